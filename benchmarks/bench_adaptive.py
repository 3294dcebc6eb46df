"""Benchmark ``--passes auto`` against fixed T = 100, in one run, on two models.

1. The bundled test set (450 digits, the bundled demo CNN, 64x64 grayscale), with the median
   rule (the default) and, for the record, the confidence rule (a mean-based rule, whose
   empirical-Bernstein test needs far more samples).
2. The 128x128x3 reference CNN of ``bench_mc.py`` (``batchuq.jobs.train.reference_cnn``) on
   ``bench_mc.py``'s smooth-noise JPEGs, *trained* so that its decisions mean something: an
   image's class is which of 5 vertical bands was brightened (the noise makes some images
   genuinely ambiguous). Training images and test images are disjoint draws.

3. ``--passes auto`` against a fixed run *at its mean passes*: the bundled test set copied 8
   times (3,600 images, other names so other keys), auto, fixed T=100 and fixed
   T=round(auto's mean passes), alternately; the ratio auto / fixed-at-mean images/s is what the
   rounds cost beyond their passes (1.0: nothing; the goal is at least 0.85). The load average
   before and after is recorded: the machine may be shared.

For 1 and 2, in one process: a warm-up call of each mode (loading, tracing, XLA and oneDNN
compiling their shapes), then fixed T=100 and ``--passes auto`` alternately, ``--repeats`` times,
keeping each mode's fastest wall time (end to end: ``score_directory`` from files to Parquet).
Reported: images/s of each, the speed-up, mean and largest passes, the share of identical
decisions, the worst-case image (most passes), and the cold (first-call) times.

``--memory`` also runs ``memory_flat.py``'s peak-RSS measurement with ``--passes auto`` on
2,000 and 20,000 images, first, while this process is still small: a child's ``ru_maxrss``
starts from its parent's peak on Linux, so measured after the training it would show that.
``--memory-only`` runs just that and updates the ``memory`` entry of the existing results;
``--ratio-only`` runs just 3 and updates the ``pooled`` entry.

Writes ``benchmarks/results/adaptive.json`` (the docs' results page reads it).

    python benchmarks/bench_adaptive.py              # ~10 min on 2 cores (training ~3 min)
    python benchmarks/bench_adaptive.py --memory     # + ~2 min
    python benchmarks/bench_adaptive.py --memory-only
    python benchmarks/bench_adaptive.py --ratio-only   # ~5 min on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_mc  # noqa: E402
import common  # noqa: E402 (the CPU, versions and date of a result)

TEST = common.REPO / "sample_data" / "digits" / "test"
RESULTS_JSON = HERE / "results" / "adaptive.json"
BANDS = 5
BRIGHTER = 30.0  # grey levels added to the class's band


def write_band_images(folder: Path, count: int, seed: int) -> None:
    """``count`` of bench_mc's smooth-noise JPEGs, one of 5 vertical bands brightened by 30.

    The class is the brightened band, drawn at random; the noise underneath makes some images
    look as if another band were the bright one, so a trained model is sure of most images and
    unsure of a few, as on real data.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    flat = folder / "_flat"
    for path in bench_mc.write_images(flat, count, seed):
        pixels = np.asarray(Image.open(path), np.float32)
        label = int(rng.integers(BANDS))
        bounds = np.linspace(0, pixels.shape[1], BANDS + 1).astype(int)
        pixels[:, bounds[label] : bounds[label + 1]] += BRIGHTER
        target = folder / f"band{label}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=90)
        path.unlink()
    flat.rmdir()


def train_reference(work: Path, epochs: int) -> Path:
    """The reference CNN at 128x128x3 trained on 1,500 band images; returns the model path."""
    from batchuq.jobs.train import TrainOptions, train_directory

    train = work / "train"
    write_band_images(train, 1500, seed=101)
    model = work / "reference.keras"
    options = TrainOptions(
        epochs=epochs, image_size=(128, 128), channels=3, augment=False, verbose=0
    )
    report = train_directory(train, model, options)
    print(f"  trained: validation accuracy {report.val_accuracy:.3f}", flush=True)
    return model


