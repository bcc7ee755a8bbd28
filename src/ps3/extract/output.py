"""The output directory of ``ps3 extract``: shards, their sidecars, resume, and ``index.json``.

``DIR/part-{n:06d}.tar`` holds one sample per encoded input: ``KEY.safetensors`` (see
:mod:`ps3.extract.encode`) and ``KEY.json`` (``source``, ``width``, ``height`` of the original
image, ``tokens``, and ``prompt`` when one steered the selection). Next to it,
``DIR/part-{n:06d}.json`` records the shard's keys with their token counts, what was skipped, the
settings and which input the shard came from.

A shard is written to ``part-….tar.tmp``; its sidecar is written next, then the tar is renamed.
So a ``part-….tar`` exists only once it is complete, and it is complete exactly when it exists:
a rerun skips those shards and redoes the rest (a killed run leaves at most ``.tmp`` files,
which are overwritten). ``DIR/index.json`` is written last, from the sidecars. Keys of image
files are unique (checked up front); input shards may repeat a key, and then the index points to
its first sample and lists every shard holding it under ``duplicate_keys``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..runtime import UserError
from .inputs import WorkUnit

__all__ = ["INDEX_NAME", "FORMAT", "UnitOutput", "is_finished", "remove_outputs", "write_index"]

INDEX_NAME = "index.json"
FORMAT = "ps3-extract/1"


def _write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


class UnitOutput:
    """The shard being written for one work unit."""

    def __init__(self, directory: Path, unit: WorkUnit, settings: dict[str, Any], rank: int) -> None:
        from ..data.writer import ShardWriter

        self.directory, self.unit, self.settings, self.rank = directory, unit, settings, rank
        self.writer = ShardWriter(directory / f"{unit.name}.tar")
        self.samples: list[tuple[str, int]] = []  # in shard order; an input shard may repeat a key
        self.skipped: list[list[str]] = []
        self.pending_workers = 0  # DataLoader workers yet to send their last message for the unit
        self.received = 0  # images handed to the writer (``samples`` fills as they are written)

    def add(self, key: str, tensors: dict[str, torch.Tensor], tokens: int, info: dict[str, Any]) -> None:
        record = json.dumps({**info, "tokens": tokens}, sort_keys=True).encode()
        blob = save(tensors, metadata={"key": key})
        self.writer.write({"__key__": key, "safetensors": blob, "json": record})
        self.samples.append((key, tokens))

    def skip(self, key: str, reason: str, detail: str) -> None:
        self.skipped.append([key, reason, detail])

    def finish(self, seconds: float) -> None:
        sidecar = {"format": FORMAT, "unit": self.unit.fingerprint(), "source": self.unit.shard,
                   "settings": self.settings, "samples": self.samples, "skipped": self.skipped,
                   "seconds": round(seconds, 3), "rank": self.rank, "finished_at": time.time()}
        _write_json_atomic(self.directory / f"{self.unit.name}.json", sidecar)
        self.writer.close()  # the rename that marks the shard complete comes last

    def abort(self) -> None:
        self.writer.abort()


def _read_sidecar(directory: Path, unit: WorkUnit) -> dict[str, Any] | None:
    try:
        return json.loads((directory / f"{unit.name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(directory: Path, unit: WorkUnit, settings: dict[str, Any]) -> bool:
    """True when the unit's shard is complete. Raises :class:`~ps3.runtime.UserError` when it was
    written from other inputs or with other settings (mixing them would make an inconsistent
    dataset)."""
    if not (directory / f"{unit.name}.tar").is_file():
        return False
    sidecar = _read_sidecar(directory, unit)
    if sidecar is None:
        return False
    if sidecar.get("unit") != unit.fingerprint() or sidecar.get("settings") != settings:
        what = "other inputs" if sidecar.get("unit") != unit.fingerprint() else "other settings"
        raise UserError(f"{directory / unit.name}.tar was written from {what} than this run's: pass --overwrite "
                         f"to redo everything, or choose another --out")
    return True


def remove_outputs(directory: Path) -> None:
    """Delete what earlier runs wrote into ``directory`` (only files of this layout)."""
    for pattern in ("part-*.tar", "part-*.json", "part-*.tmp", INDEX_NAME, INDEX_NAME + ".tmp"):
        for path in directory.glob(pattern):
            path.unlink()


def write_index(directory: Path, units: list[WorkUnit], settings: dict[str, Any], seconds: float,
                started_at: float) -> dict[str, Any]:
    """Merge every unit's sidecar into ``DIR/index.json``; returns its ``summary``. Shards finished
    before ``started_at`` (a ``time.time()``) count as resumed."""
    samples: dict[str, dict[str, Any]] = {}
    skipped: dict[str, list[str]] = {}
    duplicates: dict[str, list[str]] = {}
    shards, missing, resumed, total_tokens = [], [], 0, 0
    for unit in units:
        sidecar = _read_sidecar(directory, unit)
        if sidecar is None or not (directory / f"{unit.name}.tar").is_file():
            missing.append(f"{unit.name}.tar")
            continue
        shard = f"{unit.name}.tar"
        resumed += sidecar["finished_at"] < started_at
        shards.append({"name": shard, "images": len(sidecar["samples"]), "source": sidecar["source"],
                       "seconds": sidecar["seconds"]})
        for key, count in sidecar["samples"]:
            total_tokens += count
            if key in samples:  # input shards may repeat keys; the first sample is the indexed one
                duplicates.setdefault(key, [samples[key]["shard"]]).append(shard)
            else:
                samples[key] = {"shard": shard, "tokens": count}
        for key, reason, _detail in sidecar["skipped"]:
            skipped.setdefault(reason, []).append(key)
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) of the job are not finished ({missing[0]}, …): "
                           "rerun the same command to complete them")
    summary = {"images": sum(s["images"] for s in shards), "tokens": total_tokens,
               "skipped": {reason: len(keys) for reason, keys in sorted(skipped.items())},
               "shards": len(shards), "resumed_shards": resumed, "duplicate_keys": len(duplicates),
               "seconds": round(seconds, 3)}
    index = {"format": FORMAT, "settings": settings, "summary": summary, "shards": shards,
             "samples": samples, "skipped": skipped, "duplicate_keys": duplicates}
    _write_json_atomic(directory / INDEX_NAME, index)
    return summary
