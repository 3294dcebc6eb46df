"""Post-processing of the per-image statistics, one concern per module.

* ``rules``: every decision rule (median, threshold, confidence, none), ``decide``.
* ``thresholds``: per-class validation thresholds from augmented copies.
* ``temperature``: temperature scaling, applied and fitted.
* ``conformal``: split conformal quantiles and prediction sets (LAC, class, APS).
* ``selective``: a score threshold whose selective risk is certified (Geifman & El-Yaniv's SGR),
  with its certificate.
* ``calibration_file``: the JSON file that carries thresholds, temperature and quantiles from
  ``batchuq calibrate`` to ``batchuq score``, with the predictor they were fitted on.

The formulas are in docs/methods.md. Inputs are checked by ``batchuq.checks``, the checks that
``batchuq.metrics`` uses too. NumPy only: nothing here imports TensorFlow.
"""
