"""Where images live: a local folder, or a prefix in object storage (``s3://``, ``gs://``).

The one place that touches object storage, through ``pyarrow.fs``. Discovery lists a prefix
once, recursively (``list_tree``), and gets back a tree shaped like the entries of
``os.scandir``; decoding reads one object's bytes by its URL (``read_bytes``). An image is
always named by its URL string, never by an open handle, so that another thread or process can
open it on its own.

Credentials and endpoints come from the environment, as every AWS and Google tool reads them:

* ``s3://``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), or
  ``AWS_PROFILE`` and ``~/.aws/``; the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; an
  S3-compatible server (MinIO, Ceph, moto) from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``). pyarrow itself does not read the
  endpoint variables; batchuq passes them on.
* ``gs://``: Google's application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``); an
  emulator from ``STORAGE_EMULATOR_HOST``, as Google's client libraries read it.

``pyarrow.fs`` is imported only when object storage is used: ``is_url`` serves the command
line's first checks, which run before anything heavy is imported.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchuq.errors import UsageError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Schemes batchuq reads, and the pyarrow filesystem each one maps to.
URL_SCHEMES: tuple[str, ...] = ("s3", "gs", "gcs")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


def is_url(location: object) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path.

    Args:
        location: A path, a URL string, or anything else (which is not a URL).

    Returns:
        True for a string such as ``s3://bucket/prefix``; ``pathlib`` paths are never URLs.
    """
    return isinstance(location, str) and _URL.match(location) is not None


def split_url(url: str, name: str = "images") -> tuple[str, str]:
    """The scheme and the ``bucket/key`` path of an object-storage URL, checked.

    Trailing slashes are dropped: ``s3://bucket/prefix/`` and ``s3://bucket/prefix`` name the
    same folder.

    Args:
        url: ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]`` (``gcs://`` is ``gs://``).
        name: The argument's name, for the message.

    Returns:
        ``(scheme, path)`` with the scheme lower-case (``gcs`` becomes ``gs``) and the path
        ``bucket/prefix`` without a trailing slash.

    Raises:
        UsageError: If the scheme is not one of ``URL_SCHEMES`` or the URL names no bucket.
    """
    match = _URL.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in URL_SCHEMES:
        raise UsageError(
            f"Only {', '.join(s + '://' for s in URL_SCHEMES)} URLs and local paths are "
            f"supported. Received: {name}={url!r}"
        )
    path = match.group(2).strip("/")
    if not path:
        raise UsageError(
            f"The URL names no bucket; write {scheme}://BUCKET/PREFIX. Received: {name}={url!r}"
        )
    return ("gs" if scheme == "gcs" else scheme), path


