"""Robust image loading shared by the inference processor and the training data pipeline.

:func:`load_image` turns a path, raw bytes, a binary file object or a PIL image into an upright
8-bit RGB ``PIL.Image.Image``:

* **EXIF orientation** is applied (a phone photo stored sideways comes out upright, as viewers
  show it). Malformed EXIF data is ignored rather than failing the image.
* **Every PIL mode becomes RGB** without losing range:

  - ``1``, ``L``, ``P`` (opaque), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's own
    conversion.
  - Transparency (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``P`` or ``L``/``RGB`` with a
    ``transparency`` entry) is **composited over white**. Dropping alpha would expose whatever
    colour the fully transparent pixels happen to store (often black), so a black logo on a
    transparent background would vanish; white is how such images are displayed on a page.
  - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) is scaled by 255/65535 with rounding,
    not clipped: PIL's own conversion clips everything above 255 to white.
  - 32-bit integer (``I``) is read as 16-bit data when every value lies in [0, 65535] (what
    16-bit PNG/TIFF decoders produce); otherwise its min..max range is stretched to 0..255.
  - Float (``F``) is multiplied by 255 when every finite value lies in [0, 1], else its finite
    min..max range is stretched to 0..255; NaN becomes 0.

* **Decompression bombs**: an image with more than ``max_pixels`` pixels (default
  :data:`MAX_IMAGE_PIXELS`) is refused with ``ValueError`` *before* it is decoded. PIL's own global
  limit (``PIL.Image.MAX_IMAGE_PIXELS``) is lower than ours by default and would turn large but
  legitimate scans into a different error, so it is lifted while the header is parsed and this
  module's limit is the one that applies.
* **Broken input** (truncated file, garbage bytes, not an image) raises ``ValueError`` naming the
  file, so a data pipeline can skip and count it.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_IMAGE_PIXELS", "ImageSource", "load_image", "to_rgb"]

#: Largest image (width × height) :func:`load_image` accepts by default: a 16K square.
MAX_IMAGE_PIXELS = 16384 * 16384

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image]

_EXIF_ORIENTATION = 0x0112
# Serialises the short window in which PIL's global bomb limit is lifted (see _open).
_PIL_LIMIT_LOCK = threading.Lock()
_WHITE = (255, 255, 255)


def load_image(source: ImageSource, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Decode ``source`` into an upright 8-bit RGB image (see the module docstring for the rules).

    Args:
        source: a file path, the encoded bytes, a binary file object (read from its current
            position, not closed), or a ``PIL.Image.Image`` (converted; returned as is when it
            is already RGB and upright).
        max_pixels: refuse images with more pixels than this; default :data:`MAX_IMAGE_PIXELS`.
        name: what to call the image in error messages (default: the path, the file object's
            ``name``, or ``"<bytes>"``).

    Raises:
        ValueError: the input is not a decodable image, is truncated, or is larger than
            ``max_pixels``.
        TypeError: ``source`` is none of the accepted types.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")

    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "<PIL image>"
        _check_size(source.size, limit, label)
        image = source
        try:
            image.load()  # a lazily opened PIL image may still fail to decode
        except Exception as exc:
            raise ValueError(f"cannot decode image {label}: {exc} (the file is truncated or corrupt)") from exc
    else:
        stream, label = _as_stream(source, name)
        image = _open(stream, label)
        _check_size(image.size, limit, label)
        try:
            image.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, … on bad data
            raise ValueError(f"cannot decode image {label}: {exc} (the file is truncated or corrupt)") from exc
    return to_rgb(_upright(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited over white, high bit depths scaled)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return _grey_to_rgb(_scale_16bit(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        if values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
            return _grey_to_rgb(_scale_16bit(values))
        return _grey_to_rgb(_stretch(values.astype(np.float64)))
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0):
            scaled = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
            return _grey_to_rgb(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
        return _grey_to_rgb(_stretch(values))
    if _has_alpha(image):
        # La/RGBa store premultiplied colour; PIL's conversions un-premultiply it. PIL has no
        # direct La → RGBA conversion, so La goes through LA.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 → 0..255 with rounding (v·255/65535 = v/257)."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Map the finite min..max range linearly onto 0..255 (NaN → 0)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else 1.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8)).convert("RGB")


def _as_stream(source: ImageSource, name: str | None) -> tuple[IO[bytes], str]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        label = name or str(path)
        try:
            with open(path, "rb") as handle:  # read fully so no file handle outlives the call
                return io.BytesIO(handle.read()), label
        except FileNotFoundError as exc:
            raise ValueError(f"image file not found: {label}") from exc
        except IsADirectoryError as exc:
            raise ValueError(f"image path is a directory, not a file: {label}") from exc
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), name or "<bytes>"
    if hasattr(source, "read"):
        return source, name or str(getattr(source, "name", "<file object>"))
    raise TypeError(
        f"source must be a path, bytes, a binary file object or a PIL image, got {type(source).__name__}"
    )


def _open(stream: IO[bytes], label: str) -> Image.Image:
    """Parse the header only. PIL's global bomb limit is lifted here because :func:`_check_size`
    applies ours right after; the lock keeps our own threads from restoring it out of order."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(stream)
        except Exception as exc:
            raise ValueError(f"cannot read image {label}: {exc} (not an image, or an unsupported format)") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(size: tuple[int, int], limit: int, label: str) -> None:
    width, height = size
    if width * height > limit:
        raise ValueError(
            f"image {label} is {width}x{height} = {width * height} pixels, more than the limit of {limit} "
            f"(a possible decompression bomb); pass a larger max_pixels to accept it"
        )
    if width < 1 or height < 1:
        raise ValueError(f"image {label} is empty ({width}x{height})")


def _upright(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF block: keep the stored orientation
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image
