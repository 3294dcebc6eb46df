"""The shape of the code: import layers, no import cycle, no long function.

Three checks, each written as a function of a package path so that the tests below also run it
on a small broken package built in ``tmp_path`` and see it fail:

* ``run_lint_imports``: the import-linter contracts of ``pyproject.toml`` (``[tool.importlinter]``:
  commands over the presentation (``report``) over jobs over methods and post-processing over the
  core library, itself in sub-layers; inside the score job, sampling and the output, their own
  layers; Matplotlib imported only by the presentation and the commands);
* ``find_import_cycle``: no cycle among the modules of the import graph, imports inside functions
  included, every package ``__init__`` a module of its own;
* ``long_functions``: no function or method with more than ``MAX_FUNCTION_LINES`` lines of code;
* ``long_parameter_lists`` and ``locals_calls``: no function taking more than
  ``MAX_PARAMETERS`` parameters (options travel as objects: ``ScoreOptions``, ``RunControl``,
  ...), and no ``locals()`` hiding which values a function passes on.

``pytest -s tests/test_layers.py`` prints the five longest functions.
"""

from __future__ import annotations

import ast
import contextlib
import graphlib
import importlib
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "batchuq"
PYPROJECT = REPO / "pyproject.toml"

# Lines of code of a function body, from its first statement after the docstring to its last
# line: the signature, decorators and docstring are not counted; comments and blank lines inside
# the body are, as are the bodies of nested functions.
MAX_FUNCTION_LINES = 60
# Parameters of a function: positional ones (``self`` and ``cls`` not counted), keyword-only ones,
# and ``*args`` and ``**kwargs`` one each.
MAX_PARAMETERS = 12


# --- the checks ----------------------------------------------------------------------------------


