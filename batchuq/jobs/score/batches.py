"""Steps 2-3 of a job: decode, augment and sample, yielding each batch with its samples.

``iter_sampled_batches`` is shared by ``score`` (which summarises, decides and writes the
samples) and ``calibrate`` (which fits on them). The test-time copies are made a chunk of rows
at a time (``augment.CopyMaker``), each chunk sized by the method (``row_chunks``), so that
memory stays within the method's budget however many copies an image has. With ``--passes
auto`` the images go through an ``AdaptivePool`` (``pool``), whose rounds draw passes of the
unsettled images of many batches at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from batchuq.augment import CopyMaker, TTAConfig
from batchuq.decode import make_dataset
from batchuq.defaults import STATUS_OK
from batchuq.errors import ModelError, StopRequested
from batchuq.jobs.score.plan import RunPlan
from batchuq.jobs.score.pool import AdaptivePool
from batchuq.sampling.memory import balanced_chunks
from batchuq.seeds import image_keys, mix


@dataclass(frozen=True)
class SampledBatch:
    """One decoded batch and its samples (with ``--passes auto``: the images the adaptive pool
    released at once, consecutive in the run's order).

    Attributes:
        positions: ``(batch,)`` indices of the images in ``plan.discovery.files``.
        statuses: ``(batch,)`` ``ok`` or ``error: ...`` per image.
        samples: float32 ``(batch, K * S, classes)``, copy-major (all S samples of TTA copy 0,
            then copy 1, ...); the rows of unreadable images hold meaningless values. With
            adaptive passes, a list of ``(K * S_i, classes)`` arrays, one per image.
        passes: ``(batch,)`` int64 passes drawn per TTA copy (and ensemble member).
        extras: The method's extras (``UncertaintyMethod.extras``) per image: each row's
            value averaged over the image's TTA copies, float32 ``(batch,)`` (``(batch, D)``
            for ``features``). With adaptive passes, each copy's value is its mean over the
            passes it got.
    """

    positions: list[int]
    statuses: list[str]
    samples: np.ndarray | list[np.ndarray]
    passes: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        """``(batch,)`` bool: the image was read and scored."""
        return np.array([status == STATUS_OK for status in self.statuses], dtype=bool)


def iter_sampled_batches(
    plan: RunPlan,
    positions: Sequence[int] | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> Iterator[SampledBatch]:
    """Decode, augment and sample the plan's images, a batch at a time, in order.

    Args:
        plan: The run.
        positions: Indices into ``plan.discovery.files`` to score (default: all of them).
        should_stop: Polled before and after each batch's sampling; when it returns True,
            ``StopRequested`` is raised there.
        progress: Show a tqdm progress bar on stderr (counting the images left out too).
        desc: The progress bar's label.

    Yields:
        ``SampledBatch`` per decoded batch; with ``--passes auto``, per set of images the
        adaptive pool releases (``batchuq.jobs.score.pool``), still in order.

    Raises:
        ModelError: If the model's outputs are not probabilities.
        StopRequested: When ``should_stop`` asks.
    """
    files = plan.discovery.files
    todo = list(range(len(files))) if positions is None else list(positions)
    paths = [files[i].relative_path for i in todo]
    dataset = make_dataset(
        [files[i].path for i in todo],
        image_keys(plan.seed, paths),
        plan.spec,
        TTAConfig(copies=1),  # copies are made below, a chunk of rows at a time
        plan.batch_size,
        rescale=1.0,
        max_pixels=plan.max_pixels,
        problems=[files[i].problem for i in todo],
        exif_transpose=plan.exif_transpose,
    )
    copies = CopyMaker(plan.tta, tuple(dataset.element_spec["images"].shape[2:]), plan.rescale)
    bar = tqdm(
        total=len(files),
        initial=len(files) - len(todo),
        unit="img",
        disable=not progress,
        desc=desc,
        leave=False,
    )
    batches = iter(dataset)
    if plan.adaptive is None:
        sampled = _fixed_batches(plan, copies, batches, todo, should_stop)
    else:
        sampled = _pooled_batches(plan, copies, batches, todo, should_stop)
    try:
        with bar:
            for out in sampled:
                yield out
                bar.update(len(out.statuses))
    finally:
        # Stop the input pipeline here, while Python is fully alive. Left to the traceback
        # of an interrupt, it would be torn down at interpreter exit, where its decode
        # threads calling back into Python can crash the process.
        sampled.close()
        del sampled, batches


def _fixed_batches(
    plan: RunPlan,
    copies: CopyMaker,
    batches: Iterator[dict],
    todo: list[int],
    should_stop: Callable[[], bool] | None,
) -> Iterator[SampledBatch]:
    """Every decoded batch with its fixed number of passes, as it comes."""
    per_copy = plan.method.samples_per_row // plan.method.pass_groups
    for batch in batches:
        _stop_if_asked(should_stop)
        statuses = [status.decode() for status in batch["status"].numpy()]
        ok = np.array([status == STATUS_OK for status in statuses], dtype=bool)
        extras: dict[str, list[np.ndarray]] = {}
        samples = sample_batch(plan, copies, batch["images"][:, 0], batch["keys"], extras)
        _stop_if_asked(should_stop)
        for image in np.flatnonzero(ok):
            check_probabilities(samples[image], plan.loaded.path)
        positions = [todo[int(i)] for i in batch["index"].numpy()]
        passes = np.full(len(ok), per_copy, np.int64)
        means = per_image_extras(extras, len(ok), plan.tta.copies)
        yield SampledBatch(positions, statuses, samples, passes, means)


def per_image_extras(
    parts: dict[str, list[np.ndarray]], images: int, copies: int
) -> dict[str, np.ndarray]:
    """Rows' extras, gathered chunk by chunk (copy-major rows), as their means per image.

    Args:
        parts: Per extra, its values for consecutive chunks of rows.
        images: Images in the batch.
        copies: K, rows per image.

    Returns:
        float32 ``(images,)`` (``(images, D)``) per extra: the mean over the image's copies.
    """
    means = {}
    for name, chunks in parts.items():
        rows = np.concatenate(chunks, axis=0)
        rows = rows.reshape((images, copies) + rows.shape[1:])
        means[name] = rows.mean(axis=1, dtype=np.float64).astype(np.float32)
    return means


def _pooled_batches(
    plan: RunPlan,
    copies: CopyMaker,
    batches: Iterator[dict],
    todo: list[int],
    should_stop: Callable[[], bool] | None,
) -> Iterator[SampledBatch]:
    """``--passes auto``: the decoded batches' images through an ``AdaptivePool``, whose
    rounds run on the unsettled images of many batches; images leave in path order."""
    pool = AdaptivePool(
        plan.method,
        plan.tta.copies,
        plan.adaptive,
        plan.rule,
        round_images(plan),
        temperature=plan.decision_temperature,
    )
    for batch in batches:
        _stop_if_asked(should_stop)
        statuses = [status.decode() for status in batch["status"].numpy()]
        positions = [todo[int(i)] for i in batch["index"].numpy()]
        add_to_pool(plan, copies, pool, batch, positions, statuses)
        while pool.full:
            pool.run_round()
            yield from _released(plan, pool)
        _stop_if_asked(should_stop)
    while pool.active:
        pool.run_round()
        yield from _released(plan, pool)


def round_images(plan: RunPlan) -> int:
    """Images per adaptive round: as many as a decoded batch's copies fit one chunk of rows
    within the method's memory budget (``row_chunks``)."""
    k = plan.tta.copies
    largest = max(stop - start for start, stop in plan.method.row_chunks(plan.batch_size * k))
    return max(1, largest // k)


def add_to_pool(
    plan: RunPlan,
    copies: CopyMaker,
    pool: AdaptivePool,
    batch: dict,
    positions: list[int],
    statuses: list[str],
) -> None:
    """Augment and prepare a decoded batch (a round's images at a time, so that its copies
    fit the memory budget) and add it to the pool.

    Args:
        plan: The run (``plan.adaptive`` set).
        copies: Makes the test-time copies of a range of rows.
        pool: The run's pool.
        batch: The decoded batch (``images`` ``(batch, 1, H, W, C)``, ``keys``).
        positions: The batch's images (indices in ``plan.discovery.files``).
        statuses: ``ok`` or ``error: ...`` per image.
    """
    stack, keys, k = batch["images"][:, 0], batch["keys"], plan.tta.copies
    row_keys = copy_keys(keys, k)
    for first, last in balanced_chunks(len(positions), pool.round_images):
        chunk = copies.rows(stack, keys, first * k, last * k)
        if not plan.spec.channel_axis:  # an (H, W) model: drop the one channel
            chunk = chunk[..., 0]
        prepared = plan.method.prepare(chunk, row_keys[first * k : last * k])
        del chunk
        pool.add(prepared, positions[first:last], statuses[first:last])


def _released(plan: RunPlan, pool: AdaptivePool) -> Iterator[SampledBatch]:
    """The images the pool lets go, as a batch (checked to be probabilities)."""
    out = pool.release()
    if out is None:
        return
    for samples, status in zip(out.samples, out.statuses, strict=True):
        if status == STATUS_OK:
            check_probabilities(samples, plan.loaded.path)
    yield SampledBatch(out.positions, out.statuses, out.samples, out.passes, out.extras)


def sample_batch(
    plan: RunPlan,
    copies: CopyMaker,
    stack: tf.Tensor,
    keys: tf.Tensor,
    extras: dict[str, list[np.ndarray]] | None = None,
) -> np.ndarray:
    """Augment a batch of decoded images and sample every copy with the plan's method.

    Args:
        plan: The run.
        copies: Makes the test-time copies of a range of rows.
        stack: ``(batch, H, W, C)`` pixel values 0..255.
        keys: ``(batch,)`` uint32 image keys.
        extras: Where to append each chunk's rows' extras (``sample_with_extras``), per name;
            ``None``: not kept.

    Returns:
        float32 ``(batch, K * S, classes)``, copy-major.
    """
    b, k = int(tf.shape(stack)[0]), plan.tta.copies
    row_keys = copy_keys(keys, k)
    parts = []
    for start, stop in plan.method.row_chunks(b * k):
        chunk = copies.rows(stack, keys, start, stop)
        if not plan.spec.channel_axis:  # an (H, W) model: drop the one channel
            chunk = chunk[..., 0]
        probs, chunk_extras = plan.method.sample_with_extras(chunk, row_keys[start:stop])
        parts.append(probs)
        for name, values in chunk_extras.items():
            if extras is not None:
                extras.setdefault(name, []).append(values)
        del chunk
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)  # (B*K, S, C)
    return samples.reshape(b, k * samples.shape[1], samples.shape[2])


