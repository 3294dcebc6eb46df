"""Every statistic against a plain reference written from docs/methods.md, one image at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchuq.summarise import summarise


def reference(samples: np.ndarray) -> dict[str, object]:
    """docs/methods.md, literally, for one image: samples of shape (S, C)."""
    s_count, classes = samples.shape
    mean = [sum(samples[s, c] for s in range(s_count)) / s_count for c in range(classes)]
    std = [
        math.sqrt(sum((samples[s, c] - mean[c]) ** 2 for s in range(s_count)) / s_count)
        for c in range(classes)
    ]
    median = []
    for c in range(classes):
        column = sorted(samples[:, c])
        mid = s_count // 2
        median.append(column[mid] if s_count % 2 else (column[mid - 1] + column[mid]) / 2)
    pred = max(range(classes), key=lambda c: mean[c])
    ordered = sorted(mean, reverse=True)

    def h(p: list[float]) -> float:
        return -sum(v * math.log(v) for v in p if v > 0)

    entropy = h(mean)
    expected = sum(h(list(samples[s])) for s in range(s_count)) / s_count
    agree = sum(1 for s in range(s_count) if int(np.argmax(samples[s])) == pred)
    return {
        "mean": mean,
        "median": median,
        "std": std,
        "pred": pred,
        "confidence": ordered[0],
        "margin": ordered[0] - ordered[1],
        "entropy": entropy,
        "mutual_info": max(entropy - expected, 0.0),
        "variation_ratio": 1 - agree / s_count,
    }


@pytest.mark.parametrize("samples_per_image", [1, 2, 7, 100])
def test_statistics_match_reference(samples_per_image: int) -> None:
    rng = np.random.default_rng(samples_per_image)
    logits = rng.normal(size=(5, samples_per_image, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs[0, :, :] = [1.0, 0.0, 0.0, 0.0]  # exact zeros: 0 ln 0 = 0
    summary = summarise(probs.astype(np.float32))
    for i in range(len(probs)):
        ref = reference(probs[i].astype(np.float32).astype(np.float64))
        for name in ("mean", "median", "std"):
            np.testing.assert_allclose(getattr(summary, name)[i], ref[name], atol=1e-6)
        assert summary.pred[i] == ref["pred"]
        for name in ("confidence", "margin", "entropy", "mutual_info", "variation_ratio"):
            assert getattr(summary, name)[i] == pytest.approx(ref[name], abs=1e-6), name


def test_certain_image_has_no_uncertainty() -> None:
    probs = np.tile(np.array([0.0, 1.0, 0.0], np.float32), (1, 10, 1))
    summary = summarise(probs)
    assert summary.entropy[0] == 0 and summary.mutual_info[0] == 0
    assert summary.variation_ratio[0] == 0 and summary.std.max() == 0
    assert summary.margin[0] == 1.0


def test_coin_flip_has_high_mutual_information() -> None:
    flips = np.array([[0.99, 0.01], [0.01, 0.99]] * 50, np.float32)[None]
    summary = summarise(flips)
    assert summary.mutual_info[0] > 0.6  # ln 2 = 0.69 minus the small per-sample entropy
    assert summary.variation_ratio[0] == pytest.approx(0.5)


def test_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="Received: samples.shape"):
        summarise(np.zeros((3, 4)))
