"""Image preprocessing matching the published PS3 checkpoints (design §3.15).

Two ways to size an image, then PIL's bicubic resize, scaling to [0, 1] and normalising:

* ``resize_mode="squash"`` (the default, how every PS3 checkpoint was trained): resize to exactly
  ``image_size`` — an int (a square) or a (height, width) pair — whatever the image's aspect.
* ``resize_mode="keep_aspect"``: scale the image so it fits inside ``image_size`` (an int: the
  long side becomes ``image_size``, the model's largest scale) and, if ``max_pixels`` is given,
  holds at most that many pixels; with ``patch_size`` both sides are then rounded down to a
  multiple of it (at least one patch). Images of different aspects come out with different
  shapes, as a list for the model's ragged call.

Images are decoded by :func:`ps3.images.load_image`, which also applies EXIF orientation and
converts every PIL mode to RGB *before* resizing (resizing a palette image directly would fall
back to nearest, and an alpha channel is composited over white).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .images import load_image


PREPROCESSOR_NAME = "preprocessor_config.json"
RESIZE_MODES = ("squash", "keep_aspect")

Size = tuple[int, int]  # (height, width)


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def parse_image_size(image_size: Any, argument: str = "image_size") -> int | Size:
    """An int (a square) or a (height, width) pair of positive ints; a pair comes back a tuple."""
    if _positive_int(image_size):
        return int(image_size)
    if isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(map(_positive_int, image_size)):
        return (int(image_size[0]), int(image_size[1]))
    raise ValueError(f"{argument} must be a positive int (a square) or a (height, width) pair of positive ints, "
                     f"got {image_size!r}")


def _as_pair(image_size: int | Size) -> Size:
    return (image_size, image_size) if isinstance(image_size, int) else image_size


def fit_size(height: int, width: int, box: int | Size, max_pixels: int | None = None,
             patch_size: int | None = None) -> Size:
    """(height, width) of an image scaled, aspect kept, to fit inside ``box`` (an int: the long side
    becomes ``box``) and within ``max_pixels``; sides rounded down to multiples of ``patch_size``
    when given, else to whole pixels; every side at least one patch (pixel)."""
    box_h, box_w = _as_pair(box)
    scale = min(box_h / height, box_w / width)
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (height * width)))
    unit = patch_size or 1
    # Round down, so the result stays inside the box and the budget; the epsilon keeps a side that
    # is an exact multiple (the long side = box) from landing a floating-point hair below it.
    return (max(int(height * scale / unit + 1e-9), 1) * unit, max(int(width * scale / unit + 1e-9), 1) * unit)


class PS3ImageProcessor:
    """``processor(images)["pixel_values"]``: a list of (3, H, W) float32 tensors.

    Args:
        image_size: an int (a square) or a (height, width) pair. ``squash``: the output size.
            ``keep_aspect``: the box the image is fitted into (an int: its long side).
        mean, std: per-channel normalisation after scaling to [0, 1].
        interpolation: ``"bicubic"`` (PIL's filter; what PS3 was trained with).
        resize_mode: ``"squash"`` (default) or ``"keep_aspect"``.
        max_pixels: ``keep_aspect`` only — at most this many output pixels (H·W).
        patch_size: ``keep_aspect`` only — round both output sides down to a multiple of this.
            Pass the model's patch size (14 for the SigLIP backbones) so each side is a whole
            number of patches; None keeps the nearest pixel.
        extra: unknown keys of a ``preprocessor_config.json``, kept on save.
    """

    def __init__(self, image_size: int | Sequence[int] = 3780, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic",
                 resize_mode: str = "squash", max_pixels: int | None = None, patch_size: int | None = None,
                 **extra: Any):
        self.image_size = parse_image_size(image_size)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 numbers each with std > 0, got mean={mean}, std={std}")
        if interpolation != "bicubic":
            raise ValueError(f"interpolation must be 'bicubic' (what PS3 was trained with), got {interpolation!r}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be 'squash' (no aspect kept, as PS3 was trained) or 'keep_aspect', "
                             f"got {resize_mode!r}")
        for name, value in (("max_pixels", max_pixels), ("patch_size", patch_size)):
            if value is None:
                continue
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
            if resize_mode != "keep_aspect":
                raise ValueError(f"{name} only applies with resize_mode='keep_aspect' (squash resizes to "
                                 f"image_size exactly), got {name}={value!r}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.patch_size = None if patch_size is None else int(patch_size)
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        size = self.image_size if isinstance(self.image_size, int) else list(self.image_size)
        out = {**self.extra, "image_size": size, "mean": self.mean, "std": self.std,
               "interpolation": self.interpolation, "resize_mode": self.resize_mode}
        # Written only when set, so a squash processor's file stays the published layout.
        out.update({k: v for k, v in (("max_pixels", self.max_pixels), ("patch_size", self.patch_size))
                    if v is not None})
        return out

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> "PS3ImageProcessor":
        from .hub import resolve_model_dir

        directory = resolve_model_dir(path_or_hub_id, **hub_kwargs)
        file = directory / PREPROCESSOR_NAME
        if not file.is_file():
            raise ValueError(f"no {PREPROCESSOR_NAME} in {directory}")
        return cls(**json.loads(file.read_text()))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / PREPROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def output_size(self, height: int, width: int, image_size: int | Sequence[int] | None = None) -> Size:
        """(height, width) the processor gives an image of ``height`` × ``width`` pixels."""
        box = self.image_size if image_size is None else parse_image_size(image_size)
        if self.resize_mode == "squash":
            return _as_pair(box)
        return fit_size(height, width, box, self.max_pixels, self.patch_size)

    def preprocess_rgb(self, rgb: Image.Image, image_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """An already decoded, upright RGB PIL image → (3, H, W) float32 (resize, [0, 1], normalise)."""
        if rgb.mode != "RGB":
            raise ValueError(f"preprocess_rgb takes an RGB image, got mode {rgb.mode!r}: use preprocess_image()")
        h, w = self.output_size(rgb.height, rgb.width, image_size)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return pixels.sub_(mean).div_(std)

    def preprocess_image(self, image: Any, image_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """One image (path, bytes, file object, PIL image or HWC uint8 array) → (3, H, W) float32."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"a numpy image must be HxW or HxWxC uint8, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        return self.preprocess_rgb(load_image(image), image_size)

    def preprocess(self, images: Any, return_tensors: str | None = None,
                   image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
        """The upstream (Hugging Face style) call: ``preprocess(image, return_tensors="pt")["pixel_values"][0]``
        is the (3, H, W) tensor, as VILA's data code reads it. Same as calling the processor; for
        one image's bare tensor use :meth:`preprocess_image`."""
        return self(images, image_size=image_size, return_tensors=return_tensors)

    # Upstream attribute names (VILA reads them): mean/std, and the square side as HF size dicts.
    @property
    def image_mean(self) -> list[float]:
        return self.mean

    @property
    def image_std(self) -> list[float]:
        return self.std

    @property
    def size(self) -> dict[str, int]:
        return {"shortest_edge": _as_pair(self.image_size)[0]}

    @property
    def crop_size(self) -> dict[str, int]:
        side = _as_pair(self.image_size)[0]  # upstream uses image_size[0] for both sides
        return {"height": side, "width": side}

    def __call__(self, images: Any, image_size: int | Sequence[int] | None = None, return_tensors: str | None = None):
        """``processor(image)["pixel_values"][0]`` → (3, H, W). A list of images gives a list (with
        ``keep_aspect``, of different shapes: pass it to the model as is). ``return_tensors="pt"``
        stacks the list into (B, 3, H, W); images of different shapes cannot be stacked."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("images is an empty list: pass at least one image")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        pixels = [self.preprocess_image(im, image_size) for im in batch]
        if return_tensors is None:
            return {"pixel_values": pixels}
        shapes = sorted({tuple(p.shape[1:]) for p in pixels})
        if len(shapes) > 1:
            raise ValueError(f"return_tensors='pt' cannot stack images of different sizes {shapes} "
                             "(resize_mode='keep_aspect'): leave return_tensors=None to get a list for the "
                             "model's ragged call")
        return {"pixel_values": torch.stack(pixels)}