def compare(images: Path, work: Path, name: str, repeats: int, **options) -> dict:
    """Fixed T=100 and ``--passes auto`` on ``images``: speed, passes, decisions."""
    import pandas as pd

    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    fixed_out, auto_out = work / f"{name}-fixed.parquet", work / f"{name}-auto.parquet"
    cold = {}
    for mode, out in (("fixed", fixed_out), ("auto", auto_out)):
        started = time.perf_counter()
        score_directory(
            images, out, ScoreOptions(passes=100 if mode == "fixed" else "auto", **options)
        )
        cold[mode] = round(time.perf_counter() - started, 2)
    best = {"fixed": float("inf"), "auto": float("inf")}
    for _ in range(repeats):
        for mode, out in (("fixed", fixed_out), ("auto", auto_out)):
            started = time.perf_counter()
            report = score_directory(
                images, out, ScoreOptions(passes=100 if mode == "fixed" else "auto", **options)
            )
            best[mode] = min(best[mode], time.perf_counter() - started)
    fixed, auto = pd.read_parquet(fixed_out), pd.read_parquet(auto_out)
    same = fixed.decision == auto.decision
    worst = auto.passes.idxmax()
    result = {
        "images": report.images,
        "fixed_seconds": round(best["fixed"], 2),
        "auto_seconds": round(best["auto"], 2),
        "fixed_images_per_second": round(report.images / best["fixed"], 1),
        "auto_images_per_second": round(report.images / best["auto"], 1),
        "speedup": round(best["fixed"] / best["auto"], 2),
        "cold_seconds": cold,
        "mean_passes": round(float(auto.passes.mean()), 1),
        "median_passes": float(auto.passes.median()),
        "share_at_min_passes": round(float((auto.passes == auto.passes.min()).mean()), 3),
        "share_at_max_passes": round(float((auto.passes == 100).mean()), 3),
        "same_decisions": int(same.sum()),
        "same_decisions_share": round(float(same.mean()), 4),
        "differing": [
            {"path": p, "fixed": f, "auto": a, "passes": int(n)}
            for p, f, a, n in zip(
                fixed.path[~same],
                fixed.decision[~same],
                auto.decision[~same],
                auto.passes[~same],
                strict=True,
            )
        ][:10],
        "worst": {
            "path": auto.path[worst],
            "passes": int(auto.passes[worst]),
            "decision": auto.decision[worst],
            "fixed_decision": fixed.decision[worst],
        },
        "fixed_unclassified": int((fixed.decision == "unclassified").sum()),
        "auto_unclassified": int((auto.decision == "unclassified").sum()),
        "accuracy_fixed": _accuracy(fixed),
        "accuracy_auto": _accuracy(auto),
    }
    print(f"  {name}: {json.dumps({k: result[k] for k in list(result)[:12]})}", flush=True)
    return result


def _accuracy(frame) -> float | None:
    labelled = frame[frame.label.notna()]
    return round(float((labelled.pred == labelled.label).mean()), 4) if len(labelled) else None


def copy_test_set(folder: Path, copies: int) -> Path:
    """The bundled test set ``copies`` times over, each copy's files renamed (``rI_NAME``)."""
    for source in sorted(TEST.glob("*/*.png")):
        target = folder / source.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for i in range(copies):
            (target / f"r{i}_{source.name}").write_bytes(source.read_bytes())
    return folder


def pooled_ratio(work: Path, repeats: int) -> dict:
    """``--passes auto`` against fixed T=100 and fixed T=round(auto's mean passes), 3,600 images.

    Auto and fixed-at-mean each get a warm-up call, then run alternately ``repeats`` times,
    each keeping its fastest end-to-end wall time (the ratio's two sides see the same load);
    fixed T=100 runs twice, the first call also compiling its shapes, and keeps the faster.
    """
    import pandas as pd

    from batchuq import score_directory
    from batchuq.jobs.score import ScoreOptions

    images = copy_test_set(work / "digits3600", 8)
    out = work / "pooled-auto.parquet"
    load_before = os.getloadavg()
    score_directory(images, out, ScoreOptions(passes="auto", seed=1))  # warm-up
    auto = pd.read_parquet(out)
    at_mean = int(round(float(auto.passes.mean())))
    modes = {"auto": "auto", "fixed_at_mean": at_mean, "fixed_100": 100}

    def timed(mode: str) -> float:
        options = ScoreOptions(passes=modes[mode], seed=1)
        started = time.perf_counter()
        score_directory(images, work / f"pooled-{mode}.parquet", options)
        return time.perf_counter() - started

    timed("fixed_at_mean")  # warm-up
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(repeats):
        for mode in ("auto", "fixed_at_mean"):
            best[mode] = min(best[mode], timed(mode))
    best["fixed_100"] = min(timed("fixed_100"), timed("fixed_100"))
    fixed = pd.read_parquet(work / "pooled-fixed_100.parquet")
    count = len(auto)
    per_second = {mode: round(count / seconds, 1) for mode, seconds in best.items()}
    result = {
        "images": count,
        "mean_passes": round(float(auto.passes.mean()), 2),
        "fixed_at_mean_passes": at_mean,
        "auto_images_per_second": per_second["auto"],
        "fixed_at_mean_images_per_second": per_second["fixed_at_mean"],
        "fixed_100_images_per_second": per_second["fixed_100"],
        "ratio_auto_to_fixed_at_mean": round(best["fixed_at_mean"] / best["auto"], 3),
        "speedup_over_fixed_100": round(best["fixed_100"] / best["auto"], 2),
        "same_decisions_as_fixed_100": round(float((auto.decision == fixed.decision).mean()), 4),
        "repeats": repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seed": 1,
        "generated_by": "python benchmarks/bench_adaptive.py",
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "library_commit": _commit_of_library(),
    }
    print(f"  pooled: {json.dumps(result)}", flush=True)
    return result


