"""Step 4 of the data flow: per-image statistics over the Monte Carlo samples.

Formulas follow ``docs/methods.md`` ("Per-image statistics"): for samples ``p_s``
(S = passes x TTA copies x members) of one image, ``mean``, ``median`` and population ``std``
per class; ``pred`` = argmax of the mean, ``confidence`` = max of the mean, ``margin`` = top-1
minus top-2 of the mean, ``entropy`` of the mean in nats, ``mutual_info`` (BALD) = H[mean] -
mean of H[p_s] clamped at 0, and ``variation_ratio`` = 1 - share of samples whose argmax is
``pred``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Statistics of a batch of images; every array has ``batch`` rows.

    Attributes:
        mean, median, std: ``(batch, classes)`` float32.
        pred: ``(batch,)`` int64 class index.
        confidence, margin, entropy, mutual_info, variation_ratio: ``(batch,)`` float32.
    """

    mean: np.ndarray
    median: np.ndarray
    std: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    mutual_info: np.ndarray
    variation_ratio: np.ndarray


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis``, with ``0 ln 0 = 0``."""
    probs = np.asarray(probs, dtype=np.float64)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -np.sum(probs * logs, axis=axis)


def mean_statistics(mean: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics that depend only on the mean probabilities.

    Args:
        mean: Mean probabilities, shape ``(batch, classes)``.

    Returns:
        ``pred`` (int64), ``confidence``, ``margin`` and ``entropy`` (float32), each ``(batch,)``.
    """
    mean = np.asarray(mean, dtype=np.float64)
    top2 = np.sort(mean, axis=1)[:, -2:] if mean.shape[1] > 1 else np.pad(mean, ((0, 0), (1, 0)))
    return {
        "pred": mean.argmax(axis=1).astype(np.int64),
        "confidence": top2[:, 1].astype(np.float32),
        "margin": (top2[:, 1] - top2[:, 0]).astype(np.float32),
        "entropy": entropy(mean).astype(np.float32),
    }


def summarise(samples: np.ndarray) -> Summary:
    """Summarise Monte Carlo samples.

    Args:
        samples: Probabilities of shape ``(batch, samples, classes)``.

    Returns:
        The per-image statistics.

    Raises:
        ValueError: If ``samples`` is not 3-D or has no samples or classes.
    """
    samples = np.asarray(samples)
    if samples.ndim != 3 or samples.shape[1] == 0 or samples.shape[2] == 0:
        raise ValueError(
            "samples must have shape (batch, samples, classes) with at least one sample and "
            f"class. Received: samples.shape={samples.shape}"
        )
    p = samples.astype(np.float64)
    # Shifted-data moments: identical samples give exactly their value and exactly std 0.
    shift = p[:, :1, :]
    offset = (p - shift).mean(axis=1)
    mean = shift[:, 0, :] + offset
    variance = ((p - shift) ** 2).mean(axis=1) - offset**2
    std = np.sqrt(np.maximum(variance, 0.0))
    median = np.median(p, axis=1)
    from_mean = mean_statistics(mean)
    # Mutual information uses the float64 entropy of the mean, not the rounded column.
    mutual_info = np.maximum(entropy(mean) - entropy(p).mean(axis=1), 0.0)
    agree = (p.argmax(axis=2) == from_mean["pred"][:, None]).mean(axis=1)
    f32 = np.float32
    return Summary(
        mean=mean.astype(f32),
        median=median.astype(f32),
        std=std.astype(f32),
        mutual_info=mutual_info.astype(f32),
        variation_ratio=(1.0 - agree).astype(f32),
        **from_mean,
    )


def summarise_images(samples: np.ndarray | list[np.ndarray]) -> Summary:
    """Summarise a batch whose images may have different numbers of samples.

    Args:
        samples: ``(batch, samples, classes)``, or a list of ``(samples_i, classes)`` arrays
            (adaptive passes); images with equal counts are summarised together.

    Returns:
        The per-image statistics, in the batch's order.
    """
    if not isinstance(samples, list):
        return summarise(samples)
    counts = np.array([len(s) for s in samples])
    parts: dict[int, tuple[np.ndarray, Summary]] = {}
    for count in np.unique(counts):
        where = np.flatnonzero(counts == count)
        parts[int(count)] = (where, summarise(np.stack([samples[i] for i in where])))
    fields = {}
    for name in Summary.__dataclass_fields__:
        first = next(iter(parts.values()))[1]
        merged = np.empty(
            (len(samples), *getattr(first, name).shape[1:]), getattr(first, name).dtype
        )
        for where, summary in parts.values():
            merged[where] = getattr(summary, name)
        fields[name] = merged
    return Summary(**fields)
