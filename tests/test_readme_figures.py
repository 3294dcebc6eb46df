"""The README's figures are the ones `benchmarks/readme_figures.py` computed and kept as JSON.

Nothing is recomputed here: the blocks are rendered from the committed
`benchmarks/readme_figures.json` with the script's own render functions. After changing the
code, run `python benchmarks/readme_figures.py --write-readme` (or `--from-json --write-readme`
after changing only a block's words).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "readme_figures", REPO / "benchmarks" / "readme_figures.py"
)
figures_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(figures_script)

FIGURES = json.loads(figures_script.FIGURES_JSON.read_text(encoding="utf-8"))
README = figures_script.README.read_text(encoding="utf-8")
BLOCKS = figures_script.readme_blocks(README)
HOW = "run `python benchmarks/readme_figures.py --write-readme` (see its docstring)"

# Kinds of figures the blocks hold, which must not be typed anywhere else in the README.
STRAY = {
    "percentage": r"\d\s?%",
    "throughput": r"\d\s?images/s",
    "GFLOP": r"\d\s?GFLOP",
    "peak RSS": r"\d\s?(MiB|MB|GB) for [\d,]+",
    "unclassified count": r"\d+ (of \d+ )?unclassified",
    "selective accuracy": r"selective accuracy \d",
    "coverage value": r"covers? \d",
    "three-decimal metric": r"(?<![\d.])0\.9\d\d(?!\d)",
}


@pytest.mark.parametrize("name", sorted(figures_script.BLOCKS))
def test_readme_block_is_the_rendering_of_the_figures(name: str) -> None:
    assert name in BLOCKS, f"README.md has no <!-- figures:{name} --> block"
    assert BLOCKS[name] == figures_script.BLOCKS[name](FIGURES), f"block {name!r}: {HOW}"


def test_every_block_marker_is_well_formed_and_known() -> None:
    opened = re.findall(r"<!-- figures:([\w-]+)", README)
    closed = re.findall(r"<!-- /figures:([\w-]+) -->", README)
    assert sorted(opened) == sorted(closed) == sorted(BLOCKS)
    assert set(BLOCKS) == set(figures_script.BLOCKS)


@pytest.mark.parametrize("kind", sorted(STRAY))
def test_no_such_figure_outside_the_blocks(kind: str) -> None:
    outside = figures_script.outside_blocks(README)
    found = [line for line in outside.splitlines() if re.search(STRAY[kind], line, re.IGNORECASE)]
    assert not found, f"{kind} typed outside the generated blocks: {found}"


def test_the_stray_patterns_catch_the_old_typed_figures() -> None:
    old = "with the MC mean; 6 of 450 unclassified (selective accuracy 98.9%), covers 0.973"
    assert all(re.search(STRAY[k], old) for k in ("percentage", "unclassified count"))
    assert re.search(STRAY["three-decimal metric"], old)
    assert not re.search(STRAY["three-decimal metric"], "--max-error-rate 0.01, rtol=1e-5")


def test_speed_figures_name_their_cpu() -> None:
    cpu = FIGURES["bench_mc"]["env"]["cpu"]
    assert cpu["model_name"] and cpu["usable_cores"]
    assert set(cpu["flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    performance = " ".join(BLOCKS["performance"].split())  # as one line
    assert f"{cpu['usable_cores']}-core {cpu['model_name']}" in performance
    assert figures_script.isa(cpu) in performance
    if not cpu["bf16_native"]:
        assert "no native bfloat16" in performance and "falls back" in performance


def test_figures_record_where_and_when_they_were_made() -> None:
    assert FIGURES["date"] and FIGURES["generated_by"].startswith("python benchmarks/")
    assert all(FIGURES["versions"][package] for package in ("batchuq", "tensorflow", "keras"))
    assert FIGURES["digits"]["versions"]["tensorflow"] == FIGURES["versions"]["tensorflow"]
    assert FIGURES["digits"]["cpu"]["model_name"]
    for memory in ("memory_flat", "memory_tta"):
        block = " ".join(BLOCKS[memory.replace("_", "-")].split())
        assert figures_script.cpu_name(FIGURES[memory]["cpu"]) in block


def test_rewrite_replaces_only_the_blocks() -> None:
    broken = README.replace(
        BLOCKS["sample-accuracy"], "Test accuracy: **100.0%**, typed by hand.", 1
    )
    assert broken != README
    fixed = figures_script.rewrite(broken, FIGURES)
    assert fixed == figures_script.rewrite(README, FIGURES)
    assert figures_script.outside_blocks(fixed) == figures_script.outside_blocks(README)
