"""Jobs: score, calibrate, evaluate (and its report), train.

Each job is library code composed from the steps below it (discover, decode, augment, the
uncertainty method, summarise, post-processing, write). Jobs never import the command layer
(``batchuq.cli``), which sits on top of them.
"""
