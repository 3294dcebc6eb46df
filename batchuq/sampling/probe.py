"""The precision a run actually uses: the bfloat16 probe, run once a process.

``resolve_precision`` turns the ``--precision`` asked for into the one to run: bfloat16 only
where the CPU and oneDNN allow it (``batchuq.sampling.precision``) and a tiny CNN's passes run in
bfloat16 in this process (``bf16_probe``); otherwise float32, with a notice saying why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import keras
import numpy as np

from batchuq.sampling.precision import native_bf16
from batchuq.sampling.sampler import MCSampler


def _probe_model() -> keras.Model:
    """A tiny convolutional model (fixed weights) whose sampled tail has the layers of a CNN."""
    init = keras.initializers.GlorotUniform(seed=0)  # seeded: the global RNG is left alone
    inputs = keras.Input((8, 8, 3), name="bf16_probe_input")
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=init, name="bf16_probe_c1")(
        inputs
    )
    x = keras.layers.Dropout(0.25, seed=0, name="bf16_probe_drop")(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init, name="bf16_probe_c2")(
        x
    )
    x = keras.layers.BatchNormalization(name="bf16_probe_bn")(x)
    x = keras.layers.MaxPooling2D(name="bf16_probe_pool")(x)
    x = keras.layers.Flatten(name="bf16_probe_flat")(x)
    outputs = keras.layers.Dense(
        3, activation="softmax", kernel_initializer=init, name="bf16_probe_dense"
    )(x)
    return keras.Model(inputs, outputs, name="bf16_probe")


@functools.cache
def bf16_probe() -> str | None:
    """Run a tiny CNN's MC passes in bfloat16, as ``MCSampler`` runs a model's, once a process.

    oneDNN can refuse bf16 kernels where the CPU's flags promise them (an ISA cap it reads, a
    build without them); the error comes only when a convolution first runs. This finds out
    before any image is scored.

    Returns:
        ``None`` if the passes ran and gave finite probabilities, else why not (one line).
    """
    rows = np.linspace(0.0, 1.0, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    try:
        sampler = MCSampler(_probe_model(), passes=2, precision="bfloat16")
        samples = sampler.sample(rows, np.arange(2, dtype=np.uint32))
    except Exception as exc:  # noqa: BLE001 - any failure means: do not score in bf16
        text = str(exc)
        found = re.search(r"message: ([^.]+)", text)
        line = found.group(1) if found else next((s for s in text.splitlines() if s), "")
        return f"{type(exc).__name__}: {line.strip()}"
    if not np.isfinite(samples).all():
        return "the bfloat16 passes gave non-finite probabilities"
    return None


def resolve_precision(
    precision: str, cpuinfo: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The precision to run for the ``precision`` asked for, and the notice if it differs.

    ``bfloat16`` runs only where it is native (``native_bf16``: the CPU's flags, oneDNN's ISA cap)
    and a bfloat16 probe (``bf16_probe``) runs in this process; otherwise ``float32``.

    Args:
        precision: ``float32`` or ``bfloat16``.
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        ``(precision, notice)``: the precision to run, and ``None`` or why bfloat16 was not.
    """
    if precision != "bfloat16":
        return precision, None
    native, why_not = native_bf16(cpuinfo, environ)
    if native is False:
        return "float32", f"--precision bfloat16: {why_not}; using float32."
    failure = bf16_probe()
    if failure is not None:
        return "float32", (
            f"--precision bfloat16: a bfloat16 convolution failed in this process ({failure}); "
            "using float32."
        )
    return "bfloat16", None
