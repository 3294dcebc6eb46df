"""Dataset shift: deterministic corruptions of one image at five severities (``batchuq shift``).

Six corruptions in the spirit of ImageNet-C (Hendrycks & Dietterich 2019, "Benchmarking neural
network robustness to common corruptions and perturbations"), as Ovadia et al. 2019 used them to
test uncertainty under shift, built from NumPy and Pillow only:

=================  ============================================  =====  =====  =====  =====  =====
corruption         parameter (severity 1 ... 5)                    1      2      3      4      5
=================  ============================================  =====  =====  =====  =====  =====
``gaussian_noise`` σ of N(0, σ) added to pixels in [0, 1]         0.08   0.12   0.18   0.26   0.38
``gaussian_blur``  Gaussian σ, in 1/64 of the shorter side        1      1.5    2      2.5    3
``contrast``       c in x' = (x − mean) · c + mean                0.4    0.3    0.2    0.1    0.05
``rotate``         degrees, sign drawn per image                  5      10     20     30     45
``pixelate``       side kept before box upscaling                 0.6    0.5    0.4    0.3    0.25
``jpeg``           JPEG quality of a re-encoding                  25     18     15     10     7
=================  ============================================  =====  =====  =====  =====  =====

* ``gaussian_noise``, ``contrast``, ``pixelate`` and ``jpeg`` take ImageNet-C's values: noise and
  contrast are per pixel, pixelate and JPEG relative to the image, so none depends on its size.
* ``gaussian_blur``: ImageNet-C's σ (1, 2, 3, 4, 6 pixels) is for 224-pixel images and would
  hardly touch a 32-pixel one, so σ is a share of the shorter side: 0.5 ... 1.5 pixels on the
  bundled 32×32 digits (CIFAR-10-C uses 0.4 ... 1 at 32 pixels), 3.5 ... 10.5 pixels at 224 (a
  little stronger than ImageNet-C). Pillow's ``GaussianBlur(radius=σ)``, edges extended.
* ``rotate``: not an ImageNet-C corruption (its geometric ones need SciPy); a rotation about the
  centre by ± the angle, bilinear, with the uncovered corners filled with the median colour of
  the image's outermost pixels (black for the digits, the background for most photos).
* ``contrast``: the mean is taken per channel over the image, as ImageNet-C does.
* ``pixelate``: box downscaling to ``max(1, round(side · f))``, then box upscaling back.

Determinism: the only random draws (the noise and the sign of a rotation) come from
``numpy.random.default_rng(k)``, where ``k`` is the 64-bit BLAKE2b hash of
``"{seed}\\0{corruption}\\0{severity}\\0{relative path}"`` (``corruption_rng``). The same seed gives
the same bytes whatever the order, folder or machine; another seed other noise and signs.

Modes: images are corrupted in ``L``, ``LA``, ``RGB`` or ``RGBA`` and keep that mode (uint8 in,
uint8 out). Other modes are converted first, as ``batchuq score`` reads them: 16-bit and ``I``
images to ``L`` (scaled by 1/257 when above 255), ``F`` to ``L``, palette to ``RGB`` (``RGBA``
when it has transparency), ``1`` to ``L``, CMYK and the rest to ``RGB``. An alpha band is
transformed by the geometric corruptions (blur, rotation, pixelation) and left alone by the
others.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from batchuq.errors import UsageError

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "gaussian_blur",
    "contrast",
    "rotate",
    "pixelate",
    "jpeg",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# One value per severity 1 ... 5 (the module docstring's table; docs/methods.md repeats it).
NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
BLUR_SIGMA_PER_64 = (1.0, 1.5, 2.0, 2.5, 3.0)  # σ in 1/64 of the shorter side
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
ROTATE_DEGREES = (5.0, 10.0, 20.0, 30.0, 45.0)
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)

PARAMETERS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": NOISE_SIGMA,
    "gaussian_blur": BLUR_SIGMA_PER_64,
    "contrast": CONTRAST_FACTOR,
    "rotate": ROTATE_DEGREES,
    "pixelate": PIXELATE_FACTOR,
    "jpeg": JPEG_QUALITY,
}

_WORKING_MODES = ("L", "LA", "RGB", "RGBA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def corruption_rng(
    seed: int, corruption: str, severity: int, relative_path: str
) -> np.random.Generator:
    """The random generator of one image, corruption and severity.

    Args:
        seed: The series seed (``--seed``).
        corruption: A name from ``CORRUPTIONS``.
        severity: 1 ... 5.
        relative_path: The image's path relative to the images folder, ``/``-separated (the
            Parquet ``path`` of ``batchuq score``).

    Returns:
        ``numpy.random.default_rng`` seeded with the 64-bit BLAKE2b hash of the four values,
        so that the draws depend on nothing else (not the order, nor the other images).
    """
    text = f"{seed}\0{corruption}\0{severity}\0{relative_path}"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def parse_corruptions(value: str | Sequence[str]) -> tuple[str, ...]:
    """Corruption names from ``"a,b"`` or a sequence, in the given order, without repeats.

    Args:
        value: Comma-separated names or a sequence of names from ``CORRUPTIONS``.

    Returns:
        The names.

    Raises:
        UsageError: For an empty list or an unknown name; the message lists the known ones.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in CORRUPTIONS]
    if not names or unknown:
        what = f"Unknown corruption {unknown[0]!r}" if unknown else "No corruption given"
        raise UsageError(
            f"{what}; choose from {', '.join(CORRUPTIONS)}. Received: corruptions={value!r}"
        )
    return tuple(dict.fromkeys(names))


