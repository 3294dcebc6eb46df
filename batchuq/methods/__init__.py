"""Uncertainty methods: what turns a chunk of decoded images into samples of class probabilities.

A method implements ``UncertaintyMethod`` (``base.py``) and registers itself in the registry
(``registry.py``) under a name, with a detector of the models it scores; the score and calibrate
jobs call only that interface and ask the registry which method a run gets, so a new method is
one module (here or in the user's code) and no change in the jobs. Test-time augmentation is
orthogonal: the jobs make the augmented copies and hand them to the method as rows.

* ``mc_dropout``: Monte Carlo dropout (docs/methods.md, "MC dropout"), the default;
* ``ensemble``: deep ensembles, for several models;
* ``sngp``: SNGP, for a model with a Gaussian-process head.
"""

from batchuq.methods.base import MethodFactory, UncertaintyMethod
from batchuq.methods.registry import (
    MethodSettings,
    choose_method,
    register_method,
    registered_methods,
    unregister_method,
)

__all__ = [
    "MethodFactory",
    "MethodSettings",
    "UncertaintyMethod",
    "choose_method",
    "register_method",
    "registered_methods",
    "unregister_method",
]
