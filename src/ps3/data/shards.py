"""Reading webdataset tar shards: the one reader every consumer of the data uses (design §5).

* :func:`list_shards` expands a shard specification (directory, brace pattern, list);
  :func:`list_shard_pairs` does it for an image set and a text-box set that pair up by position.
* :func:`iter_shard` yields the samples of one tar shard as webdataset-style dicts
  (``{"__key__": str, "__url__": str, "<ext>": bytes, ...}``); a missing, truncated or corrupt
  tar is reported once through a callback and never raises.
* :func:`iter_paired_shard` reads an image shard and its text-box shard in lockstep, checks that
  the keys agree and realigns the two after a missing or misplaced file.
* Problems are reported as ``on_skip(reason, shard, key, detail)`` with a reason from
  :data:`SKIP_REASONS`; :class:`SkipReporter` counts them (or raises in strict mode) and
  :class:`SkipCounter` sums counts over batches.
"""
from __future__ import annotations

import collections
import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..runtime import UserError

__all__ = [
    "SKIP_REASONS",
    "IMAGE_EXTENSIONS",
    "RESYNC_WINDOW",
    "OnSkip",
    "SkipCounter",
    "SkipReporter",
    "ShardPair",
    "list_shards",
    "list_shard_pairs",
    "iter_shard",
    "iter_paired_shard",
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

#: File extensions of an image in an image shard, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Samples each side may look ahead to line the two shard sets up again after a key mismatch.
RESYNC_WINDOW = 16

#: ``on_skip(reason, shard, key, detail)``: a problem in the data; ``key`` is None when unknown.
OnSkip = Callable[[str, str, str | None, str], None]


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


class SkipReporter:
    """An ``on_skip`` callback that counts problems by reason, or raises the first one as
    ``ValueError`` (naming reason, shard and key) when ``strict``. ``take()`` returns the counts
    since the previous ``take()``."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise RuntimeError(f"internal error: unknown skip reason {reason!r}")
        if self.strict:
            where = f"shard {shard}" + (f", key {key!r}" if key is not None else "")
            raise UserError(f"bad training data ({reason}) in {where}: {detail or SKIP_REASONS[reason]}")
        self.counts[reason] += 1

    def take(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.clear()
        return counts


def _ignore(reason: str, shard: str, key: str | None, detail: str = "") -> None:
    """The ``on_skip`` of readers that only take what they can use (the pipeline counts the rest)."""


# --------------------------------------------------------------------------------------------
# Listing shards


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
                raise UserError(f"{argument}: directory {text} holds no *.tar shards")
            return shards
        shards = list(expand_urls(text))
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        shards = [os.fspath(s) for s in spec]
    else:
        raise TypeError(
            f"{argument} must be a directory, a brace pattern or a list of shards, got {type(spec).__name__}"
        )
    if not shards:
        raise UserError(f"{argument}: no shards given")
    missing = [s for s in shards if _is_local(s) and not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{argument}: shard not found: {missing[0]}{more}")
    return shards


def list_shard_pairs(
    image_shards: str | os.PathLike | Sequence[str | os.PathLike],
    text_box_shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_argument: str = "image_shards",
    text_box_argument: str = "text_box_shards",
) -> tuple[list[str], list[str]]:
    """Both shard sets listed (:func:`list_shards`); ``ValueError`` unless they have the same
    number of shards (image shard ``i`` pairs with text-box shard ``i``)."""
    images = list_shards(image_shards, argument=image_argument)
    records = list_shards(text_box_shards, argument=text_box_argument)
    if len(images) != len(records):
        raise UserError(
            f"{image_argument} has {len(images)} shards but {text_box_argument} has {len(records)}: they must "
            f"pair up shard by shard (image shard i with text-box shard i)"
        )
    return images, records


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


# --------------------------------------------------------------------------------------------
# Reading one shard


def iter_shard(url: str, on_skip: OnSkip | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order: ``{"__key__", "__url__", ext: bytes, ...}``
    (extensions lower-cased).

    Never raises for bad data: a tar that cannot be opened or ends early is reported once as
    ``tar_error`` (the samples read before the damage are kept), a file name that appears twice
    for one key as ``duplicate_file`` (the later copy is dropped). ``on_skip`` receives
    ``(reason, url, key, detail)``; None ignores the problems. A strict ``on_skip`` may raise.
    """
    report = on_skip or _ignore
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


# --------------------------------------------------------------------------------------------
# Reading an image shard and its text-box shard in lockstep


class ShardPair(NamedTuple):
    """One key's image sample and text-box sample (webdataset-style dicts) and their shards."""

    key: str
    image: dict[str, Any]
    record: dict[str, Any]
    image_shard: str
    record_shard: str


class _Realigner:
    """Drops the samples passed over while lining the two streams up again, naming the reason:
    ``missing_json`` / ``missing_image`` when the key is not on the other side, ``key_mismatch``
    when it is, but elsewhere."""

    def __init__(self, image_url: str, record_url: str, report: OnSkip) -> None:
        self.image_url, self.record_url, self.report = image_url, record_url, report
        self.passed_images: set[str] = set()  # keys dropped on one side, to recognise them on the other
        self.passed_records: set[str] = set()

    def drop_image(self, sample: dict, other_keys: set[str]) -> None:
        key = sample["__key__"]
        self._drop(key, other_keys, image_side=True, missing="missing_json",
                   detail=f"no {key}.json in {self.record_url}")

    def drop_record(self, sample: dict, other_keys: set[str]) -> None:
        key = sample["__key__"]
        self._drop(key, other_keys, image_side=False, missing="missing_image",
                   detail=f"no image for key {key!r} in {self.image_url}")

    def _drop(self, key: str, other_keys: set[str], *, image_side: bool, missing: str, detail: str) -> None:
        """Drop ``key`` from one side: ``key_mismatch`` when the other side has it (ahead, or
        already passed over), else ``missing`` with ``detail``."""
        passed, other_passed = ((self.passed_images, self.passed_records) if image_side
                                else (self.passed_records, self.passed_images))
        url, other_url = (self.image_url, self.record_url) if image_side else (self.record_url, self.image_url)
        passed.add(key)
        if key in other_keys or key in other_passed:
            self.report("key_mismatch", url, key, f"key {key!r} is out of lockstep with {other_url}")
        else:
            self.report(missing, url, key, detail)

    def drop_both_heads(self, image_key: str, record_key: str) -> None:
        self.report("key_mismatch", self.image_url, image_key,
                    f"image key {image_key!r} vs text-box key {record_key!r} in {self.record_url}")
        self.passed_images.add(image_key)
        self.report("key_mismatch", self.record_url, record_key,
                    f"text-box key {record_key!r} vs image key {image_key!r} in {self.image_url}")
        self.passed_records.add(record_key)


def _nearest_common_key(image_keys: Sequence[str], record_keys: Sequence[str]) -> tuple[int, int] | None:
    """Positions (i, j) with ``image_keys[i] == record_keys[j]`` and the least ``i + j``."""
    first_record_pos: dict[str, int] = {}
    for j, key in enumerate(record_keys):
        first_record_pos.setdefault(key, j)
    best: tuple[int, int] | None = None
    for i, key in enumerate(image_keys):
        j = first_record_pos.get(key)
        if j is not None and (best is None or i + j < sum(best)):
            best = (i, j)
    return best


def _pull(buf: collections.deque, stream: Iterator, size: int) -> None:
    while len(buf) < size:
        item = next(stream, None)
        if item is None:
            return
        buf.append(item)


def iter_paired_shard(image_url: str, record_url: str, on_skip: OnSkip | None = None, *,
                      strict: bool = False) -> Iterator[ShardPair]:
    """Pair the samples of an image shard and a text-box shard by position, checking keys.

    When the keys at the current position differ, both streams are looked ahead by up to
    :data:`RESYNC_WINDOW` samples for the nearest position where they agree again; the samples
    passed over are dropped and reported (``missing_json`` / ``missing_image`` when their key is
    not on the other side, ``key_mismatch`` when it is, but elsewhere). One missing file
    therefore costs one sample, not the rest of the shard. With ``strict`` the first
    disagreement is reported (naming both keys) before any realignment.
    """
    report = on_skip or _ignore
    images, records = iter_shard(image_url, report), iter_shard(record_url, report)
    image_buf: collections.deque = collections.deque()
    record_buf: collections.deque = collections.deque()
    realign = _Realigner(image_url, record_url, report)
    while True:
        _pull(image_buf, images, 1)
        _pull(record_buf, records, 1)
        if not image_buf and not record_buf:
            return
        if not record_buf:
            realign.drop_image(image_buf.popleft(), set())
            continue
        if not image_buf:
            realign.drop_record(record_buf.popleft(), set())
            continue
        if image_buf[0]["__key__"] == record_buf[0]["__key__"]:
            image, record = image_buf.popleft(), record_buf.popleft()
            yield ShardPair(image["__key__"], image, record, image_url, record_url)
            continue
        if strict:  # name both sides at the first disagreement, before any realignment
            report("key_mismatch", image_url, image_buf[0]["__key__"],
                   f"the text-box shard {record_url} has key {record_buf[0]['__key__']!r} at this position")
        _pull(image_buf, images, RESYNC_WINDOW)
        _pull(record_buf, records, RESYNC_WINDOW)
        image_keys = [s["__key__"] for s in image_buf]
        record_keys = [s["__key__"] for s in record_buf]
        best = _nearest_common_key(image_keys, record_keys)
        if best is None:  # nothing lines up within the window: drop both heads
            realign.drop_both_heads(image_keys[0], record_keys[0])
            image_buf.popleft()
            record_buf.popleft()
            continue
        image_set, record_set = set(image_keys), set(record_keys)
        for _ in range(best[0]):
            realign.drop_image(image_buf.popleft(), record_set)
        for _ in range(best[1]):
            realign.drop_record(record_buf.popleft(), image_set)
