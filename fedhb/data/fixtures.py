"""Small, learnable files in the exact official formats, for tests and for trying fedhb without the real data.

``python -m fedhb.data.fixtures --flag organamnist --root data/fixture`` writes ``data/fixture/organamnist.npz``;
``--size 224`` writes ``organamnist_224.npz``, the file ``--data.size 224`` reads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from fedhb.data.medmnist import SIZES, SPLITS, medmnist_filename, medmnist_info


def class_images(num_classes: int, n: int, size: int, channels: int, rng: np.random.Generator,
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is visible: a fixed random template per class (the same in every file) plus noise.

    Templates are drawn at 7x7 and upscaled, so the class shows at any image size and in every patch.
    """
    if labels is None:
        labels = rng.integers(0, num_classes, n)
    coarse = np.stack([np.random.default_rng(1000 + c).random((7, 7)) for c in range(num_classes)])
    reps = -(-size // 7)
    templates = np.kron(coarse, np.ones((reps, reps)))[:, :size, :size]
    noise = rng.normal(0, 0.25, (n, size, size))
    images = np.clip((0.15 + 0.7 * templates[labels] + noise) * 255, 0, 255).astype(np.uint8)
    if channels == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    return images, labels


def write_medmnist_fixture(
    root: str | Path,
    flag: str = "organamnist",
    size: int = 28,
    samples: tuple[int, int, int] = (600, 100, 300),
    seed: int = 0,
) -> Path:
    """Write ``{root}/{flag}[_{size}].npz`` with the official keys, dtypes and shapes and a learnable signal.

    Args:
        root: Folder to write into.
        flag: MedMNIST flag; its channel count, class count and task come from ``medmnist.INFO``.
        size: Image size (28, 64, 128 or 224).
        samples: Samples in the train, val and test splits.
        seed: Seed of the generator.

    Returns:
        The path written.
    """
    info = medmnist_info(flag)
    num_classes = len(info["label"])
    channels = info["n_channels"]
    multi_label = info["task"].startswith("multi-label")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(SPLITS, samples):
        images, labels = class_images(num_classes, n, size, channels, rng)
        if multi_label:
            multi = np.zeros((n, num_classes), dtype=np.uint8)
            multi[np.arange(n), labels] = 1
            arrays[f"{split}_labels"] = multi
        else:
            arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
        arrays[f"{split}_images"] = images
    path = Path(root) / medmnist_filename(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flag", default="organamnist")
    parser.add_argument("--root", default="data/fixture")
    parser.add_argument("--size", type=int, default=28, choices=SIZES,
                        help="image size; 64, 128 and 224 write {flag}_{size}.npz, as --data.size reads them")
    parser.add_argument("--samples", type=int, nargs=3, default=(600, 100, 300))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_medmnist_fixture(args.root, args.flag, args.size, tuple(args.samples), args.seed))


if __name__ == "__main__":
    main()