def run_lint_imports(cwd: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess[str]:
    """Runs the venv's ``lint-imports`` on the package found from ``cwd``.

    Args:
        cwd: working directory; lint-imports puts it first on ``sys.path``, so a package there
            shadows the installed one.
        config: the file holding the ``[tool.importlinter]`` contracts.

    Returns:
        The finished process, stdout and stderr captured as text.
    """
    lint_imports = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(lint_imports), "--config", str(config), "--no-cache", "--no-logo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def _importable(package_dir: Path) -> Iterator[str]:
    """Puts ``package_dir``'s parent first on ``sys.path`` and yields the package name."""
    parent = str(package_dir.parent)
    sys.path.insert(0, parent)
    importlib.invalidate_caches()
    try:
        yield package_dir.name
    finally:
        sys.path.remove(parent)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Builds the import graph of a package with grimp.

    Args:
        package_dir: folder of the package; its parent is put on ``sys.path`` while scanning.

    Returns:
        Every module of the package (packages as their ``__init__``) mapped to the modules of the
        package it imports, by any import statement: at module level, inside functions, or under
        ``if TYPE_CHECKING:``.
    """
    with _importable(package_dir) as name:
        graph = grimp.build_graph(name, cache_dir=None)
    return {
        module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules
    }


def find_import_cycle(package_dir: Path) -> list[str] | None:
    """Finds one import cycle among the modules of a package, if there is one.

    Args:
        package_dir: folder of the package.

    Returns:
        The modules of a cycle, the first repeated at the end (``a -> b -> a``), or None when the
        import graph is acyclic.
    """
    graph = import_graph(package_dir)
    try:
        # static_order() walks the whole graph; a module's "predecessors" are what it imports.
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        # graphlib gives the cycle against the edges we gave it (imported before importer):
        # reversed, it reads importer -> imported.
        return list(reversed(error.args[1]))
    return None


def function_lengths(package_dir: Path) -> list[tuple[int, str]]:
    """Measures every function and method of a package.

    Args:
        package_dir: folder of the package; every ``*.py`` file under it is parsed.

    Returns:
        ``(lines, "path/to/module.py:LINE Class.method")`` for every function, longest first.
        ``lines`` counts from the first statement after the docstring to the function's last
        line; a function holding only a docstring has 0.
    """
    lengths = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(package_dir.parent).as_posix()
        for qualname, node in _functions(tree, ""):
            body = node.body
            if ast.get_docstring(node, clean=False) is not None:
                body = body[1:]
            lines = node.end_lineno - body[0].lineno + 1 if body else 0
            lengths.append((lines, f"{where}:{node.lineno} {qualname}"))
    return sorted(lengths, key=lambda item: (-item[0], item[1]))


def _functions(
    node: ast.AST, prefix: str
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Yields ``(qualified name, node)`` for every function below ``node``, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.<locals>.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def long_functions(package_dir: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str]]:
    """Lists the functions and methods of a package longer than ``limit`` lines of code.

    Args:
        package_dir: folder of the package.
        limit: the most lines of code a function may have (see ``function_lengths``).

    Returns:
        ``(lines, where)`` of each offender, longest first; empty when there is none.
    """
    return [(lines, where) for lines, where in function_lengths(package_dir) if lines > limit]


def parameter_counts(package_dir: Path) -> list[tuple[int, str]]:
    """Counts the parameters of every function and method of a package.

    Args:
        package_dir: folder of the package; every ``*.py`` file under it is parsed.

    Returns:
        ``(parameters, "path/to/module.py:LINE Class.method")`` for every function, most
        first; ``self`` and ``cls`` are not counted, ``*args`` and ``**kwargs`` count one each.
    """
    counts = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(package_dir.parent).as_posix()
        for qualname, node in _functions(tree, ""):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            if positional and positional[0].arg in ("self", "cls"):
                positional = positional[1:]
            count = len(positional) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
            counts.append((count, f"{where}:{node.lineno} {qualname}"))
    return sorted(counts, key=lambda item: (-item[0], item[1]))


def long_parameter_lists(package_dir: Path, limit: int = MAX_PARAMETERS) -> list[tuple[int, str]]:
    """The functions of a package taking more than ``limit`` parameters, most first."""
    return [(n, where) for n, where in parameter_counts(package_dir) if n > limit]


def locals_calls(package_dir: Path) -> list[str]:
    """Where a package calls ``locals()``: ``"path/to/module.py:LINE"`` of each call."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(package_dir.parent).as_posix()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "locals"
            ):
                found.append(f"{where}:{node.lineno}")
    return found


# --- the checks on batchuq -----------------------------------------------------------------------


def test_lint_imports_keeps_the_contracts() -> None:
    result = run_lint_imports(REPO)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_no_import_cycle() -> None:
    cycle = find_import_cycle(PACKAGE)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_long_function() -> None:
    lengths = function_lengths(PACKAGE)
    print(
        f"\nfive longest functions (lines of code, docstring excluded; limit {MAX_FUNCTION_LINES}):"
    )
    for lines, where in lengths[:5]:
        print(f"  {lines:4d}  {where}")
    offenders = long_functions(PACKAGE)
    assert not offenders, (
        f"functions longer than {MAX_FUNCTION_LINES} lines of code:\n"
        + "\n".join(f"  {lines:4d}  {where}" for lines, where in offenders)
    )


def test_no_long_parameter_list_and_no_locals() -> None:
    counts = parameter_counts(PACKAGE)
    print(f"\nlongest parameter lists (limit {MAX_PARAMETERS}):")
    for n, where in counts[:5]:
        print(f"  {n:4d}  {where}")
    offenders = long_parameter_lists(PACKAGE)
    assert not offenders, (
        f"functions taking more than {MAX_PARAMETERS} parameters (group them in an options "
        "object):\n" + "\n".join(f"  {n:4d}  {where}" for n, where in offenders)
    )
    assert not locals_calls(PACKAGE), f"locals() called at {locals_calls(PACKAGE)}"


# --- the checks fail on a package that breaks them -----------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    """Writes ``{relative path: source}`` under ``root``, creating folders."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")


