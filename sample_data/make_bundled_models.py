"""Train the bundled example models of the other uncertainty methods (no download).

Writes, from ``sample_data/digits/train`` (made by ``make_sample_data.py``) with fixed seeds and
the recipe of the bundled demo model (64x64 grayscale, 40 epochs, 10% validation split):

* ``batchuq/data/digits_ensemble/``: a 5-member deep ensemble of the reference CNN
  (``member-0.keras`` ... with seeds 1-5, and ``ensemble.json``), what
  ``batchuq train ... --members 5`` writes;
* ``batchuq/data/digits_sngp.keras``: an SNGP model (the reference CNN's backbone, spectrally
  normalised and residual, with a random-feature Gaussian-process head), what
  ``batchuq train ... --method sngp`` writes, trained longer and with a smaller learning rate.

Run from the repository root: ``python sample_data/make_bundled_models.py [--only ensemble|sngp]``.
Training takes some minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = Path("sample_data/digits/train")  # relative: recorded as it is in the sidecars
DATA = Path("batchuq/data")
RECIPE = {"epochs": 40, "image_size": (64, 64), "channels": 1, "val_split": 0.1}


def make_ensemble() -> None:
    """The 5-member ensemble, seeds 1-5 (the demo model itself was trained with seed 0)."""
    from batchuq.jobs.train import TrainOptions, train_ensemble

    folder = DATA / "digits_ensemble"
    shutil.rmtree(folder, ignore_errors=True)
    train_ensemble(TRAIN, folder, 5, TrainOptions(seed=1, verbose=0, **RECIPE))


def make_sngp() -> None:
    """The SNGP model (``batchuq.sngp.sngp_cnn``: the reference CNN's backbone, spectrally
    normalised and residual), with 128 random features instead of the default 1024 (the GP
    precision matrix and the feature kernel are saved in the file), 150 epochs and a learning
    rate of 3e-4: with every branch bounded the network learns more slowly than the reference
    CNN, and Adam at 1e-3 fights the per-step rescaling of the kernels (one 20-epoch run each:
    89% validation accuracy at 3e-4, 85% at 1e-3)."""
    from batchuq.jobs.train import TrainOptions, train_directory

    train_directory(
        TRAIN,
        DATA / "digits_sngp.keras",
        TrainOptions(
            method="sngp",
            num_inducing=128,
            seed=0,
            verbose=0,
            learning_rate=3e-4,
            **{**RECIPE, "epochs": 150},
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ensemble", "sngp"], default=None)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.only in (None, "ensemble"):
        make_ensemble()
    if args.only in (None, "sngp"):
        make_sngp()
    for path in sorted(DATA.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>9}  {path}")


if __name__ == "__main__":
    main()
