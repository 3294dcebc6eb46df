"""Step 1 of the data flow: find the images to score, in a deterministic order.

Three layouts are understood:

* class folders (``IMAGES/n0/*.jpg``, ``IMAGES/n1/*.jpg`` ...): every image is labelled with the
  name of the top-level folder it sits under (nested folders belong to that class);
* a flat folder (``IMAGES/*.jpg``): images are unlabelled;
* a mixed folder: images at the top level are unlabelled, images in subfolders are labelled.

Classes are the subfolder names in natural sort order (``n2`` before ``n10``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class NoImagesFoundError(ValueError):
    """Raised when a folder holds no image files."""


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
    """

    root: str
    files: list[ImageFile]
    class_folders: list[str]

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


def has_images(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> bool:
    """Whether ``discover_images(root)`` would find at least one image.

    Stops at the first image, so the CLI can tell an empty folder apart in a moment, before it
    imports TensorFlow.
    """
    return any(
        _is_image_name(path.name, extensions) for path in _walk_sorted(Path(root), follow_symlinks)
    )


def discover_images(
    root: str | os.PathLike[str],
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    follow_symlinks: bool = False,
) -> Discovery:
    """Find the images below ``root``.

    Args:
        root: Folder to scan.
        extensions: Lower-case file extensions to accept, with the dot.
        follow_symlinks: Whether to descend into symlinked folders.

    Returns:
        A ``Discovery`` with the files in deterministic, natural-sorted order.

    Raises:
        NotADirectoryError: If ``root`` is not a folder.
        NoImagesFoundError: If no file with an accepted extension is found.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(
            f"The images folder does not exist or is not a folder. Received: images={str(root)!r}"
        )
    files: list[ImageFile] = []
    class_folders: list[str] = []
    real_root = root_path.resolve()
    for path in _walk_sorted(root_path, follow_symlinks):
        if not _is_image_name(path.name, extensions):
            continue
        relative = path.relative_to(root_path)
        parts = [printable(part) for part in relative.parts]
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
            f"{', '.join(extensions)}, any case, hidden files skipped)."
        )
    class_folders.sort(key=natural_key)
    return Discovery(str(root_path), files, class_folders)


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
        ValueError: If the file has no header or no rows.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(
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
