"""Which precision the passes can run in: bfloat16 detection from the CPU and the environment.

Reads ``/proc/cpuinfo`` and oneDNN's environment variables only: nothing here imports
TensorFlow. ``batchuq.sampling.probe`` adds the run-time check (a tiny bfloat16 model run once).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PRECISIONS = ("float32", "bfloat16")


# bfloat16 instructions in the CPU's feature flags (/proc/cpuinfo): x86 AVX512-BF16 and AMX-BF16,
# Arm BF16.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) that keep it from the
# CPU's bfloat16 instructions: every ISA not at or above AVX512_CORE_BF16 in oneDNN's partial
# order (its "CPU Dispatcher Control" guide). AVX2_VNNI_2 is beside the AVX-512 line, not above
# it. Under such a cap TensorFlow still hands bf16 convolutions to oneDNN on an AVX-512 CPU, which
# then refuses them ("could not create a primitive descriptor for the convolution"). The values
# that allow bf16 are AVX512_CORE_BF16, AVX10_1_512 (AVX512_CORE_FP16), AVX10_1_512_AMX
# (AVX512_CORE_AMX), AVX10_1_512_AMX_FP16 (AVX512_CORE_AMX_FP16), ALL and DEFAULT; oneDNN ignores
# a value it does not know (it compares names exactly), and so does ``native_bf16``.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) from ``/proc/cpuinfo``.

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.

    Returns:
        The flags, or ``None`` when they cannot be read (not Linux).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.

    Returns:
        ``True`` or ``False`` from the CPU's feature flags, ``None`` when they cannot be read
        (not Linux).
    """
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & _BF16_FLAGS)


def onednn_isa_cap(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The ISA cap oneDNN reads from the environment, as ``(variable, value)``.

    oneDNN reads ``ONEDNN_MAX_CPU_ISA`` and, only when that is not set, its older name
    ``DNNL_MAX_CPU_ISA``.

    Args:
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        The variable and its value, or ``None`` when neither is set.
    """
    environ = os.environ if environ is None else environ
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if name in environ:
            return name, environ[name]
    return None


def native_bf16(
    cpuinfo: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[bool | None, str]:
    """Whether bfloat16 passes would run on the CPU's bfloat16 instructions in this process.

    That needs the instructions (``cpu_has_bf16``), oneDNN (TensorFlow's CPU kernels for
    convolutions and matmuls; ``TF_ENABLE_ONEDNN_OPTS=0`` turns it off and leaves bf16 to
    emulation) and an ISA cap that lets oneDNN use them (``ONEDNN_MAX_CPU_ISA``, see
    ``ONEDNN_ISAS_WITHOUT_BF16``). Read before TensorFlow runs anything: oneDNN reads the cap once.

    Args:
        cpuinfo: Text of ``/proc/cpuinfo``; read from the system when ``None``.
        environ: The environment; ``os.environ`` when ``None``.

    Returns:
        ``(native, why_not)``: ``native`` is ``True``, ``False``, or ``None`` when the CPU's
        flags cannot be read; ``why_not`` says why it is not (empty otherwise).
    """
    environ = os.environ if environ is None else environ
    has = cpu_has_bf16(cpuinfo)
    if has is False:
        return False, (
            "this CPU has no native bfloat16 (AVX512-BF16, AMX or Arm BF16), where it would be "
            "emulated and slower"
        )
    cap = onednn_isa_cap(environ)
    if cap is not None and cap[1] in ONEDNN_ISAS_WITHOUT_BF16:
        return False, (
            f"{cap[0]}={cap[1]} keeps oneDNN from this CPU's bfloat16 instructions (it needs "
            "AVX512_CORE_BF16 or above), where bfloat16 convolutions fail or are emulated"
        )
    if environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false"):
        return False, (
            "TF_ENABLE_ONEDNN_OPTS=0 turns oneDNN off, where TensorFlow would emulate bfloat16"
        )
    return has, ""
