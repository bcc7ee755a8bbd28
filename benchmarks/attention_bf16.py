"""Attention on a CPU: the formulations ``ps3.encoder.precision.attention`` chooses between, at one 4K look's shape.

    PYTHONPATH=src python benchmarks/attention_bf16.py [--heads 12] [--head-dim 64] [--masked] [--compile]
    PYTHONPATH=src python benchmarks/attention_bf16.py --heads 16 --head-dim 72    # the so400m trunk

One look of the mid-size trunk (width 768, 12 heads of 64): 2560 queries over 2560 + 729 keys;
``--masked``: with a look-packing key mask (a tenth of the keys masked, as padding would be).
Each way is timed ``--rounds`` times in turn (the best reading kept, wall and process CPU time),
with the float32 and bf16 matmul rates measured in the same run, and each figure given as
GFLOP/s (4·N·P·d·H per call):
* SDPA and the chunked formulation (128-query chunks of batched matmuls with a softmax between
  them), each in float32 and in bf16;
* ``ps3.encoder.precision.attention`` in bf16: the formulation its first call chose by timing
  both here (``ps3.encoder.kernels``; the choice and the candidates' timed rates are printed);
* with ``--compile``: ``torch.compile`` of SDPA, of the matmul + softmax graph and of
  ``flex_attention`` (compile time printed, not counted).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ps3.encoder.kernels import chooser  # noqa: E402
from ps3.encoder.precision import _chunked_attention, attention, cpu_capability  # noqa: E402
from ps3.runtime import matmul_rates  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--masked", action="store_true", help="with a key mask (look packing)")
    parser.add_argument("--queries", type=int, default=2560)
    parser.add_argument("--keys", type=int, default=2560 + 729)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    H, N, P, d = args.heads, args.queries, args.keys, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, d, generator=g) for n in (N, P, P))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    mask = (torch.rand(1, 1, 1, P, generator=g) > 0.1) if args.masked else None
    ways = {"sdpa float32": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "chunked float32": lambda: _chunked_attention(q, k, v, mask),
            "sdpa bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask),
            "chunked bf16": lambda: _chunked_attention(qb, kb, vb, mask),
            "precision.attention bf16": lambda: attention(qb, kb, vb, mask)}
    if args.compile:
        def graph(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1) @ v

        from torch.nn.attention.flex_attention import flex_attention

        for name, fn in (("compiled sdpa bf16", F.scaled_dot_product_attention),
                         ("compiled matmul+softmax bf16", graph), ("compiled flex_attention bf16", flex_attention)):
            compiled = torch.compile(fn)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(qb, kb, vb)  # (without the mask)
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
            ways[name] = lambda c=compiled: c(qb, kb, vb)
    rates = matmul_rates(torch.device("cpu"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    times = {name: [] for name in ways}
    with torch.no_grad():
        for name, fn in ways.items():
            err = (fn().float() - want).abs().max().item()
            print(f"{name}: max |difference from float32 SDPA| {err:.2e}", flush=True)
        for _ in range(args.rounds):
            for name, fn in ways.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    rates = {dt: max(r, rates[dt]) for dt, r in matmul_rates(torch.device("cpu")).items()}
    flops = 4 * N * P * d * H
    print(f"{cpu_capability().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"matmul rates (best of start and end): float32 {rates[torch.float32] / 1e9:.0f}, "
          f"bf16 {rates[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print(f"shape: {H} heads, {N} queries x {P} keys, head dim {d}, {'masked' if mask is not None else 'no mask'}")
    for line in chooser().describe():
        print("chosen:", line)
    for name, ts in times.items():
        wall, cpu = min(t for t, _ in ts), min(c for _, c in ts)
        rate = rates[torch.float32 if "float32" in name else torch.bfloat16]
        print(f"{name:30s} {wall * 1e3:7.1f} ms = {flops / wall / 1e9:5.0f} GFLOP/s ({flops / wall / rate:4.0%} of its "
              f"dtype's matmul rate); process CPU {cpu * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
