"""Step 1 of the data flow: find the images to score, in a deterministic order.

Three layouts are understood:

* class folders (``IMAGES/n0/*.jpg``, ``IMAGES/n1/*.jpg`` ...): every image is labelled with the
  name of the top-level folder it sits under (nested folders belong to that class);
* a flat folder (``IMAGES/*.jpg``): images are unlabelled;
* a mixed folder: images at the top level are unlabelled, images in subfolders are labelled.

Classes are the subfolder names in natural sort order (``n2`` before ``n10``). Two common
wrappers are recognised (``resolve_layout``): a folder whose only content is one folder of class
folders (the Kaggle archive's ``training/training/n0``) is descended into, with a notice; a
folder of dataset splits (``train/``, ``validation/``, ... each holding class folders) is refused,
naming the split folders to score instead.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The errors of this module, from the one hierarchy (also importable from here).
from batchuq.errors import ImagesFolderError, LayoutError, NoImagesFoundError, UsageError

# Formats Pillow reads (TIFF: first page; GIF: first frame; ICO: the largest size).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".ico",
)
# Folder names that mean "a split of a dataset", not "a class".
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders embedded numbers numerically: ``n2`` < ``n10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 are written as ``\\xNN``.

    Linux file names are bytes; Python keeps undecodable ones as lone surrogates, which
    Parquet, Arrow and JSON cannot store. Valid names are returned unchanged.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ImageFile:
    """One image found on disk.

    Attributes:
        path: Absolute path of the file.
        relative_path: Path relative to the scored folder, ``/``-separated (the Parquet ``path``),
            made ``printable``.
        folder_label: Name of the class folder it sits under (``printable``), or ``None`` when
            unlabelled.
        problem: Why the file must not be read (e.g. a symlink leaving the folder), or ``None``.
    """

    path: str
    relative_path: str
    folder_label: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Discovery:
    """The result of scanning a folder.

    Attributes:
        root: The scanned folder.
        files: Images in deterministic order.
        class_folders: Names of the top-level subfolders that hold at least one image, in
            natural sort order.
        skipped: Relative paths of the files left out because of their extension.
        notices: What ``resolve_layout`` did (e.g. descended into a wrapper folder).
    """

    root: str
    files: list[ImageFile]
    class_folders: list[str]
    skipped: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """Whether any image carries a folder label."""
        return any(f.folder_label is not None for f in self.files)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str, extensions: tuple[str, ...]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _walk_sorted(folder: Path, follow_symlinks: bool) -> Iterator[Path]:
    """All files below ``folder``, depth-first, each level in natural order, hidden skipped."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    except OSError:
        return
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=follow_symlinks):
            yield from _walk_sorted(Path(entry.path), follow_symlinks)
        elif entry.is_file(follow_symlinks=True) or entry.is_symlink():
            yield Path(entry.path)


def _accepts(name: str, extensions: tuple[str, ...] | None) -> bool:
    return extensions is None or _is_image_name(name, extensions)


