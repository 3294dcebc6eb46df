"""``--passes auto`` across decoded batches: a bounded pool of unsettled images.

Rounds draw ``min_passes`` more passes of images still unsettled (``batchuq.sampling.stopping``).
Run within one decoded batch, later rounds would hold a handful of rows each, padded, with a
compiled call and a look each. The pool instead keeps the unsettled images of many batches (their
prepared rows: the activations before the first dropout layer, their samples so far, their place
in the run) and runs every round on the oldest ``round_images`` of them, each image at its own
next pass (``sample_passes`` takes a first pass per row). A row's draws depend only on its key
and pass index, so an image gets the samples it gets in a batch of its own.

Images leave in the order they came in (``AdaptivePool.release``): the output's row order is
that of a fixed run. The oldest image is in every round until it settles, so at most ``rounds``
rounds pass while it holds the others back: the pool holds at most about
``(rounds + 2) x round_images`` images (``AdaptivePool.peak_images`` records it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchuq.defaults import STATUS_OK
from batchuq.methods.base import UncertaintyMethod
from batchuq.sampling.stopping import AdaptivePasses, StoppingRule, settled


@dataclass
class _Image:
    """One image in the pool: where it is in the run, its rows, its rounds so far."""

    position: int
    status: str
    readable: bool
    row: int = 0  # its first row in the pool's prepared rows (K rows from there)
    drawn: list[np.ndarray] = field(default_factory=list)  # per round (K * G, count, C)
    done: bool = False
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # kept when done


@dataclass(frozen=True)
class Released:
    """Finished images, in the order they entered the pool.

    Attributes:
        positions: Indices of the images in the run's files.
        statuses: ``ok`` or ``error: ...`` per image.
        samples: Per image, float32 ``(K * G * passes_i, classes)``, copy-major.
        passes: ``(images,)`` int64 passes drawn per copy (and member).
        extras: The method's extras per image (``prepared_extras``: each row's mean over the
            passes it got), averaged over the image's copies: float32 ``(images, ...)``.
    """

    positions: list[int]
    statuses: list[str]
    samples: list[np.ndarray]
    passes: np.ndarray
    extras: dict[str, np.ndarray]


class AdaptivePool:
    """Unsettled images of many batches, sampled in full rounds, released in order.

    Args:
        method: The run's method (``prepare``, ``join_prepared``, ``sample_passes``).
        copies: K, rows per image (test-time copies).
        adaptive: The ``--passes auto`` settings.
        rule: The run's decision rule (what ``settled`` reads).
        round_images: Images per round (a round runs ``round_images * K`` rows at once).
        temperature: The temperature before a mean-based rule, if any.
    """

    def __init__(
        self,
        method: UncertaintyMethod,
        copies: int,
        adaptive: AdaptivePasses,
        rule: StoppingRule,
        round_images: int,
        temperature: float | None = None,
    ) -> None:
        self.method, self.copies, self.adaptive, self.rule = method, copies, adaptive, rule
        self.round_images = max(1, round_images)
        self.temperature = temperature
        self.rounds = adaptive.rounds()
        self.looks = len(self.rounds) - 1  # adaptive.looks, without rebuilding the rounds
        self.prepared: Any = None
        self.active: list[_Image] = []  # unsettled, oldest first; their rows are in `prepared`
        self.waiting: deque[_Image] = deque()  # every image not yet released, oldest first
        self.peak_images = 0  # the most images held at once (for tests)
        self.peak_rows = 0  # the most prepared rows held at once (for tests)
        self.calls = 0  # sample_passes calls (for the benchmark)

    @property
    def full(self) -> bool:
        """Whether the next round can run full (``round_images`` unsettled images)."""
        return len(self.active) >= self.round_images

    def __len__(self) -> int:
        """Images held: unsettled, or settled but waiting for an older one."""
        return len(self.waiting)

    def add(self, prepared: Any, positions: list[int], statuses: list[str]) -> None:
        """Take in a chunk of images: their prepared rows (K per image, copy-minor).

        The pool's rows are rebuilt as the unsettled images' rows followed by the new ones, so
        that rows of settled images are dropped.

        Args:
            prepared: What ``method.prepare`` gave for the chunk's ``len(positions) * K`` rows.
            positions: The chunk's images (indices in the run's files).
            statuses: ``ok`` or ``error: ...`` per image (unreadable images stop after one round).
        """
        k = self.copies
        keep = np.array([i.row + c for i in self.active for c in range(k)], dtype=np.int64)
        parts = [(self.prepared, keep)] if keep.size else []
        parts.append((prepared, np.arange(len(positions) * k)))
        self.prepared = parts[0][0] if len(parts) == 1 else self.method.join_prepared(parts)
        for row, image in enumerate(self.active):
            image.row = row * k
        start = len(self.active)
        for offset, (position, status) in enumerate(zip(positions, statuses, strict=True)):
            image = _Image(position, status, status == STATUS_OK, row=(start + offset) * k)
            self.active.append(image)
            self.waiting.append(image)
        self.peak_images = max(self.peak_images, len(self.waiting))
        self.peak_rows = max(self.peak_rows, len(self.active) * k)

    def run_round(self) -> None:
        """Draw the next round of the oldest ``round_images`` unsettled images, then look."""
        batch = self.active[: self.round_images]
        by_count: dict[int, list[_Image]] = {}
        for image in batch:
            by_count.setdefault(self.rounds[len(image.drawn)][1], []).append(image)
        for count, images in by_count.items():
            self._draw(images, count)
        self._look(batch)
        self._keep_extras([image for image in batch if image.done])
        self.active = [image for image in self.active if not image.done]

    def _keep_extras(self, done: list[_Image]) -> None:
        """Keep the extras of images just done, before their rows leave the pool: each row's
        mean over its passes, averaged over the image's copies (as a fixed run's)."""
        if not done:
            return
        k = self.copies
        for name, values in self.method.prepared_extras(self.prepared).items():
            for image in done:
                rows = values[image.row : image.row + k]
                image.extras[name] = rows.mean(axis=0, dtype=np.float64).astype(np.float32)

    def _draw(self, images: list[_Image], count: int) -> None:
        """Draw ``count`` passes of ``images``, each from its own next pass."""
        k = self.copies
        rows = np.array([i.row + c for i in images for c in range(k)], dtype=np.int32)
        first = np.repeat([self.rounds[len(i.drawn)][0] for i in images], k).astype(np.int32)
        drawn = self.method.sample_passes(self.prepared, rows, first, count)
        self.calls += 1
        # (images * K, G, count, C) -> (images, K * G, count, C): copy, then member
        drawn = drawn.reshape(len(images), k * drawn.shape[1], count, drawn.shape[3])
        for image, new in zip(images, drawn, strict=True):
            image.drawn.append(new)

    def _look(self, images: list[_Image]) -> None:
        """Mark the images whose decision is settled (or whose passes are all drawn) done."""
        by_look: dict[int, list[_Image]] = {}
        for image in images:
            look = len(image.drawn) - 1  # the look after this image's latest round
            if look == self.looks or (look == 0 and not image.readable):
                image.done = True
            else:
                by_look.setdefault(look, []).append(image)
        for look, group in by_look.items():
            so_far = np.stack([np.concatenate(i.drawn, axis=1) for i in group])
            level = self.adaptive.level(self.rule, look)
            stop = settled(so_far, self.rule, level, self.temperature)
            for image, done in zip(group, stop, strict=True):
                image.done = bool(done)

    def release(self) -> Released | None:
        """The finished images no older unfinished image holds back, in order (or ``None``)."""
        out: list[_Image] = []
        while self.waiting and self.waiting[0].done:
            out.append(self.waiting.popleft())
        if not out:
            return None
        samples, passes = [], []
        for image in out:
            joined = np.concatenate(image.drawn, axis=1)  # (K * G, passes, C)
            samples.append(joined.reshape(-1, joined.shape[2]))
            passes.append(joined.shape[1])
        extras = {name: np.stack([i.extras[name] for i in out]) for name in out[0].extras}
        return Released(
            [i.position for i in out],
            [i.status for i in out],
            samples,
            np.asarray(passes, dtype=np.int64),
            extras,
        )
