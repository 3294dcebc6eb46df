"""The documentation site, built once per test session (``tests/test_docs.py`` and
``tests/test_figures.py`` read it) with ``mkdocs build --strict``, as CI and the docs extra do."""

from __future__ import annotations

import atexit
import functools
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def built_site() -> Path:
    """Build the site into a temporary folder (removed at exit); fail with mkdocs' output."""
    out = Path(tempfile.mkdtemp(prefix="batchuq_site_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}")
    return out


def html_text(markup: str) -> str:
    """The text of an HTML page, tags dropped and whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def page_text(page: str) -> str:
    """The text of the built page ``page`` (``cli`` for ``docs/cli.md``)."""
    return html_text((built_site() / page / "index.html").read_text(encoding="utf-8"))
