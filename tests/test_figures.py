"""Every benchmark figure is in the docs, with the CPU it came from and its date, and the
sentences around the figures say what the JSON results say.

The figures live in ``benchmarks/results/*.json`` (written by the scripts in ``benchmarks/``)
and the sentences in ``docs/*.md``; ``benchmarks/figures.py`` fills the numbers in when the site
is built. Nothing is recomputed here, and nothing depends on the CPU of the machine running the
tests: a figure names the CPU it was measured on, whatever that was.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from site_build import REPO, page_text

_SPEC = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "figures.py")
figures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(figures)
R = figures.results()


def _setup(r: dict) -> list[str]:
    return [r["digits"]["setup"]["summary_line"]]


def _digits_accuracy(r: dict) -> list[str]:
    d = r["digits"]
    return [figures.pct(d["passes1"]["accuracy"]), figures.pct(d["default"]["accuracy"])]


# The 14 figures the README carried before the docs became a site: figure -> (page, results
# file, what of it the page must show besides the CPU and the date).
CHECKLIST = {
    "setup": ("getting-started", "digits", _setup),
    "sample-data": (
        "getting-started",
        "digits",
        lambda r: [f"val {r['digits']['files']['val']}"],
    ),
    "sample-accuracy": ("getting-started", "digits", _digits_accuracy),
    "bitwise": (
        "scoring",
        "digits",
        lambda r: [figures.sci(r["digits"]["batch_size"]["mean"]["max_abs_diff"])],
    ),
    "calibration": (
        "calibration",
        "digits",
        lambda r: [f"fitted temperature {r['digits']['calibration']['temperature']:.2f}"],
    ),
    "conformal": (
        "calibration",
        "digits",
        lambda r: [f"expected coverage {r['digits']['conformal']['expected_coverage']:.3f}"],
    ),
    "auroc": (
        "calibration",
        "digits",
        lambda r: [f"{r['digits']['evaluate']['auroc_error']['entropy']:.3f}"],
    ),
    "performance": (
        "results",
        "bench_mc",
        lambda r: [f"c/d = {r['bench_mc']['ratios']['c/d fp32']:.2f}"],
    ),
    "memory-flat": (
        "results",
        "memory_flat",
        lambda r: [f"{run['peak_rss_mib']:,.0f} MiB for" for run in r["memory_flat"]["runs"]],
    ),
    "memory-tta": (
        "results",
        "memory_tta",
        lambda r: [
            f"calibrate {r['memory_tta']['before_chunking']['calibrate']['peak_rss_mib']:,.0f} MiB"
        ],
    ),
    "adaptive": (
        "results",
        "adaptive",
        lambda r: [f"{r['adaptive']['digits']['speedup']:.2f}×"],
    ),
    "methods": (
        "results",
        "methods",
        lambda r: [f"{r['methods']['rows']['one_member']['images_per_second']:.1f} images/s"],
    ),
    "compare-methods": (
        "results",
        "compare_methods",
        lambda r: [f"{row['nll']:.4f}" for row in r["compare_methods"]["clean"]["rows"]],
    ),
    "guarantees": (
        "calibration",
        "guarantees",
        lambda r: [r["guarantees"]["calibration"]["statement"]],
    ),
    "ood": (
        "results",
        "ood",
        lambda r: [f"{row['far']['auroc']['energy']:.4f}" for row in r["ood"]["rows"].values()],
    ),
    "scaleout": (
        "results",
        "scaleout",
        lambda r: [f"d = {r['scaleout']['driver_us_per_image']['shared_fs']:.1f} µs"],
    ),
}


@pytest.mark.parametrize("name", sorted(CHECKLIST))
def test_figure_is_on_its_page_with_its_cpu_and_date(name: str) -> None:
    page, result, shown = CHECKLIST[name]
    text = page_text(page)
    cpu, date = figures.cpu_and_date(R[result])
    assert cpu["model_name"] and cpu["usable_cores"] and date
    line = figures.source(R[result]).strip("*")
    assert line in text, f"{name}: no '{line}' on {page}"
    for expected in shown(R):
        assert expected in text, f"{name}: {expected!r} is not on {page}"


def test_every_result_names_its_cpu_and_date() -> None:
    for name, result in R.items():
        cpu, date = figures.cpu_and_date(result)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:]+([+-]\d\d:?\d\d|Z)?", date), name
        assert cpu["model_name"] and cpu["usable_cores"] >= 1, name
        assert "avx2" in cpu["flags"] and "bf16_native" in cpu, name


def test_the_cpu_line_follows_the_recorded_flags_not_this_machine() -> None:
    amd = {"model_name": "AMD EPYC", "usable_cores": 2, "bf16_native": False}
    amd["flags"] = {"avx2": True, "avx512f": False}
    sapphire = {"model_name": "Xeon", "usable_cores": 4, "bf16_native": True}
    sapphire["flags"] = {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True}
    assert figures.isa(amd) == "AVX2, no AVX-512, no native bfloat16"
    assert figures.isa(sapphire) == "AVX-512, AVX512-BF16, AMX-BF16"
    when = {"cpu": sapphire, "date": "2027-01-02T03:04:05+00:00"}
    assert (
        figures.source(when)
        == "*Measured on a 4-core Xeon (AVX-512, AVX512-BF16, AMX-BF16), 2027-01-02.*"
    )


def test_the_speed_page_says_what_bfloat16_did_on_that_cpu() -> None:
    text = page_text("results")
    native = R["bench_mc"]["env"]["cpu"]["bf16_native"]
    assert ("This CPU has no native bfloat16" in text) is (not native)
    assert ("bf16 means agree with fp32" in text) is bool(native)


def test_the_conformal_sentences_hold_for_the_figures() -> None:
    d = R["digits"]
    c = d["conformal"]
    alpha, lac, cls, aps = c["alpha"], *(c["methods"][m] for m in ("lac", "class", "aps"))
    assert d["evaluate"]["accuracy"] > 1 - alpha  # "can only come down to 90% by empty sets"
    assert lac["empty"] > 0 and aps["empty"] == 0
    assert aps["evaluate"]["coverage"] > 1 - alpha  # "over-covers"
    assert max(cls["images_per_class"]) < c["min_images_per_class"] and cls["warnings"]
    assert d["mapie"]["max_abs_diff"] is not None and d["mapie"]["max_abs_diff"] <= 1e-12


def test_the_guarantee_sentences_hold_for_the_figures() -> None:
    """docs/calibration.md, "Guarantees under shift": the clean run keeps both promises; the
    rule abstains as confidence falls; RAPS sets hold coverage at least as long as LAC's; the
    randomised sets equal MAPIE's where the methods page says they do."""
    g = R["guarantees"]
    alpha, target = g["settings"]["alpha"], g["settings"]["target_risk"]
    clean = g["clean"]
    assert clean["risk_rule"]["target_held"] and clean["lac"]["coverage_interval"][1] >= 1 - alpha
    assert clean["raps"]["coverage_interval"][1] >= 1 - alpha
    for cells in g["shift"].values():
        lac = figures.first_break(cells, "lac", 1 - alpha)
        raps = figures.first_break(cells, "raps", 1 - alpha)
        assert raps is None or (lac is not None and raps >= lac)  # "keep coverage longer"
    contrast, rotate = g["shift"]["contrast"], g["shift"]["rotate"]
    # Contrast: the rule abstains, down to none accepted, and its risk never breaks.
    assert contrast["5"]["risk_rule"]["accepted"] == 0
    assert figures.first_break(contrast, "risk", target) is None
    assert contrast["5"]["raps"]["mean_set_size"] > contrast["1"]["raps"]["mean_set_size"]
    # Rotate: confident and wrong; the certified risk breaks beyond doubt.
    assert figures.first_break(rotate, "risk", target) is not None
    for method in ("lac", "raps"):  # "an empty set never covers, a one-class set almost always"
        sizes = {x["size"]: x for x in clean["strata"][method]["per_size"]}
        assert sizes[0]["covered"] == 0 and sizes[1]["coverage"] > 0.95
    for entry in g["mapie"]["alphas"].values():
        aps = entry["aps-random"]
        assert aps["sets_differ"] == 0 and aps["coverage"] == aps["mapie_coverage"]
        for x in entry.values():
            assert abs(x["quantile"] - x["mapie_quantile"]) <= 1e-12


