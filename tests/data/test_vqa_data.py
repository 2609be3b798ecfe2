"""PathVQA and EHRXQA read fixtures in their published layouts and name the file that is malformed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedhb.config import ModelArgs
from fedhb.data import EHRXQA, PathVQA
from fedhb.data.fixtures_vqa import OPEN_ANSWERS, write_ehrxqa_fixture, write_pathvqa_fixture
from fedhb.fast_dev_run import dev_model


@pytest.fixture(scope="module")
def pathvqa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pathvqa_fixture(tmp_path_factory.mktemp("pathvqa"), images=(4, 2, 2), questions=4)


@pytest.fixture(scope="module")
def ehrxqa_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_ehrxqa_fixture(tmp_path_factory.mktemp("ehrxqa"), patients=4, studies=2)


def test_pathvqa_reads_the_parquet_release_keeping_each_image_once(pathvqa_root):
    files = sorted(p.name for p in (pathvqa_root / "data").iterdir())
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet",
                     "validation-00000-of-00001.parquet"]
    yes_no = PathVQA(str(pathvqa_root)).load()
    # 8 images x 2 yes/no questions; odd images (square on the right) answer yes
    assert len(yes_no) == 16 and yes_no.task == "vqa" and yes_no.meta["vqa_mode"] == "classify"
    assert yes_no.inputs.answers[:4] == ["no", "no", "yes", "yes"] and yes_no.labels[:4].tolist() == [0, 0, 1, 1]
    assert yes_no.label_names == ["no", "yes"] and len(yes_no.inputs.sources) == 8
    assert yes_no.groups["image"].tolist() == [i // 2 for i in range(16)]  # an image's questions stay together
    assert list(np.unique(yes_no.source_split)) == ["test", "train", "validation"]
    assert dev_model(ModelArgs(backbone="Salesforce/blip-vqa-base"), yes_no).backbone == "tiny-blip"

    every = PathVQA(str(pathvqa_root), subset="all").load()
    assert len(every) == 32 and every.meta["vqa_mode"] == "generate" and set(every.inputs.answers) - {"yes", "no"} \
        <= set(OPEN_ANSWERS)
    assert every.labels.tolist() == [0, 1] * 16  # generate: yes/no or open question, to stratify on
    opened = PathVQA(str(pathvqa_root), subset="open").load()
    assert len(opened) == 16 and not {"yes", "no"} & set(opened.inputs.answers)

    kept = every.subset(np.array([5, 1, 30]))  # selects questions without decoding any image
    pixels, index = kept.inputs.pixels(24)
    assert pixels.shape == (3, 3, 24, 24) and pixels.dtype == np.uint8 and index.tolist() == [1, 0, 2]  # images 0, 1, 7
    assert kept.inputs.questions[0] == "what does this image show?"
    # the bright square is on the right in odd images (their yes/no answer is yes), on the left in even ones
    assert pixels[1][:, 6:18, 12:].mean() > 150 > pixels[1][:, 6:18, :12].mean()
    assert pixels[0][:, 6:18, :12].mean() > 150 > pixels[0][:, 6:18, 12:].mean()


def test_pathvqa_rejects_a_parquet_without_answers_and_bad_options_naming_them(tmp_path, pathvqa_root):
    broken = write_pathvqa_fixture(tmp_path / "broken", images=(2, 1, 1), questions=2, drop_column="answer")
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet: no 'answer' column"):
        PathVQA(str(broken)).load()
    with pytest.raises(FileNotFoundError, match="no data/"):
        PathVQA(str(tmp_path)).load()
    with pytest.raises(ValueError, match="--data.mode classify answers yes/no questions only"):
        PathVQA(str(pathvqa_root), subset="open", mode="classify")
    with pytest.raises(ValueError, match="--data.subset"):
        PathVQA(str(pathvqa_root), subset="closed")
    (tmp_path / "bad" / "data").mkdir(parents=True)
    (tmp_path / "bad" / "data" / "test-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet: not a readable parquet file"):
        PathVQA(str(tmp_path / "bad")).load()


def test_ehrxqa_reads_image_questions_their_mimic_cxr_images_and_patients(ehrxqa_root, tmp_path):
    release, images = ehrxqa_root
    study = EHRXQA(str(release), str(images), cache_dir=str(tmp_path / "cache")).load()
    # 4 patients x 2 studies x (a yes/no and an open image question); table and impossible questions left out
    assert len(study) == 16 and study.meta["vqa_mode"] == "generate"
    assert study.inputs.questions[0] == "given the 50000000 study, is the bright region on the right?"
    assert study.inputs.answers[:4] == ["no", "left lung", "yes", "right lung, left lung"]
    assert study.groups["patient"].tolist() == [i // 4 for i in range(16)]
    assert dict(zip(*np.unique(study.source_split, return_counts=True))) == {"test": 4, "train": 8, "valid": 4}
    first = study.inputs.sources[study.inputs.image_index[0]]
    assert first.relative_to(images).parts[:4] == ("files", "p10", "p10000000", "s50000000")
    pixels, index = study.inputs.pixels(16)  # decoded once into the image cache, memory-mapped from it
    assert isinstance(pixels, np.memmap) and pixels.shape == (8, 3, 16, 16) and len(list((tmp_path / "cache").glob(
        "ehrxqa-16px-3c-*.npy"))) == 1
    assert index.tolist() == [i // 2 for i in range(16)]
    right = pixels[1][:, 4:12, 8:].mean() > pixels[1][:, 4:12, :8].mean()  # patient 0, study 1: the answer is yes
    assert right and study.inputs.answers[2] == "yes"

    every = EHRXQA(str(release), str(images), questions="all", ehr_tables=["admissions"],
                   cache_dir=str(tmp_path / "cache")).load()
    assert len(every) == 24 and every.inputs.answers[2] == "1"  # the table question, with a blank image
    assert every.inputs.image_index[2] == 0 and every.inputs.sources[0] is None
    blank, rows = every.subset(np.array([2, 3])).inputs.pixels(16)
    assert rows.tolist() == [0, 1] and not blank[0].any() and blank[1].any()  # no study: a black image
    assert every.inputs.questions[2] == ("how many times did patient 10000000 get admitted to the hospital? context: "
                                         "admissions: hadm_id 20000000 admittime 2105-01-01 10:00:00 "
                                         "admission_type ew emer.")
    yes_no = EHRXQA(str(release), str(images), subset="yes_no").load()
    # yes when patient + study is odd
    assert yes_no.meta["vqa_mode"] == "classify" and yes_no.labels.tolist() == [0, 1, 1, 0] * 2


def test_ehrxqa_names_the_malformed_file(tmp_path):
    release, images = write_ehrxqa_fixture(tmp_path / "ok", patients=3, studies=1)
    items = json.loads((release / "dataset" / "train.json").read_text())
    del items[1]["answer"]
    (release / "dataset" / "train.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"train\.json: question 1 has no answer \(the pre-release"):
        EHRXQA(str(release), str(images)).load()
    del items[1]
    (release / "dataset" / "train.json").write_text(json.dumps(items))
    lost = next((images / "files").rglob("*.jpg"))
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=lost.name):
        EHRXQA(str(release), str(images)).load()
    table = release / "database" / "mimic_iv_cxr" / "train" / "tb_cxr.csv"
    table.write_text(table.read_text().replace("image_id", "dicom_id"))
    with pytest.raises(ValueError, match=r"tb_cxr\.csv: no image_id column"):
        EHRXQA(str(release), str(images)).load()
    with pytest.raises(FileNotFoundError, match="--data.images"):
        EHRXQA(str(release), str(tmp_path)).load()