def _layer_modules() -> list[str]:
    """The module paths (relative to ``batchuq``, dotted) the layers contracts of pyproject.toml
    declare, optional ones included."""
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    contracts = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    names = []
    for contract in contracts:
        (container,) = contract["containers"]
        prefix = container.removeprefix("batchuq").lstrip(".")
        for layer in contract["layers"]:
            for tail in layer.replace("|", ":").split(":"):
                name = tail.strip().strip("()")
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def _contract(contract_id: str) -> dict:
    """The import-linter contract of pyproject.toml with this ``id``."""
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == contract_id]
    return contract


# The modules that may import Matplotlib: the presentation layer and what sits above it.
DRAWING_LAYERS = {"__main__", "cli", "report"}


def test_matplotlib_is_forbidden_in_every_module_below_the_presentation() -> None:
    """The forbidden contract lists every module of the top layers contract below ``report``,
    so a module added to a layer without being added there fails here."""
    top = [
        tail.strip().strip("()")
        for layer in _contract("layers")["layers"]
        for tail in layer.replace("|", ":").split(":")
    ]
    below = [name for name in top if name not in DRAWING_LAYERS]
    contract = _contract("drawing")
    assert contract["forbidden_modules"] == ["matplotlib"]
    assert sorted(contract["source_modules"]) == sorted(f"batchuq.{name}" for name in below)
    layers = [layer.split(":")[0].split("|")[0].strip() for layer in _contract("layers")["layers"]]
    assert layers[: len(DRAWING_LAYERS)] == ["__main__", "cli", "report"]  # the top three


@pytest.fixture
def fake_batchuq(tmp_path: Path) -> Path:
    """An empty ``batchuq`` with every module of the layers contracts, shadowing the real one.

    Commands import the report and jobs, the report imports jobs and Matplotlib, jobs import
    methods and postprocess, methods import the core, the score job's entry imports its engines
    and they the shared steps, the core's modules import lower sub-layers (models -> classes ->
    discover -> storage -> errors; the sampler its steps, the sink the schema); so it keeps the
    contracts, until a test adds a bad import.
    """
    packages = {
        "cli",
        "report",
        "jobs",
        "jobs.score",
        "methods",
        "postprocess",
        "sampling",
        "output",
    }
    files = {"batchuq/__init__.py": "", "batchuq/jobs/score/__init__.py": ""}
    for name in _layer_modules():
        path = "batchuq/" + name.replace(".", "/")
        files[f"{path}/__init__.py" if name in packages else f"{path}.py"] = ""
    files["batchuq/__main__.py"] = "import batchuq.cli\n"
    files["batchuq/cli/score.py"] = (
        "from batchuq.jobs.score import job\nimport batchuq.report.score\n"
    )
    files["batchuq/report/score.py"] = (
        "import matplotlib.figure\nfrom batchuq.jobs.score import job\n"
    )
    files["batchuq/jobs/score/job.py"] = (
        "import batchuq.methods.base\nimport batchuq.postprocess\n"
        "from batchuq.jobs.score import local, ray_engine\n"
    )
    files["batchuq/jobs/score/local.py"] = "from batchuq.jobs.score import rows, plan\n"
    files["batchuq/jobs/score/ray_engine.py"] = "from batchuq.jobs.score import ray_worker, rows\n"
    files["batchuq/methods/base.py"] = (
        "from batchuq.sampling import sampler\nimport batchuq.errors\n"
    )
    files["batchuq/sampling/sampler.py"] = (
        "from batchuq import seeds\nfrom batchuq.sampling import dropout, memory\n"
    )
    files["batchuq/sampling/probe.py"] = "from batchuq.sampling import sampler, precision\n"
    files["batchuq/output/sink.py"] = "from batchuq.output import schema\nimport batchuq.compact\n"
    files["batchuq/models.py"] = "import batchuq.classes\nimport batchuq.sngp\n"
    files["batchuq/classes.py"] = "import batchuq.discover\n"
    files["batchuq/discover.py"] = "import batchuq.storage\n"
    files["batchuq/storage.py"] = "import batchuq.errors\n"
    _write(tmp_path, files)
    return tmp_path


