"""How finely a strategy sees each region of the image: tokens per source pixel, from a layout.

Every feature token covers a cell of its segment's grid, which spans the segment's ``box`` of the
source image; a token's share of a pixel there is 1 / (the cell's area in source pixels). Summing
over all segments (and, for PS3, only the cells whose blocks were kept) gives a density whose
integral over the image is the number of feature tokens that look at it; ``1 / density`` is the
number of source pixels per token. Separator rows look at nothing.
"""
from __future__ import annotations

import numpy as np

from .base import Layout


def _cell_index(n_out: int, extent: int, lo: float, hi: float, cells: int) -> np.ndarray:
    """Grid cell (or -1) under the centre of each of ``n_out`` raster pixels spanning ``extent``."""
    centres = (np.arange(n_out) + 0.5) * extent / n_out
    idx = np.floor((centres - lo) / (hi - lo) * cells).astype(np.int64)
    idx[(idx < 0) | (idx >= cells)] = -1
    return idx


def token_density(layout: Layout, raster: tuple[int, int]) -> np.ndarray:
    """(rows, cols) raster over the image of feature tokens per source pixel."""
    plan = layout.plan
    out = np.zeros(raster, dtype=np.float64)
    for index, seg in enumerate(layout.segments):
        if seg.kind != "features" or not seg.grid[0] or not seg.grid[1]:
            continue
        x0, y0, x1, y1 = seg.box
        gh, gw = seg.grid
        per_cell = np.full((gh, gw), gh * gw / ((x1 - x0) * (y1 - y0)))
        if index in layout.masks:
            per_cell = per_cell * layout.masks[index].numpy()
        rows = _cell_index(raster[0], plan.height, y0, y1, gh)
        cols = _cell_index(raster[1], plan.width, x0, x1, gw)
        r, c = rows >= 0, cols >= 0
        out[np.ix_(r, c)] += per_cell[np.ix_(rows[r], cols[c])]
    return out
