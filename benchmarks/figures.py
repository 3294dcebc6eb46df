"""Fill the benchmark figures into the documentation when it is built (mkdocs-macros).

The sentences live in the Markdown pages under ``docs/``; the numbers in the benchmarks' JSON
results (``benchmarks/results/*.json``). ``mkdocs.yml`` names this module, and every page may
write ``{{ r.NAME.key }}`` (``NAME`` a results file) with the filters and macros below::

    {{ r.digits.default.accuracy | pct }}            98.4%
    {{ r.bench_mc.total_seconds / 60 | f(".0f") }}   14
    {{ source(r.adaptive) }}                         the CPU and the date of a result

A figure whose result is missing, or a key that is not in it, fails the build
(``on_undefined: strict``), so a page cannot show a stale or empty figure quietly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def results() -> dict[str, dict]:
    """Every ``benchmarks/results/NAME.json``, by ``NAME``."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))}


def pct(x: float) -> str:
    """``0.984`` -> ``98.4%``."""
    return f"{100 * x:.1f}%"


def sci(x: float) -> str:
    """``6.0e-8``, as the pages write small numbers."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}").replace("e+", "e")


def f(x: float, spec: str) -> str:
    """Python's ``format(x, spec)``: ``{{ x | f(",.0f") }}``."""
    return format(x, spec)


def isa(cpu: dict) -> str:
    """``AVX2, no AVX-512, no native bfloat16`` and the like, from ``cpu_info``'s flags."""
    flags = cpu["flags"]
    parts = []
    if flags.get("avx512f"):
        parts.append("AVX-512")
    else:
        parts += (["AVX2"] if flags.get("avx2") else []) + ["no AVX-512"]
    if flags.get("avx512_bf16"):
        parts.append("AVX512-BF16")
    if flags.get("amx_bf16"):
        parts.append("AMX-BF16")
    if not cpu.get("bf16_native"):
        parts.append("no native bfloat16")
    return ", ".join(parts)


def cpu_name(cpu: dict) -> str:
    """``2-core AMD EPYC``."""
    return f"{cpu['usable_cores']}-core {cpu['model_name']}"


def cpu_and_date(result: dict) -> tuple[dict, str]:
    """The CPU and the date a result records (``bench_mc`` keeps both under ``env``; the Ray
    benchmark calls its date ``when``)."""
    holder = result.get("env", result)
    return holder["cpu"], holder.get("date") or holder["when"]


def source(result: dict) -> str:
    """The line printed beside every figure: which CPU it came from, and when."""
    cpu, date = cpu_and_date(result)
    note = result.get("env", result).get("date_source")
    when = f"{date[:10]} ({note})" if note else date[:10]
    return f"*Measured on a {cpu_name(cpu)} ({isa(cpu)}), {when}.*"


def best(rows: dict | list, key: str | None = None, high: bool = False, label: str = "name"):
    """The row with the lowest (``high``: highest) ``key``, skipping missing values: its
    ``label``, or its key in a dict (whose values may be numbers, with no ``key``)."""
    items = rows.items() if isinstance(rows, dict) else ((row[label], row) for row in rows)
    found = {name: row if key is None else row.get(key) for name, row in items}
    found = {name: value for name, value in found.items() if value is not None}
    return (max if high else min)(found, key=found.get)


def series_cell(series: list[dict], name: str, severity: int, key: str) -> str:
    """One cell of the shift table: ``name``'s mean ``key`` over the corruptions."""
    for row in series:
        if row["name"] == name and row["severity"] == severity and row.get(key) is not None:
            return pct(row[key]) if key == "accuracy" else f"{row[key]:.4f}"
    return "n/a"


def first_break(cells: dict, check: str, level: float) -> int | None:
    """The lowest severity of one corruption of ``guarantees.json`` at which a guarantee is
    broken beyond doubt: ``check`` ``"risk"``, the 95% interval of the certified rule's realised
    selective risk lies above the target ``level``; ``"lac"`` or ``"raps"``, that of the sets'
    coverage lies below ``level`` (1 - alpha). ``None``: not at any severity."""
    for severity in sorted(cells, key=int):
        cell = cells[severity]
        if check == "risk":
            interval = cell["risk_rule"]["risk_interval"]
            if interval is not None and interval[0] > level:
                return int(severity)
        elif cell[check]["coverage_interval"][1] < level:
            return int(severity)
    return None


def pairs(first: list, second: list) -> list[tuple]:
    """``zip`` of two lists of the same length: ``{% for a, b in xs | pairs(ys) %}``."""
    return list(zip(first, second, strict=True))


def define_env(env) -> None:
    """mkdocs-macros' hook: the results as ``r``, the helpers as filters and macros."""
    env.variables["r"] = results()
    for helper in (pct, sci, f, isa, cpu_name, pairs):
        env.filter(helper)
    for helper in (source, best, series_cell, isa, cpu_name, first_break):
        env.macro(helper)
