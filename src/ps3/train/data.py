"""Pre-training data: paired image / text-box webdatasets → batches for PS3 (SPEC §5).

Layout
------
Two shard sets with the same shard layout and the same keys, in the same order:

* images: ``KEY.jpg`` (``.jpeg``, ``.png`` and ``.webp`` are accepted too);
* text-boxes: ``KEY.json`` = ``{"text": [local captions], "box": [[x0, y0, x1, y1], ...],
  "global_text": "..."}`` with boxes in the original image's pixels (edge coordinates).

Each set is given as a directory (every ``*.tar`` inside, sorted by name), a brace pattern such
as ``"/data/image_{00000..00099}.tar"`` (``::`` joins several), or a list of paths/URLs. Shard
``i`` of one set is read together with shard ``i`` of the other, sample by sample, and the keys
must agree.

Per sample (SPEC §5)
--------------------
1. Captions are shaped (:func:`shape_caption`): a leading "The image is a close-up of" /
   "The second image is a close-up of" is dropped, so is a final sentence that mentions both
   "text" and "visible" (whole words, any case) when other sentences exist; with
   ``sentence_masking`` a random contiguous run of sentences is kept.
2. If both a global caption and local captions exist, the global one is used with probability
   ``global_caption_prob``; only a global one → global; otherwise ``sample_n_box_each_image``
   local caption/box pairs are drawn without replacement. An image with fewer usable pairs than
   that takes all of them and then draws again from a fresh permutation (so every image
   contributes exactly ``n`` texts). A global caption is repeated ``n`` times.
3. The image is squash-resized to ``image_size`` with PIL bicubic, scaled to [0, 1] and
   normalised (the inference processor, :class:`ps3.processor.PS3ImageProcessor`, does the
   same). A box is clipped to the image, scaled by the same squash, and rows
   ``floor(y0)..ceil(y1)`` and columns ``floor(x0)..ceil(x1)`` (inclusive, clipped to the map)
   of an (S, S) map of zeros are set to 1 (:func:`box_to_gt_map`). A global caption's map is all 1.

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
:data:`SKIP_REASONS`; counts travel with the batches (so they reach the main process from
DataLoader workers) and :class:`PretrainLoader` sums them in ``loader.counter``. When the keys of
the two sets disagree, both are looked ahead (up to :data:`RESYNC_WINDOW` samples) for the point
where they line up again, so a missing file costs one sample, not the rest of the shard. With
``strict=True`` the first problem raises ``ValueError`` naming the reason, shard and key.

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

import collections
import copy
import glob
import hashlib
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..images import MAX_IMAGE_PIXELS, load_image
from ..processor import PS3ImageProcessor

__all__ = [
    "SKIP_REASONS",
    "LEADING_PHRASES",
    "SkipCounter",
    "PretrainDataset",
    "PretrainLoader",
    "build_dataloader",
    "list_shards",
    "shape_caption",
    "clean_caption",
    "mask_sentences",
    "box_to_gt_map",
]

#: Why an item was dropped; the keys of ``batch["skipped"]`` and ``loader.counter``.
SKIP_REASONS: dict[str, str] = {
    "tar_error": "a shard could not be opened or read to its end (missing, truncated or corrupt tar); "
    "counted once per shard, the samples after the damage are lost",
    "duplicate_file": "a tar holds the same file name twice for one key (the later copy is ignored)",
    "missing_image": "a text-box sample has no image (no KEY.jpg for its key)",
    "missing_json": "an image has no text-box record (no KEY.json for its key)",
    "key_mismatch": "the two shard sets disagree on the order of keys here (one item per side)",
    "bad_image": "image bytes that do not decode (corrupt, truncated, not an image, too many pixels)",
    "bad_json": "a record that is not valid JSON or does not have the expected layout",
    "length_mismatch": "'text' and 'box' lists of different lengths (all local pairs of the sample)",
    "bad_box": "a box that is not 4 finite numbers, or is inverted or has zero area (one pair)",
    "box_outside_image": "a box with nothing left after clipping it to the image (one pair)",
    "empty_caption": "a caption that is empty after shaping (one pair, or the global caption)",
    "no_usable_caption": "a sample left with no usable caption at all",
}

#: Leading phrases removed from captions (SPEC §5), compared case-insensitively.
LEADING_PHRASES = ("The second image is a close-up of", "The image is a close-up of")

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Samples each side may look ahead to line the two shard sets up again after a key mismatch.
RESYNC_WINDOW = 16
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_TEXT_WORD = re.compile(r"\btexts?\b", re.IGNORECASE)
_VISIBLE_WORD = re.compile(r"\bvisible\b", re.IGNORECASE)
_CONTROL = "_control"  # marks non-batch items (placeholders, worker tails) inside the stream


# --------------------------------------------------------------------------------------------
# Counting bad data


class SkipCounter:
    """Counts of dropped items by reason (see :data:`SKIP_REASONS`), summed over batches."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: collections.Counter[str] = collections.Counter(counts or {})

    def update(self, counts: Mapping[str, int]) -> None:
        self.counts.update({reason: int(n) for reason, n in counts.items() if n})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def reset(self) -> None:
        self.counts.clear()

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