def parse_severities(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """Severities from ``"1-5"``, ``"3,5"``, ``"3"``, an int or a sequence, sorted, unique.

    Args:
        value: A range ``a-b``, comma-separated severities (ranges allowed among them), one
            severity, or a sequence of ints; each in 1 ... 5.

    Returns:
        The severities in increasing order.

    Raises:
        UsageError: For anything else; the message shows the accepted forms.
    """
    items: list[str] = (
        value.split(",") if isinstance(value, str) else [str(v) for v in np.atleast_1d(value)]
    )
    found: set[int] = set()
    for item in (item.strip() for item in items):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or low > high or low < SEVERITIES[0] or high > SEVERITIES[-1]:
            raise UsageError(
                f"Severities are 1 to {SEVERITIES[-1]}, given as a range such as 1-5, a list "
                f"such as 3,5 or one value such as 3. Received: severities={value!r}"
            )
        found.update(range(low, high + 1))
    return tuple(sorted(found))


def working_image(image: Image.Image) -> Image.Image:
    """``image`` in the mode it is corrupted and written in: ``L``, ``LA``, ``RGB`` or ``RGBA``.

    Args:
        image: A decoded Pillow image of any mode.

    Returns:
        The same image when its mode is one of the four, else a converted copy (16-bit as
        ``batchuq score`` reads it: divided by 257 when a value is above 255).
    """
    if image.mode in _WORKING_MODES:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and array.max(initial=0) > 255:
            array = array / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.convert("L" if image.mode == "1" else "RGB")


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour part (``L`` or ``RGB``) of a working image and its alpha band, if any."""
    if image.mode in ("LA", "RGBA"):
        return image.convert(image.mode[:-1]), image.getchannel("A")
    return image, None


def _with_alpha(color: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """``color`` with ``alpha`` put back (``L`` -> ``LA``, ``RGB`` -> ``RGBA``)."""
    if alpha is None:
        return color
    merged = color.convert(color.mode + "A")
    merged.putalpha(alpha)
    return merged


def _to_uint8(array: np.ndarray, mode: str) -> Image.Image:
    """An image of ``mode`` from float pixels on the 0 ... 255 scale, rounded and clipped."""
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode=mode)


def _gaussian_noise(color: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Add N(0, σ) to every pixel value on the [0, 1] scale (each channel its own noise)."""
    pixels = np.asarray(color, dtype=np.float64) / 255.0
    noisy = pixels + rng.normal(0.0, NOISE_SIGMA[severity - 1], size=pixels.shape)
    return _to_uint8(np.clip(noisy, 0.0, 1.0) * 255.0, color.mode)


def _contrast(color: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Blend every pixel towards its channel's mean: ``(x - mean) * c + mean``."""
    pixels = np.asarray(color, dtype=np.float64)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((pixels - mean) * CONTRAST_FACTOR[severity - 1] + mean, color.mode)


def _jpeg(color: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Encode as JPEG at the severity's quality and decode again."""
    buffer = io.BytesIO()
    color.save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
    with Image.open(buffer) as decoded:
        return decoded.convert(color.mode)


def _gaussian_blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Pillow's Gaussian blur with σ a share of the shorter side (all bands, alpha too)."""
    sigma = BLUR_SIGMA_PER_64[severity - 1] * min(image.size) / 64.0
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _rotate(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Rotate by ± the severity's angle (sign from ``rng``); corners get the border's median."""
    angle = ROTATE_DEGREES[severity - 1] * (1.0 if rng.random() < 0.5 else -1.0)
    pixels = np.asarray(image, dtype=np.float64).reshape(image.height, image.width, -1)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0)
    # The median, not the mean: a digit touching the edge must not turn the black corners grey.
    fill = tuple(int(v) for v in np.rint(np.median(border, axis=0)))
    return image.rotate(
        angle,
        resample=Image.Resampling.BILINEAR,
        fillcolor=fill[0] if len(fill) == 1 else fill,
    )


def _pixelate(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Box-downscale to a share of the size and box-upscale back (all bands, alpha too)."""
    factor = PIXELATE_FACTOR[severity - 1]
    small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    shrunk = image.resize(small, Image.Resampling.BOX)
    return shrunk.resize(image.size, Image.Resampling.BOX)


_Corruption = Callable[[Image.Image, int, np.random.Generator], Image.Image]
# Corruptions of the colour bands only (alpha kept), and geometric ones of every band.
_ON_COLOR: dict[str, _Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "contrast": _contrast,
    "jpeg": _jpeg,
}
_ON_ALL_BANDS: dict[str, _Corruption] = {
    "gaussian_blur": _gaussian_blur,
    "rotate": _rotate,
    "pixelate": _pixelate,
}


def corrupt(
    image: Image.Image, corruption: str, severity: int, rng: np.random.Generator
) -> Image.Image:
    """Corrupt one image.

    Args:
        image: A Pillow image of shape (height, width) and any mode; it is not modified.
        corruption: A name from ``CORRUPTIONS``.
        severity: 1 ... 5.
        rng: The image's generator, from ``corruption_rng`` (used by ``gaussian_noise`` and
            ``rotate`` only).

    Returns:
        A new image of the same size in ``working_image(image).mode``.

    Raises:
        UsageError: For an unknown corruption or a severity outside 1 ... 5.
    """
    if corruption not in PARAMETERS:
        parse_corruptions([corruption])  # raises, naming the known corruptions
    if severity not in SEVERITIES:
        parse_severities([severity])  # raises, naming the accepted range
    work = working_image(image)
    if corruption in _ON_ALL_BANDS:
        return _ON_ALL_BANDS[corruption](work, severity, rng)
    color, alpha = _split_alpha(work)
    return _with_alpha(_ON_COLOR[corruption](color, severity, rng), alpha)
