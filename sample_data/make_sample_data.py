"""Make batchuq's bundled sample data from scikit-learn's handwritten digits (no download).

Writes, with a fixed seed:

* ``sample_data/digits/{train,val,test}/n0..n9/*.png``: a stratified 60/15/25 split of the 1,797
  8x8 digits, upscaled to 32x32 grayscale PNGs (the bundled model's input is 64x64, so scoring
  always resizes);
* ``sample_data/ood/*.jpg``: 40 out-of-domain RGB crops of the two photos that ship with
  scikit-learn (a temple in China and a flower).

Run from the repository root: ``python sample_data/make_sample_data.py``. Then train the bundled
model with the command in docs/getting-started.md ("Bundled sample data and model").
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

ROOT = Path(__file__).resolve().parent
SEED = 20261122
STORED_SIZE = 32
SPLITS = {"train": 0.60, "val": 0.15, "test": 0.25}


def write_digits() -> dict[str, int]:
    digits = load_digits()
    rng = np.random.default_rng(SEED)
    counts = dict.fromkeys(SPLITS, 0)
    out = ROOT / "digits"
    shutil.rmtree(out, ignore_errors=True)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == digit))
        n_train = int(round(len(members) * SPLITS["train"]))
        n_val = int(round(len(members) * SPLITS["val"]))
        parts = {
            "train": members[:n_train],
            "val": members[n_train : n_train + n_val],
            "test": members[n_train + n_val :],
        }
        for split, indices in parts.items():
            folder = out / split / f"n{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize(
                    (STORED_SIZE, STORED_SIZE), Image.Resampling.BILINEAR
                )
                image.save(folder / f"digit_{index:04d}.png", optimize=True)
                counts[split] += 1
    return counts


def write_ood(count: int = 40) -> int:
    out = ROOT / "ood"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(SEED + 1)
    photos = load_sample_images().images
    for i in range(count):
        photo = photos[i % len(photos)]
        size = int(rng.integers(48, 200))
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        crop = Image.fromarray(photo[top : top + size, left : left + size])
        crop.resize((STORED_SIZE, STORED_SIZE), Image.Resampling.BILINEAR).save(
            out / f"photo_crop_{i:02d}.jpg", quality=90
        )
    return count


if __name__ == "__main__":
    print("digits:", write_digits())
    print("ood:", write_ood())
