"""Step 1 of the data flow: find the images to score, in a deterministic order.

Three layouts are understood:

* class folders (``IMAGES/n0/*.jpg``, ``IMAGES/n1/*.jpg`` ...): every image is labelled with the
  name of the top-level folder it sits under (nested folders belong to that class);
* a flat folder (``IMAGES/*.jpg``): images are unlabelled;
* a mixed folder: images at the top level are unlabelled, images in subfolders are labelled.

Class folders are listed as ``keras.utils.image_dataset_from_directory`` orders them, which is
how most Keras models were trained: Python's ``sorted()`` of the names (``n0, n1, n10, n2``), so
that class index ``i`` is the model's output ``i``. Files are walked in natural order (``n2``
before ``n10``) within each folder; that order decides only the row order. Two common
wrappers are recognised (``resolve_layout``): a folder whose only content is one folder of class
folders (the Kaggle archive's ``training/training/n0``) is descended into, with a notice; a
folder of dataset splits (``train/``, ``validation/``, ... each holding class folders) is refused,
naming the split folders to score instead.

``IMAGES`` may also be an object-storage URL (``s3://bucket/prefix``, ``gs://...``): the prefix
is listed once, recursively (``batchuq.storage.list_tree``), and the same rules apply to the
listed tree, so an uploaded copy of a folder gives the same files, order, labels and relative
paths. A file's ``path`` is then its URL.
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
from batchuq.storage import ObjectEntry, is_url, list_tree

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
# A folder to scan: a local path, or a folder of an object-storage listing.
Folder = str | os.PathLike[str] | ObjectEntry
Entry = os.DirEntry[str] | ObjectEntry


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders embedded numbers numerically: ``n2`` < ``n10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


CLASS_ORDERS = ("keras", "natural")


def order_classes(names: list[str], order: str = "keras") -> list[str]:
    """Class folder names in the order that gives each its class index.

    Args:
        names: The class folder names.
        order: ``keras``: Python's ``sorted()``, as ``keras.utils.image_dataset_from_directory``
            orders them (``n0, n1, n10, n2``); ``natural``: numbers by value (``n2`` before
            ``n10``).

    Returns:
        The names in that order.

    Raises:
        UsageError: If ``order`` is neither.
    """
    if order == "keras":
        return sorted(names)
    if order == "natural":
        return sorted(names, key=natural_key)
    raise UsageError(
        f"`class_order` must be one of {CLASS_ORDERS}. Received: class_order={order!r}"
    )


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
        path: Path of the file (as found below the folder given), or its URL in object storage.
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
        root: The scanned folder (a URL for object storage).
        files: Images in deterministic order.
        class_folders: Names of the top-level subfolders that hold at least one image, in
            Keras's order (``sorted()``, as ``image_dataset_from_directory``; see
            ``order_classes`` for the natural order).
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


def _scandir(folder: Folder) -> list[Entry]:
    """The entries of a local folder (``os.scandir``) or of a listed object-storage folder."""
    if isinstance(folder, ObjectEntry):
        return list(folder.children or ())
    return list(os.scandir(folder))


def _folder(entry: Entry) -> Path | ObjectEntry:
    """A folder entry as the functions here take it: its path, or the listed folder itself."""
    return entry if isinstance(entry, ObjectEntry) else Path(entry.path)


def _walk_sorted(
    folder: Folder, follow_symlinks: bool, parents: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Entry]]:
    """All files below ``folder``, depth-first, each level in natural order, hidden skipped.

    Yields:
        ``(parts, entry)``: the file's path relative to ``folder`` as its parts, and its entry.
    """
    try:
        entries = sorted(_scandir(folder), key=lambda e: natural_key(e.name))
    except OSError:
        return
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=follow_symlinks):
            yield from _walk_sorted(_folder(entry), follow_symlinks, (*parents, entry.name))
        elif entry.is_file(follow_symlinks=True) or entry.is_symlink():
            yield (*parents, entry.name), entry


def _accepts(name: str, extensions: tuple[str, ...] | None) -> bool:
    return extensions is None or _is_image_name(name, extensions)


def has_images(
    root: Folder,
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> bool:
    """Whether there is at least one image below ``root`` (``None`` extensions: any file).

    Stops at the first image and does not sort, so the CLI can tell an empty folder apart in a
    moment, before it imports TensorFlow. ``root`` is a local folder or a listed one
    (``storage.list_tree``), not a URL.
    """
    try:
        entries = _scandir(root)
    except OSError:
        return False
    folders = []
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=follow_symlinks):
            folders.append(_folder(entry))
        elif _accepts(entry.name, extensions) and (
            entry.is_file(follow_symlinks=True) or entry.is_symlink()
        ):
            return True
    return any(has_images(folder, extensions, follow_symlinks) for folder in folders)


def _visible_entries(folder: Folder) -> list[Entry]:
    try:
        entries = [e for e in _scandir(folder) if not _is_hidden(e.name)]
    except OSError:
        return []
    return sorted(entries, key=lambda e: natural_key(e.name))


def _class_folders_in(folder: Folder, extensions: tuple[str, ...] | None, follow: bool) -> int:
    """How many subfolders of ``folder`` hold at least one image."""
    return sum(
        1
        for entry in _visible_entries(folder)
        if entry.is_dir(follow_symlinks=follow) and has_images(_folder(entry), extensions, follow)
    )


def _same_name_inside(entry: Entry) -> Folder:
    """The folder named like ``entry`` inside it (the Kaggle archive's ``training/training``)."""
    if isinstance(entry, ObjectEntry):
        return entry.child(entry.name)
    return Path(entry.path) / entry.name


def resolve_layout(
    root: Folder,
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> tuple[Path | ObjectEntry, list[str]]:
    """The folder whose subfolders are the classes, and notices about how it was found.

    * A folder whose only content is one folder holding two or more class folders (the Kaggle
      archive's ``training/training/n0 ...``) is descended into, repeatedly.
    * A folder whose image-holding subfolders are all split names (``train``, ``validation``,
      ...) that each hold class folders is refused: its "classes" would be the splits.

    Args:
        root: The folder given to score: local, or listed from object storage.
        extensions: Image extensions, or ``None`` for every file.
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        ``(folder, notices)``.

    Raises:
        LayoutError: For a folder of dataset splits; the message names them.
    """
    folder = root if isinstance(root, ObjectEntry) else Path(root)
    notices: list[str] = []
    while True:
        entries = _visible_entries(folder)
        only = entries[0] if len(entries) == 1 else None
        if only is None or not only.is_dir(follow_symlinks=follow_symlinks):
            break
        if _class_folders_in(_folder(only), extensions, follow_symlinks) < 2:
            break
        notices.append(
            f"{str(folder)!r} holds only the folder {only.name!r}, whose subfolders are the "
            f"classes: scoring {only.path!r}."
        )
        folder = _folder(only)
    holding = [
        entry
        for entry in _visible_entries(folder)
        if entry.is_dir(follow_symlinks=follow_symlinks)
        and has_images(_folder(entry), extensions, follow_symlinks)
    ]
    splits = [e for e in holding if e.name.lower() in SPLIT_NAMES]
    if (
        splits
        and len(splits) == len(holding)
        and all(
            _class_folders_in(_folder(e), extensions, follow_symlinks)
            or _class_folders_in(_same_name_inside(e), extensions, follow_symlinks)
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


def class_folder_names(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> list[str]:
    """The class folders ``discover_images`` would find, without listing every file.

    Args:
        root: A local images folder (``resolve_layout`` sees through its wrappers).
        extensions: Image extensions, or ``None`` for every file.
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        The names of the subfolders holding an image, in Keras's order (``sorted()``).

    Raises:
        LayoutError: If ``root`` holds dataset splits rather than classes.
    """
    folder, _ = resolve_layout(Path(root), extensions, follow_symlinks)
    names = [
        printable(entry.name)
        for entry in _visible_entries(folder)
        if entry.is_dir(follow_symlinks=follow_symlinks)
        and has_images(_folder(entry), extensions, follow_symlinks)
    ]
    return order_classes(names)


def discover_images(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> Discovery:
    """Find the images below ``root``.

    Args:
        root: Folder to scan (see ``resolve_layout`` for the wrappers it sees through), or an
            object-storage URL (``s3://bucket/prefix``), listed once, recursively.
        extensions: Lower-case file extensions to accept, with the dot; ``None`` accepts every
            file (``--include-all``: files that are not images become error rows).
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        A ``Discovery`` with the files in deterministic, natural-sorted order, relative to the
        folder ``resolve_layout`` chose.

    Raises:
        ImagesFolderError: If ``root`` is not a folder (a ``NotADirectoryError`` too), or its
            bucket does not exist.
        LayoutError: If ``root`` holds dataset splits rather than classes.
        NoImagesFoundError: If no file with an accepted extension is found.
        UsageError: For a URL whose scheme is not supported.
        OSError: If object storage cannot be reached or refuses the listing.
    """
    root_path, notices = resolve_layout(_top_folder(root), extensions, follow_symlinks)
    files: list[ImageFile] = []
    skipped: list[str] = []
    class_folders: list[str] = []
    local_root = None if isinstance(root_path, ObjectEntry) else root_path.resolve()
    for names, entry in _walk_sorted(root_path, follow_symlinks):
        parts = [printable(name) for name in names]
        if not _accepts(entry.name, extensions):
            skipped.append("/".join(parts))
            continue
        label = parts[0] if len(parts) > 1 else None
        if label is not None and label not in class_folders:
            class_folders.append(label)
        problem = None
        if (
            local_root is not None
            and entry.is_symlink()
            and not follow_symlinks
            and not Path(entry.path).resolve().is_relative_to(local_root)
        ):
            problem = "symlink to a file outside the images folder (not followed)"
        files.append(ImageFile(entry.path, "/".join(parts), label, problem))
    if not files:
        raise NoImagesFoundError(
            f"No images found in {str(root)!r} (looked for files ending in "
            f"{', '.join(extensions or ())}, any case, hidden files skipped)."
        )
    return Discovery(str(root_path), files, order_classes(class_folders), skipped, notices)


def _top_folder(root: str | os.PathLike[str]) -> Path | ObjectEntry:
    """The folder to scan: a local folder, or the listing of an object-storage URL.

    Raises:
        ImagesFolderError: If it is not a folder, or the bucket does not exist.
    """
    if is_url(root):
        try:
            return list_tree(str(root))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ImagesFolderError(
                f"The images prefix cannot be listed: {exc}. Received: images={root!r}"
            ) from None
    if not Path(root).is_dir():
        raise ImagesFolderError(
            f"The images folder does not exist or is not a folder. Received: images={str(root)!r}"
        )
    return Path(root)


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