def test_the_other_sentences_hold_for_the_figures() -> None:
    runs = sorted(R["memory_flat"]["runs"], key=lambda run: run["images"])
    growth = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"] - 1
    assert growth < 0.1 * (runs[-1]["images"] / runs[0]["images"] - 1)  # "does not grow"
    b = R["digits"]["batch_size"]
    assert b["pred_identical"] == b["decision_identical"] == b["images"]  # "identical for all"
    for workload in ("digits", "digits_confidence", "reference"):
        assert R["adaptive"][workload]["speedup"] > 1


def test_the_monitor_sentences_hold_for_the_figures() -> None:
    m = R["monitor"]
    fa = m["false_alarms"]
    assert fa["splits"] >= 200 and fa["by_min_psi"]["0.0"]["rate"] <= m["alpha"]  # "at or below"
    cells = {(x["corruption"], x["severity"]): x for x in m["detection"]}
    rate = {key: x["by_min_psi"]["0.0"]["rate"] for key, x in cells.items()}
    clean = m["clean_accuracy"]["test"]
    assert all(rate[("contrast", s)] >= 0.95 for s in range(1, 6))  # "every severity"
    assert all(rate[("rotate", s)] >= 0.95 for s in (3, 4, 5))
    assert all(rate[("gaussian_noise", s)] >= 0.5 for s in (3, 4, 5))
    for corruption in ("gaussian_blur", "pixelate"):  # "although the accuracy barely moves"
        assert rate[(corruption, 5)] >= 0.9
        assert abs(cells[(corruption, 5)]["accuracy"] - clean) <= 0.01
    quiet = [("jpeg", s) for s in range(1, 6)] + [("pixelate", 1), ("pixelate", 2)]
    assert all(rate[key] <= 0.1 for key in quiet)  # "at the false-alarm level"


