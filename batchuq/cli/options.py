"""Click options shared by ``batchuq score`` and ``batchuq calibrate``.

Both commands load a model, augment images and run batches the same way, so their options must
read and behave the same; they are defined once here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from batchuq.classes import DEFAULT_CLASS_ORDER
from batchuq.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_TTA_CONTRAST,
    DEFAULT_TTA_FLIP,
    DEFAULT_TTA_ROTATION,
    DEFAULT_TTA_SHIFT,
    DEFAULT_TTA_ZOOM,
)
from batchuq.discover import CLASS_ORDERS
from batchuq.storage import is_url

if TYPE_CHECKING:  # imported where used: batchuq.augment loads TensorFlow
    from batchuq.augment import TTAConfig

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class PassesType(click.ParamType):
    """A number of passes (at least 1), or ``auto`` for adaptive passes."""

    name = "INTEGER|auto"
    toml_types = (int, str)  # what a batchuq.toml may write (checked by config.py)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1 or (isinstance(value, float) and value != number):
            self.fail(
                f"expected a whole number of at least 1 or 'auto', got {value!r}.", param, ctx
            )
        return number


PASSES = PassesType()


class PathOrURL(click.ParamType):
    """A local path, checked and converted by ``local``, or an object-storage URL kept as the
    string it is (``click.Path`` would turn ``s3://bucket/x`` into ``s3:/bucket/x``).

    Args:
        local: The ``click.Path`` type that local paths get.
    """

    name = "path"

    def __init__(self, local: click.Path) -> None:
        self.local = local

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """``value`` as a ``str`` if it is a URL, else as ``local`` converts it."""
        if is_url(value):
            return value
        return self.local.convert(value, param, ctx)


def _compose(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` so that they appear in ``--help`` in the order given."""

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


model_option = click.option(
    "--model",
    "-m",
    "model",
    envvar="BATCHUQ_MODEL",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Keras 3 .keras model, or a deep-ensemble folder from `batchuq train --members`; "
    "repeat it to score with an ensemble of these models (env BATCHUQ_MODEL, several separated "
    "by ':'). Default: the bundled digits demo model.",
)

augmentation_options = _compose(
    click.option(
        "--tta-rotation",
        type=click.FloatRange(min=0),
        default=DEFAULT_TTA_ROTATION,
        show_default=True,
        help="TTA: maximum rotation in degrees.",
    ),
    click.option(
        "--tta-zoom",
        type=click.FloatRange(0, 1, max_open=True),
        default=DEFAULT_TTA_ZOOM,
        show_default=True,
        help="TTA: maximum relative zoom in or out.",
    ),
    click.option(
        "--tta-shift",
        type=click.FloatRange(min=0),
        default=DEFAULT_TTA_SHIFT,
        show_default=True,
        help="TTA: maximum translation, as a fraction of width and height.",
    ),
    click.option(
        "--tta-contrast",
        type=click.FloatRange(0, 1, max_open=True),
        default=DEFAULT_TTA_CONTRAST,
        show_default=True,
        help="TTA: maximum relative contrast change.",
    ),
    click.option(
        "--tta-flip/--no-tta-flip",
        default=DEFAULT_TTA_FLIP,
        show_default=True,
        help="TTA: flip half the copies horizontally (off: flips turn some classes into others).",
    ),
)

seed_option = click.option(
    "--seed",
    type=int,
    default=DEFAULT_SEED,
    show_default=True,
    help="Seed for augmentation and dropout masks; same seed, same draws (docs/scoring.md "
    "says what is bitwise).",
)

batch_size_option = click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images per batch. Results do not depend on it beyond float32 rounding.",
)

