"""A small BraTS 2023 GLI fixture in the released layout (``BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1c,t1n,t2f,
t2w,seg}.nii.gz``, int16 images and a uint8 seg on a 1 mm grid), learnable: each case is an ellipsoid "brain" with a
spherical tumour (enhancing rim, necrotic core, surrounding edema) whose labels each sequence shows differently, as
in real scans (ET bright on T1c, edema bright on T2-FLAIR, the core dark on T1n)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedhb.data.brats import SEQUENCES


def case_id(k: int, timepoint: int = 0) -> str:
    return f"BraTS-GLI-{k:05d}-{timepoint:03d}"


def brats_case(size: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case: ``({sequence: int16 (size,)*3}, uint8 labels)``."""
    grid = np.stack(np.meshgrid(*(np.arange(size, dtype=np.float64),) * 3, indexing="ij"))
    centre = np.full(3, (size - 1) / 2)
    brain = (((grid - centre[:, None, None, None]) / (0.42 * size)) ** 2).sum(0) <= 1
    radius = rng.uniform(0.12, 0.25) * size
    offset = rng.uniform(-0.12, 0.12, 3) * size
    r = np.sqrt(((grid - (centre + offset)[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros((size,) * 3, dtype=np.uint8)
    labels[(r <= radius * 1.6) & brain] = 2  # edema
    labels[r <= radius] = 3  # enhancing rim
    labels[r <= radius * 0.55] = 1  # necrotic core
    base = {"t1c": 300.0, "t1n": 350.0, "t2f": 250.0, "t2w": 280.0}
    boost = {"t1c": {3: 500.0, 1: -100.0}, "t1n": {1: -200.0, 3: -50.0}, "t2f": {2: 450.0, 3: 150.0},
             "t2w": {2: 300.0, 1: 400.0}}
    images = {}
    for seq in SEQUENCES:
        value = np.where(brain, base[seq], 0.0) + rng.normal(0, 20, labels.shape) * brain
        for label, delta in boost[seq].items():
            value[labels == label] += delta
        images[seq] = np.clip(value, 0, 32767).astype(np.int16)
    return images, labels


def write_brats_fixture(root: str | Path, cases: int = 6, size: int = 32, seed: int = 0,
                        missing: Mapping[int, Sequence[str]] | None = None, sites: int = 0,
                        timepoints: Sequence[int] = ()) -> Path:
    """Write ``cases`` cases under ``root`` (``missing``: case number -> sequences whose file is left out;
    ``sites``: also write ``sites.csv`` dealing the cases over that many institutions; ``timepoints``: case numbers
    that get a second scan ``-001`` of the same patient). Returns ``root``."""
    import nibabel as nib

    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    written = []
    for k in range(cases):
        for t in (0, 1) if k in timepoints else (0,):
            name = case_id(k, t)
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            images, labels = brats_case(size, rng)
            for seq, image in images.items():
                if seq in (missing or {}).get(k, ()):
                    continue
                nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}-{seq}.nii.gz"))
            nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{name}-seg.nii.gz"))
            written.append((name, k))
    if sites:
        with (root / "sites.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "site"])
            for name, k in written:  # by patient: a patient's scans share a site
                w.writerow([name, f"site{k % sites}"])
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedhb.data.fixtures_brats --root DIR [--cases N --size S]``: write the fixture."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--sites", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_brats_fixture(args.root, cases=args.cases, size=args.size, sites=args.sites))


if __name__ == "__main__":
    main()