# Kinds of measured figures that must come from the JSON, never typed into a page's sentences
# (code blocks are examples, and table headers name units).
STRAY = {
    "percentage": r"\d\s?%",
    "throughput": r"(?<![\w.])\d[\d,.]*\s?images/s",
    "GFLOP": r"\d\s?GFLOP",
    "peak RSS": r"\d\s?(MiB|MB|GB) for [\d,]+",
    "unclassified count": r"\d+ (of \d+ )?unclassified",
    "selective accuracy": r"selective accuracy \d",
    "coverage value": r"covers? \d",
    "three-decimal metric": r"(?<![\d.])0\.9\d\d(?!\d)",
}


# The methods page states the settings (alpha 5%, delta 10%) and seeded outcomes of the simulation
# tests that check its guarantees (tests/test_stopping.py, tests/test_selective.py assert them
# against their bounds); measured figures of the benchmarks belong on the other pages.
SIMULATION_PAGES = {"methods.md"}


def typed_lines(markdown: str) -> list[str]:
    """The lines of a page's sentences and table cells as written, without the filled-in
    ``{{ ... }}`` and ``{% ... %}``, code blocks or table headers."""
    text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", " ", markdown, flags=re.DOTALL)
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    lines = text.splitlines()
    return [
        line
        for i, line in enumerate(lines)
        if not (i + 1 < len(lines) and lines[i + 1].startswith("|--"))
    ]


@pytest.mark.parametrize("kind", sorted(STRAY))
def test_no_figure_typed_into_a_page(kind: str) -> None:
    found = [
        f"{page.name}: {line}"
        for page in sorted((REPO / "docs").glob("*.md"))
        if page.name not in SIMULATION_PAGES
        for line in typed_lines(page.read_text(encoding="utf-8"))
        if re.search(STRAY[kind], line, re.IGNORECASE)
    ]
    assert not found, f"{kind} typed into the docs instead of read from the results: {found}"


def test_the_stray_patterns_catch_a_typed_figure() -> None:
    typed = "Test accuracy **98.4%**; 5 of 450 unclassified, at 48.1 images/s."
    assert typed_lines(typed) == [typed]
    assert all(
        re.search(STRAY[k], typed) for k in ("percentage", "throughput", "unclassified count")
    )
    assert typed_lines("accuracy {{ d.default.accuracy | pct }}") == ["accuracy  "]
    assert not re.search(STRAY["three-decimal metric"], "--max-error-rate 0.01, rtol=1e-5")
    assert json.loads((REPO / "benchmarks" / "results" / "digits.json").read_text())
