"""Post-processing of the per-image statistics: decision rules, thresholds, temperature,
conformal sets and the calibration file that carries them from ``calibrate`` to ``score``.

NumPy only: nothing here imports TensorFlow.
"""
