"""batchuq: per-image uncertainty for image classifiers, in batch, written to Parquet.

The jobs are imported lazily so that ``import batchuq`` (and the CLI's ``--help``) does not pay
for importing TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchuq._version import __version__

if TYPE_CHECKING:
    from batchuq.augment import TTAConfig
    from batchuq.jobs.calibrate import CalibrateOptions, calibrate_directory
    from batchuq.jobs.monitor import MonitorReport, MonitorSettings, monitor_runs
    from batchuq.jobs.score import (
        RaySettings,
        RunControl,
        ScoreOptions,
        ScoreReport,
        score_directory,
    )
    from batchuq.postprocess.selective import SelectiveCertificate, fit_selective_threshold

__all__ = [
    "CalibrateOptions",
    "MonitorReport",
    "MonitorSettings",
    "RaySettings",
    "RunControl",
    "ScoreOptions",
    "ScoreReport",
    "SelectiveCertificate",
    "TTAConfig",
    "__version__",
    "calibrate_directory",
    "fit_selective_threshold",
    "monitor_runs",
    "score_directory",
]

_LAZY = {
    "score_directory": "batchuq.jobs.score",
    "ScoreReport": "batchuq.jobs.score",
    "ScoreOptions": "batchuq.jobs.score",
    "RunControl": "batchuq.jobs.score",
    "RaySettings": "batchuq.jobs.score",
    "TTAConfig": "batchuq.augment",
    "calibrate_directory": "batchuq.jobs.calibrate",
    "fit_selective_threshold": "batchuq.postprocess.selective",
    "SelectiveCertificate": "batchuq.postprocess.selective",
    "CalibrateOptions": "batchuq.jobs.calibrate",
    "monitor_runs": "batchuq.jobs.monitor",
    "MonitorSettings": "batchuq.jobs.monitor",
    "MonitorReport": "batchuq.jobs.monitor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchuq' has no attribute {name!r}")
