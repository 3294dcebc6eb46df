"""MC dropout sampler: only dropout is stochastic, nothing in the model changes, and the
prefix-cached path draws the same samples as tiling the whole model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import ROUNDING, bn_dropout_model

from batchuq.errors import NoDropoutError, UsageError
from batchuq.sampling.dropout import find_dropout_layers, sample_dropout
from batchuq.sampling.sampler import MCSampler
from batchuq.seeds import mix
from batchuq.summarise import summarise


def _images(n: int = 6, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


def _keys(n: int) -> np.ndarray:
    return np.arange(100, 100 + n, dtype=np.uint32)


def _zero_rate_copy(model: keras.Model) -> keras.Model:
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if "rate" in config:
            config["rate"] = 0.0
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


@pytest.fixture
def bf16_runs() -> None:
    """Skip where bfloat16 passes cannot run in this process, saying why.

    That is under an ISA cap that keeps oneDNN from bf16 on an AVX-512 CPU (.ci/run's second
    step, ``ONEDNN_MAX_CPU_ISA=AVX2``): oneDNN refuses the convolutions there, and
    ``batchuq score --precision bfloat16`` falls back to float32. Without a cap bf16 runs on
    every CPU (natively or emulated), so there the probe must pass.
    """
    from batchuq.sampling.precision import onednn_isa_cap
    from batchuq.sampling.probe import bf16_probe

    failure = bf16_probe()
    if failure is not None:
        assert onednn_isa_cap() is not None, f"bfloat16 fails without an ISA cap: {failure}"
        name, value = onednn_isa_cap()
        pytest.skip(f"bfloat16 does not run under {name}={value}: {failure}")


@pytest.mark.numerics
def test_passes_differ_and_bn_statistics_are_untouched(bn_model: keras.Model) -> None:
    bn = bn_model.get_layer("bn")
    before = [w.numpy().copy() for w in bn.weights]
    samples = MCSampler(bn_model, passes=30).sample(_images(), _keys(6))
    assert samples.shape == (30, 6, 3)
    assert (samples.std(axis=0).max(axis=1) > 1e-4).all()  # every image varies across passes
    after = [w.numpy() for w in bn.weights]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.numerics
def test_bn_runs_in_inference_mode(bn_model: keras.Model) -> None:
    """With dropout off, sampling equals predict: BN used its moving statistics, not the batch's.

    Equal to float32 rounding, not bitwise: the passes sit at other positions of a tiled batch
    than predict's rows, and oneDNN may round them differently (up to 6e-8 on AVX2). Batch
    statistics would be 3e-2 away (checked below), so ``ROUNDING`` (1e-6) still tells them apart.
    """
    copy = _zero_rate_copy(bn_model)
    images = _images(5)
    samples = MCSampler(copy, passes=4).sample(images, _keys(5))
    expected = copy.predict(images, verbose=0)
    np.testing.assert_allclose(samples, np.broadcast_to(expected, samples.shape), **ROUNDING)
    assert samples.std(axis=0).max() <= ROUNDING["atol"]  # nothing but dropout is random
    batch_stats = copy(images, training=True).numpy()  # what training=True would have given
    assert np.abs(batch_stats - expected).max() > 1000 * ROUNDING["atol"]


@pytest.mark.numerics
def test_zero_rate_copy_equals_predict_for_bundled_model() -> None:
    """Equal to float32 rounding (measured up to 2e-8 on AVX2), not bitwise: the sampler runs
    the prefix once and the tail on a tiled batch, predict the whole model on 8 rows, and oneDNN
    may pick other kernels for the two shapes. The predicted classes are exactly equal."""
    from batchuq.models import load_model

    model = load_model().model
    copy = _zero_rate_copy(model)
    images = np.random.default_rng(3).random((8, 64, 64, 1), dtype=np.float32)
    samples = MCSampler(copy, passes=5).sample(images, _keys(8))
    expected = copy.predict(images, batch_size=8, verbose=0)
    summary = summarise(samples.transpose(1, 0, 2))
    np.testing.assert_allclose(summary.mean, expected, **ROUNDING)
    np.testing.assert_allclose(summary.median, expected, **ROUNDING)
    assert summary.std.max() <= ROUNDING["atol"]
    np.testing.assert_array_equal(summary.pred, expected.argmax(axis=1))


@pytest.mark.numerics
def test_baked_in_training_true_dropout_is_still_sampled() -> None:
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x, training=True)  # the Keras 3 pitfall
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    data = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    predict_passes = np.stack([model.predict(data, verbose=0) for _ in range(3)])
    assert (predict_passes == predict_passes[0]).all()  # predict silently switches it off
    samples = MCSampler(model, passes=20).sample(data, _keys(4))
    assert samples.std(axis=0).min() > 0.0


@pytest.mark.numerics
def test_mean_is_close_to_deterministic_reference() -> None:
    from batchuq.models import load_model

    model = load_model().model
    images = np.random.default_rng(4).random((4, 64, 64, 1), dtype=np.float32) * 0.2
    samples = MCSampler(model, passes=400).sample(images, _keys(4))
    # Weight scaling (the deterministic pass) approximates the MC mean (Gal & Ghahramani).
    assert np.abs(samples.mean(axis=0) - model.predict(images, verbose=0)).max() < 0.1


@pytest.mark.numerics
def test_prefix_cache_equals_whole_model_tiling(bn_model: keras.Model) -> None:
    split = MCSampler(bn_model, passes=25)
    whole = MCSampler(bn_model, passes=25, split=False)
    assert split.uses_split and not whole.uses_split
    assert [n.operation.name for n in split.split.prefix] == ["conv_a", "bn"]
    images = _images(4)
    # The same masks, but other kernels for other shapes: equal to float32 rounding.
    np.testing.assert_allclose(
        split.sample(images, _keys(4)), whole.sample(images, _keys(4)), **ROUNDING
    )


@pytest.mark.numerics
def test_prefix_cache_is_statistically_consistent_on_residual_branch(bn_model) -> None:
    """Different keys give independent draws; the means agree within a few standard errors."""
    images = _images(3)
    a = MCSampler(bn_model, passes=400).sample(images, _keys(3))
    b = MCSampler(bn_model, passes=400, split=False).sample(images, _keys(3) + 7777)
    stderr = np.sqrt(a.var(axis=0) / 400 + b.var(axis=0) / 400) + 1e-9
    assert (np.abs(a.mean(axis=0) - b.mean(axis=0)) / stderr).max() < 5
    assert not np.allclose(a, b)  # genuinely different masks


@pytest.mark.numerics
def test_samples_do_not_depend_on_batch_composition(bn_model: keras.Model) -> None:
    sampler = MCSampler(bn_model, passes=10, memory_budget_mb=1)
    images, keys = _images(7), _keys(7)
    full = sampler.sample(images, keys)
    part = sampler.sample(images[2:5], keys[2:5])
    # Same masks (drawn per key), other batch positions: equal to float32 rounding only.
    np.testing.assert_allclose(full[:, 2:5], part, **ROUNDING)
    # The same call again, and a fresh sampler with the same settings: bitwise identical.
    np.testing.assert_array_equal(sampler.sample(images, keys), full)
    fresh = MCSampler(bn_dropout_model(), passes=10, memory_budget_mb=1)
    np.testing.assert_array_equal(fresh.sample(images, keys), full)


@pytest.mark.numerics
def test_memory_budget_chunks_do_not_change_results(bn_model: keras.Model) -> None:
    images, keys = _images(5), _keys(5)
    big = MCSampler(bn_model, passes=12, memory_budget_mb=512)
    small = MCSampler(bn_model, passes=12, memory_budget_mb=0.01)
    assert small.max_rows < 5 * 12 <= big.max_rows
    # Other chunk shapes, other kernels: equal to float32 rounding.
    np.testing.assert_allclose(big.sample(images, keys), small.sample(images, keys), **ROUNDING)


class _Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(16, activation="relu")
        self.dropout = keras.layers.Dropout(0.5)
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs, training=False):
        return self.out(self.dropout(self.dense(inputs), training=training))


def test_subclassed_model_falls_back_to_whole_model_tiling() -> None:
    model = _Subclassed()
    data = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    model(data)
    sampler = MCSampler(model, passes=20)
    assert not sampler.uses_split
    assert sampler.sample(data, _keys(4)).std(axis=0).min() > 0


def test_model_without_dropout_is_refused_for_many_passes() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    with pytest.raises(NoDropoutError, match="no dropout layer"):
        MCSampler(model, passes=10)
    assert MCSampler(model, passes=1).sample(np.ones((2, 4), np.float32), _keys(2)).shape == (
        1,
        2,
        2,
    )


def test_sample_layers_selects_by_name(bn_model: keras.Model) -> None:
    assert [layer.name for layer in find_dropout_layers(bn_model, ["head_*"])] == ["head_dropout"]
    sampler = MCSampler(bn_model, passes=5, sample_layers=["head_*"])
    assert [n.operation.name for n in sampler.split.prefix][:4] == [
        "conv_a",
        "bn",
        "branch_dropout",
        "conv_b",
    ]


@pytest.mark.numerics
@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.Dropout(0.4),
        keras.layers.SpatialDropout2D(0.4),
        keras.layers.GaussianDropout(0.4),
        keras.layers.AlphaDropout(0.4),
    ],
    ids=["Dropout", "SpatialDropout2D", "GaussianDropout", "AlphaDropout"],
)
def test_dropout_kinds_keep_the_expectation(layer: keras.layers.Layer) -> None:
    import tensorflow as tf

    x = tf.ones((4000, 2, 2, 3))
    keys = mix(tf.cast(tf.range(4000), tf.uint32), 9)
    y = sample_dropout(layer, x, keys).numpy()
    expected = 1.0 if not isinstance(layer, keras.layers.AlphaDropout) else None
    if expected is not None:
        assert abs(y.mean() - expected) < 0.03
    assert y.std() > 0.1
    if isinstance(layer, keras.layers.SpatialDropout2D):
        assert (y.reshape(4000, 4, 3).std(axis=1) == 0).all()  # one mask per channel map


@pytest.mark.numerics
@pytest.mark.parametrize("spatial", [False, True], ids=["elementwise", "per-channel"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_dropout_kernel_equals_the_op_by_op_formula(spatial: bool, dtype: str) -> None:
    import tensorflow as tf

    from batchuq.sampling.dropout import _inverted_dropout
    from batchuq.seeds import uniform_from_keys

    x = tf.cast(tf.random.stateless_normal((37, 9, 11, 6), seed=(1, 2)), dtype)
    keys = mix(tf.cast(tf.range(37), tf.uint32), 3)
    shape = tf.constant([37, 1, 1, 6]) if spatial else tf.shape(x)
    for rate in (0.1, 0.3, 0.5):
        keep = tf.cast(uniform_from_keys(keys, shape) >= rate, dtype)
        expected = (x * keep * tf.cast(1 / (1 - rate), dtype)).numpy()
        fused = _inverted_dropout(x, keys, shape, rate).numpy()
        assert fused.dtype == expected.dtype
        # Bitwise: element-wise products are correctly rounded IEEE operations, so the same on
        # any ISA and any vector width.
        np.testing.assert_array_equal(fused, expected)
        assert abs((fused == 0).mean() - rate) < 0.1


@pytest.mark.numerics
def test_bfloat16_tail_agrees_with_float32(bn_model: keras.Model, bf16_runs: None) -> None:
    images, keys = _images(4), _keys(4)
    fp32 = MCSampler(bn_model, passes=50).sample(images, keys)
    bf16 = MCSampler(bn_model, passes=50, precision="bfloat16").sample(images, keys)
    assert bf16.dtype == np.float32
    stderr = fp32.std(axis=0) / np.sqrt(50) + 1e-3
    assert (np.abs(bf16.mean(axis=0) - fp32.mean(axis=0)) < stderr * 3).all()
    # and the model's own dtype policy is restored afterwards
    assert all(layer.dtype_policy.name == "float32" for layer in bn_model.layers)


@pytest.mark.numerics
def test_bfloat16_frontier_cast_before_tiling_changes_nothing(bf16_runs: None) -> None:
    from batchuq.decode import ImageSpec
    from batchuq.jobs.train import reference_cnn

    keras.utils.set_random_seed(3)
    model = reference_cnn(ImageSpec(48, 48, 3), 4)
    images = np.random.default_rng(3).random((3, 48, 48, 3), dtype=np.float32)
    sampler = MCSampler(model, passes=8, precision="bfloat16")
    assert sampler._cast_before_tiling == [True]  # pool2's output is read only by dropout1
    uncast = MCSampler(model, passes=8, precision="bfloat16")
    uncast._cast_before_tiling = [False]  # before the first call, which traces
    # Bitwise: casting commutes with tiling, so the tail gets the same tensor of the same shape.
    np.testing.assert_array_equal(sampler.sample(images, _keys(3)), uncast.sample(images, _keys(3)))
    assert MCSampler(model, passes=8)._cast_before_tiling == [False]  # float32: nothing to cast


def test_bundled_dropout_model_is_rebuilt_with_fresh_keys(bn_model: keras.Model) -> None:
    model = bn_dropout_model(seed=2)
    a = MCSampler(model, passes=5).sample(_images(2), _keys(2))
    b = MCSampler(model, passes=5).sample(_images(2), _keys(2) + 1)
    assert not np.allclose(a, b)


@pytest.mark.numerics
def test_bfloat16_keeps_softmax_and_everything_after_it_in_float32(bf16_runs: None) -> None:
    inputs = keras.Input((12,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    x = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    outputs = keras.layers.Identity(name="passthrough")(x)  # the softmax is not the output layer
    model = keras.Model(inputs, outputs)
    sampler = MCSampler(model, passes=16, precision="bfloat16")
    low = {layer.name for layer in sampler._low_precision_layers}
    assert "drop" in low and not low & {"probs", "passthrough"}
    rows = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    samples = sampler.sample(rows, _keys(6))
    np.testing.assert_allclose(samples.sum(axis=-1), 1.0, atol=1e-5)


def test_cpu_bf16_detection_reads_the_feature_flags() -> None:
    from batchuq.sampling.precision import cpu_has_bf16

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n\nprocessor\t: 1\n"
    assert cpu_has_bf16(x86.format("avx512_bf16 avx512_vnni")) is True
    assert cpu_has_bf16(x86.format("amx_tile amx_bf16")) is True
    assert cpu_has_bf16(x86.format("avx512_vnni")) is False
    assert cpu_has_bf16("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n") is True
    assert cpu_has_bf16("processor\t: 0\nFeatures\t: fp asimd\n") is False
    assert cpu_has_bf16("") is None


# Feature flags of real CPUs, as /proc/cpuinfo lists them (one logical CPU each).
# The machine these tests were written on ("Intel(R) Xeon(R) Processor", Ice Lake server's ISA):
# AVX-512 without AVX512-BF16.
ICE_LAKE_XEON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
    "nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic "
    "movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm "
    "avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw "
    "avx512vl xsaveopt xsavec xgetbv1 xsaves arat avx512vbmi umip avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm arch_capabilities"
)
# Sapphire Rapids: Ice Lake's ISA plus AVX512-BF16, AVX512-FP16 and AMX.
SAPPHIRE_RAPIDS = (
    ICE_LAKE_XEON
    + " avx_vnni avx512_bf16 serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8"
)
EPYC_ZEN3 = (  # the AMD EPYC of the docs' figures: AVX2, no AVX-512
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc "
    "cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe "
    "popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a "
    "misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase "
    "bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec "
    "xgetbv1 xsaves clzero xsaveerptr rdpru wbnoinvd arat npt nrip_save umip vaes vpclmulqdq rdpid "
    "fsrm"
)
EPYC_ZEN4 = (  # AVX-512 with AVX512-BF16, no AMX
    EPYC_ZEN3 + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi "
    "avx512_vbmi2 gfni avx512_vnni avx512_bitalg avx512_vpopcntdq"
)
GRAVITON3 = (  # Neoverse V1, Arm
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
    "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg "
    "dcpodp svei8mm svebf16 i8mm bf16 dgh rng"
)


def _cpuinfo(flags: str, arm: bool = False) -> str:
    key = "Features\t" if arm else "flags\t\t"
    return "".join(f"processor\t: {i}\n{key}: {flags}\n\n" for i in range(2))


NO_BF16 = "this CPU has no native bfloat16"


@pytest.mark.parametrize(
    ("cpu", "environ", "why_not"),
    [
        # No bf16 instructions: never native, whatever the cap.
        (ICE_LAKE_XEON, {}, NO_BF16),
        (ICE_LAKE_XEON, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, NO_BF16),
        (EPYC_ZEN3, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, NO_BF16),
        # bf16 instructions and no cap, or a cap at or above AVX512_CORE_BF16: native.
        (SAPPHIRE_RAPIDS, {}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512"}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX_FP16"}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "ALL"}, ""),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, ""),
        (EPYC_ZEN4, {}, ""),
        # A cap below it (.ci/run's second step, containers): the crash of issue 19.
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2 keeps"),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "=AVX512_CORE_VNNI keeps"),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, "=AVX2_VNNI_2 keeps"),  # beside
        (EPYC_ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "=AVX512_CORE keeps"),
        (EPYC_ZEN4, {"ONEDNN_MAX_CPU_ISA": "SSE41"}, "=SSE41 keeps"),
        # The older name, read only when the new one is not set.
        (SAPPHIRE_RAPIDS, {"DNNL_MAX_CPU_ISA": "AVX2"}, "DNNL_MAX_CPU_ISA=AVX2 keeps"),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "ALL", "DNNL_MAX_CPU_ISA": "AVX2"}, ""),
        # oneDNN compares names exactly and ignores others: no cap.
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "avx2"}, ""),
        # oneDNN off: TensorFlow's own kernels emulate bf16.
        (SAPPHIRE_RAPIDS, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "TF_ENABLE_ONEDNN_OPTS=0 turns"),
        (SAPPHIRE_RAPIDS, {"TF_ENABLE_ONEDNN_OPTS": "1"}, ""),
    ],
)
def test_native_bf16_needs_the_instructions_and_a_onednn_cap_that_allows_them(
    cpu: str, environ: dict[str, str], why_not: str
) -> None:
    from batchuq.sampling.precision import native_bf16
    from batchuq.sampling.probe import resolve_precision

    native, reason = native_bf16(_cpuinfo(cpu), environ)
    assert native is not why_not
    assert why_not in reason if why_not else reason == ""
    if not native:  # the fallback, decided before anything runs
        precision, notice = resolve_precision("bfloat16", _cpuinfo(cpu), environ)
        assert precision == "float32"
        assert notice == f"--precision bfloat16: {reason}; using float32."


def test_native_bf16_reads_arm_features_and_unknown_cpus() -> None:
    from batchuq.sampling.precision import native_bf16

    assert native_bf16(_cpuinfo(GRAVITON3, arm=True), {})[0] is True
    assert native_bf16(_cpuinfo("fp asimd evtstrm aes pmull", arm=True), {})[0] is False
    assert native_bf16("", {}) == (None, "")  # not Linux: the probe decides


def test_float32_is_never_changed() -> None:
    from batchuq.sampling.probe import resolve_precision

    assert resolve_precision("float32", _cpuinfo(EPYC_ZEN3), {}) == ("float32", None)


@pytest.mark.numerics
def test_the_bf16_probe_fails_for_real_where_onednn_is_capped_below_bf16(tmp_path) -> None:
    """On an AVX-512 CPU TensorFlow hands bf16 convolutions to oneDNN; under
    ``ONEDNN_MAX_CPU_ISA=AVX2`` oneDNN refuses them (the crash of issue 19). The probe meets that
    failure (in a fresh process: oneDNN reads the cap once) and the run falls back to float32,
    even where the flags promise bf16 (Sapphire Rapids' flags given here)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from batchuq.sampling.precision import cpu_flags

    if "avx512f" not in (cpu_flags() or set()):
        pytest.skip("TensorFlow leaves bf16 convolutions to oneDNN only on AVX-512 CPUs")
    script = (
        "import json, sys\n"
        "from batchuq.sampling.probe import bf16_probe, resolve_precision\n"
        "failure = bf16_probe()\n"
        "json.dump([failure, resolve_precision('bfloat16', sys.argv[1], {})], sys.stdout)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("MAX_CPU_ISA")}
    env |= {"ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script, _cpuinfo(SAPPHIRE_RAPIDS)],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    failure, (precision, notice) = json.loads(done.stdout)
    assert "could not create a primitive descriptor for the convolution" in failure
    assert precision == "float32"
    assert notice == (
        f"--precision bfloat16: a bfloat16 convolution failed in this process ({failure}); "
        "using float32."
    )


def test_cli_memory_budget_default_is_the_samplers() -> None:
    import inspect

    from batchuq.cli.score import score

    (option,) = [p for p in score.params if p.name == "memory_budget"]
    assert option.default == inspect.signature(MCSampler).parameters["memory_budget_mb"].default


def test_bad_sampler_arguments_are_usage_errors(bn_model: keras.Model) -> None:
    with pytest.raises(UsageError, match="Received: precision='float16'"):
        MCSampler(bn_model, passes=5, precision="float16")
    with pytest.raises(UsageError, match="Received: memory_budget_mb=0"):
        MCSampler(bn_model, passes=5, memory_budget_mb=0)
    with pytest.raises(UsageError, match="Received: passes=0"):
        MCSampler(bn_model, passes=0)
    assert issubclass(NoDropoutError, UsageError) and issubclass(UsageError, ValueError)


def test_sample_uses_private_keras_apis_only_through_keras_private() -> None:
    """Every private Keras attribute sits in batchuq/keras_private.py, so that a Keras upgrade
    is checked in one place; batchuq/sampling/ names none (its own ``self._x`` attributes aside)."""
    import re
    from pathlib import Path

    import batchuq.sampling

    folder = Path(batchuq.sampling.__file__).parent
    source = "".join(path.read_text() for path in sorted(folder.glob("*.py")))
    # Attribute access (x._name), names passed as strings (getattr(x, "_name")), internals.
    pattern = (
        r"(?<!self)\._[a-z]\w*|[\"']_[a-z]\w*[\"']|keras\.src|__setattr__|__delattr__|__dict__"
    )
    private = re.findall(pattern, source)
    assert private == []


def test_keras_private_functions_on_the_apis_they_wrap() -> None:
    import tensorflow as tf

    from batchuq import keras_private

    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dropout(0.2)])
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    names = [layer.name for layer in keras_private.flatten_layers(model)]
    nested = {layer.name for layer in inner.layers}
    assert nested <= set(names) and len(names) == len(set(names))  # nested layers, each once
    assert not nested & {layer.name for layer in keras_private.flatten_layers(model, False, False)}
    assert keras_private.flatten_layers(model, include_self=True)[0] is model
    # A built Sequential walks through its functional graph; a subclassed model has none.
    assert keras_private.graph_model(inner) is not None
    assert keras_private.graph_model(_Subclassed()) is None
    nodes = keras_private.graph_nodes(model)
    assert [node.operation for node in nodes] == [inner, model.get_layer("head")]
    data = np.random.default_rng(0).random((3, 6), dtype=np.float32)
    tensors = {id(model.inputs[0]): tf.constant(data)}
    for node in nodes:
        keras_private.run_node(node, tensors)  # dropout off: training=False reaches it
    np.testing.assert_allclose(
        tensors[id(model.outputs[0])], model.predict(data, verbose=0), **ROUNDING
    )
    x = tf.ones((2, 5, 5, 3))
    assert keras_private.spatial_noise_shape(keras.layers.SpatialDropout2D(0.5), x) == (2, 1, 1, 3)
    assert keras_private.spatial_noise_shape(keras.layers.Dropout(0.5), x) is None
    layer = keras.layers.Dropout(0.5)
    keras_private.override_call(layer, lambda inputs, **kwargs: inputs * 0)
    assert float(tf.reduce_sum(layer(tf.ones((2, 2))))) == 0.0
    keras_private.restore_call(layer)
    keras_private.restore_call(layer)  # a no-op the second time
    assert float(tf.reduce_sum(layer(tf.ones((2, 2)), training=False))) == 4.0
    assert "call" not in layer.__dict__