def test_lint_imports_passes_on_a_package_that_keeps_the_contracts(fake_batchuq: Path) -> None:
    result = run_lint_imports(fake_batchuq)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"batchuq/errors.py": "def f():\n    import batchuq.jobs.score\n"},
            "batchuq.errors is not allowed to import batchuq.jobs",
            id="core-imports-a-job-inside-a-function",
        ),
        pytest.param(
            {"batchuq/storage.py": "def f():\n    from batchuq.sampling import sampler\n"},
            "batchuq.storage is not allowed to import batchuq.sampling",
            id="lower-core-sub-layer-imports-a-higher-one",
        ),
        pytest.param(
            {"batchuq/errors.py": "import batchuq.models\n"},
            "batchuq.errors is not allowed to import batchuq.models",
            id="core-foundation-imports-the-top-of-the-core",
        ),
        pytest.param(
            {"batchuq/metrics.py": "from batchuq.output import schema\n"},
            "batchuq.metrics is not allowed to import batchuq.output",
            id="independent-core-siblings",
        ),
        pytest.param(
            {"batchuq/sampling/stopping.py": "from batchuq.sampling import sampler\n"},
            "batchuq.sampling.stopping is not allowed to import batchuq.sampling.sampler",
            id="stopping-imports-the-sampler",
        ),
        pytest.param(
            {"batchuq/output/paths.py": "from batchuq.output import sink\n"},
            "batchuq.output.paths is not allowed to import batchuq.output.sink",
            id="path-checks-import-the-sink",
        ),
        pytest.param(
            {"batchuq/seeds.py": "import batchuq.methods.base\n"},
            "batchuq.seeds is not allowed to import batchuq.methods",
            id="core-imports-a-method",
        ),
        pytest.param(
            {
                "batchuq/jobs/train.py": """
                    from typing import TYPE_CHECKING
                    if TYPE_CHECKING:
                        from batchuq.cli import score
                """
            },
            "batchuq.jobs is not allowed to import batchuq.cli",
            id="job-imports-a-command-for-type-checking",
        ),
        pytest.param(
            {"batchuq/postprocess/rules.py": "from batchuq.methods import base\n"},
            "batchuq.postprocess is not allowed to import batchuq.methods",
            id="independent-siblings",
        ),
        pytest.param(
            {
                "batchuq/jobs/report.py": "from batchuq.jobs import evaluate\n",
                "batchuq/jobs/evaluate.py": "from batchuq.jobs import report\n",
            },
            "No cycles are allowed in batchuq.jobs",
            id="jobs-import-each-other",
        ),
        pytest.param(
            {"batchuq/jobs/score/local.py": "from batchuq.jobs.score import ray_engine\n"},
            "batchuq.jobs.score.local is not allowed to import batchuq.jobs.score.ray_engine",
            id="local-engine-imports-the-ray-engine",
        ),
        pytest.param(
            {"batchuq/jobs/score/rows.py": "def f():\n    import batchuq.jobs.score.local\n"},
            "batchuq.jobs.score.rows is not allowed to import batchuq.jobs.score.local",
            id="a-shared-step-imports-an-engine",
        ),
        pytest.param(
            {"batchuq/jobs/score/helpers.py": ""},
            "- batchuq.jobs.score.helpers",
            id="score-module-in-no-layer",
        ),
        pytest.param(
            {"batchuq/helpers.py": ""},
            "- batchuq.helpers",
            id="module-in-no-layer",
        ),
        pytest.param(
            {"batchuq/jobs/train.py": "def f():\n    from matplotlib.figure import Figure\n"},
            "batchuq.jobs is not allowed to import matplotlib",
            id="job-draws-inside-a-function",
        ),
        pytest.param(
            {"batchuq/metrics.py": "import matplotlib.pyplot as plt\n"},
            "batchuq.metrics is not allowed to import matplotlib",
            id="core-draws",
        ),
        pytest.param(
            # methods.base -> sampling.sampler -> seeds -> matplotlib
            {"batchuq/seeds.py": "import matplotlib\n"},
            "batchuq.methods is not allowed to import matplotlib",
            id="method-draws-through-the-core",
        ),
        pytest.param(
            {"batchuq/jobs/train.py": "import batchuq.report.score\n"},
            "batchuq.jobs is not allowed to import batchuq.report",
            id="job-imports-the-presentation",
        ),
    ],
)
def test_lint_imports_fails_on_a_broken_contract(
    fake_batchuq: Path, files: dict[str, str], expected: str
) -> None:
    _write(fake_batchuq, files)
    result = run_lint_imports(fake_batchuq)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_find_import_cycle(tmp_path: Path) -> None:
    package = tmp_path / "cyclic_pkg"
    _write(tmp_path, {"cyclic_pkg/__init__.py": "", "cyclic_pkg/a.py": "", "cyclic_pkg/b.py": ""})
    assert find_import_cycle(package) is None
    # A package and its own submodule: acyclic_siblings does not see this one.
    _write(
        tmp_path,
        {
            "cyclic_pkg/__init__.py": "from cyclic_pkg import a\n",
            "cyclic_pkg/a.py": "def f():\n    from cyclic_pkg import b\n",
            "cyclic_pkg/b.py": "import cyclic_pkg\n",
        },
    )
    cycle = find_import_cycle(package)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"cyclic_pkg", "cyclic_pkg.a", "cyclic_pkg.b"}
    # Each step of the reported cycle is an import, in the direction importer -> imported.
    graph = import_graph(package)
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:], strict=False))


