"""Pre-training data: paired image / text-box webdatasets → batches for PS3 (design §5).

Input
-----
Two shard sets (images ``KEY.jpg``; text-boxes ``KEY.json`` with local captions, their boxes and
a global caption; layout in :mod:`ps3.data.writer`), each a directory, brace pattern or list of
shards. Shard ``i`` of one set is read with shard ``i`` of the other, sample by sample, and the
keys must agree (listing, reading and lockstep pairing: :mod:`ps3.data.shards`). Everything else
that shapes the stream is one :class:`DataOptions`; :func:`build_dataloader` takes it, or its
fields as keywords.

Per sample (design §5)
----------------------
1. Captions are shaped and an image's ``n = sample_n_box_each_image`` texts are drawn
   (global vs local, boxes without replacement, sentence masking): :mod:`ps3.train.captions`.
2. The image is squash-resized to ``image_size`` and normalised
   (:meth:`ps3.PS3ImageProcessor.preprocess_rgb`, the inference processor's steps); each box is
   clipped, scaled by the same squash and drawn as an (S, S) or (H, W) map of ones
   (:func:`ps3.data.boxes.box_to_gt_map`). A global caption's map is all 1.

Batches
-------
``pixel_values`` float (B, 3, S, S); ``texts`` list of B·n strings, image-major (texts
``i·n … i·n+n-1`` belong to image ``i``); ``gt_selection_maps`` float (B·n, S, S) of 0/1;
``is_global_text`` bool (B·n, 1); ``keys`` list of B sample keys; ``skipped`` dict
reason → count of what was dropped since the previous batch of the same worker; ``text_ids``
= ``tokenize(texts)`` when a ``tokenize`` callable is given.

Bad data
--------
Nothing in the data stops a run. Every dropped item is counted under one of
:data:`ps3.data.shards.SKIP_REASONS`; counts travel with the batches (so they reach the main
process from DataLoader workers) and :class:`PretrainLoader` sums them in ``loader.counter``.
After a key mismatch the two sets are realigned, so a missing file costs one sample, not the
rest of the shard. With ``strict=True`` the first problem raises ``ValueError`` naming the
reason, shard and key.

Determinism and exact resume
----------------------------
The stream is a pure function of (shards, ``seed``, ``epoch``, ``rank``, ``world_size``,
``workers``, ``batch_size`` and the other options): shard order comes from ``(seed, epoch)``,
the sample shuffle buffer of each worker from ``(seed, epoch, rank, worker)``, and every random
choice for a sample (global vs local, which boxes, sentence masking) from
``(seed, epoch, shard, key)``. With ``workers > 0`` the DataLoader takes batches from the
workers in turn, so the order is fixed too.

To resume after ``N`` batches of epoch ``E`` were consumed, build the loader with the same
arguments and ``epoch=E, skip_batches=N`` (or call ``loader.set_epoch(E, skip_batches=N)``);
the next batch is exactly batch ``N`` of the uninterrupted run. The skipped part is still read
and its images decoded (a corrupt image changes which samples form a batch, so skipping has to
see it), but nothing is resized, normalised, tokenised or sent between processes, so it is much
cheaper than running the batches. Counts of bad data in the skipped part are not added to
``loader.counter``.

Distributed training
--------------------
Without ``resample``, shards are split between ranks, then between each rank's workers, so
every sample is read by exactly one worker of one rank; ranks can then end an epoch with
different numbers of batches. Collective-based training needs the same count on every rank:
use ``resample=True`` (each rank/worker draws shards with replacement, an endless stream) with
``num_batches`` as the epoch length, or pass a ``num_batches`` every rank can reach.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.boxes import box_cells
from ..data.shards import (IMAGE_EXTENSIONS, SKIP_REASONS, ShardPair, SkipCounter, SkipReporter, iter_paired_shard,
                           list_shard_pairs, list_shards)
from ..images import load_image
from ..runtime import UserError
from .captions import choose_captions, usable_captions
from .data_options import DataOptions, check_int

# SKIP_REASONS, SkipCounter and list_shards are re-exported from ps3.data.shards, DataOptions from
# ps3.train.data_options.
__all__ = ["SKIP_REASONS", "SkipCounter", "list_shards", "DataOptions", "PretrainDataset", "TrainingSample",
           "PretrainLoader", "build_dataloader"]

_CONTROL = "_control"  # marks non-batch items (placeholders, worker tails) inside the stream


# --------------------------------------------------------------------------------------------
# The dataset


@dataclass
class TrainingSample:
    """One usable image/text-box pair as :meth:`PretrainDataset.read_sample` reads it."""

    key: str
    pixels: torch.Tensor | None  # None for placeholders (resume skipping)
    texts: list[str]
    cells: list[tuple[int, int, int, int] | None]  # per text; None = global (whole image)


def _seed(*parts: Any) -> int:
    """A stable 64-bit seed from any parts (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A shuffle buffer: yields a random element of a ``size``-element buffer for every new item."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class PretrainDataset(IterableDataset):
    """The batch stream of one rank (see the module docstring). Iterate it through
    :class:`PretrainLoader` (from :func:`build_dataloader`): the raw stream also carries control
    items (resume placeholders and per-worker tails of skip counts) that the loader consumes.

    ``epoch`` and ``skip_batches`` start from the options and are changed by the loader."""

    def __init__(self, image_shards: Sequence[str], text_box_shards: Sequence[str], options: DataOptions) -> None:
        super().__init__()
        if len(image_shards) != len(text_box_shards):
            raise ValueError(
                f"image_shards and text_box_shards must pair up shard by shard, got {len(image_shards)} "
                f"and {len(text_box_shards)} shards"
            )
        if not isinstance(options, DataOptions):
            raise TypeError(f"options must be a DataOptions, got {type(options).__name__}")
        self.image_shards = list(image_shards)
        self.text_box_shards = list(text_box_shards)
        self.options = options
        self.processor = options.processor()
        self.rank, self.world_size = options.resolved_rank()
        self.epoch = options.epoch
        self.skip_batches = options.skip_batches

    # -- shard plan -----------------------------------------------------------------------

    def shards_of(self, worker: int, workers: int) -> list[int]:
        """Shard indices (into the shard lists) read by this rank's ``worker`` of ``workers``
        in this epoch, in order (without ``resample``)."""
        order = list(range(len(self.image_shards)))
        if self.options.shuffle:
            random.Random(_seed(self.options.seed, self.epoch, "shards")).shuffle(order)
        return order[self.rank::self.world_size][worker::workers]

    def _shard_draws(self, worker: int, workers: int) -> Iterator[tuple[int, str]]:
        """(shard index, draw name): the draw name is part of each sample's random seed."""
        if not self.options.resample:
            for index in self.shards_of(worker, workers):
                yield index, f"shard{index}"
            return
        rng = random.Random(_seed(self.options.seed, self.epoch, "resample", self.rank, worker))
        draw = 0
        while True:  # endless: the epoch length is num_batches
            yield rng.randrange(len(self.image_shards)), f"rank{self.rank}-worker{worker}-draw{draw}"
            draw += 1

    def _pairs(self, worker: int, workers: int, report: SkipReporter) -> Iterator[tuple[str, ShardPair]]:
        """(draw name, paired sample) of this worker, shuffled when asked."""
        def pairs() -> Iterator[tuple[str, ShardPair]]:
            for index, draw in self._shard_draws(worker, workers):
                for pair in iter_paired_shard(self.image_shards[index], self.text_box_shards[index], report,
                                              strict=report.strict):
                    yield draw, pair

        if not self.options.shuffle:
            return pairs()
        rng = random.Random(_seed(self.options.seed, self.epoch, "samples", self.rank, worker))
        return _shuffled(pairs(), self.options.shuffle_buffer, rng)

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        report = SkipReporter(self.options.strict)
        batch_size, num_batches = self.options.batch_size, self.options.num_batches
        # Worker w's batch j is batch j·workers + w of the rank (the DataLoader takes batches from
        # the workers in turn); it can only come earlier when another worker runs out first.
        quota = None if num_batches is None else num_batches // workers + (worker < num_batches % workers)
        made = 0
        pending: list[TrainingSample] = []
        if quota != 0:
            for draw, pair in self._pairs(worker, workers, report):
                placeholder = made * workers + worker < self.skip_batches
                sample = self.read_sample(pair, draw, report, placeholder=placeholder)
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) == batch_size:
                    yield self._collate(pending, report.take(), placeholder)
                    pending = []
                    made += 1
                    if quota is not None and made >= quota:
                        break
            if pending and not self.options.drop_last and (quota is None or made < quota):
                yield self._collate(pending, report.take(), made * workers + worker < self.skip_batches)
        yield {_CONTROL: "tail", "skipped": report.take()}

    def read_sample(self, pair: ShardPair, draw: str, report: SkipReporter, *,
                    placeholder: bool = False) -> TrainingSample | None:
        """One paired sample as the trainer reads it: ``None`` (after calling ``report`` with the
        skip reason) when its image, record or captions are unusable, else its key, pixels,
        chosen texts and their box cells. ``draw`` names the shard draw and seeds the caption
        choice with the key; ``placeholder=True`` only checks usability (no pixels or texts),
        as resumes and ``ps3 data check`` need."""
        key, image_shard, record_shard = pair.key, pair.image_shard, pair.record_shard
        image_bytes = next((pair.image[ext] for ext in IMAGE_EXTENSIONS if ext in pair.image), None)
        if image_bytes is None:
            report("missing_image", image_shard, key, f"sample has no image file (.jpg) in {image_shard}")
            return None
        if "json" not in pair.record:
            report("missing_json", record_shard, key, f"sample has no .json file in {record_shard}")
            return None
        # The record first: it is cheap, and a bad one spares decoding the image.
        try:
            record = json.loads(pair.record["json"])
        except ValueError as exc:  # also UnicodeDecodeError
            report("bad_json", record_shard, key, f"invalid JSON: {exc}")
            return None
        if not isinstance(record, dict):
            report("bad_json", record_shard, key, f"the record must be a JSON object, got {type(record).__name__}")
            return None
        try:
            image = load_image(image_bytes, max_pixels=self.options.max_pixels, name=f"{key!r} in {image_shard}")
        except ValueError as exc:
            report("bad_image", image_shard, key, str(exc))
            return None

        local, global_sentences = usable_captions(record, image.size, report, record_shard, key)
        if not local and global_sentences is None:
            report("no_usable_caption", record_shard, key, "no usable local or global caption")
            return None
        if placeholder:  # resume skipping: validity is all that matters
            return TrainingSample(key, None, [], [])

        options, size = self.options, self.processor.image_size
        rng = random.Random(_seed(options.seed, self.epoch, draw, key))
        chosen = choose_captions(local, global_sentences, rng, n=options.sample_n_box_each_image,
                                 global_caption_prob=options.global_caption_prob,
                                 sentence_masking=options.sentence_masking)
        cells = [None if box is None else box_cells(box, image.size, size) for _, box in chosen]
        # Decoded here under max_pixels, so the processor's steps after decoding, not preprocess().
        pixels = self.processor.preprocess_rgb(image)
        return TrainingSample(key, pixels, [text for text, _ in chosen], cells)

    def _collate(self, samples: list[TrainingSample], skipped: dict[str, int], placeholder: bool) -> dict[str, Any]:
        if placeholder:
            return {_CONTROL: "placeholder", "skipped": skipped}
        size = self.processor.image_size
        height, width = (size, size) if isinstance(size, int) else size
        texts = [text for sample in samples for text in sample.texts]
        cells = [cell for sample in samples for cell in sample.cells]
        gt = torch.zeros(len(texts), height, width)
        for row, cell in enumerate(cells):
            if cell is None:
                gt[row] = 1.0
            else:
                row0, row1, col0, col1 = cell
                gt[row, row0:row1 + 1, col0:col1 + 1] = 1.0
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([sample.pixels for sample in samples]),
            "texts": texts,
            "gt_selection_maps": gt,
            "is_global_text": torch.tensor([cell is None for cell in cells], dtype=torch.bool).view(-1, 1),
            "keys": [sample.key for sample in samples],
            "skipped": skipped,
        }
        if self.options.tokenize is not None:
            batch["text_ids"] = self.options.tokenize(texts)
        return batch


