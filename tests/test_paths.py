"""``--out_dir`` checks: a path that cannot become the run folder is refused up front, naming the file."""

from __future__ import annotations

import pytest

from fedhb.paths import check_out_dir


def test_an_out_dir_that_is_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "results").write_text("an old export")

    with pytest.raises(FileExistsError, match=rf"^--out_dir {tmp_path}/results is a file, not a folder: "):
        check_out_dir(tmp_path / "results")


def test_an_out_dir_below_a_file_names_the_file(tmp_path):
    (tmp_path / "results").write_text("an old export")

    with pytest.raises(FileExistsError) as err:
        check_out_dir(str(tmp_path / "results" / "epfl" / "seed0"))

    assert str(err.value).startswith(f"--out_dir {tmp_path}/results/epfl/seed0: {tmp_path}/results is a file")


@pytest.mark.parametrize("name", ["new/deeper/run", "existing"])
def test_a_new_or_existing_folder_is_fine(tmp_path, name):
    (tmp_path / "existing").mkdir()

    check_out_dir(tmp_path / name)

    assert not (tmp_path / "new").exists()  # checking makes nothing