def copy_keys(keys: tf.Tensor, copies: int) -> tf.Tensor:
    """The key of every test-time copy: ``(batch * copies,)`` uint32, where row ``r`` is copy
    ``r % copies`` of image ``r // copies`` and gets ``mix(image key, copy)``."""
    copy_index = tf.cast(tf.range(copies), tf.uint32)
    return _copy_keys(tf.convert_to_tensor(keys, tf.uint32), copy_index)


@tf.function(reduce_retracing=True)
def _copy_keys(keys: tf.Tensor, copy_index: tf.Tensor) -> tf.Tensor:
    """``copy_keys`` as one compiled call (run eagerly, its ~20 integer ops cost ~5 ms a batch)."""
    return tf.reshape(mix(keys[:, None], copy_index[None, :]), [-1])


def _stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise StopRequested()


def check_probabilities(samples: np.ndarray, model_path: Path) -> None:
    """Refuse model outputs that are not probability vectors.

    Args:
        samples: ``(batch, samples, classes)`` model outputs of readable images.
        model_path: For the message.

    Raises:
        ModelError: If values leave ``[0, 1]`` or do not sum to 1.
    """
    if samples.size == 0:
        return
    sums = samples.sum(axis=-1)
    if samples.min() < -1e-4 or samples.max() > 1 + 1e-4 or np.abs(sums - 1).max() > 1e-3:
        raise ModelError(
            "The model's outputs are not probabilities (values outside [0, 1] or rows not "
            "summing to 1); if it ends in logits, pass --logits to apply a softmax. "
            f"Received: model={str(model_path)!r}, output range=[{samples.min():.3g}, "
            f"{samples.max():.3g}]"
        )
