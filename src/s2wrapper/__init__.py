"""Drop-in import path for code written against S2-Wrapper (bfshi/scaling_on_scales).

``from s2wrapper import forward as multiscale_forward`` keeps working; the implementation lives in
:mod:`ps3.s2` (same arguments, plus ``split_chunk_size``, (h, w) ``max_split_size`` and any-shape
``scales``)."""
from ps3.s2 import forward, merge_chessboard, multiscale_forward, split_chessboard

__all__ = ["forward", "multiscale_forward", "split_chessboard", "merge_chessboard"]