def normalise_url(url: str, name: str = "images") -> str:
    """``url`` checked and written the one way relative paths are taken from.

    Returns:
        ``scheme://bucket/prefix``: lower-case scheme, no trailing slash.

    Raises:
        UsageError: As ``split_url``.
    """
    scheme, path = split_url(url, name)
    return f"{scheme}://{path}"


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds ``url`` and the path of ``url`` in it.

    One filesystem per scheme, endpoint and credential settings is made and kept (they are
    thread-safe); the environment is read on every call, so a changed endpoint gets its own.

    Args:
        url: An object-storage URL.

    Returns:
        ``(filesystem, "bucket/key")``.

    Raises:
        UsageError: As ``split_url``.
    """
    scheme, path = split_url(url)
    if scheme == "s3":
        settings = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")
        return _s3(s3_endpoint(), tuple(os.environ.get(k) for k in settings)), path
    return _gcs(os.environ.get("STORAGE_EMULATOR_HOST") or None), path


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, settings: tuple[str | None, ...]) -> pafs.FileSystem:
    """An ``S3FileSystem`` for ``endpoint`` (``settings`` only key the cache: the AWS SDK reads
    the region and credentials from the environment itself)."""
    import pyarrow.fs as pafs

    if endpoint is None:
        return pafs.S3FileSystem()
    return pafs.S3FileSystem(endpoint_override=endpoint)


@functools.lru_cache(maxsize=4)
def _gcs(emulator: str | None) -> pafs.FileSystem:
    """A ``GcsFileSystem``: default credentials, or anonymous against an emulator."""
    import pyarrow.fs as pafs

    if emulator is None:
        return pafs.GcsFileSystem()
    scheme, _, host = emulator.rpartition("://")
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http")


@dataclass(slots=True)
class ObjectEntry:
    """A file or a folder of an object-storage listing, read like an ``os.DirEntry``.

    Attributes:
        name: The last part of its key.
        path: Its URL, ``scheme://bucket/key``.
        children: For a folder, what it holds (unsorted); ``None`` for a file.
        size: Bytes of a file (0 for a folder).
    """

    name: str
    path: str
    children: list[ObjectEntry] | None = field(default=None, repr=False)
    size: int = 0

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        """Whether it is a folder (a common prefix of keys)."""
        return self.children is not None

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        """Whether it is an object."""
        return self.children is None

    def is_symlink(self) -> bool:
        """Objects are never symlinks."""
        return False

    def child(self, name: str) -> ObjectEntry:
        """The folder ``name`` inside this one; an empty folder if there is none."""
        for entry in self.children or ():
            if entry.name == name and entry.is_dir():
                return entry
        return ObjectEntry(name, f"{self.path}/{name}", [])

    def __str__(self) -> str:
        return self.path


def list_tree(url: str) -> ObjectEntry:
    """Every object below ``url``, from one recursive listing, as a tree of folders.

    Folder markers (keys ending in ``/``) become folders; objects are files. Nothing is sorted
    or filtered here (see ``batchuq.discover``).

    Args:
        url: ``scheme://bucket[/prefix]``.

    Returns:
        The folder ``url`` (its ``path`` is ``normalise_url(url)``).

    Raises:
        UsageError: As ``split_url``.
        FileNotFoundError: If the bucket does not exist.
        NotADirectoryError: If ``url`` is an object, not a prefix.
        OSError: If the store cannot be reached or refuses the listing (pyarrow's message).
    """
    import pyarrow.fs as pafs

    fs, base = filesystem(url)
    scheme = split_url(url)[0]
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = fs.get_file_info(selector)
    if not infos:
        _check_empty_prefix(fs, base, url)
    root = ObjectEntry(base.rsplit("/", 1)[-1], f"{scheme}://{base}", [])
    folders = {"": root}
    for info in infos:
        relative = info.path[len(base) + 1 :]
        if info.type == pafs.FileType.Directory:
            _folder(folders, relative, root)
        elif info.type == pafs.FileType.File:
            parent_key, _, name = relative.rpartition("/")
            file = ObjectEntry(name, f"{root.path}/{relative}", None, info.size)
            _folder(folders, parent_key, root).children.append(file)
    return root


def _folder(folders: dict[str, ObjectEntry], key: str, root: ObjectEntry) -> ObjectEntry:
    """The folder ``key`` (relative to ``root``), made with its parents if it is new."""
    if key in folders:
        return folders[key]
    parent_key, _, name = key.rpartition("/")
    parent = _folder(folders, parent_key, root)
    folder = ObjectEntry(name, f"{root.path}/{key}", [])
    parent.children.append(folder)
    folders[key] = folder
    return folder


def _check_empty_prefix(fs: pafs.FileSystem, base: str, url: str) -> None:
    """Tell a missing bucket and an object from an empty prefix (which lists nothing)."""
    import pyarrow.fs as pafs

    bucket = base.split("/", 1)[0]
    bucket_info, base_info = fs.get_file_info([bucket, base])
    if bucket_info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"the bucket {bucket!r} does not exist (or is not visible)")
    if base_info.type == pafs.FileType.File:
        raise NotADirectoryError(f"{url!r} is an object, not a prefix")


def read_bytes(url: str) -> bytes:
    """The whole content of the object at ``url`` (one GET).

    Raises:
        FileNotFoundError: If there is no such object.
        OSError: If it cannot be read.
    """
    fs, path = filesystem(url)
    with fs.open_input_stream(path) as stream:
        return stream.readall()
