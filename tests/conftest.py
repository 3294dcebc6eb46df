"""Shared fixtures: small real models and image folders made on the fly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TEST = REPO / "sample_data" / "digits" / "test"

# Tolerance for "equal to float32 rounding". The same image in another batch (another
# --batch-size, another position in the batch, the zero-rate copy run by model.predict) or on
# another CPU ISA (AVX2 vs AVX-512: oneDNN picks other kernels, so other summation orders) gives
# probabilities that differ in their last bits: up to 6e-8 measured on an AVX2 CPU, one float32
# ulp in [0.5, 1). atol 1e-6 is about 17 such ulps, yet thousands of times smaller than anything
# a real change moves (BN on batch statistics instead of moving ones moves them by 3e-2).
# rtol 1e-5 only matters for the larger non-probability columns (entropy in nats).
ROUNDING = {"rtol": 1e-5, "atol": 1e-6}


def _float_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]


def assert_frames_equal_to_rounding(
    a: pd.DataFrame, b: pd.DataFrame, check_dtype: bool = True
) -> None:
    """Float columns equal to float32 rounding; every other column (path, label, pred,
    pred_index, decision, status) exactly equal."""
    assert list(a.columns) == list(b.columns)
    floats = _float_columns(a)
    exact = [c for c in a.columns if c not in floats]
    pd.testing.assert_frame_equal(a[exact], b[exact], check_exact=True, check_dtype=check_dtype)
    pd.testing.assert_frame_equal(
        a[floats], b[floats], check_exact=False, check_dtype=check_dtype, **ROUNDING
    )


def assert_frames_bitwise_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Every column exactly equal, float columns down to the bits (-0.0 is not 0.0)."""
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for name in _float_columns(a):
        values_a, values_b = a[name].to_numpy(), b[name].to_numpy()
        bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[values_a.dtype.itemsize]
        np.testing.assert_array_equal(values_a.view(bits), values_b.view(bits), err_msg=name)


def assert_parquet_bitwise_equal(a: Path, b: Path) -> None:
    """Same schema, same nulls and the same bits in every value of every column (so also
    -0.0 vs 0.0 and NaN payloads); the key-value metadata is not compared here."""
    table_a, table_b = pq.read_table(a), pq.read_table(b)
    assert table_a.schema.equals(table_b.schema, check_metadata=False)
    for name in table_a.column_names:
        col_a, col_b = table_a[name].combine_chunks(), table_b[name].combine_chunks()
        assert col_a.is_null().equals(col_b.is_null()), name
        if pa.types.is_floating(col_a.type):
            bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[col_a.type.byte_width]
            values_a = col_a.fill_null(0).to_numpy().view(bits)
            values_b = col_b.fill_null(0).to_numpy().view(bits)
            np.testing.assert_array_equal(values_a, values_b, err_msg=name)
        else:
            assert col_a.equals(col_b), name


INTEGER_COLUMNS = ("label_index", "pred_index", "passes")  # every int64 of the output schema


def integer_columns_by_reader(path: Path) -> dict[str, dict[str, tuple[str, dict]]]:
    """How pandas, polars and DuckDB read the integer columns of an output file or folder.

    Returns:
        ``{reader: {column: (type, {path: value or None})}}``, and ``"arrow"`` (pyarrow's own
        types and values, the reference) among the readers.
    """
    import duckdb
    import polars as pl

    pattern = str(path / "*.parquet") if path.is_dir() else str(path)
    table = pq.read_table(path)
    frame = pd.read_parquet(path)
    polars_frame = pl.read_parquet(pattern)
    duck = duckdb.read_parquet(pattern)
    duck_types = dict(zip(duck.columns, duck.types, strict=True))
    duck_rows = duck.select(", ".join(["path", *INTEGER_COLUMNS])).fetchall()
    out: dict[str, dict[str, tuple[str, dict]]] = {}
    for name in INTEGER_COLUMNS:
        paths = table["path"].to_pylist()
        out.setdefault("arrow", {})[name] = (
            str(table.schema.field(name).type),
            dict(zip(paths, table[name].to_pylist(), strict=True)),
        )
        # Int64 yields NumPy integers (made Python ints here); float64 would yield floats.
        values = [
            None if pd.isna(v) else int(v) if isinstance(v, np.integer) else v for v in frame[name]
        ]
        out.setdefault("pandas", {})[name] = (
            str(frame[name].dtype),
            dict(zip(frame["path"], values, strict=True)),
        )
        out.setdefault("polars", {})[name] = (
            str(polars_frame[name].dtype),
            dict(zip(polars_frame["path"], polars_frame[name].to_list(), strict=True)),
        )
        column = 1 + INTEGER_COLUMNS.index(name)
        out.setdefault("duckdb", {})[name] = (
            str(duck_types[name]),
            {row[0]: row[column] for row in duck_rows},
        )
    return out


def assert_integer_columns_stay_integers(
    path: Path, with_nulls: tuple[str, ...] = INTEGER_COLUMNS
) -> None:
    """pandas reads every integer column as nullable ``Int64``, polars as ``Int64``, DuckDB as
    ``BIGINT``, each with pyarrow's values and nulls; the ``with_nulls`` columns hold both
    values and nulls (so that the test is not vacuous)."""
    read = integer_columns_by_reader(path)
    expected_types = {"arrow": "int64", "pandas": "Int64", "polars": "Int64", "duckdb": "BIGINT"}
    for name in INTEGER_COLUMNS:
        reference = read["arrow"][name][1]
        values = set(reference.values())
        assert len(values - {None}) > 0, f"{name} holds only nulls"
        if name in with_nulls:
            assert None in values, f"{name} holds no null"
        for reader, columns in read.items():
            kind, got = columns[name]
            assert kind == expected_types[reader], (reader, name, kind)
            assert got == reference, (reader, name)
            # and the values are integers, not floats equal to them
            assert all(type(v) is int for v in got.values() if v is not None), (reader, name)


def bn_dropout_model(classes: int = 3, size: int = 16, seed: int = 1) -> keras.Model:
    """Functional model with BatchNormalization, a residual branch and a baked-in dropout."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    branch = keras.layers.Dropout(0.3, name="branch_dropout")(x, training=True)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="conv_b")(branch)
    x = keras.layers.Add(name="residual")([x, branch])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dropout(0.2, name="head_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    # Non-trivial moving statistics, so that using batch statistics would show.
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(0.1, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(1.5, 2.5, 8).astype("float32"))
    return model


@pytest.fixture
def bn_model() -> keras.Model:
    return bn_dropout_model()


def write_image(path: Path, size: int = 20, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode).save(path)
    return path


@pytest.fixture
def digits_subset(tmp_path: Path) -> Path:
    """Three test images of each digit from the bundled sample data (30 images)."""
    root = tmp_path / "digits"
    for folder in sorted(SAMPLE_TEST.iterdir()):
        for image in sorted(folder.iterdir())[:3]:
            (root / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / folder.name / image.name)
    return root
