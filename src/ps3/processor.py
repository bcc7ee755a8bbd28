"""Image preprocessing matching the published PS3 checkpoints (SPEC §3.15).

Squash-resize to ``image_size`` with PIL's bicubic filter, scale to [0, 1], normalise. Images are
decoded by :func:`ps3.images.load_image`, which also applies EXIF orientation and converts every
PIL mode to RGB *before* resizing (resizing a palette image directly would fall back to nearest).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .images import load_image


PREPROCESSOR_NAME = "preprocessor_config.json"


class PS3ImageProcessor:
    def __init__(self, image_size: int = 3780, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic",
                 resize_mode: str = "squash", **extra: Any):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must be 3 numbers each with std > 0, got mean={mean}, std={std}")
        if interpolation != "bicubic":
            raise ValueError(f"interpolation must be 'bicubic' (what PS3 was trained with), got {interpolation!r}")
        if resize_mode != "squash":
            raise ValueError(f"resize_mode must be 'squash' (no aspect kept, as PS3 was trained), got {resize_mode!r}")
        self.image_size = image_size
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "image_size": self.image_size, "mean": self.mean, "std": self.std,
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}

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

    def preprocess(self, image: Any, image_size: int | None = None) -> torch.Tensor:
        """One image (path, bytes, file object, PIL image or HWC uint8 array) → (3, S, S) float32."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"a numpy image must be HxW or HxWxC uint8, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        rgb = load_image(image)
        size = image_size or self.image_size
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return pixels.sub(mean).div(std)

    def __call__(self, images: Any, image_size: int | None = None, return_tensors: str | None = None):
        """``processor(image)["pixel_values"][0]`` → (3, S, S). A list of images gives a list; with
        ``return_tensors="pt"`` the list is stacked into (B, 3, S, S)."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("images is an empty list: pass at least one image")
        pixels = [self.preprocess(im, image_size) for im in batch]
        if return_tensors == "pt":
            return {"pixel_values": torch.stack(pixels)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return {"pixel_values": pixels}


def resize_and_normalize(rgb: Image.Image, size: int | tuple[int, int], mean: Sequence[float],
                         std: Sequence[float]) -> torch.Tensor:
    """The processor's steps after decoding: squash-resize an RGB PIL image to ``size`` (``S`` or
    ``(H, W)``) with PIL bicubic, scale to [0, 1], normalise by ``mean``/``std`` → (3, H, W)
    float32. Shared by :meth:`PS3ImageProcessor.preprocess` and the training data pipeline
    (which decodes images itself, under its own pixel limit)."""
    height, width = (size, size) if isinstance(size, int) else size
    resized = rgb.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return pixels.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))
