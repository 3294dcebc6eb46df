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


def verdicts(rows: list[dict], key: str) -> str:
    """The methods whose difference to the baseline in ``key`` is ``better``, ``worse`` or a
    ``tie`` (its paired bootstrap interval holds 0), as one sentence fragment."""
    found: dict[str, list[str]] = {"better": [], "worse": [], "tie": []}
    for row in rows:
        entry = (row.get("difference_to_baseline") or {}).get(key) or {}
        if entry.get("verdict") in found:
            found[entry["verdict"]].append(row["name"])
    parts = [f"{word}: {', '.join(names)}" for word, names in found.items() if names]
    return "; ".join(parts) or "no difference has an interval"


def shift_verdicts(rows: list[dict], severity: int, key: str) -> list[dict]:
    """Per method, how many corruptions at ``severity`` put its ``key`` better, worse or tied
    with the baseline (``difference_to_baseline`` of ``compare_methods``' series rows)."""
    counts: dict[str, dict] = {}
    for row in rows:
        entry = (row.get("difference_to_baseline") or {}).get(key)
        if row["severity"] != severity or not entry or entry.get("verdict") is None:
            continue
        tally = counts.setdefault(
            row["name"], {"name": row["name"], "better": 0, "worse": 0, "tie": 0}
        )
        tally[entry["verdict"]] += 1
    return list(counts.values())


def mean_sd(entry: dict | None, spec: str = ".4f", percent: bool = False) -> str:
    """``{mean, sd}`` over seeds as ``0.0920 ± 0.0004`` (``percent``: ``98.4% ± 0.1``)."""
    if not entry:
        return "n/a"
    if percent:
        return f"{100 * entry['mean']:.1f}% ± {100 * entry['sd']:.1f}"
    sd = entry["sd"] if entry["sd"] > 1e-12 * abs(entry["mean"]) else 0.0  # rounding, not spread
    return f"{entry['mean']:{spec}} ± {sd:{spec}}"


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
    for helper in (pct, sci, f, isa, cpu_name, pairs, mean_sd):
        env.filter(helper)
    for helper in (
        source,
        verdicts,
        shift_verdicts,
        series_cell,
        isa,
        cpu_name,
        mean_sd,
        first_break,
    ):
        env.macro(helper)