def has_images(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> bool:
    """Whether there is at least one image below ``root`` (``None`` extensions: any file).

    Stops at the first image and does not sort, so the CLI can tell an empty folder apart in a
    moment, before it imports TensorFlow.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return False
    folders = []
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=follow_symlinks):
            folders.append(entry.path)
        elif _accepts(entry.name, extensions) and (
            entry.is_file(follow_symlinks=True) or entry.is_symlink()
        ):
            return True
    return any(has_images(folder, extensions, follow_symlinks) for folder in folders)


def _visible_entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        entries = [e for e in os.scandir(folder) if not _is_hidden(e.name)]
    except OSError:
        return []
    return sorted(entries, key=lambda e: natural_key(e.name))


def _class_folders_in(folder: Path, extensions: tuple[str, ...] | None, follow: bool) -> int:
    """How many subfolders of ``folder`` hold at least one image."""
    return sum(
        1
        for entry in _visible_entries(folder)
        if entry.is_dir(follow_symlinks=follow) and has_images(entry.path, extensions, follow)
    )


def resolve_layout(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> tuple[Path, list[str]]:
    """The folder whose subfolders are the classes, and notices about how it was found.

    * A folder whose only content is one folder holding two or more class folders (the Kaggle
      archive's ``training/training/n0 ...``) is descended into, repeatedly.
    * A folder whose image-holding subfolders are all split names (``train``, ``validation``,
      ...) that each hold class folders is refused: its "classes" would be the splits.

    Args:
        root: The folder given to score.
        extensions: Image extensions, or ``None`` for every file.
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        ``(folder, notices)``.

    Raises:
        LayoutError: For a folder of dataset splits; the message names them.
    """
    folder, notices = Path(root), []
    while True:
        entries = _visible_entries(folder)
        only = entries[0] if len(entries) == 1 else None
        if only is None or not only.is_dir(follow_symlinks=follow_symlinks):
            break
        if _class_folders_in(Path(only.path), extensions, follow_symlinks) < 2:
            break
        notices.append(
            f"{str(folder)!r} holds only the folder {only.name!r}, whose subfolders are the "
            f"classes: scoring {only.path!r}."
        )
        folder = Path(only.path)
    holding = [
        entry
        for entry in _visible_entries(folder)
        if entry.is_dir(follow_symlinks=follow_symlinks)
        and has_images(entry.path, extensions, follow_symlinks)
    ]
    splits = [e for e in holding if e.name.lower() in SPLIT_NAMES]
    if (
        splits
        and len(splits) == len(holding)
        and all(
            _class_folders_in(Path(e.path), extensions, follow_symlinks)
            or _class_folders_in(Path(e.path) / e.name, extensions, follow_symlinks)
            for e in splits
        )
    ):
        names = ", ".join(repr(e.path) for e in splits)
        raise LayoutError(
            "The images folder holds dataset splits, not classes: score each split on its own, "
            f"e.g. `batchuq score {splits[0].path} ...`. Split folders: {names}. "
            f"Received: images={str(root)!r}"
        )
    return folder, notices


def discover_images(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> Discovery:
    """Find the images below ``root``.

    Args:
        root: Folder to scan (see ``resolve_layout`` for the wrappers it sees through).
        extensions: Lower-case file extensions to accept, with the dot; ``None`` accepts every
            file (``--include-all``: files that are not images become error rows).
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        A ``Discovery`` with the files in deterministic, natural-sorted order, relative to the
        folder ``resolve_layout`` chose.

    Raises:
        ImagesFolderError: If ``root`` is not a folder (a ``NotADirectoryError`` too).
        LayoutError: If ``root`` holds dataset splits rather than classes.
        NoImagesFoundError: If no file with an accepted extension is found.
    """
    if not Path(root).is_dir():
        raise ImagesFolderError(
            f"The images folder does not exist or is not a folder. Received: images={str(root)!r}"
        )
    root_path, notices = resolve_layout(root, extensions, follow_symlinks)
    files: list[ImageFile] = []
    skipped: list[str] = []
    class_folders: list[str] = []
    real_root = root_path.resolve()
    for path in _walk_sorted(root_path, follow_symlinks):
        parts = [printable(part) for part in path.relative_to(root_path).parts]
        if not _accepts(path.name, extensions):
            skipped.append("/".join(parts))
            continue
        label = parts[0] if len(parts) > 1 else None
        if label is not None and label not in class_folders:
            class_folders.append(label)
        problem = None
        if path.is_symlink() and not follow_symlinks:
            target = path.resolve()
            if not target.is_relative_to(real_root):
                problem = "symlink to a file outside the images folder (not followed)"
        files.append(ImageFile(str(path), "/".join(parts), label, problem))
    if not files:
        raise NoImagesFoundError(
            f"No images found in {str(root)!r} (looked for files ending in "
            f"{', '.join(extensions or ())}, any case, hidden files skipped)."
        )
    class_folders.sort(key=natural_key)
    return Discovery(str(root_path), files, class_folders, skipped, notices)


def read_labels_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a Kaggle ``monkey_labels.txt``-style file mapping folder ids to readable names.

    The file is comma-separated with a header such as
    ``Label, Latin Name, Common Name, Train Images, Validation Images``. The readable name is the
    ``Common Name`` column when present, else the second column.

    Args:
        path: The labels file.

    Returns:
        A dict from folder id (e.g. ``"n0"``) to readable name (e.g. ``"mantled_howler"``).

    Raises:
        UsageError: If the file has no header or no rows.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise UsageError(
            "The labels file needs a header line and one row per class, e.g. "
            f"'Label, Latin Name, Common Name'. Received: labels={str(path)!r}"
        )
    header = [h.lower() for h in rows[0]]
    column = header.index("common name") if "common name" in header else 1
    mapping: dict[str, str] = {}
    for row in rows[1:]:
        if len(row) > column and row[0]:
            mapping[row[0]] = row[column]
    return mapping
