"""An opt-in cache of the frozen encoder's low-res passes across training steps (``--cache-low-res``).

The low-res pass (trunk over the s_0 view, key/value cache, pooled feature, selection features
and the 1512 px ConvNet's features) does not depend on the prompt, and a frozen encoder gives the
same pass for the same image every epoch. With the cache each training image's pass is computed
the first time the image comes up and reused afterwards: the pass then costs nothing from the
second epoch on. Memory grows by one pass per image (kept on the CPU): about 0.4 MB an image for
the tiny test model, but tens of MB for a published 4K checkpoint (27 layers × 729 tokens × 1152
channels, twice for keys and values), so it suits small encoders or small datasets.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..encoder.outputs import LowResPass
from .block_looks import encode_low_res


def _rows(low: LowResPass, i: int) -> LowResPass:
    """Image ``i`` of a pass, as a batch of one (copies: the batch's tensors are not kept alive)."""
    def take(t):
        return None if t is None else t[i:i + 1].detach().cpu().clone()

    return LowResPass([take(h) for h in low.hidden_states],
                      None if low.kv_cache is None else [(take(k), take(v)) for k, v in low.kv_cache],
                      take(low.pooled_output), take(low.selection_features), take(low.highres_selection_features),
                      [low.image_sizes[i]])


def stack_passes(passes: Sequence[LowResPass], device: torch.device) -> LowResPass:
    """One pass of the images of ``passes`` (each a batch of one), in order, on ``device``."""
    def cat(items):
        return None if items[0] is None else torch.cat(items).to(device)

    first = passes[0]
    kv = None if first.kv_cache is None else [
        (cat([p.kv_cache[j][0] for p in passes]), cat([p.kv_cache[j][1] for p in passes]))
        for j in range(len(first.kv_cache))]
    return LowResPass([cat([p.hidden_states[j] for p in passes]) for j in range(len(first.hidden_states))], kv,
                      cat([p.pooled_output for p in passes]), cat([p.selection_features for p in passes]),
                      cat([p.highres_selection_features for p in passes]), [s for p in passes for s in p.image_sizes])


class LowResCache:
    """Low-res passes by key (one per training record)."""

    def __init__(self):
        self.passes: dict[int, LowResPass] = {}

    @torch.no_grad()
    def get(self, vision_model, keys: Sequence[int], pixel_values: torch.Tensor) -> LowResPass:
        """The pass of every row of ``pixel_values`` (row ``i`` is the image of ``keys[i]``),
        computing only the rows not cached yet, in one batch."""
        missing = [i for i, key in enumerate(keys) if key not in self.passes]
        if missing:
            fresh = encode_low_res(vision_model, pixel_values[missing])
            for row, i in enumerate(missing):
                self.passes[keys[i]] = _rows(fresh, row)
        return stack_passes([self.passes[key] for key in keys], pixel_values.device)
