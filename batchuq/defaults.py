"""Every default setting batchuq has, defined once and shared by the library and the CLI.

Kept free of TensorFlow imports, so that ``batchuq --help`` and option parsing stay fast while
the CLI's defaults are the library's own values.
"""

from __future__ import annotations

# The `status` of a row whose image was read and scored (error rows hold "error: ...").
STATUS_OK = "ok"

# Scoring.
DEFAULT_METHOD = "mc_dropout"  # the uncertainty method of a plain model (methods/)
DEFAULT_PASSES = 100
# --passes auto (sampling/stopping.py): rounds of DEFAULT_MIN_PASSES up to DEFAULT_MAX_PASSES.
DEFAULT_MIN_PASSES = 10
DEFAULT_MAX_PASSES = 100
DEFAULT_ADAPTIVE_ALPHA = 0.01
DEFAULT_TTA = 1
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 32
DEFAULT_RESCALE = 1.0 / 255.0
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 0.25 GiB RGBA)
# 64-1024 MB ran at the same speed on the reference CNN (128x128x3, T = 100); peak RSS rose by
# about 1.5 MB per MB of budget (0.97 GB at 64 MB, 1.44 at 256, 1.89 at 512, 2.45 at 1024).
DEFAULT_MEMORY_BUDGET_MB = 256
DEFAULT_CHECKPOINT_ROWS = 1024
DEFAULT_ROW_GROUP_SIZE = 4096  # Parquet rows per row group (fewer with raw samples: ~64 MiB)
# Ray engine: CPUs Ray books per scoring actor. Below 1 so that the default pool (one actor per
# CPU) never books every CPU: a Ray Data pipeline whose own tasks then find no CPU stalls (seen on
# 2 cores with read tasks; this engine's pipeline has none, but other jobs may share the cluster).
DEFAULT_CPUS_PER_WORKER = 0.5
DEFAULT_PRECISION = "float32"

# Test-time augmentation of each copy (see augment.TTAConfig).
DEFAULT_TTA_ROTATION = 15.0  # degrees
DEFAULT_TTA_ZOOM = 0.1
DEFAULT_TTA_SHIFT = 0.1
DEFAULT_TTA_CONTRAST = 0.1
DEFAULT_TTA_FLIP = False

# Decision rules.
DEFAULT_RULE = "median"
DEFAULT_MIN_MEDIAN = 0.5
DEFAULT_MIN_CONFIDENCE = 0.5

# SNGP (batchuq/sngp.py; docs/methods.md, "SNGP").
DEFAULT_NUM_INDUCING = 1024  # M, random Fourier features of the GP head (P is M x M in the file)
DEFAULT_RIDGE_PENALTY = 1.0
DEFAULT_LENGTH_SCALE = 2.0  # l of the RBF kernel exp(-|h - h'|^2 / (2 l^2))
DEFAULT_NORM_MULTIPLIER = 0.9  # bound on each hidden layer's spectral norm
DEFAULT_MEAN_FIELD_LAMBDA = 0.39269908169872414  # pi / 8

# Calibration (docs/methods.md, "Calibration" and "Conformal prediction sets").
DEFAULT_CALIBRATION_TTA = 100
DEFAULT_CALIBRATION_PASSES = 1
DEFAULT_PERCENTILE = 10.0
DEFAULT_ALPHA = 0.1
# `calibrate --target-risk`: the selective threshold's failure probability and score.
DEFAULT_DELTA = 0.1
DEFAULT_RISK_SCORE = "confidence"
DEFAULT_CONFORMAL = "lac"

# Training the reference CNN.
DEFAULT_TRAIN_BATCH_SIZE = 32
DEFAULT_EPOCHS = 30
DEFAULT_IMAGE_SIZE = 128
DEFAULT_VAL_SPLIT = 0.1  # stratified share held out to report validation accuracy

# The `decision` of an image the rule leaves undecided: index -1, written as "unclassified".
UNCLASSIFIED = -1
UNCLASSIFIED_NAME = "unclassified"

# `batchuq monitor` (drift.py, jobs/monitor.py; docs/monitoring.md).
DEFAULT_MONITOR_ALPHA = 0.05  # family-wise level of the Holm-corrected tests of one night
DEFAULT_MIN_PSI = 0.0  # effect size an alert also needs (0: the p-value alone decides)
DEFAULT_PSI_BINS = 10  # PSI bins: the reference's deciles
PSI_EPSILON = 1e-4  # floor of a bin's share in PSI (an empty bin would make it infinite)
DEFAULT_MONITOR_LAST = 7  # nights of a history folder pooled as the reference
