"""Uncertainty methods: what turns a chunk of decoded images into samples of class probabilities.

A method implements ``UncertaintyMethod`` (``base.py``); the score and calibrate jobs call only
that interface, so a new method is one module here and no change in the jobs. Test-time
augmentation is orthogonal: the jobs make the augmented copies and hand them to the method as
rows.

* ``mc_dropout``: Monte Carlo dropout (docs/methods.md, "MC dropout"), the default.
"""

from batchuq.methods.base import MethodFactory, UncertaintyMethod

__all__ = ["MethodFactory", "UncertaintyMethod"]