def test_long_functions(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    source = (
        "@staticmethod\n"
        "def just_right(\n    a,\n    b,\n):\n"
        '    """Doc.\n\n    More doc.\n    """\n' + body + "    return a\n"
        "\n"
        "class Job:\n"
        "    def run(self):\n"
        '        """Doc."""\n' + textwrap.indent(body, "    ") + "        # a comment\n"
        "        return 1\n"
        "\n"
        "def only_doc():\n"
        '    """Doc."""\n'
        "\n"
        "def outer():\n"
        "    def inner():\n" + textwrap.indent(body, "    ") + "        return 2\n"
        "    return inner\n"
    )
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": source})
    lengths = {where.split(" ")[1]: lines for lines, where in function_lengths(tmp_path / "pkg")}
    assert lengths == {
        "just_right": 60,
        "Job.run": 61,
        "only_doc": 0,
        "outer": 62,
        "outer.<locals>.inner": 60,
    }
    assert long_functions(tmp_path / "pkg") == [
        (62, "pkg/mod.py:139 outer"),
        (61, "pkg/mod.py:72 Job.run"),
    ]


def test_long_parameter_lists_and_locals(tmp_path: Path) -> None:
    twelve = ", ".join(f"a{i}" for i in range(10))
    source = (
        f"def just_right({twelve}, *args, **kwargs):\n    return args\n"
        "\n"
        "class Job:\n"
        f"    def run(self, {twelve}, *, b, c):\n        return b\n"
        f"    def over(self, {twelve}, b, c, *, d):\n        return locals()\n"
        "\n"
        "def outer():\n"
        f"    def inner(x, /, {twelve}, y, *rest):\n        return x\n"
        "    return inner\n"
    )
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": source})
    counts = {where.split(" ")[1]: n for n, where in parameter_counts(tmp_path / "pkg")}
    assert counts == {
        "just_right": 12,
        "Job.run": 12,
        "Job.over": 13,
        "outer": 0,
        "outer.<locals>.inner": 13,
    }
    offenders = {where.split(" ")[1] for _, where in long_parameter_lists(tmp_path / "pkg")}
    assert offenders == {"Job.over", "outer.<locals>.inner"}
    assert locals_calls(tmp_path / "pkg") == ["pkg/mod.py:8"]