class_names_options = _compose(
    click.option(
        "--class-names",
        type=str,
        default=None,
        help="Comma-separated names of the model outputs, in output order. They win over the "
        "model's sidecar MODEL.classes.json (with a warning naming both), which wins over the "
        "class folders (numbered in --class-order when there are as many as outputs); else "
        "0..C-1.",
    ),
    click.option(
        "--class-order",
        type=click.Choice(CLASS_ORDERS),
        default=DEFAULT_CLASS_ORDER,
        show_default=True,
        help="How class folders are numbered when they give the class names (no sidecar, no "
        "--class-names): keras = Python's sorted() of the names (n0, n1, n10, n2), as "
        "keras.utils.image_dataset_from_directory trains; natural = n2 before n10. A notice "
        "says which was used when the two differ.",
    ),
    click.option(
        "--labels",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="monkey_labels.txt-style file mapping folder ids (n0...) to readable names; it "
        "renames classes and fixes no order.",
    ),
    click.option(
        "--allow-class-mismatch",
        is_flag=True,
        default=False,
        show_default=True,
        help="Score labelled class folders that nothing maps onto the model's outputs (their "
        "count differs and no sidecar or --class-names names them, or no folder is a class), "
        "e.g. a folder of other classes for OOD; their rows get no label_index. By default "
        "that is a usage error.",
    ),
)

# The options that define the predictor (with --passes, --tta and the --tta-* options): score
# and calibrate read images and run the model the same way, and calibrate records them.
rescale_option = click.option(
    "--rescale",
    type=float,
    default=None,
    help="Multiply pixel values 0..255 by this. Default: the value the model was trained with "
    "(sidecar), else 1 when the model scales pixels itself (Rescaling/Normalization), else 1/255.",
)

sample_layers_option = click.option(
    "--sample-layers",
    type=str,
    default=None,
    help="Comma-separated name patterns (e.g. 'dropout*') of the dropout layers to "
    "sample. Default: all Dropout, SpatialDropout, GaussianDropout, AlphaDropout.",
)

precision_option = click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16"]),
    default=DEFAULT_PRECISION,
    show_default=True,
    help="Arithmetic of the sampled passes. bfloat16 is faster on CPUs with AVX512-BF16 "
    "or AMX. Where it is not native or does not run (no such CPU; oneDNN capped below "
    "it by ONEDNN_MAX_CPU_ISA, e.g. AVX2; a bf16 probe failing) it falls back to float32 "
    "with a warning; the metadata keeps precision and precision_requested. Probabilities "
    "and statistics stay float32.",
)

logits_option = click.option(
    "--logits",
    is_flag=True,
    default=False,
    show_default=True,
    help="The model outputs logits: apply a softmax to every pass.",
)

exif_transpose_option = click.option(
    "--exif-transpose/--no-exif-transpose",
    default=None,
    help="Turn images upright by their EXIF orientation tag. Default: what the model's "
    "sidecar says (batchuq train records it), else off, as Keras's own loader.",
)

import_option = click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE (a module name or a .py file) before loading the model, so that its "
    "registered custom layers load. Repeatable.",
)

progress_option = click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Show a progress bar on stderr.",
)


def split_csv(value: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; empty or ``None`` -> ``None``."""
    if not value:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def model_argument(models: tuple[Path, ...] | list[str] | str | None) -> Any:
    """``--model`` as the jobs take it: None (env or bundled), one model, or a list (ensemble)."""
    if isinstance(models, (str, Path)):
        models = [models]
    models = [Path(m) for m in models or ()]
    if not models:
        return None
    return models[0] if len(models) == 1 else models


def tta_config(options: Mapping[str, Any], copies: int) -> TTAConfig:
    """The ``TTAConfig`` of a command's ``--tta-*`` options (``augmentation_options``), with
    ``copies`` augmented copies per image.

    Imports TensorFlow (through ``batchuq.augment``): call it after
    ``import_tensorflow_quietly``.

    Raises:
        UsageError: If a range is out of bounds.
    """
    from batchuq.augment import TTAConfig

    return TTAConfig(
        copies=copies,
        rotation=options["tta_rotation"],
        zoom=options["tta_zoom"],
        shift=options["tta_shift"],
        contrast=options["tta_contrast"],
        flip=options["tta_flip"],
    )
