"""``batchuq shift``: a deterministic corruption series of an images folder, for scoring.

``shift_directory(IMAGES, OUT_DIR)`` writes every image of ``IMAGES`` once per corruption and
severity to ``OUT_DIR/<corruption>/<severity>/<relative path>``: the same class folders and file
names, so that ``batchuq score OUT_DIR/<corruption>/<severity> ...`` gives rows whose ``path``
equals the clean run's. The corruptions and their parameters are ``batchuq.corrupt``'s (table
there and in docs/methods.md, "Dataset shift").

Files:

* Each image is written in the format it was read in (a PNG as PNG, a JPEG as JPEG), under its
  own name. JPEG files are saved at quality 95 (the clean file's own quality is unknown), except
  for the ``jpeg`` corruption, whose re-encoding at the severity's quality is the file itself;
  WebP is saved lossless. EXIF and ICC data are kept where the format holds them, so an EXIF
  orientation means the same as in the clean file. GIF and TIFF give their first frame or page.
* Unreadable images (and symlinks leaving the folder) are skipped, counted in the report and
  named in one warning: ``score`` would only turn them into error rows. Files that are not
  images by their extension are neither read nor copied.
* Every file is written to a hidden temporary name beside it and renamed into place, so an
  interrupted run leaves no half-written image (``discover`` ignores hidden files). Existing
  files of an earlier series are replaced one by one; other files in ``OUT_DIR`` are left alone.
* ``OUT_DIR/shift.json`` records the images folder, seed, corruptions, severities, their
  parameters and the counts.

This job draws nothing: the ``ShiftReport`` names the image a contact sheet shows (the one asked
for, else the first readable), and ``batchuq.report.contact_sheet`` draws it across corruptions
(rows) and severities (columns, after the clean image), as ``batchuq shift`` does by default.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from batchuq._version import __version__
from batchuq.corrupt import (
    CORRUPTIONS,
    JPEG_QUALITY,
    PARAMETERS,
    SEVERITIES,
    corrupt,
    corruption_rng,
    parse_corruptions,
    parse_severities,
    working_image,
)
from batchuq.defaults import DEFAULT_MAX_PIXELS, DEFAULT_SEED
from batchuq.discover import Discovery, ImageFile, discover_images
from batchuq.errors import OutputError, UsageError

logger = logging.getLogger("batchuq")

MANIFEST_NAME = "shift.json"
_JPEG_SAVE_QUALITY = 95


@dataclass(frozen=True)
class ShiftReport:
    """What ``shift_directory`` did.

    Attributes:
        images: Images read and written in every corruption and severity.
        skipped: Relative paths of the images that could not be read (not written).
        written: Image files written (``images`` x corruptions x severities).
        folders: The series' folders, ``OUT_DIR/<corruption>/<severity>``, in order.
        corruptions: The corruptions, in the order given.
        severities: The severities, increasing.
        seed: The seed of the random draws.
        out_dir: The series' folder, ``OUT_DIR``.
        images_root: The folder the images were found in (``Discovery.root``).
        contact_image: The image a contact sheet shows, by its path relative to
            ``images_root`` (its real file name): the one asked for, else the first that could
            be read; None when none could be read.
        manifest: ``OUT_DIR/shift.json``.
        seconds: Wall time.
    """

    images: int
    skipped: list[str]
    written: int
    folders: list[Path]
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int
    out_dir: Path
    images_root: Path
    contact_image: str | None
    manifest: Path
    seconds: float


@dataclass(frozen=True)
class _Plan:
    """The checked arguments of one series."""

    discovery: Discovery
    out_dir: Path
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int
    contact_image: ImageFile | None  # None: the first image that could be read


class _UnreadableImageError(Exception):
    """An image that cannot be decoded; the message is the reason."""


@dataclass(frozen=True)
class _Source:
    """One decoded image and how to write it back."""

    image: Image.Image  # in a working mode: L, LA, RGB or RGBA
    format: str
    save_options: dict[str, Any]


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _find_contact_image(discovery: Discovery, wanted: str | os.PathLike[str]) -> ImageFile:
    """The image named by ``--contact-image``: a relative path as in ``path``, or a file path.

    Raises:
        UsageError: If it is none of the images found.
    """
    text = str(wanted).replace(os.sep, "/")
    for file in discovery.files:
        if file.relative_path == text or (
            Path(wanted).exists() and Path(file.path).resolve() == Path(wanted).resolve()
        ):
            return file
    raise UsageError(
        "The contact image must be one of the images in the images folder, given by its path "
        f"relative to it (e.g. {discovery.files[0].relative_path!r}) or as a file path. "
        f"Received: contact_image={str(wanted)!r}"
    )


def _plan(
    images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    corruptions: str | Sequence[str],
    severities: str | int | Sequence[int],
    seed: int,
    contact_image: str | os.PathLike[str] | None,
) -> _Plan:
    """Check the arguments and find the images, before anything is written.

    Raises:
        UsageError: For unknown corruptions, bad severities, an output folder inside the images
            folder (or around it), or a contact image that is not one of the images.
        NoImagesFoundError: If the folder holds no image.
    """
    names, levels = parse_corruptions(corruptions), parse_severities(severities)
    discovery = discover_images(images)
    out = Path(out_dir)
    root = Path(discovery.root)
    if _inside(out, root) or _inside(root, out) or _inside(out, Path(images)):
        raise OutputError(
            "The output folder must lie outside the images folder, and the images outside the "
            f"output folder. Received: images={str(images)!r}, out_dir={str(out_dir)!r}"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"The output folder is a file. Received: out_dir={str(out_dir)!r}")
    chosen = None
    if contact_image is not None:
        chosen = _find_contact_image(discovery, contact_image)
        try:  # unreadable: a usage error now, not after the whole series
            _read_source(chosen)
        except _UnreadableImageError as exc:
            raise UsageError(
                f"The contact image cannot be read ({exc}). "
                f"Received: contact_image={str(contact_image)!r}"
            ) from None
    return _Plan(discovery, out, names, levels, seed, chosen)


def _read_source(file: ImageFile) -> _Source:
    """Decode one image (first frame or page) and note its format and metadata.

    Raises:
        _UnreadableImageError: If the file cannot be read; the message gives the reason.
    """
    if file.problem:
        raise _UnreadableImageError(file.problem)
    try:
        with Image.open(file.path) as opened:
            if opened.width * opened.height > DEFAULT_MAX_PIXELS:
                raise ValueError(f"{opened.width}x{opened.height} pixels, above the limit")
            if getattr(opened, "n_frames", 1) > 1:
                opened.seek(0)
            opened.load()
            image = working_image(opened)
            image = image.copy() if image is opened else image
            fmt = "JPEG" if opened.format == "MPO" else (opened.format or "PNG")
            info = dict(opened.info)
    except Exception as exc:  # noqa: BLE001 - every decoding failure means "skip this file"
        raise _UnreadableImageError(f"{type(exc).__name__}: {exc}") from exc
    return _Source(image, fmt, _save_options(fmt, info))


def _save_options(fmt: str, info: dict[str, Any]) -> dict[str, Any]:
    """Pillow ``save`` options that keep the clean file's EXIF and colour profile."""
    options: dict[str, Any] = {}
    if fmt in ("JPEG", "PNG", "WEBP") and info.get("exif"):
        options["exif"] = info["exif"]
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and info.get("icc_profile"):
        options["icc_profile"] = info["icc_profile"]
    if fmt == "JPEG":
        options["quality"] = _JPEG_SAVE_QUALITY
    if fmt == "WEBP":
        options["lossless"] = True
    return options


