"""The presentation layer: every figure and HTML page batchuq writes.

The jobs compute and return data (``Evaluation``, ``Comparison``, ``ShiftReport``); the commands
call a job, then a module here to draw what it returned. This package sits above the jobs and
below the commands, and is the only one besides the commands that may import Matplotlib (an
import-linter contract in ``pyproject.toml``). Each module imports Matplotlib at its top, so the
commands import them inside the function that draws, keeping ``--help`` light.
"""
