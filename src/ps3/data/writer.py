"""Writing webdataset tar shards: atomic, byte-reproducible, in the paired layout (design §5).

:class:`ShardWriter` writes one tar to ``<path>.tmp`` and renames it to ``path`` only when it is
closed without an error, so a crash never leaves a half shard under a final name. Members get a
fixed mtime, owner and mode, so the same samples always give the same bytes.

The paired layout of the pre-training data (what :mod:`ps3.data.shards` reads in lockstep)::

    ROOT/images/image_00000.tar         KEY.jpg
    ROOT/text_boxes/text_box_00000.tar  KEY.json

:class:`PairedShardWriter` streams samples into that layout, ``shard_size`` per shard pair;
:func:`write_paired_shards` does it for an iterable.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from webdataset import TarWriter

__all__ = [
    "FIXED_MTIME",
    "IMAGE_DIR",
    "TEXT_BOX_DIR",
    "ShardWriter",
    "PairedShardWriter",
    "encode_record",
    "existing_paired_shards",
    "prepare_paired_output",
    "write_paired_shards",
]

FIXED_MTIME = 946684800  # 2000-01-01: tar member timestamps, so shards are byte-reproducible
IMAGE_DIR, TEXT_BOX_DIR = "images", "text_boxes"
_OWNER = "ps3"
_T = TypeVar("_T", bound="_Transaction")


class _Transaction:
    """``with`` support: ``close()`` when the block ends normally, ``abort()`` on an exception."""

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardWriter(_Transaction):
    """One tar shard, written to ``<path>.tmp`` and renamed to ``path`` on a clean close.

    Use as a context manager; ``write({"__key__": key, ext: bytes, ...})`` adds one sample (its
    files in sorted extension order). On an exception inside the ``with`` block the temporary
    file is removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.temporary = self.path.with_name(self.path.name + ".tmp")
        self.samples = 0
        self._handle = open(self.temporary, "wb")
        self._tar = TarWriter(self._handle, encoder=False, mtime=FIXED_MTIME, user=_OWNER, group=_OWNER)

    def write(self, sample: Mapping[str, Any]) -> None:
        if self._tar is None:
            raise ValueError(f"the shard writer of {self.path} is closed")
        key = sample.get("__key__")
        # webdataset splits a member name at the first dot of its last path component.
        if not isinstance(key, str) or not key.rpartition("/")[2] or "." in key.rpartition("/")[2]:
            raise ValueError(f"a sample's __key__ must be a non-empty str with no '.' after its last '/', "
                             f"got {key!r}")
        self._tar.write(dict(sample))
        self.samples += 1

    def close(self) -> Path:
        """Finish the tar and move it to its final name; returns that path."""
        if self._tar is not None:
            self._tar.close()
            self._handle.close()
            self._tar = None
            os.replace(self.temporary, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the shard: close and remove the temporary file."""
        if self._tar is not None:
            self._tar = None
            self._handle.close()
            self.temporary.unlink(missing_ok=True)


def encode_record(record: Any) -> bytes:
    """A text-box record as JSON bytes (sorted keys, so equal records give equal bytes)."""
    return json.dumps(record, sort_keys=True).encode("utf-8")


# --------------------------------------------------------------------------------------------
# The paired images/ + text_boxes/ layout


def existing_paired_shards(root: str | os.PathLike) -> list[Path]:
    """Shards already under ``root/images`` and ``root/text_boxes``."""
    root = Path(root)
    return sorted((root / IMAGE_DIR).glob("*.tar")) + sorted((root / TEXT_BOX_DIR).glob("*.tar"))


def prepare_paired_output(root: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``root/images`` and ``root/text_boxes``; returns them. Shards already there raise
    ``ValueError`` (mixing two datasets would pair the wrong files), or are deleted with
    ``overwrite``."""
    root = Path(root)
    existing = existing_paired_shards(root)
    if existing and not overwrite:
        raise ValueError(
            f"{root} already holds shards ({existing[0]}, …): choose an empty output directory or pass "
            f"overwrite=True (--overwrite) to replace them"
        )
    for stale in existing:
        stale.unlink()
    images, records = root / IMAGE_DIR, root / TEXT_BOX_DIR
    images.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    return images, records


class PairedShardWriter(_Transaction):
    """Streams (key, image bytes, record) samples into the paired layout under ``root``: shard
    pair ``i`` is ``images/image_{i:05d}.tar`` + ``text_boxes/text_box_{i:05d}.tar`` with the same
    keys in the same order, ``shard_size`` samples each (the last may hold fewer).

    Every shard is atomic (:class:`ShardWriter`); leaving the ``with`` block by an exception
    drops the shard pair being written and keeps the finished ones. ``written`` lists the
    finished shards: ``{"images": [...], "text_boxes": [...]}``.
    """

    def __init__(self, root: str | os.PathLike, *, shard_size: int, overwrite: bool = False,
                 image_ext: str = "jpg") -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        self.image_dir, self.record_dir = prepare_paired_output(root, overwrite=overwrite)
        self.shard_size = shard_size
        self.image_ext = image_ext
        self.written: dict[str, list[str]] = {"images": [], "text_boxes": []}
        self._open: tuple[ShardWriter, ShardWriter] | None = None

    def write(self, key: str, image: bytes, record: bytes | Mapping[str, Any]) -> None:
        """Add one sample; ``record`` is JSON bytes or a dict (encoded by :func:`encode_record`)."""
        if self._open is None:
            index = len(self.written["images"])
            image_writer = ShardWriter(self.image_dir / f"image_{index:05d}.tar")
            try:
                record_writer = ShardWriter(self.record_dir / f"text_box_{index:05d}.tar")
            except BaseException:
                image_writer.abort()
                raise
            self._open = (image_writer, record_writer)
        image_writer, record_writer = self._open
        record_bytes = record if isinstance(record, (bytes, bytearray)) else encode_record(record)
        image_writer.write({"__key__": key, self.image_ext: image})
        record_writer.write({"__key__": key, "json": record_bytes})
        if image_writer.samples >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._open is not None:
            image_writer, record_writer = self._open
            self._open = None
            self.written["images"].append(str(image_writer.close()))
            self.written["text_boxes"].append(str(record_writer.close()))

    def close(self) -> dict[str, list[str]]:
        """Finish the last shard pair; returns :attr:`written`."""
        self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the shard pair being written (the finished ones stay)."""
        if self._open is not None:
            for writer in self._open:
                writer.abort()
            self._open = None


def write_paired_shards(root: str | os.PathLike, samples: Iterable[tuple[str, bytes, bytes | Mapping[str, Any]]],
                        *, shard_size: int, overwrite: bool = False, image_ext: str = "jpg") -> dict[str, list[str]]:
    """Write ``(key, image bytes, record)`` samples as paired shards under ``root`` (see
    :class:`PairedShardWriter`); returns ``{"images": [paths], "text_boxes": [paths]}``."""
    with PairedShardWriter(root, shard_size=shard_size, overwrite=overwrite, image_ext=image_ext) as writer:
        for key, image, record in samples:
            writer.write(key, image, record)
    return writer.written
