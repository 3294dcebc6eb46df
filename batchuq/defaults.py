"""Default settings shared by the library and the CLI.

Kept free of TensorFlow imports, so that ``batchuq --help`` and option parsing stay fast while
the CLI's defaults are the library's own values.
"""

from __future__ import annotations

DEFAULT_PASSES = 100
DEFAULT_BATCH_SIZE = 32
DEFAULT_RESCALE = 1.0 / 255.0
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 0.25 GiB RGBA)
# 64-1024 MB ran at the same speed on the reference CNN (128x128x3, T = 100); peak RSS rose by
# about 1.5 MB per MB of budget (0.97 GB at 64 MB, 1.44 at 256, 1.89 at 512, 2.45 at 1024).
DEFAULT_MEMORY_BUDGET_MB = 256
