"""The options of the pre-training batch stream: :class:`DataOptions`, checked when made.

Everything besides the shards that decides the stream of :mod:`ps3.train.loader` (preprocessing,
batching, shuffling, caption choice, rank, resume offset) is one frozen dataclass, so the trainer,
``ps3 data check`` and Python callers state it once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..images import MAX_IMAGE_PIXELS
from ..processor import PS3ImageProcessor

__all__ = ["DataOptions"]


def check_int(name: str, value: Any, minimum: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Everything besides the shards that decides the batch stream; checked when made
    (``ValueError``/``TypeError`` naming the field). Change fields with ``dataclasses.replace``.

    Attributes:
        image_size, mean, std: the preprocessing (``preprocessor_config.json`` of the model);
            ``image_size`` is an int (a square) or a (height, width) pair.
        batch_size: images per batch (each brings ``sample_n_box_each_image`` texts).
        workers: DataLoader worker processes (0 reads in the main process).
        seed, epoch: make the stream deterministic; change ``epoch`` (or ``set_epoch``) each epoch.
        shuffle: shuffle the shard order and samples (through a ``shuffle_buffer``-sample buffer
            per worker, holding encoded images: budget ``shuffle_buffer`` × JPEG size of memory
            per worker); False reads shards and samples in order.
        resample: draw shards with replacement, endlessly (use ``num_batches`` as epoch length).
        global_caption_prob, sample_n_box_each_image, sentence_masking: caption choice (design §5).
        rank, world_size: this rank; default (both None) from ``torch.distributed`` when
            initialised, else 0/1.
        strict: raise ``ValueError`` on the first bad sample instead of skipping and counting it.
        tokenize: callable list[str] → token ids, run in the workers; result in ``text_ids``.
        num_batches: stop after this many batches of this rank (needed with ``resample``).
        drop_last: drop each worker's final partial batch.
        skip_batches: resume: leave out the first this many batches of this epoch (cheaply).
        pin_memory: pin batch tensors (for asynchronous copies to a GPU).
        max_pixels: refuse larger images (counted as ``bad_image``).
    """

    image_size: int | tuple[int, int]
    batch_size: int
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    workers: int = 0
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 256
    resample: bool = False
    global_caption_prob: float = 0.0
    sample_n_box_each_image: int = 1
    sentence_masking: bool = False
    rank: int | None = None
    world_size: int | None = None
    strict: bool = False
    tokenize: Callable[[list[str]], Any] | None = None
    num_batches: int | None = None
    drop_last: bool = False
    skip_batches: int = 0
    pin_memory: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        processor = self.processor()  # checks image_size, mean and std
        object.__setattr__(self, "image_size", processor.image_size)  # an int or a (height, width) tuple
        object.__setattr__(self, "mean", tuple(processor.mean))
        object.__setattr__(self, "std", tuple(processor.std))
        for name, minimum in (("batch_size", 1), ("workers", 0), ("seed", 0), ("epoch", 0), ("shuffle_buffer", 1),
                              ("sample_n_box_each_image", 1), ("skip_batches", 0), ("max_pixels", 1)):
            check_int(name, getattr(self, name), minimum)
        if self.num_batches is not None:
            check_int("num_batches", self.num_batches, 1)
        prob = self.global_caption_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"global_caption_prob must be a number in [0, 1], got {prob!r}")
        object.__setattr__(self, "global_caption_prob", float(prob))
        if self.tokenize is not None and not callable(self.tokenize):
            raise TypeError(f"tokenize must be a callable list[str] -> token ids, got {type(self.tokenize).__name__}")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if self.rank is not None:
            for name in ("rank", "world_size"):
                if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                    raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
            if self.world_size < 1 or not 0 <= self.rank < self.world_size:
                raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")

    def processor(self) -> PS3ImageProcessor:
        """The inference processor with this preprocessing."""
        return PS3ImageProcessor(image_size=self.image_size, mean=self.mean, std=self.std)

    def resolved_rank(self) -> tuple[int, int]:
        """(rank, world_size): the given ones, else ``torch.distributed``'s, else (0, 1)."""
        if self.rank is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
