"""IU X-ray images joined to the real Indiana reports (torchxrayvision's copies) by the ids each report lists."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedhb.data.image_cache import decode_image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None,
                                reason="reads the reports and metadata inside torchxrayvision")


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedhb.data.fixtures_mimic import write_iu_xray_png_fixture

    return write_iu_xray_png_fixture(tmp_path_factory.mktemp("iu") / "NLMCXR_png", studies=30)


@pytest.fixture(scope="module")
def frontal(png_folder: Path) -> dict[str, list[tuple[str, str]]]:
    return reference(png_folder)


def reference(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """``{report id: [(image id, view)]}`` of the frontal (PA, AP) images on disk, re-read with regular expressions
    from the packaged archive and the csv module from the packaged metadata."""
    from fedhb.data.iu_xray import METADATA, packaged_archive

    with gzip.open(packaged_archive(METADATA), "rt", newline="") as handle:
        views = {row["imageid"]: row["View Position"] for row in csv.DictReader(handle)}
    out = {}
    with tarfile.open(packaged_archive()) as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            xml = archive.extractfile(member).read().decode()
            report = re.search(r'<uId id="([^"]+)"', xml).group(1)
            ids = re.findall(r'<parentImage id="([^"]+)"', xml)
            out[report] = [(i, views.get(i, "")) for i in ids if views.get(i) in ("PA", "AP")
                           and (folder / f"{i}.png").is_file()]
    return out


def test_each_report_gets_its_first_frontal_image_and_reports_without_one_keep_their_text(png_folder, frontal):
    from fedhb.data import IUXray
    from fedhb.data.iu_xray import packaged_archive, read_iu_xray_reports

    samples = IUXray(images=str(png_folder), image_size=16).load()
    with_text, texts, labels, _ = read_iu_xray_reports(packaged_archive(), ["findings", "impression"])
    cached = np.asarray(samples.inputs["image"])

    # the reports with text, as the text dataset reads them (no report here lacks text but has a frontal image)
    assert samples.modalities == ("image", "text") and len(samples) == len(with_text)
    assert samples.inputs["text"] == texts and samples.labels.tolist() == labels.tolist()
    assert samples.task == "binary" and samples.label_names == ["normal", "abnormal"]
    expected_image = [bool(frontal[r]) for r in with_text]
    assert samples.present["image"].tolist() == expected_image and 10 < sum(expected_image) < 30
    for i, report in enumerate(with_text):
        if frontal[report]:
            first = min(frontal[report], key=lambda iv: iv[1] != "PA")  # PA first, then the report's order
            np.testing.assert_array_equal(cached[i], decode_image(png_folder / f"{first[0]}.png", 16))
        else:
            assert not cached[i].any()


def test_every_frontal_image_and_the_image_alone(png_folder, frontal):
    from fedhb.data import IUXray

    every = IUXray(images=str(png_folder), image_size=16, per_study=False, modalities=["image"]).load()

    assert every.modalities == ("image",) and every.present["image"].all()
    assert len(every) == sum(len(v) for v in frontal.values())
    patients = every.groups["patient"]
    assert len(np.unique(patients)) == sum(bool(v) for v in frontal.values())  # a report's images grouped


def test_blank_dicom_views_filled_from_the_tsne_views(png_folder):
    from fedhb.data import IUXray
    from fedhb.data.iu_xray import METADATA, TSNE, packaged_archive

    with gzip.open(packaged_archive(METADATA), "rt", newline="") as handle:
        dicom = {row["imageid"]: row["View Position"] for row in csv.DictReader(handle)}
    with gzip.open(packaged_archive(TSNE), "rt", newline="") as handle:
        tsne = {row["imageid"]: row["tsne-view"] for row in csv.DictReader(handle)}
    on_disk = [p.stem for p in png_folder.glob("*.png")]
    filled = sum(dicom.get(i) in ("PA", "AP") or (not dicom.get(i) and tsne.get(i) == "PA") for i in on_disk)
    only_tsne = sum(tsne.get(i) == "PA" for i in on_disk)

    every = IUXray(images=str(png_folder), per_study=False, modalities=["image"], view_source="dicom_or_tsne").load()
    tsne_only = IUXray(images=str(png_folder), per_study=False, modalities=["image"], view_source="tsne").load()

    assert len(every) == filled > sum(dicom.get(i) in ("PA", "AP") for i in on_disk)
    assert len(tsne_only) == only_tsne
    with pytest.raises(ValueError, match="--data.view_source"):
        IUXray(images=str(png_folder), view_source="guess")


def test_a_truncated_png_a_missing_folder_and_a_bad_metadata_file_are_named(png_folder, frontal, tmp_path):
    import shutil

    from fedhb.data import IUXray

    folder = tmp_path / "NLMCXR_png"
    shutil.copytree(png_folder, folder)
    first = next(min(v, key=lambda iv: iv[1] != "PA")[0] for v in frontal.values() if v)  # a chosen image
    victim = folder / f"{first}.png"
    victim.write_bytes(victim.read_bytes()[:60])
    samples = IUXray(images=str(folder), image_size=16, cache_dir=str(tmp_path / "cache")).load()
    with pytest.raises(ValueError, match=f"{victim.name}: not a readable image"):
        np.asarray(samples.inputs["image"])
    with pytest.raises(FileNotFoundError, match="--data.images .*no-such: no such folder"):
        IUXray(images=str(tmp_path / "no-such")).load()
    bad = tmp_path / "meta.csv"
    bad.write_text("imageid,View\nCXR1_1_IM-0001-3001,PA\n")
    with pytest.raises(ValueError, match=r"meta.csv: line 1: missing columns \['View Position'\]"):
        IUXray(images=str(folder), metadata=str(bad)).load()
    with pytest.raises(ValueError, match="--data.images"):
        IUXray()
