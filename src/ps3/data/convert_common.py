"""Turning one source image and its annotations into a training sample (design §5).

The format readers (``convert_coco``, ``convert_vg``, ``convert_flickr30k``, ``convert_jsonl``)
describe each image as a :class:`SourceImage`: where the file is, its regions as (text, box)
pairs with boxes ``[x0, y0, x1, y1]`` in the source's pixels (edge coordinates), its global
captions, and the size the annotation says the image has. :func:`build_sample` makes the
sample that goes into the shards:

1. The file is read and decoded completely (a broken file is dropped here, not during training).
2. Frame: boxes are taken to be in the *stored* pixels (what COCO, Visual Genome and Flickr30k
   annotate, and what ``PIL.Image.open`` shows) unless the declared size only matches the
   EXIF-upright size. The trainer decodes images upright (:func:`ps3.images.load_image`), so
   boxes of an image with an EXIF rotation are rotated with it. A declared size matching
   neither is a ``size_mismatch`` and the image is dropped (its boxes cannot be trusted).
3. ``max_side``: a larger image is downscaled (Lanczos; a JPEG 2x or more too large is first
   decoded at a reduced DCT scale) so its longer side is ``max_side``, and the boxes with it.
   Otherwise JPEG bytes are copied as they are; other formats are re-encoded as JPEG.
4. Regions: texts have their whitespace collapsed; boxes are clipped to the image
   (:func:`ps3.data.boxes.clip_box`), those thinner than ``min_box_side`` output pixels are
   dropped, coordinates are rounded to 1/100 px. The same text on the same box is a duplicate
   (dropped); several texts on the same box become one region whose text is their sentences in
   order ("a man. a skier.").
5. An image left without regions keeps its global caption (``keep_global_only``) or is dropped.

Every drop is counted by reason in a :class:`DropLog` with a few examples; the reasons are
:data:`DROP_REASONS` (the format readers add their own).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..images import load_image
from ..runtime import UserError
from .boxes import clip_box

__all__ = ["DROP_REASONS", "DropLog", "SourceImage", "SampleOptions", "Sample", "build_sample",
           "clean_text", "read_json", "sanitize_key", "choose_global_text", "GLOBAL_CAPTION_CHOICES"]

#: Why a conversion dropped something. One count per region unless it says "image".
DROP_REASONS: dict[str, str] = {
    "missing_image_file": "image: the file named by the annotation does not exist or cannot be read",
    "bad_image": "image: the file does not decode as an image (corrupt, truncated, too many pixels)",
    "size_mismatch": "image: the annotation's width/height match neither the file's stored nor its upright size",
    "no_caption": "image: no usable region and no global caption",
    "no_region": "image: no usable region (dropped because images without regions are skipped)",
    "empty_text": "region: text empty after collapsing whitespace",
    "bad_box": "region: box not 4 finite numbers, inverted, or of zero area",
    "box_outside_image": "region: nothing of the box left after clipping it to the image",
    "small_box": "region: box thinner than --min-box-side output pixels after clipping, scaling and rounding",
    "duplicate_region": "region: same text on the same box as an earlier region of the image",
    "merged_same_box": "region: another text on an earlier region's box; its text was appended there",
    "empty_global_text": "global caption: empty after collapsing whitespace",
}

GLOBAL_CAPTION_CHOICES = ("first", "longest", "all")
_EXAMPLES = 3
_EXIF_ORIENTATION = 0x0112
_WHITESPACE = re.compile(r"\s+")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SENTENCE_END = (".", "!", "?")


class DropLog:
    """Counts of dropped items by reason with up to 3 examples each (JSON-serialisable)."""

    def __init__(self, counts: Mapping[str, int] | None = None,
                 examples: Mapping[str, Sequence[str]] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.examples: dict[str, list[str]] = {k: list(v) for k, v in (examples or {}).items()}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] += count
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES:
            shown.append(example)

    def merge(self, other: DropLog) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: _EXAMPLES - len(shown)])

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DropLog:
        return cls(data.get("counts"), data.get("examples"))

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)


@dataclass
class SourceImage:
    """One image as a format reader sees it.

    ``regions`` are (text, box) pairs, boxes ``[x0, y0, x1, y1]`` in the source's pixels;
    ``declared_size`` is the (width, height) the annotation gives, or None; ``name`` says how to
    refer to the image in examples and becomes the record's ``"source"``.
    """

    key: str
    path: str
    name: str
    regions: list[tuple[str, Any]] = field(default_factory=list)
    global_texts: list[str] = field(default_factory=list)
    declared_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SampleOptions:
    """How :func:`build_sample` shapes a sample (see the module docstring)."""

    max_side: int | None = None
    min_box_side: float = 1.0
    keep_global_only: bool = True
    global_caption: str = "first"
    jpeg_quality: int = 95


@dataclass
class Sample:
    key: str
    jpeg: bytes
    record: dict[str, Any]


def read_json(path: str | os.PathLike, argument: str) -> Any:
    """A JSON file's content; ``ValueError`` naming the command-line ``argument`` when it
    cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise UserError(f"{argument}: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"{argument}: {path} is not valid JSON ({exc})") from None


def clean_text(text: Any) -> str:
    """Whitespace collapsed to single spaces and stripped; ``""`` for a non-string."""
    return _WHITESPACE.sub(" ", text).strip() if isinstance(text, str) else ""


def sanitize_key(name: str) -> str:
    """A webdataset-safe key: runs of characters other than letters, digits, ``_`` and ``-``
    (dots split keys from extensions) become ``_``."""
    return _KEY_UNSAFE.sub("_", str(name)).strip("_") or "_"


def choose_global_text(texts: Sequence[str], how: str) -> str:
    """The record's ``global_text`` from an image's captions: the ``first``, the ``longest``, or
    ``all`` as consecutive sentences (sentence masking then trains on a random run of them)."""
    texts = [t for t in texts if t]
    if not texts:
        return ""
    if how == "first":
        return texts[0]
    if how == "longest":
        return max(texts, key=len)
    if how == "all":
        return _join_sentences(texts)
    raise ValueError(f"global_caption must be one of {GLOBAL_CAPTION_CHOICES}, got {how!r}")


def _join_sentences(texts: Sequence[str]) -> str:
    return " ".join(t if t.endswith(_SENTENCE_END) else t + "." for t in texts)


# --------------------------------------------------------------------------------------------
# Image: frame, scale, bytes


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF: load_image keeps the stored orientation too
        return 1
    return value if value in range(1, 9) else 1


def _to_upright(box: Sequence[float], orientation: int, width: int, height: int) -> list[float]:
    """A box in the stored pixels of a ``width`` × ``height`` image, in the pixels of the image
    after its EXIF ``orientation`` is applied (as ``PIL.ImageOps.exif_transpose`` does)."""
    x0, y0, x1, y1 = box
    if orientation == 2:  # mirrored left-right
        return [width - x1, y0, width - x0, y1]
    if orientation == 3:  # rotated 180°
        return [width - x1, height - y1, width - x0, height - y0]
    if orientation == 4:  # mirrored top-bottom
        return [x0, height - y1, x1, height - y0]
    if orientation == 5:  # transposed (x and y swap)
        return [y0, x0, y1, x1]
    if orientation == 6:  # shown rotated 90° clockwise: stored (x, y) -> (height - y, x)
        return [height - y1, x0, height - y0, x1]
    if orientation == 7:  # transversed: (x, y) -> (height - y, width - x)
        return [height - y1, width - x1, height - y0, width - x0]
    if orientation == 8:  # shown rotated 90° counter-clockwise: (x, y) -> (y, width - x)
        return [y0, width - x1, y1, width - x0]
    return [x0, y0, x1, y1]


@dataclass
class _Decoded:
    data: bytes
    image: Image.Image  # upright RGB as the trainer will see it; smaller when decoded at a reduced scale
    upright_size: tuple[int, int]  # full-resolution size of the upright image
    is_jpeg: bool
    orientation: int
    stored_size: tuple[int, int]


def _decode(source: SourceImage, max_side: int | None, drops: DropLog) -> _Decoded | None:
    """Read and fully decode the file (a broken one is dropped here, not during training). A JPEG
    that will be downscaled at least 2x is decoded at a reduced DCT scale still larger than the
    target (``draft``): several times cheaper, and the whole file is still decoded."""
    try:
        with open(source.path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        drops.add("missing_image_file", f"{source.name}: {exc.strerror or exc}")
        return None
    try:
        probe = Image.open(io.BytesIO(data))
        is_jpeg, orientation, stored = probe.format == "JPEG", _orientation(probe), probe.size
        upright_size = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
        if is_jpeg and max_side is not None and max(stored) >= 2 * max_side:
            factor = max_side / max(stored)
            probe.draft("RGB", (math.ceil(stored[0] * factor), math.ceil(stored[1] * factor)))
            image = load_image(probe, name=source.name)
        else:
            image = load_image(data, name=source.name)
            upright_size = image.size
    except Exception as exc:  # PIL raises many types for broken files
        drops.add("bad_image", f"{source.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None
    return _Decoded(data, image, upright_size, is_jpeg, orientation, stored)


def _frame_is_stored(decoded: _Decoded, declared: tuple[int, int] | None) -> bool | None:
    """True when boxes are in the stored pixels, False when upright, None when the declared size
    fits neither."""
    if declared is None or tuple(declared) == decoded.stored_size:
        return True
    if tuple(declared) == decoded.upright_size:
        return False
    return None


def _output_image(decoded: _Decoded, options: SampleOptions) -> tuple[bytes, float, float, tuple[int, int]]:
    """(JPEG bytes, x scale, y scale, output size) of the upright image."""
    width, height = decoded.upright_size
    if options.max_side is not None and max(width, height) > options.max_side:
        factor = options.max_side / max(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        resized = decoded.image.resize(size, Image.Resampling.LANCZOS)
        return _encode_jpeg(resized, options.jpeg_quality), size[0] / width, size[1] / height, size
    if decoded.is_jpeg:  # as stored: the trainer applies the same EXIF rotation we applied to the boxes
        return decoded.data, 1.0, 1.0, (width, height)
    return _encode_jpeg(decoded.image, options.jpeg_quality), 1.0, 1.0, (width, height)


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps colour edges
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Regions


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _round(value: float) -> float | int:
    rounded = round(value, 2)
    return int(rounded) if rounded.is_integer() else rounded


def _clean_regions(source: SourceImage, decoded: _Decoded, stored_frame: bool, scale: tuple[float, float],
                   size: tuple[int, int], options: SampleOptions, drops: DropLog) -> tuple[list[str], list[list]]:
    """Usable (text, box) pairs in output pixels, duplicates dropped and same boxes merged."""
    by_box: dict[tuple, list[str]] = {}
    for text, box in source.regions:
        text = clean_text(text)
        where = f"{source.name}: {text!r} {box!r}"
        if not text:
            drops.add("empty_text", where)
            continue
        numbers = [_number(v) for v in box] if isinstance(box, (list, tuple)) and len(box) == 4 else None
        if numbers is None or None in numbers or numbers[2] <= numbers[0] or numbers[3] <= numbers[1]:
            drops.add("bad_box", where)
            continue
        if stored_frame and decoded.orientation != 1:
            numbers = _to_upright(numbers, decoded.orientation, *decoded.stored_size)
        scaled = [numbers[0] * scale[0], numbers[1] * scale[1], numbers[2] * scale[0], numbers[3] * scale[1]]
        clipped = clip_box(scaled, *size)
        if isinstance(clipped, str):
            drops.add("box_outside_image" if clipped == "box_outside_image" else "bad_box", where)
            continue
        rounded = tuple(_round(v) for v in clipped)
        side = min(rounded[2] - rounded[0], rounded[3] - rounded[1])
        if side <= 0 or side < options.min_box_side:
            drops.add("small_box", where)
            continue
        texts = by_box.setdefault(rounded, [])
        if any(t.lower() == text.lower() for t in texts):
            drops.add("duplicate_region", where)
        else:
            if texts:
                drops.add("merged_same_box", where)
            texts.append(text)
    merged = [(texts[0] if len(texts) == 1 else _join_sentences(texts), list(box)) for box, texts in by_box.items()]
    return [text for text, _ in merged], [box for _, box in merged]


def build_sample(source: SourceImage, options: SampleOptions, drops: DropLog) -> Sample | None:
    """The training sample of one source image, or None when it is dropped (counted in ``drops``)."""
    decoded = _decode(source, options.max_side, drops)
    if decoded is None:
        return None
    stored_frame = _frame_is_stored(decoded, source.declared_size)
    if stored_frame is None:
        drops.add("size_mismatch", f"{source.name}: annotation says {tuple(source.declared_size)}, the file is "
                                   f"{decoded.stored_size[0]}x{decoded.stored_size[1]}")
        return None
    data, scale_x, scale_y, size = _output_image(decoded, options)
    texts, boxes = _clean_regions(source, decoded, stored_frame, (scale_x, scale_y), size, options, drops)
    global_texts = []
    for text in source.global_texts:
        cleaned = clean_text(text)
        if cleaned:
            global_texts.append(cleaned)
        else:
            drops.add("empty_global_text", f"{source.name}: {text!r}")
    global_text = choose_global_text(global_texts, options.global_caption)
    if not texts and not global_text:
        drops.add("no_caption", source.name)
        return None
    if not texts and not options.keep_global_only:
        drops.add("no_region", source.name)
        return None
    record: dict[str, Any] = {"text": texts, "box": boxes, "source": source.name}
    if global_text:
        record["global_text"] = global_text
    return Sample(source.key, data, record)
