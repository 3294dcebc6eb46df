"""The memory budget in rows: how many rows run at once, and how they are cut into chunks.

The budget bounds the activations of one chunk: the rows run through the prefix at once, and
those rows tiled over passes in the tail. A call with more rows (e.g. a batch of B images times
K test-time copies) is cut into chunks of balanced size, so peak memory does not grow with B x K
and few distinct shapes reach compiled code. Plain arithmetic: nothing here imports TensorFlow.
"""

from __future__ import annotations

import math


def row_limits(
    tail_bytes_per_row: int,
    prefix_bytes_per_row: int,
    input_shape: tuple | None,
    precision: str,
    memory_budget_mb: float,
) -> tuple[int, int]:
    """The rows that fit the memory budget.

    Args:
        tail_bytes_per_row: Estimated float32 bytes of tail activations per row (0: unknown,
            e.g. no graph split; then 16 images' worth of the input, or of 64 values).
        prefix_bytes_per_row: Estimated float32 bytes of prefix activations per row (0: none).
        input_shape: The model's input shape ``(None, ...)``, if known.
        precision: ``float32`` or ``bfloat16`` (halves the tail's bytes).
        memory_budget_mb: The budget in MiB.

    Returns:
        ``(max_rows, max_chunk_rows)``: the most tiled rows (rows x passes) in the tail at once,
        and the most rows run at once (their prefix activations fit the budget, and so does
        one pass of them through the tail).
    """
    per_row = tail_bytes_per_row
    if not per_row:
        per_row = 4 * 16 * math.prod(d or 1 for d in (input_shape or (None, 64))[1:])
    if precision == "bfloat16":
        per_row //= 2
    max_rows = max(1, int(memory_budget_mb * 2**20 // per_row))
    prefix_rows = (
        int(memory_budget_mb * 2**20 // prefix_bytes_per_row) if prefix_bytes_per_row else max_rows
    )
    return max_rows, max(1, min(prefix_rows, max_rows))


def balanced_chunks(rows: int, largest: int) -> list[tuple[int, int]]:
    """Cut ``rows`` rows into ``(start, stop)`` ranges of at most ``largest`` rows each, whose
    sizes differ by at most one (e.g. 399 + 400 + 400, not 416 + 416 + 367), so that few
    distinct shapes reach compiled code."""
    if rows <= 0:
        return []
    count = -(-rows // largest)
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def bucket_rows(rows: int) -> int:
    """The padded number of rows for ``rows`` rows: the next of 1, 2, 3, 4, 6, 8, 12, 16, ...

    Adaptive sampling runs ever fewer rows; padding them to these sizes (at most a third
    more) keeps the shapes that reach XLA and oneDNN, each compiled once, to a handful.
    """
    if rows <= 2:
        return max(rows, 1)
    power = 1 << (rows - 1).bit_length()  # next power of two >= rows
    return power * 3 // 4 if power * 3 // 4 >= rows else power
