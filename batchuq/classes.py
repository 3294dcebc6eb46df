"""Which class each model output is, and which output each class folder is: no TensorFlow.

One precedence, used after the model is loaded (``batchuq.jobs.score.plan``) and, from the model
file's config, before TensorFlow is imported (``batchuq.prechecks``):

1. ``--class-names`` (a warning names the sidecar's names when it overrides them);
2. the sidecar ``MODEL.classes.json`` that ``batchuq train`` writes;
3. the class folders, when there are as many as model outputs, in ``--class-order``: ``keras``
   (the default: ``sorted()`` of the names, as ``keras.utils.image_dataset_from_directory``
   numbers them) or ``natural`` (``n2`` before ``n10``);
4. ``0 .. C-1``.

A labels file (``--labels``) only renames classes; it fixes no order and maps no output. When
the folders give the names and the two orders differ, a notice says which one was used. A
labelled folder that nothing maps onto the model's outputs (its class count differs from the
outputs and neither 1 nor 2 names them) is a usage error unless ``--allow-class-mismatch``
(scoring a folder of other classes on purpose, for OOD).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchuq.discover import order_classes
from batchuq.errors import ClassMismatchError, ModelError, UsageError

DEFAULT_CLASS_ORDER = "keras"


@dataclass(frozen=True)
class ClassNames:
    """The model's class names and where they came from.

    Attributes:
        names: One name per model output, in output order.
        source: ``option``, ``sidecar``, ``folders`` or ``index``.
        overridden: The sidecar's names when ``--class-names`` overrode different ones.
        order_notice: With names from the folders whose Keras and natural orders differ: the
            notice saying which order was used and how to choose the other; else ``None``.
    """

    names: list[str]
    source: str
    overridden: list[str] | None = None
    order_notice: str | None = None


def resolve_names(
    classes: int,
    class_names: Sequence[str] | None = None,
    sidecar: Sequence[object] | None = None,
    folders: Sequence[str] | None = None,
    order: str = DEFAULT_CLASS_ORDER,
    sidecar_file: str | os.PathLike[str] | None = None,
) -> ClassNames:
    """Work out the model's class names (see the module docstring for the precedence).

    Args:
        classes: The model's output count.
        class_names: ``--class-names``, if given.
        sidecar: The sidecar's ``class_names``, if any.
        folders: The class folders found (any order).
        order: ``keras`` or ``natural``: how folders are numbered.
        sidecar_file: The sidecar's path, for messages.

    Returns:
        The names, their source, and the notices to give.

    Raises:
        ModelError: If the names given or stored do not match the model's output count, or
            repeat.
    """
    folders = list(folders or ())
    overridden = None
    notice = None
    if class_names:
        names, source = [str(n) for n in class_names], "option"
        if sidecar and [str(n) for n in sidecar] != names:
            overridden = [str(n) for n in sidecar]
    elif sidecar:
        names, source = [str(n) for n in sidecar], "sidecar"
    elif folders and len(folders) == classes:
        names, source = order_classes(folders, order), "folders"
        other = "natural" if order == "keras" else "keras"
        if names != order_classes(folders, other):
            notice = class_order_notice(names, order, other)
    else:
        names, source = [str(i) for i in range(classes)], "index"
    if len(names) != classes:
        where = {"option": "--class-names", "sidecar": f"the sidecar {sidecar_file or ''}"}
        raise ModelError(
            f"The model has {classes} outputs but {len(names)} class names were given "
            f"(from {where.get(source, source).strip()}). Received: class_names={names}"
        )
    if len(set(names)) != len(names):
        raise ModelError(f"Class names must be unique. Received: class_names={names}")
    return ClassNames(names, source, overridden, notice)


def class_order_notice(names: list[str], order: str, other: str) -> str:
    """The notice for class folders whose Keras and natural orders differ."""
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    how = {
        "keras": "Python's sorted(), as keras.utils.image_dataset_from_directory numbers them",
        "natural": "natural order, numbers by value",
    }
    return (
        f"class folders numbered in {order} order, {shown} ({how[order]}). If the model was "
        f"trained with the {other} order, pass --class-order {other} (or class_order = "
        f'"{other}" in batchuq.toml), or name the outputs with --class-names.'
    )


def check_folders_match(
    classes: int, resolved: ClassNames, folders: Sequence[str], allow: bool = False
) -> None:
    """Refuse labelled class folders that nothing maps onto the model's outputs.

    Args:
        classes: The model's output count.
        resolved: The class names (``resolve_names``).
        folders: The class folders holding images (empty for an unlabelled folder).
        allow: ``--allow-class-mismatch``: score anyway (rows of folders that are not a class
            get no ``label_index``).

    Raises:
        ClassMismatchError: If the folders' count differs from ``classes`` and no sidecar or
            ``--class-names`` names the outputs (the names are ``0 .. C-1``).
    """
    if allow or not folders or resolved.source != "index" or len(folders) == classes:
        return
    shown = ", ".join(list(folders)[:5]) + (", ..." if len(folders) > 5 else "")
    raise ClassMismatchError(
        f"The model has {classes} outputs but the images folder has {len(folders)} class "
        f"folders ({shown}), and no sidecar or --class-names says which output is which, so "
        "no row would get its label. Name the outputs with --class-names (comma-separated, in "
        "output order), put the sidecar MODEL.classes.json (as `batchuq train` writes it) "
        "beside the model, score the folder the model was trained on, or pass "
        "--allow-class-mismatch to score a folder of other classes on purpose (e.g. for OOD). "
        f"Received: {classes} model outputs, {len(folders)} class folders"
    )


def labels_name_some(label_map: Mapping[str, str], class_folders: Sequence[str]) -> list[str]:
    """The class folders a labels file does not name; it must name at least one.

    Args:
        label_map: Folder id -> readable name, from ``--labels``.
        class_folders: The class folders found (or the model's class names when unlabelled).

    Returns:
        The folders it leaves out (empty without a labels file).

    Raises:
        UsageError: If ``label_map`` is not empty and names none of ``class_folders``.
    """
    if not label_map or not class_folders:
        return []
    missing = [name for name in class_folders if name not in label_map]
    if len(missing) == len(class_folders):
        shown = ", ".join(list(class_folders)[:5]) + (", ..." if len(class_folders) > 5 else "")
        raise UsageError(
            f"The labels file names none of the class folders ({shown}); it names "
            f"{', '.join(list(label_map)[:5])}. Received: labels with {len(label_map)} entries"
        )
    return missing


def sidecar_file(model_path: str | os.PathLike[str]) -> Path:
    """The class-name sidecar that ``batchuq train`` writes beside ``model.keras``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".classes.json")