def _commit_of_library() -> str | None:
    """The git commit of the checkout the imported ``batchuq`` comes from (None: unknown)."""
    import subprocess

    import batchuq

    folder = Path(batchuq.__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def memory(work: Path) -> list[dict]:
    """Peak RSS of ``batchuq score --passes auto`` on 2,000 and 20,000 images.

    Run it before this process grows: Linux starts a child's ``ru_maxrss`` from its parent's.
    """
    import memory_flat

    folder, runs = work / "memory", []
    for size in (2000, 20000):
        memory_flat.make_images(folder, size)
        rss, seconds = memory_flat.peak_rss_mb(folder, work / f"mem{size}.parquet", "auto")
        runs.append({"images": size, "peak_rss_mib": round(rss), "seconds": round(seconds, 1)})
        print(f"  memory: {size} images, peak RSS {rss:.0f} MiB, {seconds:.1f} s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--memory", action="store_true", help="also peak RSS at 2k and 20k")
    parser.add_argument("--memory-only", action="store_true", help="only peak RSS: update JSON")
    parser.add_argument(
        "--ratio-only", action="store_true", help="only auto vs fixed at its mean: update JSON"
    )
    parser.add_argument(
        "--key",
        default="pooled",
        help="with --ratio-only, the JSON entry to write (e.g. pooled_before, for a run of an "
        "older checkout's library: PYTHONPATH=OLD python benchmarks/bench_adaptive.py ...)",
    )
    args = parser.parse_args(argv)
    if args.memory_only or args.ratio_only:
        with tempfile.TemporaryDirectory(prefix="bench_adaptive_") as tmp:
            result = json.loads(RESULTS_JSON.read_text())
            if args.memory_only:
                result["memory"] = memory(Path(tmp))
            else:
                result[args.key] = pooled_ratio(Path(tmp), args.repeats)
                result[args.key]["generated_by"] = (
                    f"python benchmarks/bench_adaptive.py --ratio-only --key {args.key}"
                )
        return _save(result)
    started = time.perf_counter()
    result = {
        "generated_by": "python benchmarks/bench_adaptive.py"
        + (" --memory" if args.memory else ""),
        "date": common.now(),
        "cpu": common.cpu_info(),
        "versions": common.versions(),
        "settings": {"min_passes": 10, "max_passes": 100, "alpha": 0.01, "fixed_passes": 100},
    }
    with tempfile.TemporaryDirectory(prefix="bench_adaptive_") as tmp:
        work = Path(tmp)
        if args.memory:  # first: see memory()'s docstring
            result["memory"] = memory(work)
        print("bundled digits, median rule ...", flush=True)
        result["digits"] = compare(TEST, work, "digits", args.repeats, seed=1)
        print("bundled digits, confidence rule ...", flush=True)
        from batchuq.postprocess.rules import DecisionRule

        result["digits_confidence"] = compare(
            TEST, work, "conf", 1, seed=1, rule=DecisionRule("confidence")
        )
        print("reference CNN 128x128, training ...", flush=True)
        model = train_reference(work, args.epochs)
        test = work / "test"
        write_band_images(test, args.test_images, seed=202)
        result["reference"] = compare(test, work, "reference", args.repeats, model=model, seed=1)
        print("3,600 digits: auto vs fixed at its mean passes ...", flush=True)
        result["pooled"] = pooled_ratio(work, args.repeats)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return _save(result)


def _save(result: dict) -> int:
    """Write the results JSON, which the docs' results page reads when it is built."""
    common.record(result, RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
