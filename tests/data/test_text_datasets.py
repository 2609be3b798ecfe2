"""The text readers on files written in the exact published formats, malformed files, downloads and the real
IU X-ray archive shipped in torchxrayvision."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedhb.data import IUXrayReports, MedicalAbstracts, PubMedRCT
from fedhb.data.text_fixtures import (
    iu_xray_report,
    write_iu_xray_fixture,
    write_medical_abstracts_fixture,
    write_pubmed_rct_fixture,
)

# -- Medical Abstracts ---------------------------------------------------------------------------------------------

MA_TRAIN = (
    "condition_label,medical_abstract\n"
    '3,"Obstructive sleep apnea in loud snorers. Eight snorers, age 39 +/- 5.3 yr, slept ""well"". "\n'
    '1,"Flow cytometric DNA analysis of parathyroid tumors.\nA second line inside the quotes. "\n'
    "\n"
    '5,"Neutrophil function after transplant. "\n'
)


def test_medical_abstracts_reads_the_published_layout_exactly(tmp_path: Path) -> None:
    (tmp_path / "medical_tc_train.csv").write_text(MA_TRAIN)
    (tmp_path / "medical_tc_test.csv").write_text('condition_label,medical_abstract\n4,"Paraneoplastic vasculitic '
                                                  'neuropathy. "\n')
    s = MedicalAbstracts(root=str(tmp_path)).load()
    assert s.inputs == [
        'Obstructive sleep apnea in loud snorers. Eight snorers, age 39 +/- 5.3 yr, slept "well".',
        "Flow cytometric DNA analysis of parathyroid tumors.\nA second line inside the quotes.",
        "Neutrophil function after transplant.",
        "Paraneoplastic vasculitic neuropathy.",
    ]
    assert s.labels.tolist() == [2, 0, 4, 3]
    assert s.source_split.tolist() == ["train", "train", "train", "test"]
    assert s.label_names[0] == "neoplasms" and s.label_names[4] == "general pathological conditions"
    assert (s.num_classes, s.task, s.modality, s.meta["dataset"]) == (5, "multi-class", "text", "medical_abstracts")
    only_test = MedicalAbstracts(root=str(tmp_path), splits=["test"]).load()
    assert only_test.inputs == ["Paraneoplastic vasculitic neuropathy."]


def test_medical_abstracts_duplicate_texts_share_a_group(tmp_path: Path) -> None:
    (tmp_path / "medical_tc_train.csv").write_text('condition_label,medical_abstract\n1,"Same text. "\n2,"Other. "\n')
    (tmp_path / "medical_tc_test.csv").write_text('condition_label,medical_abstract\n5,"Same text. "\n')
    s = MedicalAbstracts(root=str(tmp_path)).load()
    assert s.groups["abstract"].tolist() == [0, 1, 0]
    assert MedicalAbstracts.default_group_by == "abstract"


def test_medical_abstracts_fixture_round_trips(tmp_path: Path) -> None:
    write_medical_abstracts_fixture(tmp_path, (40, 12), seed=3)
    s = MedicalAbstracts(root=str(tmp_path)).load()
    assert len(s) == 52 and set(s.labels.tolist()) == {0, 1, 2, 3, 4}
    assert all('"' in t and "," in t for t in s.inputs)  # quoting and commas survived the CSV round trip


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("label,text\n1,\"x\"\n", 1, "expected the header"),
        ('condition_label,medical_abstract\n1,"ok. "\n7,"bad label. "\n', 3, "condition_label must be 1..5"),
        ('condition_label,medical_abstract\n1,"ok. "\n2,"a\nb. "\nx,"y"\n', 5, "condition_label must be 1..5"),
        ('condition_label,medical_abstract\n1,"ok. "\n2,one,two\n', 3, "expected 2 fields"),
        ('condition_label,medical_abstract\n1,"ok. "\n2,"  "\n', 3, "medical_abstract is empty"),
    ],
)
def test_medical_abstracts_malformed_file_names_file_and_line(tmp_path: Path, content: str, line: int,
                                                              what: str) -> None:
    write_medical_abstracts_fixture(tmp_path, (10, 5))
    (tmp_path / "medical_tc_test.csv").write_text(content)
    with pytest.raises(ValueError) as err:
        MedicalAbstracts(root=str(tmp_path)).load()
    message = str(err.value)
    assert f"{tmp_path / 'medical_tc_test.csv'}: line {line}:" in message and what in message


def test_medical_abstracts_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data.download true"):
        MedicalAbstracts(root=str(tmp_path)).load()
    with pytest.raises(ValueError, match="--data.splits"):
        MedicalAbstracts(splits=["dev"])
    with pytest.raises(ValueError, match="--data.fraction"):
        MedicalAbstracts(fraction=0)


def test_medical_abstracts_download_from_github(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    published = write_medical_abstracts_fixture(tmp_path / "published", (20, 5))
    urls = []

    def fake_urlretrieve(url: str, dest: Path) -> None:
        urls.append(url)
        shutil.copy(published / url.rsplit("/", 1)[-1], dest)

    monkeypatch.setattr("urllib.request.urlretrieve", fake_urlretrieve)
    s = MedicalAbstracts(root=str(tmp_path / "root"), download=True).load()
    assert len(s) == 25
    assert urls == [
        "https://raw.githubusercontent.com/sebischair/Medical-Abstracts-TC-Corpus/main/medical_tc_train.csv",
        "https://raw.githubusercontent.com/sebischair/Medical-Abstracts-TC-Corpus/main/medical_tc_test.csv",
    ]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["medical_tc_test.csv", "medical_tc_train.csv"]


def test_medical_abstracts_falls_back_to_the_hub_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(url: str, dest: Path) -> None:
        raise OSError("network unreachable")

    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"condition_label": [2, 4], "medical_abstract": ['A, "b" c. ', "D. "]}),
        "test": datasets.Dataset.from_dict({"condition_label": [1], "medical_abstract": ["E. "]}),
    })
    calls = []
    monkeypatch.setattr("urllib.request.urlretrieve", offline)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: calls.append(name) or hub)
    s = MedicalAbstracts(root=str(tmp_path), download=True).load()
    assert calls == ["TimSchopf/medical_abstracts"]
    assert s.inputs == ['A, "b" c.', "D.", "E."] and s.labels.tolist() == [1, 3, 0]
    # Written in the published layout: header, bare label, quoted abstract.
    assert (tmp_path / "medical_tc_train.csv").read_text() == ('condition_label,medical_abstract\n2,"A, ""b"" c. "\n'
                                                               '4,"D. "\n')
    assert not list(tmp_path.glob(".*part"))


# -- PubMed RCT ----------------------------------------------------------------------------------------------------

RCT_DEV = (
    "###24293578\n"
    "OBJECTIVE\tTo investigate the efficacy of @ weeks of daily low-dose oral prednisolone .\n"
    "METHODS\tA total of @ patients with primary knee OA were randomized @:@ .\n"
    "RESULTS\tPain was reduced significantly .\n"
    "CONCLUSIONS\tLow-dose oral prednisolone had a sustained effect .\n"
    "\n"
    "###24854809\n"
    "BACKGROUND\tEmotional eating is associated with overeating .\n"
    "RESULTS\tFood attention bias moderated the effect .\n"
    "\n"
)


def _rct_root(tmp_path: Path, dev: str = RCT_DEV) -> Path:
    write_pubmed_rct_fixture(tmp_path, "20k", (6, 2, 3))
    (tmp_path / "PubMed_20k_RCT" / "dev.txt").write_text(dev)
    return tmp_path


def test_pubmed_rct_reads_the_published_layout_exactly(tmp_path: Path) -> None:
    s = PubMedRCT(root=str(_rct_root(tmp_path)), splits=["dev"]).load()
    assert s.inputs[0] == "To investigate the efficacy of @ weeks of daily low-dose oral prednisolone ."
    assert s.labels.tolist() == [1, 2, 3, 4, 0, 3]
    assert s.groups["abstract"].tolist() == [0, 0, 0, 0, 1, 1]
    assert s.label_names == ["BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS"]
    assert (s.num_classes, s.task, s.meta["dataset"]) == (5, "multi-class", "pubmed_20k_rct")
    lower = PubMedRCT(root=str(tmp_path), splits=["dev"], lowercase=True).load()
    assert lower.inputs[4] == "emotional eating is associated with overeating ."
    assert PubMedRCT.default_group_by == "abstract"


def test_pubmed_rct_pools_splits_and_keeps_abstract_ids(tmp_path: Path) -> None:
    write_pubmed_rct_fixture(tmp_path, "200k", (5, 3, 4), seed=1)
    s = PubMedRCT(root=str(tmp_path), variant="200k").load()
    assert len(np.unique(s.groups["abstract"])) == 12
    assert list(dict.fromkeys(s.source_split.tolist())) == ["train", "dev", "test"]
    for g in np.unique(s.groups["abstract"]):  # an abstract's sentences are contiguous and from one split
        rows = np.flatnonzero(s.groups["abstract"] == g)
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)) and len(set(s.source_split[rows])) == 1


@pytest.mark.parametrize(
    ("dev", "line", "what"),
    [
        ("###1\nMETHODS\tok .\n\n###2\nRESULTS no tab here\n", 5, "expected LABEL<TAB>sentence"),
        ("###1\nMETHODS\tok .\nFINDINGS\tnot a label .\n", 3, "unknown label 'FINDINGS'"),
        ("METHODS\tbefore any header .\n", 1, "a sentence outside an abstract"),
        ("###1\nMETHODS\tok .\n\nRESULTS\tafter the blank line .\n", 4, "a sentence outside an abstract"),
        ("###1\nMETHODS\tok .\n\n###2\n\n###3\nMETHODS\tok .\n", 4, "abstract 2 has no sentences"),
        ("###1\nMETHODS\t   \n", 2, "empty sentence"),
        ("###\nMETHODS\tok .\n", 1, "'###' without an abstract id"),
    ],
)
def test_pubmed_rct_malformed_file_names_file_and_line(tmp_path: Path, dev: str, line: int, what: str) -> None:
    _rct_root(tmp_path, dev)
    with pytest.raises(ValueError) as err:
        PubMedRCT(root=str(tmp_path)).load()
    assert f"{tmp_path / 'PubMed_20k_RCT' / 'dev.txt'}: line {line}:" in str(err.value)
    assert what in str(err.value)


def test_pubmed_rct_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    published = write_pubmed_rct_fixture(tmp_path / "published", "20k", (4, 2, 2))
    urls = []

    def fake_urlretrieve(url: str, dest: Path) -> None:
        urls.append(url)
        shutil.copy(published / url.rsplit("/", 1)[-1], dest)

    monkeypatch.setattr("urllib.request.urlretrieve", fake_urlretrieve)
    s = PubMedRCT(root=str(tmp_path / "root"), download=True, splits=["train", "test"]).load()
    assert len(np.unique(s.groups["abstract"])) == 6
    base = "https://raw.githubusercontent.com/Franck-Dernoncourt/pubmed-rct/master/PubMed_20k_RCT/"
    assert urls == [base + "train.txt", base + "test.txt"]


def test_pubmed_200k_train_is_extracted_from_its_7z_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import py7zr

    text = "###7\nMETHODS\tWe randomized 120 patients .\n\n"

    def fake_urlretrieve(url: str, dest: Path) -> None:
        assert url.endswith("PubMed_200k_RCT/train.7z")
        (tmp_path / "train.txt").write_text(text)
        with py7zr.SevenZipFile(dest, "w") as z:
            z.write(tmp_path / "train.txt", "train.txt")

    monkeypatch.setattr("urllib.request.urlretrieve", fake_urlretrieve)
    s = PubMedRCT(root=str(tmp_path / "root"), variant="200k", download=True, splits=["train"]).load()
    assert s.inputs == ["We randomized 120 patients ."]
    assert sorted(p.name for p in (tmp_path / "root" / "PubMed_200k_RCT").iterdir()) == ["train.7z", "train.txt"]


def test_pubmed_200k_train_without_py7zr_says_how_to_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "py7zr", None)  # not installed
    monkeypatch.setattr("urllib.request.urlretrieve", lambda url, dest: Path(dest).write_bytes(b"7z archive"))
    with pytest.raises(FileNotFoundError, match=r"fedhb\[text\].*7z x .*train\.7z"):
        PubMedRCT(root=str(tmp_path), variant="200k", download=True, splits=["train"]).load()


def test_pubmed_200k_numbers_replaced_train_is_unzipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    text = "###7\nMETHODS\tWe randomized @ patients .\n\n"

    def fake_urlretrieve(url: str, dest: Path) -> None:
        assert url.endswith("PubMed_200k_RCT_numbers_replaced_with_at_sign/train.zip")
        with zipfile.ZipFile(dest, "w") as z:
            z.writestr("train.txt", text)

    monkeypatch.setattr("urllib.request.urlretrieve", fake_urlretrieve)
    s = PubMedRCT(root=str(tmp_path), variant="200k", numbers_replaced=True, download=True, splits=["train"]).load()
    assert s.inputs == ["We randomized @ patients ."] and s.meta["dataset"] == "pubmed_200k_rct_at"


def test_pubmed_rct_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pubmed-rct"):
        PubMedRCT(root=str(tmp_path)).load()
    with pytest.raises(ValueError, match="--data.variant"):
        PubMedRCT(variant="2k")  # type: ignore[arg-type]


# -- IU X-ray reports ----------------------------------------------------------------------------------------------

def _tgz(path: Path, members: dict[str, str]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return path


def test_iu_xray_text_and_label_from_the_xml(tmp_path: Path) -> None:
    archive = _tgz(tmp_path / "NLMCXR_reports.tgz", {
        "ecgen-radiology/2.xml": iu_xray_report(2, "Heart  size is\n normal.", "No acute disease.", ["normal"]),
        "ecgen-radiology/10.xml": iu_xray_report(10, "Mild cardiomegaly.", "Cardiomegaly.",
                                                 ["Cardiomegaly/mild", "Spine/degenerative"]),
        "ecgen-radiology/11.xml": iu_xray_report(11, "", "Stable granuloma.", ["Granuloma/lung"]),
        "ecgen-radiology/12.xml": iu_xray_report(12, "", "", ["normal"]),
    })
    s = IUXrayReports(path=str(archive)).load()
    assert s.inputs == ["Heart size is normal. No acute disease.", "Mild cardiomegaly. Cardiomegaly.",
                        "Stable granuloma."]
    assert s.labels.tolist() == [0, 1, 1] and s.label_names == ["normal", "abnormal"]
    assert (s.task, s.num_classes, s.meta["skipped_reports"]) == ("binary", 2, 1)
    assert s.groups["study"].tolist() == [0, 1, 2]
    impression_first = IUXrayReports(path=str(archive), sections=["impression", "findings"]).load()
    assert impression_first.inputs[1] == "Cardiomegaly. Mild cardiomegaly."


def test_iu_xray_malformed_report_names_archive_member_and_line(tmp_path: Path) -> None:
    good = iu_xray_report(1, "Clear lungs.", "Normal.", ["normal"])
    broken = good.replace("</Abstract>", "</Abstrac>")
    line = broken[:broken.index("</Abstrac>")].count("\n") + 1
    archive = _tgz(tmp_path / "r.tgz", {"ecgen-radiology/1.xml": good, "ecgen-radiology/2.xml": broken})
    with pytest.raises(ValueError, match=rf"r\.tgz:ecgen-radiology/2\.xml: line {line}, column \d+: not well-formed"):
        IUXrayReports(path=str(archive)).load()
    no_mesh = good.replace("<major>normal</major>", "")
    archive = _tgz(tmp_path / "m.tgz", {"ecgen-radiology/3.xml": no_mesh})
    with pytest.raises(ValueError, match=r"m\.tgz:ecgen-radiology/3\.xml: no <MeSH><major>"):
        IUXrayReports(path=str(archive)).load()
    (tmp_path / "junk.tgz").write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match=r"junk\.tgz: not a readable tar archive"):
        IUXrayReports(path=str(tmp_path / "junk.tgz")).load()
    with pytest.raises(FileNotFoundError, match="--data.path"):
        IUXrayReports(path=str(tmp_path / "absent.tgz")).load()
    with pytest.raises(ValueError, match="--data.sections"):
        IUXrayReports(sections=["summary"])


def test_iu_xray_fixture_round_trips(tmp_path: Path) -> None:
    s = IUXrayReports(path=str(write_iu_xray_fixture(tmp_path / "r.tgz", reports=60, empty=3))).load()
    assert len(s) == 60 and s.meta["skipped_reports"] == 3 and 0 < s.labels.mean() < 1


def test_iu_xray_reads_the_real_archive_in_torchxrayvision_without_importing_it() -> None:
    loaded_before = "torchxrayvision" in sys.modules
    s = IUXrayReports().load()
    # The published collection: 3,955 reports, 1,391 normal; 28 (all normal) have neither findings nor impression.
    assert len(s) == 3955 - 28 and s.meta["skipped_reports"] == 28
    assert int((s.labels == 0).sum()) == 1391 - 28
    assert len(np.unique(s.groups["study"])) == len(s)
    assert loaded_before or "torchxrayvision" not in sys.modules