class _Reporter:
    """Counts a problem, or raises it in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise RuntimeError(f"internal error: unknown skip reason {reason!r}")
        if self.strict:
            where = f"shard {shard}" + (f", key {key!r}" if key is not None else "")
            raise ValueError(f"bad training data ({reason}) in {where}: {detail or SKIP_REASONS[reason]}")
        self.counts[reason] += 1

    def take(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.clear()
        return counts


# --------------------------------------------------------------------------------------------
# Shards


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], *, argument: str = "shards") -> list[str]:
    """Expand a shard specification into a list of shard paths/URLs.

    ``spec`` is a directory (every ``*.tar`` in it, sorted), a brace pattern
    (``"dir/image_{00000..00099}.tar"``; ``::`` separates several patterns), or a list of
    paths/URLs. Local paths must exist; URLs (``scheme://``) and ``pipe:`` commands are passed to
    webdataset's ``gopen`` unchecked. ``argument`` names the caller's argument in errors.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if os.path.isdir(text):
            shards = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
            if not shards:
                raise ValueError(f"{argument}: directory {text} holds no *.tar shards")
            return shards
        shards = list(expand_urls(text))
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        shards = [os.fspath(s) for s in spec]
    else:
        raise TypeError(
            f"{argument} must be a directory, a brace pattern or a list of shards, got {type(spec).__name__}"
        )
    if not shards:
        raise ValueError(f"{argument}: no shards given")
    missing = [s for s in shards if _is_local(s) and not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{argument}: shard not found: {missing[0]}{more}")
    return shards


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _read_shard(url: str, report: _Reporter) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension → bytes, plus ``__key__``) of one tar shard, in order.

    A tar that cannot be opened or ends early is counted once as ``tar_error``; the samples read
    before the damage are kept.
    """
    last_key: list[str | None] = [None]
    failed = [False]
    # Problems seen inside webdataset's iterators are reported once control is back here: a
    # strict-mode ValueError raised inside its handlers would be caught by its outer handler.
    pending: list[tuple[str, str | None, str]] = []

    def on_error(exc: Exception) -> bool:
        message = str(exc.args[0]) if exc.args else repr(exc)
        if isinstance(exc, ValueError) and "duplicate file name" in message:
            file_name = message.split(":")[0]
            pending.append(("duplicate_file", base_plus_ext(file_name)[0], f"{file_name} appears twice"))
            return True  # drop the duplicate, keep reading
        if not failed[0]:
            failed[0] = True
            where = f"after key {last_key[0]!r}" if last_key[0] is not None else "before the first sample"
            pending.append(("tar_error", None, f"cannot read the tar {where} ({type(exc).__name__}: {message})"))
        return False  # stop reading this shard: what follows the damage is unreliable

    def flush() -> None:
        while pending:
            reason, key, detail = pending.pop(0)
            report(reason, url, key, detail)

    try:
        stream = gopen(url, "rb")
    except Exception as exc:
        report("tar_error", url, None, f"cannot open the shard ({type(exc).__name__}: {exc})")
        return
    try:
        def tracked(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for file in files:  # remember the last file read whole, to say where damage starts
                if "fname" in file:
                    last_key[0] = base_plus_ext(file["fname"])[0]
                yield file

        files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        for sample in group_by_keys(tracked(files), handler=on_error):
            flush()
            yield sample
        flush()
    finally:
        try:
            stream.close()
        except Exception:  # a pipe that exited non-zero: the damage was already reported
            pass


class _RawPair(NamedTuple):
    key: str
    image: dict[str, Any]
    record: dict[str, Any]
    image_shard: str
    record_shard: str
    draw: str  # identifies the shard draw; part of the per-sample random seed


def _lockstep(image_url: str, record_url: str, draw: str, report: _Reporter) -> Iterator[_RawPair]:
    """Pair the samples of an image shard and a text-box shard by position, checking keys.

    When the keys at the current position differ, both streams are looked ahead by up to
    :data:`RESYNC_WINDOW` samples for the nearest position where they agree again; the samples
    passed over are dropped (``missing_json`` / ``missing_image`` when their key is not on the
    other side, ``key_mismatch`` when it is, but elsewhere). One missing file therefore costs
    one sample, not the rest of the shard.
    """
    images, records = _read_shard(image_url, report), _read_shard(record_url, report)
    image_buf: collections.deque = collections.deque()
    record_buf: collections.deque = collections.deque()
    passed_images: set[str] = set()  # keys dropped on one side, to recognise them on the other
    passed_records: set[str] = set()

    def pull(buf: collections.deque, stream: Iterator, size: int) -> None:
        while len(buf) < size:
            item = next(stream, None)
            if item is None:
                return
            buf.append(item)

    def drop_image(sample: dict, other_keys: set[str]) -> None:
        key = sample["__key__"]
        passed_images.add(key)
        if key in other_keys or key in passed_records:
            report("key_mismatch", image_url, key, f"key {key!r} is out of lockstep with {record_url}")
        else:
            report("missing_json", image_url, key, f"no {key}.json in {record_url}")

    def drop_record(sample: dict, other_keys: set[str]) -> None:
        key = sample["__key__"]
        passed_records.add(key)
        if key in other_keys or key in passed_images:
            report("key_mismatch", record_url, key, f"key {key!r} is out of lockstep with {image_url}")
        else:
            report("missing_image", record_url, key, f"no image for key {key!r} in {image_url}")

    while True:
        pull(image_buf, images, 1)
        pull(record_buf, records, 1)
        if not image_buf and not record_buf:
            return
        if not record_buf:
            drop_image(image_buf.popleft(), set())
            continue
        if not image_buf:
            drop_record(record_buf.popleft(), set())
            continue
        if image_buf[0]["__key__"] == record_buf[0]["__key__"]:
            image, record = image_buf.popleft(), record_buf.popleft()
            yield _RawPair(image["__key__"], image, record, image_url, record_url, draw)
            continue
        if report.strict:  # name both sides at the first disagreement, before any realignment
            report("key_mismatch", image_url, image_buf[0]["__key__"],
                   f"the text-box shard {record_url} has key {record_buf[0]['__key__']!r} at this position")
        pull(image_buf, images, RESYNC_WINDOW)
        pull(record_buf, records, RESYNC_WINDOW)
        image_keys = [s["__key__"] for s in image_buf]
        record_keys = [s["__key__"] for s in record_buf]
        first_record_pos: dict[str, int] = {}
        for j, key in enumerate(record_keys):
            first_record_pos.setdefault(key, j)
        best: tuple[int, int] | None = None
        for i, key in enumerate(image_keys):
            j = first_record_pos.get(key)
            if j is not None and (best is None or i + j < sum(best)):
                best = (i, j)
        image_set, record_set = set(image_keys), set(record_keys)
        if best is None:  # nothing lines up within the window: drop both heads
            report("key_mismatch", image_url, image_keys[0],
                   f"image key {image_keys[0]!r} vs text-box key {record_keys[0]!r} in {record_url}")
            passed_images.add(image_keys[0])
            image_buf.popleft()
            report("key_mismatch", record_url, record_keys[0],
                   f"text-box key {record_keys[0]!r} vs image key {image_keys[0]!r} in {image_url}")
            passed_records.add(record_keys[0])
            record_buf.popleft()
            continue
        for _ in range(best[0]):
            drop_image(image_buf.popleft(), record_set)
        for _ in range(best[1]):
            drop_record(record_buf.popleft(), image_set)


# --------------------------------------------------------------------------------------------
# Captions and boxes


def clean_caption(text: str) -> list[str]:
    """The deterministic part of caption shaping: the caption's sentences after dropping a
    leading phrase (:data:`LEADING_PHRASES`) and a final "text … visible" sentence when other
    sentences exist. Sentences end at ``.``, ``!`` or ``?`` followed by whitespace."""
    stripped = text.strip()
    for phrase in LEADING_PHRASES:
        if stripped.lower().startswith(phrase.lower()):
            stripped = stripped[len(phrase):].strip()
            break
    sentences = [s.strip() for s in _SENTENCE_BREAK.split(stripped) if s.strip()]
    if len(sentences) > 1 and _TEXT_WORD.search(sentences[-1]) and _VISIBLE_WORD.search(sentences[-1]):
        sentences.pop()
    return sentences


def mask_sentences(sentences: Sequence[str], rng: random.Random) -> list[str]:
    """Keep a random contiguous run of sentences: start in [0, min(n-1, 2)], length in
    [min(n, 1), max(n - start, 1)] (SPEC §5)."""
    n = len(sentences)
    if n == 0:
        return []
    start = rng.randint(0, min(n - 1, 2))
    length = rng.randint(min(n, 1), max(n - start, 1))
    return list(sentences[start:start + length])


def shape_caption(text: str, *, sentence_masking: bool = False, rng: random.Random | None = None) -> str:
    """Shape one caption as in pre-training (SPEC §5); ``""`` when nothing is left.

    ``rng`` drives sentence masking (a fresh unseeded one when omitted)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    sentences = clean_caption(text)
    if sentence_masking:
        sentences = mask_sentences(sentences, rng or random.Random())
    return " ".join(sentences)


def _clip_box(box: Any, width: int, height: int) -> tuple[float, float, float, float] | str:
    """The box clipped to the image, or the skip reason."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return "bad_box"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return "bad_box"
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return "bad_box"  # non-finite, inverted or zero-area
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        return "box_outside_image"
    return x0, y0, x1, y1


def _box_cells(box: Sequence[float], original_size: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """Inclusive (row0, row1, col0, col1) of the gt map for a box in original pixels."""
    width, height = original_size
    # Multiply before dividing: 20 * 10 / 50 is exactly 4, 20 * (10 / 50) is not.
    x0, x1 = box[0] * image_size / width, box[2] * image_size / width
    y0, y1 = box[1] * image_size / height, box[3] * image_size / height
    last = image_size - 1
    row0, row1 = min(max(math.floor(y0), 0), last), min(max(math.ceil(y1), 0), last)
    col0, col1 = min(max(math.floor(x0), 0), last), min(max(math.ceil(x1), 0), last)
    return row0, row1, col0, col1


def box_to_gt_map(box: Sequence[float] | None, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """The (S, S) float 0/1 ground-truth map of a box ``[x0, y0, x1, y1]`` given in the pixels of an
    image of ``original_size = (width, height)`` after the squash resize to ``image_size`` S
    (SPEC §5). ``box=None`` (a global caption) gives the whole-image map of ones. The box is
    clipped to the image first; an unusable box raises ``ValueError``."""
    gt = torch.zeros(image_size, image_size)
    if box is None:
        return gt.fill_(1.0)
    clipped = _clip_box(box, *original_size)
    if isinstance(clipped, str):
        raise ValueError(f"box {box!r} is not usable for an image of size {original_size}: {SKIP_REASONS[clipped]}")
    row0, row1, col0, col1 = _box_cells(clipped, original_size, image_size)
    gt[row0:row1 + 1, col0:col1 + 1] = 1.0
    return gt


# --------------------------------------------------------------------------------------------
# The dataset


@dataclass
class _Sample:
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


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class PretrainDataset(IterableDataset):
    """The batch stream of one rank (see the module docstring). Iterate it through
    :class:`PretrainLoader` (from :func:`build_dataloader`): the raw stream also carries control
    items (resume placeholders and per-worker tails of skip counts) that the loader consumes."""

    def __init__(
        self,
        image_shards: Sequence[str],
        text_box_shards: Sequence[str],
        *,
        processor: PS3ImageProcessor,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        resample: bool = False,
        global_caption_prob: float = 0.0,
        sample_n_box_each_image: int = 1,
        sentence_masking: bool = False,
        rank: int = 0,
        world_size: int = 1,
        strict: bool = False,
        tokenize: Callable[[list[str]], Any] | None = None,
        num_batches: int | None = None,
        drop_last: bool = False,
        skip_batches: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        if len(image_shards) != len(text_box_shards):
            raise ValueError(
                f"image_shards and text_box_shards must pair up shard by shard, got {len(image_shards)} "
                f"and {len(text_box_shards)} shards"
            )
        self.image_shards = list(image_shards)
        self.text_box_shards = list(text_box_shards)
        self.processor = processor
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.global_caption_prob = global_caption_prob
        self.n_texts = sample_n_box_each_image
        self.sentence_masking = sentence_masking
        self.rank = rank
        self.world_size = world_size
        self.strict = strict
        self.tokenize = tokenize
        self.num_batches = num_batches
        self.drop_last = drop_last
        self.skip_batches = skip_batches
        self.max_pixels = max_pixels

    # -- shard plan -----------------------------------------------------------------------

    def shards_of(self, worker: int, workers: int) -> list[int]:
        """Shard indices (into the shard lists) read by this rank's ``worker`` of ``workers``
        in this epoch, in order (without ``resample``)."""
        order = list(range(len(self.image_shards)))
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order[self.rank::self.world_size][worker::workers]

    def _shard_draws(self, worker: int, workers: int) -> Iterator[tuple[int, str]]:
        if not self.resample:
            for index in self.shards_of(worker, workers):
                yield index, f"shard{index}"
            return
        rng = random.Random(_seed(self.seed, self.epoch, "resample", self.rank, worker))
        draw = 0
        while True:  # endless: the epoch length is num_batches
            yield rng.randrange(len(self.image_shards)), f"rank{self.rank}-worker{worker}-draw{draw}"
            draw += 1

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        report = _Reporter(self.strict)

        def pairs() -> Iterator[_RawPair]:
            for index, draw in self._shard_draws(worker, workers):
                yield from _lockstep(self.image_shards[index], self.text_box_shards[index], draw, report)

        stream: Iterable[_RawPair] = pairs()
        if self.shuffle:
            rng = random.Random(_seed(self.seed, self.epoch, "samples", self.rank, worker))
            stream = _shuffled(stream, self.shuffle_buffer, rng)

        # Worker w's batch j is batch j·workers + w of the rank (the DataLoader takes batches from
        # the workers in turn); it can only come earlier when another worker runs out first.
        quota = None
        if self.num_batches is not None:
            quota = self.num_batches // workers + (worker < self.num_batches % workers)
        made = 0
        pending: list[_Sample] = []
        if quota != 0:
            for raw in stream:
                placeholder = made * workers + worker < self.skip_batches
                sample = self._sample(raw, report, placeholder)
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._collate(pending, report.take(), placeholder)
                    pending = []
                    made += 1
                    if quota is not None and made >= quota:
                        break
            if pending and not self.drop_last and (quota is None or made < quota):
                yield self._collate(pending, report.take(), made * workers + worker < self.skip_batches)
        yield {_CONTROL: "tail", "skipped": report.take()}

    def _sample(self, raw: _RawPair, report: _Reporter, placeholder: bool) -> _Sample | None:
        key = raw.key
        image_bytes = next((raw.image[ext] for ext in _IMAGE_EXTENSIONS if ext in raw.image), None)
        if image_bytes is None:
            report("missing_image", raw.image_shard, key, f"sample has no image file (.jpg) in {raw.image_shard}")
            return None
        if "json" not in raw.record:
            report("missing_json", raw.record_shard, key, f"sample has no .json file in {raw.record_shard}")
            return None
        # The record first: it is cheap, and a bad one spares decoding the image.
        try:
            record = json.loads(raw.record["json"])
        except ValueError as exc:  # also UnicodeDecodeError
            report("bad_json", raw.record_shard, key, f"invalid JSON: {exc}")
            return None
        if not isinstance(record, dict):
            report("bad_json", raw.record_shard, key, f"the record must be a JSON object, got {type(record).__name__}")
            return None
        try:
            image = load_image(image_bytes, max_pixels=self.max_pixels, name=f"{key!r} in {raw.image_shard}")
        except ValueError as exc:
            report("bad_image", raw.image_shard, key, str(exc))
            return None

        local, global_text = self._captions(record, image.size, report, raw)
        if not local and global_text is None:
            report("no_usable_caption", raw.record_shard, key, "no usable local or global caption")
            return None
        if placeholder:  # resume skipping: validity is all that matters
            return _Sample(key, None, [], [])

        rng = random.Random(_seed(self.seed, self.epoch, raw.draw, key))
        if global_text is not None and (not local or rng.random() < self.global_caption_prob):
            chosen = [(global_text, None)] * self.n_texts
        else:
            order: list[int] = []
            while len(order) < self.n_texts:  # without replacement, refilled only if too few
                order += rng.sample(range(len(local)), len(local))
            chosen = [local[i] for i in order[: self.n_texts]]
        texts, cells = [], []
        for sentences, box in chosen:
            if self.sentence_masking:
                sentences = mask_sentences(sentences, rng)
            texts.append(" ".join(sentences))
            cells.append(None if box is None else _box_cells(box, image.size, self.processor.image_size))
        return _Sample(key, self._pixels(image), texts, cells)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32: squash resize with PIL bicubic, [0, 1], normalised — what
        :meth:`PS3ImageProcessor.preprocess` does (checked by the tests), without decoding the
        image a second time or applying the processor's default pixel limit to it."""
        size = self.processor.image_size
        resized = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(self.processor.mean).view(3, 1, 1)
        std = torch.tensor(self.processor.std).view(3, 1, 1)
        return pixels.sub_(mean).div_(std)

    def _captions(
        self, record: dict[str, Any], size: tuple[int, int], report: _Reporter, raw: _RawPair
    ) -> tuple[list[tuple[list[str], tuple[float, float, float, float]]], list[str] | None]:
        """Usable (sentences, clipped box) pairs and the global caption's sentences (or None)."""
        shard, key = raw.record_shard, raw.key
        texts, boxes = record.get("text"), record.get("box")
        texts = [] if texts is None else texts
        boxes = [] if boxes is None else boxes
        local = []
        if not isinstance(texts, list) or not isinstance(boxes, list):
            report("bad_json", shard, key, "'text' and 'box' must be lists")
        elif len(texts) != len(boxes):
            report("length_mismatch", shard, key, f"{len(texts)} captions but {len(boxes)} boxes")
        else:
            for text, box in zip(texts, boxes):
                if not isinstance(text, str):
                    report("bad_json", shard, key, f"a caption must be a string, got {type(text).__name__}")
                    continue
                sentences = clean_caption(text)
                if not sentences:
                    report("empty_caption", shard, key, f"caption {text!r} is empty after shaping")
                    continue
                clipped = _clip_box(box, *size)
                if isinstance(clipped, str):
                    report(clipped, shard, key, f"box {box!r} for an image of {size[0]}x{size[1]}")
                    continue
                local.append((sentences, clipped))

        global_text = record.get("global_text")
        global_sentences = None
        if global_text is not None and global_text != "":
            if not isinstance(global_text, str):
                report("bad_json", shard, key, f"'global_text' must be a string, got {type(global_text).__name__}")
            else:
                global_sentences = clean_caption(global_text) or None
                if global_sentences is None:
                    report("empty_caption", shard, key, f"global caption {global_text!r} is empty after shaping")
        return local, global_sentences

    def _collate(self, samples: list[_Sample], skipped: dict[str, int], placeholder: bool) -> dict[str, Any]:
        if placeholder:
            return {_CONTROL: "placeholder", "skipped": skipped}
        size = self.processor.image_size
        texts = [text for sample in samples for text in sample.texts]
        cells = [cell for sample in samples for cell in sample.cells]
        gt = torch.zeros(len(texts), size, size)
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
        if self.tokenize is not None:
            batch["text_ids"] = self.tokenize(texts)
        return batch


class PretrainLoader:
    """Iterable over the training batches of one rank; ``counter`` sums the skip counts.

    ``set_epoch(epoch, skip_batches=0)`` switches to another epoch's deterministic stream (and
    optionally resumes inside it). Iterating again restarts the current epoch from its start
    (after ``skip_batches``, which applies to the next iteration only).
    """

    def __init__(self, dataset: PretrainDataset, *, workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.workers = workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.counter = SkipCounter()
        self._skip_next = dataset.skip_batches

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        _check_int("epoch", epoch, 0)
        _check_int("skip_batches", skip_batches, 0)
        self.dataset.epoch = epoch
        self._skip_next = skip_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Each pass reads a copy, so the resume offset applies to this pass only and changing
        # the epoch while a pass is running cannot affect it.
        dataset = copy.copy(self.dataset)
        dataset.skip_batches = to_skip = self._skip_next
        self._skip_next = 0
        if not dataset.resample:
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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def build_dataloader(
    image_shards: str | os.PathLike | Sequence[str | os.PathLike],
    text_box_shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 256,
    resample: bool = False,
    epoch: int = 0,
    global_caption_prob: float = 0.0,
    sample_n_box_each_image: int = 1,
    sentence_masking: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    strict: bool = False,
    tokenize: Callable[[list[str]], Any] | None = None,
    num_batches: int | None = None,
    drop_last: bool = False,
    skip_batches: int = 0,
    pin_memory: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> PretrainLoader:
    """Build the pre-training batch stream of this rank (see the module docstring).

    Args:
        image_shards, text_box_shards: directory, brace pattern or list of shards each
            (:func:`list_shards`); the same number of shards, paired by position.
        image_size, mean, std: the preprocessing (``preprocessor_config.json`` of the model).
        batch_size: images per batch (each brings ``sample_n_box_each_image`` texts).
        workers: DataLoader worker processes (0 reads in the main process).
        seed, epoch: make the stream deterministic; change ``epoch`` (or ``set_epoch``) each epoch.
        shuffle: shuffle the shard order and samples (through a ``shuffle_buffer``-sample buffer
            per worker, holding encoded images: budget ``shuffle_buffer`` × JPEG size of memory
            per worker); False reads shards and samples in order.
        resample: draw shards with replacement, endlessly (use ``num_batches`` as epoch length).
        global_caption_prob, sample_n_box_each_image, sentence_masking: caption choice (SPEC §5).
        rank, world_size: this rank; default from ``torch.distributed`` when initialised, else 0/1.
        strict: raise ``ValueError`` on the first bad sample instead of skipping and counting it.
        tokenize: callable list[str] → token ids, run in the workers; result in ``text_ids``.
        num_batches: stop after this many batches of this rank (needed with ``resample``).
        drop_last: drop each worker's final partial batch.
        skip_batches: resume: leave out the first this many batches of this epoch (cheaply).
        pin_memory: pin batch tensors (for asynchronous copies to a GPU).
        max_pixels: refuse larger images (counted as ``bad_image``).
    """
    images = list_shards(image_shards, argument="image_shards")
    records = list_shards(text_box_shards, argument="text_box_shards")
    if len(images) != len(records):
        raise ValueError(
            f"image_shards has {len(images)} shards but text_box_shards has {len(records)}: they must pair "
            f"up shard by shard (image shard i with text-box shard i)"
        )
    processor = PS3ImageProcessor(image_size=image_size, mean=mean, std=std)
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    _check_int("shuffle_buffer", shuffle_buffer, 1)
    _check_int("epoch", epoch, 0)
    _check_int("sample_n_box_each_image", sample_n_box_each_image, 1)
    _check_int("skip_batches", skip_batches, 0)
    _check_int("seed", seed, 0)
    if num_batches is not None:
        _check_int("num_batches", num_batches, 1)
    if isinstance(global_caption_prob, bool) or not isinstance(global_caption_prob, (int, float)) \
            or not 0.0 <= global_caption_prob <= 1.0:
        raise ValueError(f"global_caption_prob must be a number in [0, 1], got {global_caption_prob!r}")
    if tokenize is not None and not callable(tokenize):
        raise TypeError(f"tokenize must be a callable list[str] -> token ids, got {type(tokenize).__name__}")
    if resample and num_batches is None:
        warnings.warn("resample=True without num_batches gives an endless stream", stacklevel=2)
    rank, world_size = _resolve_rank(rank, world_size)
    if not resample and len(images) < world_size:
        raise ValueError(
            f"{len(images)} shard pair(s) cannot be split between {world_size} ranks: every rank needs at least "
            f"one shard (write more, smaller shards, or use resample=True)"
        )
    dataset = PretrainDataset(
        images, records, processor=processor, batch_size=batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, resample=resample, global_caption_prob=float(global_caption_prob),
        sample_n_box_each_image=sample_n_box_each_image, sentence_masking=sentence_masking, rank=rank,
        world_size=world_size, strict=strict, tokenize=tokenize, num_batches=num_batches, drop_last=drop_last,
        skip_batches=skip_batches, max_pixels=max_pixels,
    )
    return PretrainLoader(dataset, workers=workers, pin_memory=pin_memory)