# --------------------------------------------------------------------------------------------
# The loader


class PretrainLoader:
    """Iterable over the training batches of one rank; ``counter`` sums the skip counts.

    ``set_epoch(epoch, skip_batches=0)`` switches to another epoch's deterministic stream (and
    optionally resumes inside it). Iterating again restarts the current epoch from its start
    (after ``skip_batches``, which applies to the next iteration only).
    """

    def __init__(self, dataset: PretrainDataset, *, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.workers = dataset.options.workers
        self.pin_memory = dataset.options.pin_memory
        self.prefetch_factor = prefetch_factor
        self.counter = SkipCounter()
        self._skip_next = dataset.skip_batches

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        check_int("epoch", epoch, 0)
        check_int("skip_batches", skip_batches, 0)
        self.dataset.epoch = epoch
        self._skip_next = skip_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each pass reads a copy, so the resume offset applies to this pass only and changing
        # the epoch while a pass is running cannot affect it.
        dataset = copy.copy(self.dataset)
        dataset.skip_batches = to_skip = self._skip_next
        self._skip_next = 0
        if not dataset.options.resample:
            per_rank = len(dataset.shards_of(0, 1))
            if per_rank < max(self.workers, 1):
                warnings.warn(
                    f"rank {dataset.rank} reads {per_rank} shard(s) with {self.workers} DataLoader workers: "
                    f"{max(self.workers, 1) - per_rank} worker(s) will have nothing to read; use more shards or "
                    f"fewer workers",
                    stacklevel=2,
                )
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
        )
        for item in loader:
            if item.get(_CONTROL) == "tail":
                if to_skip == 0:
                    self.counter.update(item["skipped"])
                continue
            if to_skip > 0:  # placeholders, and real batches pulled forward by an early-ending worker
                to_skip -= 1
                continue
            if _CONTROL in item:
                raise RuntimeError("internal error: a resume placeholder escaped the skipped range")
            self.counter.update(item["skipped"])
            yield item


def build_dataloader(image_shards: str | os.PathLike | Sequence[str | os.PathLike],
                     text_box_shards: str | os.PathLike | Sequence[str | os.PathLike],
                     options: DataOptions | None = None, **fields: Any) -> PretrainLoader:
    """Build the pre-training batch stream of this rank (see the module docstring).

    Args:
        image_shards, text_box_shards: directory, brace pattern or list of shards each
            (:func:`ps3.data.shards.list_shards`); the same number of shards, paired by position.
        options: a :class:`DataOptions`; or give its fields as keywords (``image_size=...,
            batch_size=...``), which also override fields of ``options``.
    """
    if options is None:
        options = DataOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    images, records = list_shard_pairs(image_shards, text_box_shards)
    if options.resample and options.num_batches is None:
        warnings.warn("resample=True without num_batches gives an endless stream", stacklevel=2)
    dataset = PretrainDataset(images, records, options)
    if not options.resample and len(images) < dataset.world_size:
        raise UserError(
            f"{len(images)} shard pair(s) cannot be split between {dataset.world_size} ranks: every rank needs at "
            f"least one shard (write more, smaller shards, or use resample=True)"
        )
    return PretrainLoader(dataset)
