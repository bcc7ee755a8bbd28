"""Replaying the trunk's blocks from CUDA graphs.

A PS3 look is a few thousand tokens through 27 blocks of ~15 kernels each; on a fast GPU the host
cannot launch those kernels as fast as the GPU runs them (the low-res pass, 729 tokens, is almost
all launch time). A CUDA graph records one pass's kernels once and replays them with one launch.

Each distinct input signature (batch, tokens, prefix length, dtype, what is returned) gets its own
graph, captured on first use. Inputs are copied into the graph's fixed buffers and outputs copied
out, so callers see ordinary tensors. All graphs of one trunk share one memory pool: replays run
one at a time on the current stream and every output is copied out before the next replay, so
their scratch memory can overlap.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class GraphedBlocks:
    """``trunk.forward_blocks`` for inference on CUDA, replayed from captured graphs.

    Only for no-grad evaluation: the caller falls back to the eager blocks otherwise. Weights are
    read in place, so loading new values into the same parameters is seen by the graphs; moving or
    casting the model (new parameter storage) is detected and triggers a fresh capture.
    """

    def __init__(self, trunk: nn.Module, max_graphs: int = 16):
        self.trunk = trunk
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self._weights = None

    def _weights_key(self) -> tuple:
        return tuple(p.data_ptr() for p in self.trunk.parameters())

    def _capture(self, x, kv_cache, return_kv, keep_hidden):
        static_x = x.clone()
        static_kv = [(k.clone(), v.clone()) for k, v in kv_cache] if kv_cache is not None else None

        def run():
            return self.trunk.forward_blocks(static_x, kv_cache=static_kv, return_kv=return_kv, keep_hidden=keep_hidden)

        # Warm up on a side stream (library handles, autotuning) before recording.
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        return graph, static_x, static_kv, outputs

    def __call__(self, x: torch.Tensor, kv_cache=None, return_kv: bool = False, keep_hidden: int = 0):
        weights = self._weights_key()
        if weights != self._weights:  # moved or cast since the last capture: start over
            self.graphs.clear()
            self.pool = None
            self._weights = weights
        # Inference mode and autocast change what a capture records (tensor kind, kernel dtypes).
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x.shape), x.dtype, x.device, tuple(kv_cache[0][0].shape) if kv_cache is not None else None,
               return_kv, keep_hidden, torch.is_inference_mode_enabled(), autocast)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(x, kv_cache, return_kv, keep_hidden)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_x, static_kv, (out, hidden, kvs) = entry
        static_x.copy_(x)
        if kv_cache is not None:
            for (sk, sv), (k, v) in zip(static_kv, kv_cache):
                sk.copy_(k)
                sv.copy_(v)
        graph.replay()
        return out.clone(), [h.clone() for h in hidden], [(k.clone(), v.clone()) for k, v in kvs]
