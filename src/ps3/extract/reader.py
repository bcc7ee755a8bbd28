"""Reading the output of ``ps3 extract`` back: :func:`read` iterates samples, :func:`load_index`
returns ``index.json``."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from .output import FORMAT, INDEX_NAME

__all__ = ["ExtractedSample", "load_index", "read"]


@dataclass
class ExtractedSample:
    """One encoded image. ``hidden_states`` (k, T, C): the last k layers' tokens (low-res tokens,
    then the selected high-res ones by ascending scale); ``tokens_per_scale`` sums to T;
    ``selection_maps`` one 0/1 (h_i, w_i) map per high-res scale; ``feature_maps`` per scale
    (C, h_i, w_i), low-res first, when written with ``--feature-maps``; ``info``: ``source``,
    ``width``, ``height`` of the original image, ``tokens``, and ``prompt`` if one was used."""

    key: str
    hidden_states: torch.Tensor
    pooled_output: torch.Tensor | None
    tokens_per_scale: list[int]
    selection_maps: list[torch.Tensor] = field(default_factory=list)
    feature_maps: list[torch.Tensor] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    shard: str = ""

    @property
    def last_hidden_state(self) -> torch.Tensor:
        """(T, C): the last layer's tokens."""
        return self.hidden_states[-1]


def load_index(directory: str | os.PathLike) -> dict[str, Any]:
    """``DIR/index.json`` of a finished ``ps3 extract`` run (``summary``, ``shards``, ``samples``:
    key → {shard, tokens}, ``skipped``: reason → keys, ``settings``)."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"{directory} has no {INDEX_NAME}: not the output of a finished `ps3 extract` run "
                         "(rerun the same command to finish an interrupted one)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}; this version reads {FORMAT!r}")
    return index


def _numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    count = sum(1 for name in tensors if name.startswith(prefix + "."))
    return [tensors[f"{prefix}.{i}"] for i in range(count)]


def read(directory: str | os.PathLike) -> Iterator[ExtractedSample]:
    """Every sample of a ``ps3 extract`` output directory, shard by shard in index order.

    A damaged shard raises ``ValueError`` (the index says what it should hold)."""
    from ..data.shards import iter_shard

    index = load_index(directory)
    for shard in index["shards"]:
        url = os.path.join(os.fspath(directory), shard["name"])
        problems: list[str] = []
        count = 0
        for sample in iter_shard(url, lambda reason, _shard, key, detail="": problems.append(f"{reason}: {detail}")):
            tensors = load(sample["safetensors"])
            count += 1
            yield ExtractedSample(key=sample["__key__"], hidden_states=tensors["hidden_states"],
                                  pooled_output=tensors.get("pooled_output"),
                                  tokens_per_scale=tensors["tokens_per_scale"].tolist(),
                                  selection_maps=_numbered(tensors, "selection_maps"),
                                  feature_maps=_numbered(tensors, "feature_maps"),
                                  info=json.loads(sample["json"]), shard=shard["name"])
        if problems or count != shard["images"]:
            raise ValueError(f"{url} is damaged: {problems[0] if problems else f'{count} samples'}; the index "
                             f"lists {shard['images']}")
