"""``ps3 bench``: time and memory of PS3 encodes, measured against this machine's own matmul rate.

Every figure is measured in the same run, so the ratios are comparable wherever it runs:
* ``ratio_4k_vs_1p5k_one_look``: one look (2560 tokens) of a 4K model on a 3780 px image over one
  look of a 1.5K model on a 1512 px image — PS3's constant-cost claim;
* ``speedup_all_batched_vs_sequential``: "all" at 1.5K with looks batched through the trunk vs the
  same looks one pass each;
* ``trunk_matmul_fraction``: the trunk's achieved FLOP rate on one look over a plain matmul rate;
* ``speedup_all_batched_upper_bound``: the most any batching could give there — the one-look-per-pass
  time with its trunk passes replaced by their FLOPs at the matmul rate;
* ``mem_ratio_4k_vs_1p5k_one_look``: (peak memory − model and input) of those two one-look encodes;
plus S2 and a full-image ViT at the same resolutions for reference.
Weights are random (no download): timing does not depend on them.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .config import PS3VisionConfig
from .vision import PS3VisionModel

PRESETS = {
    # A CPU-sized trunk with the published geometry (patch 14, scales, budgets, selection module).
    "cpu": dict(width=768, depth=4, heads=12),
    # The published so400m trunk (PS3-4K-SigLIP2 sized); for a GPU.
    "so400m": dict(width=1152, depth=27, heads=16),
}


def build_model(scales: list[int], width: int, depth: int, heads: int, device, dtype) -> PS3VisionModel:
    layers = sorted({0, depth // 3, 2 * depth // 3, depth - 1})
    cfg = PS3VisionConfig(model_name=f"bench_vit_w{width}_d{depth}", hidden_size=width, pool="map",
                          ps3_scales=scales, max_select_num=2560, select_based_on_layer=layers,
                          vit=dict(patch_size=14, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=3.7362,
                                   class_token=False, global_pool="map", img_size=378))
    torch.manual_seed(0)
    model = PS3VisionModel(cfg)
    with torch.no_grad():  # zero-initialised tables (residual position embeddings) get values too
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device, repeats: int, best: bool = False) -> float:
    """Median (or best) seconds of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of an n×n @ n×n matmul in ``dtype``: the best of 10, as the reference must be the
    machine's ceiling (a shared machine's slow moments would otherwise flatter every ratio)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, 10, best=True)
    return 2 * n ** 3 / seconds


