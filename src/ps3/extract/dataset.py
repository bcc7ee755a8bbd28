"""Decoding and resizing in DataLoader workers, batched, for ``ps3 extract``.

Every worker walks the same pending units in the same order and takes every ``workers``-th image
of each (a unit is one output shard, so even a single-shard job keeps all workers busy). A worker
yields three kinds of messages, plain dicts so the DataLoader can pin the tensors:

* ``{"kind": "batch", "unit", "keys", "sources", "sizes", "pixels"}``: up to ``batch_size``
  images of one unit resized as the model's processor does, as uint8 (normalising happens on the
  device: a quarter of the bytes of float32 through shared and pinned memory): one (B, 3, H, W)
  tensor when they have one size (a squashing processor), else a list of (3, H_i, W_i) images for
  the model's ragged call (a ``keep_aspect`` processor);
* ``{"kind": "skip", "unit", "key", "reason", "detail"}``: an input that was dropped;
* ``{"kind": "done", "unit"}``: this worker has sent everything of the unit.

Either way a batch is one model call.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import load_image
from ..processor import PS3ImageProcessor
from .inputs import WorkUnit

__all__ = ["SKIP_REASONS", "ExtractDataset", "build_loader"]

#: Why an input was not encoded; the keys of ``index.json``'s ``skipped``.
SKIP_REASONS: dict[str, str] = {
    "missing_file": "a listed image file does not exist or cannot be opened",
    "empty_file": "a zero-byte file",
    "unreadable": "not an image, or a corrupt or truncated one",
    "too_many_pixels": "more pixels than --max-pixels (a possible decompression bomb)",
    "missing_image": "a shard sample with no image member",
    "tar_error": "an input shard that cannot be read to its end (the samples after the damage are lost)",
    "duplicate_file": "an input shard holding the same file name twice for one key",
}
_SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _decode(data: bytes, name: str, processor: PS3ImageProcessor, image_size: int | None,
            max_pixels: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encoded bytes → (uint8 (3, H, W) resized as ``processor`` does, original (width, height))."""
    if not data:
        raise _Skip("empty_file", f"{name} is empty (0 bytes)")
    try:
        image = load_image(data, max_pixels=max_pixels, name=name)
    except ValueError as exc:
        # load_image refuses oversized images before decoding them, saying "more than the limit".
        reason = "too_many_pixels" if "more than the limit" in str(exc) else "unreadable"
        raise _Skip(reason, str(exc)) from None
    # The processor's size and resize (PS3ImageProcessor.preprocess_rgb); normalising is left to
    # the device (FeatureEncoder.encode), with the same operations in the same order.
    height, width = processor.output_size(image.height, image.width, image_size)
    resized = image if (height, width) == (image.height, image.width) else \
        image.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1), image.size


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise _Skip("missing_file", f"cannot open {path}: {exc.strerror or exc}") from None


class ExtractDataset(IterableDataset):
    """Messages (see the module docstring) for the given units; see :func:`build_loader`."""

    def __init__(self, units: list[WorkUnit], *, processor: PS3ImageProcessor, image_size: int | None,
                 batch_size: int, max_pixels: int | None = None) -> None:
        super().__init__()
        self.units = units
        self.processor = processor
        self.image_size = image_size
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units:
            yield from self._unit(unit, worker, workers)
            yield {"kind": "done", "unit": unit.index}

    def _items(self, unit: WorkUnit, worker: int, workers: int, skips: list) -> Iterator[tuple[str, str, Any]]:
        """(key, source, bytes or a path) of this worker's share of ``unit``."""
        if unit.shard is None:
            for key, path in unit.files[worker::workers]:
                yield key, path, path
            return
        from ..data.shards import iter_shard

        def on_skip(reason: str, shard: str, key: str | None, detail: str = "") -> None:
            if worker == 0:  # every worker reads the whole shard: report its damage once
                skips.append((key or shard, reason, detail))

        for position, sample in enumerate(iter_shard(unit.shard, on_skip)):
            if position % workers != worker:
                continue
            key = sample["__key__"]
            ext = next((e for e in _SHARD_IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                files = sorted(k for k in sample if not k.startswith("__"))
                skips.append((key, "missing_image", f"sample {key!r} of {unit.shard} has no image (files: {files})"))
                continue
            yield key, f"{unit.shard}:{key}.{ext}", sample[ext]

    def _unit(self, unit: WorkUnit, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        skips: list[tuple[str, str, str]] = []
        batch: list[tuple[str, str, tuple[int, int], torch.Tensor]] = []
        for key, source, payload in self._items(unit, worker, workers, skips):
            try:
                data = _read_file(payload) if isinstance(payload, str) else payload
                pixels, size = _decode(data, source, self.processor, self.image_size, self.max_pixels)
            except _Skip as skip:
                skips.append((key, skip.reason, str(skip)))
            else:
                batch.append((key, source, size, pixels))
                if len(batch) == self.batch_size:
                    yield self._batch(unit, batch)
                    batch = []
            while skips:
                yield self._skip(unit, *skips.pop(0))
        while skips:  # damage reported after the last sample of a shard
            yield self._skip(unit, *skips.pop(0))
        if batch:
            yield self._batch(unit, batch)

    @staticmethod
    def _skip(unit: WorkUnit, key: str, reason: str, detail: str) -> dict[str, Any]:
        return {"kind": "skip", "unit": unit.index, "key": key, "reason": reason, "detail": detail}

    @staticmethod
    def _batch(unit: WorkUnit, items: list) -> dict[str, Any]:
        keys, sources, sizes, pixels = zip(*items)
        same_size = len({tuple(p.shape) for p in pixels}) == 1
        return {"kind": "batch", "unit": unit.index, "keys": list(keys), "sources": list(sources),
                "sizes": [list(s) for s in sizes], "pixels": torch.stack(pixels) if same_size else list(pixels)}


def build_loader(units: list[WorkUnit], *, processor: PS3ImageProcessor, image_size: int | None, batch_size: int,
                 workers: int, max_pixels: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the messages of ``units``; ``workers`` 0 decodes in the calling process."""
    dataset = ExtractDataset(units, processor=processor, image_size=image_size, batch_size=batch_size,
                             max_pixels=max_pixels)
    # Each worker prefetches a few messages; batches are small next to the model call.
    extra = {"prefetch_factor": 2, "persistent_workers": False} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, **extra)


def default_workers() -> int:
    """Decoding workers when none are asked for: up to 8, leaving a core for the main process
    (decoding and resizing a 4K JPEG takes longer than encoding it on a GPU)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
