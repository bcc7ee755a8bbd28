"""The server's low-res cache: what a repeat image needs so that a new prompt, budget or
look-closer turn skips decoding and the low-res pass.

An entry holds one image's resized 8-bit pixels and its :class:`ps3.LowResPass` (low-res tokens
of every layer, their keys/values, the pooled feature and the prompt-independent selection
features). Nothing in it depends on the prompt or the budget, so results computed from it for
any prompt equal a fresh call; the key is the image's content digest plus the model and dtype.
Entries are evicted least recently used first to stay within a byte budget.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .. import LowResPass


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def low_res_tensors(low_res: LowResPass) -> list[torch.Tensor | None]:
    kv = [t for pair in (low_res.kv_cache or []) for t in pair]
    return [*low_res.hidden_states, *kv, low_res.pooled_output, low_res.selection_features,
            low_res.highres_selection_features]


def stack_low_res(passes: Sequence[LowResPass]) -> LowResPass:
    """Several images' passes as one pass over their batch (in this order), for one encoder call."""
    if len(passes) == 1:
        return passes[0]

    def cat(ts):
        return None if ts[0] is None else torch.cat(list(ts))

    first = passes[0]
    kv = None
    if all(p.kv_cache is not None for p in passes):
        kv = [(cat([p.kv_cache[i][0] for p in passes]), cat([p.kv_cache[i][1] for p in passes]))
              for i in range(len(first.kv_cache))]
    return LowResPass([cat([p.hidden_states[i] for p in passes]) for i in range(len(first.hidden_states))], kv,
                      cat([p.pooled_output for p in passes]), cat([p.selection_features for p in passes]),
                      cat([p.highres_selection_features for p in passes]),
                      [size for p in passes for size in p.image_sizes])


def split_low_res(low_res: LowResPass) -> list[LowResPass]:
    """One pass per image of a batch's pass, each holding its own copy (a slice would keep the
    whole batch's storage alive in the cache)."""
    def row(t, b):
        return None if t is None else t[b:b + 1].clone()

    out = []
    for b, size in enumerate(low_res.image_sizes):
        kv = None if low_res.kv_cache is None else [(row(k, b), row(v, b)) for k, v in low_res.kv_cache]
        out.append(LowResPass([row(h, b) for h in low_res.hidden_states], kv, row(low_res.pooled_output, b),
                              row(low_res.selection_features, b), row(low_res.highres_selection_features, b),
                              [size]))
    return out


@dataclass
class CachedImage:
    """One image as the encoder needs it again: resized RGB pixels (3, H, W) uint8, the size of
    the uploaded image, and its low-res pass."""

    pixels: torch.Tensor
    image_size: tuple[int, int]
    low_res: LowResPass

    @property
    def nbytes(self) -> int:
        return _tensor_bytes([self.pixels, *low_res_tensors(self.low_res)])


class LowResCache:
    """A thread-safe LRU map from a key to a :class:`CachedImage`, within ``max_bytes``
    (0 disables caching). Counts hits and misses."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, count: bool = True) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            if count:
                if entry is None:
                    self.misses += 1
                else:
                    self.hits += 1
            return entry

    def put(self, key: Hashable, entry: CachedImage) -> None:
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if size > self.max_bytes:
                return
            self._entries[key] = entry
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