def _memory_case(scales: list[int], arch: dict, size: int, device: str, dtype: str, queue) -> None:
    """Child process: peak memory of one one-look encode beyond the model and the input (bytes)."""
    import resource

    dev, dt = torch.device(device), getattr(torch, dtype)
    model = build_model(scales, **arch, device=dev, dtype=dt)
    x = torch.randn(1, 3, size, size, device=dev, dtype=dt)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * resource.getpagesize()
        # Reset this process's peak-RSS mark (VmHWM) so it measures the call alone. (ru_maxrss
        # would not do: Linux carries the parent's size at fork into it.)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with torch.no_grad():
        model(x, num_look_close=1, num_hidden_layers_to_return=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    queue.put(peak - base)


def peak_extra_memory(scales: list[int], arch: dict, size: int, device, dtype) -> int:
    """Bytes one one-look encode needs beyond the model and its input, measured in a fresh process
    (CPU: the peak resident set, Linux only; CUDA: the allocator's peak), so earlier cases cannot
    hide it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_case, args=(scales, arch, size, str(device), str(dtype).replace("torch.", ""), queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return int(result)


def trunk_flops(tokens: int, context: int, width: int, depth: int, mlp: int) -> float:
    """Matmul FLOPs of the trunk blocks for ``tokens`` queries attending over ``context`` keys."""
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 4 * tokens * context * width
    return per_layer * depth


def run_bench(preset: str = "cpu", device: str = "cpu", dtype: str | None = None, repeats: int = 3,
              width: int | None = None, depth: int | None = None, skip_full_vit: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    dev = torch.device(device)
    dt = getattr(torch, dtype) if dtype else (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    arch = dict(PRESETS[preset])
    arch["width"] = width or arch["width"]
    arch["depth"] = depth or arch["depth"]
    arch["heads"] = arch["width"] // 64
    W, D = arch["width"], arch["depth"]
    mlp = int(W * 3.7362)
    torch.manual_seed(0)
    results: dict[str, Any] = {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "width": W, "depth": D,
                               "torch": torch.__version__, "threads": torch.get_num_threads()}
    matmul_n = 2048 if dev.type == "cpu" else 8192
    first_rate = matmul_rate(dev, dt, matmul_n)
    log(f"matmul rate ({results['dtype']}): {first_rate / 1e9:.1f} GFLOP/s")

    m15 = build_model([378, 756, 1512], **arch, device=dev, dtype=dt)
    m4k = build_model([378, 756, 1512, 3780], **arch, device=dev, dtype=dt)
    x15 = torch.randn(1, 3, 1512, 1512, device=dev, dtype=dt)
    x4k = torch.randn(1, 3, 3780, 3780, device=dev, dtype=dt)

    def call(model, x, **kw):
        with torch.no_grad():
            return model(x, num_hidden_layers_to_return=1, **kw)

    t15 = timeit(lambda: call(m15, x15, num_look_close=1), dev, repeats)
    t4k = timeit(lambda: call(m4k, x4k, num_look_close=1), dev, repeats)
    results.update(one_look_1p5k_s=t15, one_look_4k_s=t4k, ratio_4k_vs_1p5k_one_look=t4k / t15)
    log(f"one look, 1.5K model @1512px: {t15:.3f} s | 4K model @3780px: {t4k:.3f} s | ratio {t4k / t15:.2f}")

    mem15 = peak_extra_memory([378, 756, 1512], arch, 1512, dev, dt)
    mem4k = peak_extra_memory([378, 756, 1512, 3780], arch, 3780, dev, dt)
    results.update(mem_one_look_1p5k_mb=mem15 / 2**20, mem_one_look_4k_mb=mem4k / 2**20,
                   mem_ratio_4k_vs_1p5k_one_look=mem4k / max(mem15, 1))
    log(f"peak extra memory, one look: 1.5K {mem15 / 2**20:.0f} MiB | 4K {mem4k / 2**20:.0f} MiB | "
        f"ratio {mem4k / max(mem15, 1):.2f}")

    look_tokens = 2560
    t_all = timeit(lambda: call(m15, x15, num_look_close="all", max_tokens_per_pass=6 * look_tokens), dev, repeats)
    t_seq = timeit(lambda: call(m15, x15, num_look_close="all", max_tokens_per_pass=look_tokens), dev, repeats)
    results.update(all_1p5k_batched_s=t_all, all_1p5k_sequential_s=t_seq, speedup_all_batched_vs_sequential=t_seq / t_all)
    log(f"'all' at 1.5K (6 looks): batched {t_all:.3f} s | one look per pass {t_seq:.3f} s | "
        f"speedup {t_seq / t_all:.2f}x")

    if dev.type == "cuda":
        # The same calls with the trunk replayed from CUDA graphs (first calls capture, then timed).
        for m in (m15, m4k):
            m.vision_model.use_cuda_graphs = True
        t15g = timeit(lambda: call(m15, x15, num_look_close=1), dev, repeats)
        t4kg = timeit(lambda: call(m4k, x4k, num_look_close=1), dev, repeats)
        t_allg = timeit(lambda: call(m15, x15, num_look_close="all", max_tokens_per_pass=6 * look_tokens), dev, repeats)
        t_seqg = timeit(lambda: call(m15, x15, num_look_close="all", max_tokens_per_pass=look_tokens), dev, repeats)
        for m in (m15, m4k):
            m.vision_model.use_cuda_graphs = False
            m.vision_model._graphed_blocks = None
        torch.cuda.empty_cache()
        results.update(one_look_1p5k_graphs_s=t15g, one_look_4k_graphs_s=t4kg, all_1p5k_batched_graphs_s=t_allg,
                       all_1p5k_sequential_graphs_s=t_seqg)
        log(f"with CUDA graphs: one look 1.5K {t15g * 1e3:.1f} ms | 4K {t4kg * 1e3:.1f} ms | 'all' at 1.5K batched "
            f"{t_allg * 1e3:.1f} ms, one look per pass {t_seqg * 1e3:.1f} ms")

    # The trunk alone on one look's tokens with the low-res cache: achieved rate vs matmul rate.
    vm = m15.vision_model
    with torch.no_grad():
        _, kv, _ = vm.forward_low_res(x15)
        tokens = torch.randn(1, look_tokens, W, device=dev, dtype=dt)
    t_trunk = timeit(lambda: vm.trunk.forward_blocks(tokens, kv_cache=kv), dev, repeats)
    flops = trunk_flops(look_tokens, look_tokens + vm.low_res_token_num, W, D, mlp)
    results.update(trunk_one_look_s=t_trunk, trunk_gflops=flops / t_trunk / 1e9)
    t_trunk_g = None
    if dev.type == "cuda":
        # Eager on a GPU mostly measures how fast the host launches kernels; replayed from a CUDA
        # graph it measures the kernels.
        from .cuda_graphs import GraphedBlocks

        graphed = GraphedBlocks(vm.trunk)
        with torch.no_grad():
            t_trunk_g = timeit(lambda: graphed(tokens, kv_cache=kv), dev, repeats)
        del graphed
        results["trunk_one_look_graphs_s"] = t_trunk_g

    # How far batching looks could possibly go: batching changes only how the looks pass through
    # the trunk, and their trunk work cannot take less than its FLOPs at the matmul rate.
    sizes = [sum(scale[0] for scale in look) for look in vm.plan(1512, 1512, 1, "all").budgets]
    with torch.no_grad():
        looks = [torch.randn(1, n, W, device=dev, dtype=dt) for n in sizes]
        t_trunk_seq = timeit(lambda: [vm.trunk.forward_blocks(t, kv_cache=kv) for t in looks], dev, repeats)
    all_flops = sum(trunk_flops(n, n + vm.low_res_token_num, W, D, mlp) for n in sizes)
    results["all_1p5k_sequential_trunk_s"] = t_trunk_seq

    from .s2 import multiscale_forward

    trunk = vm.trunk

    def backbone(images):
        return trunk.forward_blocks(trunk.embed(images))[0]

    x378 = torch.randn(1, 3, 378, 378, device=dev, dtype=dt)
    with torch.no_grad():
        t_s2 = timeit(lambda: multiscale_forward(backbone, x378, img_sizes=[378, 756, 1512], max_split_size=378), dev, repeats)
    results["s2_1512_s"] = t_s2
    log(f"S2 (378/756/1512 px, 21 pieces of 378 px) on the same trunk: {t_s2:.3f} s")
    if not skip_full_vit:
        full = torch.randn(1, 3, 1512, 1512, device=dev, dtype=dt)
        with torch.no_grad():
            t_full = timeit(lambda: backbone(full), dev, 1)
        results["full_vit_1512_s"] = t_full
        log(f"full-image ViT at 1512 px (11,664 tokens): {t_full:.3f} s")
    if dev.type == "cuda":
        t_all4k = timeit(lambda: call(m4k, x4k, num_look_close="all"), dev, 1)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        call(m4k, x4k, num_look_close="all")
        mem_all4k = torch.cuda.max_memory_allocated(dev) - base
        results.update(all_4k_s=t_all4k, mem_all_4k_mb=mem_all4k / 2**20)
        log(f"'all' at 4K (35 looks, 88,209 tokens, last layer kept): {t_all4k:.3f} s, {mem_all4k / 2**20:.0f} MiB")
    # The matmul rate is read again at the end and the higher reading kept, so every figure below
    # is against the machine's best, not a slow moment of a shared machine.
    rate = max(first_rate, matmul_rate(dev, dt, matmul_n))
    floor = all_flops / rate  # the looks' trunk work at the matmul rate
    bound = t_seq / (t_seq - t_trunk_seq + floor)
    results.update(matmul_gflops=rate / 1e9, trunk_matmul_fraction=flops / t_trunk / rate,
                   all_1p5k_trunk_floor_s=floor, all_1p5k_sequential_trunk_matmul_fraction=floor / t_trunk_seq,
                   speedup_all_batched_upper_bound=bound)
    log(f"matmul rate, best of start and end: {rate / 1e9:.1f} GFLOP/s")
    log(f"trunk on one look: {t_trunk:.3f} s, {flops / t_trunk / 1e9:.1f} GFLOP/s = {flops / t_trunk / rate:.0%} "
        "of the matmul rate")
    if t_trunk_g is not None:
        results["trunk_graphs_matmul_fraction"] = flops / t_trunk_g / rate
        log(f"trunk on one look, CUDA graph: {t_trunk_g * 1e3:.1f} ms = {flops / t_trunk_g / rate:.0%} of the matmul rate")
    log(f"'all' at 1.5K, trunk one look per pass: {t_trunk_seq:.3f} s = {floor / t_trunk_seq:.0%} of the matmul "
        f"rate, so no batching can beat {bound:.2f}x")
    return results


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure encode time, memory and FLOP rate (random weights)",
                       description="Benchmark PS3 with random weights of a named size: one look at 1.5K vs 4K, "
                                   "'all' with batched vs sequential looks, the trunk's FLOP rate against a plain "
                                   "matmul measured in the same run, S2 and a full-image ViT for reference.")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="trunk size (default cpu: width 768, depth 4)")
    p.add_argument("--width", type=int, help="override the trunk width")
    p.add_argument("--depth", type=int, help="override the trunk depth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-full-vit", action="store_true", help="skip the full-image ViT reference")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    # With --json the progress lines go to stderr, so stdout is one JSON object.
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else print
    results = run_bench(args.preset, args.device, args.dtype, args.repeats, args.width, args.depth,
                        args.skip_full_vit, log=log)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