def _save_atomically(image: Image.Image, path: Path, fmt: str, options: dict[str, Any]) -> None:
    """Save ``image`` to a hidden temporary file beside ``path`` and rename it into place.

    A format that cannot hold the image's alpha band (JPEG, PPM ...) gets it without.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            image.save(temporary, format=fmt, **options)
        except (OSError, ValueError, KeyError):
            if image.mode not in ("LA", "RGBA"):
                raise
            image.convert(image.mode[:-1]).save(temporary, format=fmt, **options)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_series(source: _Source, file: ImageFile, plan: _Plan, bar: tqdm) -> int:
    """Write every corruption and severity of one image; the number of files written."""
    relative = Path(file.path).relative_to(plan.discovery.root)  # the real name, not printable
    written = 0
    for name in plan.corruptions:
        for severity in plan.severities:
            target = plan.out_dir / name / str(severity) / relative
            if name == "jpeg" and source.format == "JPEG":
                # The re-encoding at the severity's quality is the file itself.
                options = {**source.save_options, "quality": JPEG_QUALITY[severity - 1]}
                _save_atomically(source.image, target, "JPEG", options)
            else:
                rng = corruption_rng(plan.seed, name, severity, file.relative_path)
                shifted = corrupt(source.image, name, severity, rng)
                _save_atomically(shifted, target, source.format, source.save_options)
            written += 1
            bar.update(1)
    return written


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    """One warning naming the unreadable images (the first ten) and why."""
    if not skipped:
        return
    shown = "; ".join(f"{path} ({reason})" for path, reason in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    logger.warning(
        "skipped %d unreadable image(s), not written in the series: %s%s",
        len(skipped),
        shown,
        more,
    )


def _run_series(plan: _Plan, progress: bool) -> tuple[int, list[str], ImageFile | None]:
    """Write the series of every image.

    Returns:
        ``(files written, relative paths skipped, the first image that could be read)``.
    """
    files = plan.discovery.files
    steps = len(files) * len(plan.corruptions) * len(plan.severities)
    written, skipped, first = 0, [], None
    with tqdm(total=steps, unit="img", disable=not progress, desc="shift", leave=False) as bar:
        for file in files:
            try:
                source = _read_source(file)
            except _UnreadableImageError as exc:
                skipped.append((file.relative_path, str(exc)))
                bar.update(len(plan.corruptions) * len(plan.severities))
                continue
            first = first or file
            written += _write_series(source, file, plan, bar)
    _warn_skipped(skipped)
    return written, [path for path, _ in skipped], first


def _write_manifest(plan: _Plan, images: int, skipped: list[str]) -> Path:
    """Write ``OUT_DIR/shift.json``, describing the series (atomically, like the images)."""
    manifest = {
        "batchuq_version": __version__,
        "images_folder": str(Path(plan.discovery.root).resolve()),
        "seed": plan.seed,
        "corruptions": list(plan.corruptions),
        "severities": list(plan.severities),
        "parameters": {
            name: {str(s): PARAMETERS[name][s - 1] for s in plan.severities}
            for name in plan.corruptions
        },
        "images": images,
        "skipped": skipped,
    }
    path = plan.out_dir / MANIFEST_NAME
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def shift_directory(
    images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    corruptions: str | Sequence[str] = CORRUPTIONS,
    severities: str | int | Sequence[int] = SEVERITIES,
    seed: int = DEFAULT_SEED,
    contact_image: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ShiftReport:
    """Write a corruption series of ``images``: one folder per corruption and severity.

    Args:
        images: The images folder, with class folders or flat (as for ``batchuq score``).
        out_dir: The series' folder; gets ``<corruption>/<severity>/<relative path>`` for every
            image and ``shift.json``.
        corruptions: Names from ``batchuq.corrupt.CORRUPTIONS``, as a sequence or ``"a,b"``.
        severities: 1 ... 5, as a sequence, an int, or text such as ``"1-5"``, ``"3,5"``.
        seed: Seed of the random draws (noise, rotation signs); see ``corruption_rng``.
        contact_image: The image for a contact sheet (a path relative to ``images`` or a file
            path), checked to be readable before the series is written; None takes the first
            image that could be read. ``batchuq.report.contact_sheet`` draws the sheet.
        progress: Show a tqdm bar over images x corruptions x severities on stderr.

    Returns:
        A ``ShiftReport``.

    Raises:
        UsageError: For unknown corruptions (``Received: corruptions=...``), bad severities
            (``Received: severities=...``), an output folder inside the images folder, or a
            contact image that is not one of the readable images.
        ImagesFolderError, LayoutError, NoImagesFoundError: As ``discover_images``.
    """
    started = time.perf_counter()
    plan = _plan(images, out_dir, corruptions, severities, seed, contact_image)
    written, skipped, first = _run_series(plan, progress)
    manifest = _write_manifest(plan, len(plan.discovery.files) - len(skipped), skipped)
    shown = plan.contact_image or first
    root = Path(plan.discovery.root)
    return ShiftReport(
        images=len(plan.discovery.files) - len(skipped),
        skipped=skipped,
        written=written,
        folders=[plan.out_dir / c / str(s) for c in plan.corruptions for s in plan.severities],
        corruptions=plan.corruptions,
        severities=plan.severities,
        seed=seed,
        out_dir=plan.out_dir,
        images_root=root,
        contact_image=None if shown is None else Path(shown.path).relative_to(root).as_posix(),
        manifest=manifest,
        seconds=time.perf_counter() - started,
    )
