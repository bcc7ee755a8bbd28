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
plus S2 at the same resolutions for reference.

By default it is bounded for a slow laptop: one-look figures take the median of ``--repeats``
calls after a warm-up; on a CPU each multi-look call ("all", S2) is timed once, its shapes already
warm, and the trunk is timed on shapes the "all" call already ran. ``--full`` times every case with
``--repeats`` after a warm-up and adds the full-image ViT (``full_vit_1512_s``, absent otherwise).
Before starting it prints how long it expects to take, from the measured matmul rate. Weights
are random (no download): timing does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch

from .encoder.kernels import chooser
from .registry import BENCH_PRESETS, PUBLISHED, ViTArch, bench_vision_config, preset_scales
from .runtime import (DTYPE_NAMES, UserError, cpu_capability, matmul_rate, matmul_rates, measure, native_dtype,
                      parse_device, parse_dtype, timeit, user_input)
from .encoder.vision import PS3VisionModel

PRESETS = BENCH_PRESETS
LOOK_TOKENS = PUBLISHED["PS3-4K-SigLIP2"].max_select_num  # one look's high-res tokens (the bench configs' budget)
# Before anything is timed, a whole encode is assumed to run at this share of the matmul rate
# (what the CPU preset measures, roughly); the first timed case replaces the guess.
_ASSUMED_MATMUL_SHARE = 0.6
_PROCESS_START_S = 4.0  # fresh Python processes importing torch (the memory cases, side by side)


def build_model(scales, preset: str = "cpu", *, width: int | None = None, depth: int | None = None,
                device=None, dtype=None) -> PS3VisionModel:
    """A random-weight encoder of a bench preset (registry) at ``scales``."""
    torch.manual_seed(0)
    model = PS3VisionModel(bench_vision_config(preset, scales, width=width, depth=depth))
    with torch.no_grad():  # zero-initialised tables (residual position embeddings) get values too
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.to(device=parse_device(device), dtype=parse_dtype(dtype, device)).eval()


def trunk_flops(tokens: int, context: int, arch: ViTArch) -> float:
    """Matmul FLOPs of the trunk blocks for ``tokens`` queries attending over ``context`` keys."""
    width = arch.embed_dim
    per_layer = 2 * tokens * width * (3 * width + width + 2 * arch.mlp_hidden) + 4 * tokens * context * width
    return per_layer * arch.depth


def _memory_case(index: int, scales, preset: str, width, depth, size: int, device: str, dtype: str, queue) -> None:
    """Child process: peak memory of one one-look encode beyond the model and the input (bytes)."""
    model = build_model(scales, preset, width=width, depth=depth, device=device, dtype=dtype)
    x = torch.randn(1, 3, size, size, device=device, dtype=parse_dtype(dtype))
    with measure(torch.device(device)) as cost, torch.no_grad():
        model(x, num_look_close=1, num_hidden_layers_to_return=1)
    queue.put((index, cost.extra_bytes))


def peak_extra_memory(cases, preset: str, width, depth, device, dtype) -> list[int]:
    """Bytes one one-look encode needs beyond the model and its input, for each (scales, image
    size) in ``cases``. Each case runs in a fresh process, so no other case can hide its peak
    (CPU: the process's peak resident set, Linux only; CUDA: its allocator's peak); the processes
    run at the same time, as only their memory is measured."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_memory_case, args=(i, list(scales), preset, width, depth, size, str(device),
                                                    str(dtype).replace("torch.", ""), queue))
             for i, (scales, size) in enumerate(cases)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for proc in procs:
        proc.join()
    return [int(results[i]) for i in range(len(cases))]


class _Bench:
    """One run: the models, inputs and results, one method per printed figure."""

    def __init__(self, preset, device, dtype, repeats, width, depth, full, skip_full_vit):
        self.dev, self.dt = device, dtype
        self.preset, self.width_override, self.depth_override = preset, width, depth
        self.repeats, self.full = repeats, full
        self.run_full_vit = full and not skip_full_vit
        # On a CPU a multi-look call takes seconds: by default one timed call, its shapes already warm.
        self.once = dict(repeats=repeats) if full or device.type != "cpu" else dict(repeats=1, warmup=False)
        self.scales15, self.scales4k = preset_scales(preset)  # the preset's geometry (patch 14 or 16)
        self.m15 = self._model(self.scales15)
        self.m4k = self._model(self.scales4k)
        self.vm = self.m15.vision_model
        self.arch = self.vm.trunk.arch
        self.size15, self.size4k = self.scales15[-1], self.scales4k[-1]
        self.x15 = torch.randn(1, 3, self.size15, self.size15, device=device, dtype=dtype)
        self.x4k = torch.randn(1, 3, self.size4k, self.size4k, device=device, dtype=dtype)
        plan = self.vm.plan(self.size15, self.size15, 1, "all")
        self.look_sizes = [sum(scale[0] for scale in look) for look in plan.budgets]
        self.looks_4k = self.m4k.vision_model.plan(self.size4k, self.size4k, 1, "all").num_looks
        self.s2_pieces = sum((s // self.scales15[0]) ** 2 for s in self.scales15)
        self.full_tokens = (self.size15 // self.arch.patch_size) ** 2
        self.results: dict[str, Any] = {
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "width": self.arch.embed_dim,
            "depth": self.arch.depth, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "full": full, "repeats": repeats}

    def _model(self, scales) -> PS3VisionModel:
        return build_model(scales, self.preset, width=self.width_override, depth=self.depth_override,
                           device=self.dev, dtype=self.dt)

    def call(self, model, x, **kw):
        with torch.no_grad():
            return model(x, num_hidden_layers_to_return=1, **kw)

    def _trunk(self, tokens: int, context: int | None = None) -> float:
        return trunk_flops(tokens, tokens + self.vm.low_res_token_num if context is None else context, self.arch)

    # ------------------------------------------------------------------ what each step costs
    def steps(self) -> list[tuple[str, Callable[[], None], float, float]]:
        """(name, method, predicted FLOPs, fixed seconds) in the order they run."""
        low_res = self._trunk(self.vm.low_res_token_num, self.vm.low_res_token_num)  # also one S2 piece
        one_look = self._trunk(LOOK_TOKENS) + low_res
        calls_once = self.once["repeats"] + (1 if self.once.get("warmup", True) else 0)
        calls = self.repeats + 1
        all_looks = sum(self._trunk(n) for n in self.look_sizes) + low_res
        trunk_calls = self.repeats + (1 if self.once.get("warmup", True) else 0)
        steps = [
            ("one look", self.step_one_look, 2 * calls * one_look, 0.0),
            ("memory", self.step_memory, 2 * one_look, _PROCESS_START_S),
            ("all", self.step_all, 2 * calls_once * all_looks, 0.0),
            ("trunk", self.step_trunk, trunk_calls * sum(self._trunk(n) for n in set(self.look_sizes)), 0.0),
            ("s2", self.step_s2, calls_once * self.s2_pieces * low_res, 0.0),
        ]
        if self.dev.type == "cuda":
            steps.insert(3, ("graphs", self.step_graphs, 4 * calls * one_look, 0.0))
            steps.append(("all 4k", self.step_all_4k, 2 * self.looks_4k * one_look, 0.0))
        if self.run_full_vit:
            steps.append(("full vit", self.step_full_vit, 2 * self._trunk(self.full_tokens, self.full_tokens), 0.0))
        return steps

    # ------------------------------------------------------------------ the steps
    def step_one_look(self) -> str:
        t15 = timeit(lambda: self.call(self.m15, self.x15, num_look_close=1), self.dev, self.repeats)
        t4k = timeit(lambda: self.call(self.m4k, self.x4k, num_look_close=1), self.dev, self.repeats)
        self.results.update(one_look_1p5k_s=t15, one_look_4k_s=t4k, ratio_4k_vs_1p5k_one_look=t4k / t15)
        return (f"one look, 1.5K model @{self.size15}px: {t15:.3f} s | 4K model @{self.size4k}px: {t4k:.3f} s | "
                f"ratio {t4k / t15:.2f}")

    def step_memory(self) -> str:
        mem15, mem4k = peak_extra_memory([(self.scales15, self.size15), (self.scales4k, self.size4k)], self.preset,
                                         self.width_override, self.depth_override, self.dev, self.dt)
        self.results.update(mem_one_look_1p5k_mb=mem15 / 2**20, mem_one_look_4k_mb=mem4k / 2**20,
                            mem_ratio_4k_vs_1p5k_one_look=mem4k / max(mem15, 1))
        return (f"peak extra memory, one look: 1.5K {mem15 / 2**20:.0f} MiB | 4K {mem4k / 2**20:.0f} MiB | "
                f"ratio {mem4k / max(mem15, 1):.2f}")

    def _all_pair(self) -> tuple[float, float]:
        # Sequential first: one look per pass runs the shapes the one-look calls already warmed.
        t_seq = timeit(lambda: self.call(self.m15, self.x15, num_look_close="all", max_tokens_per_pass=LOOK_TOKENS),
                       self.dev, **self.once)
        t_all = timeit(lambda: self.call(self.m15, self.x15, num_look_close="all",
                                         max_tokens_per_pass=len(self.look_sizes) * LOOK_TOKENS), self.dev, **self.once)
        return t_all, t_seq

    def step_all(self) -> str:
        t_all, t_seq = self._all_pair()
        self.results.update(all_1p5k_batched_s=t_all, all_1p5k_sequential_s=t_seq,
                            speedup_all_batched_vs_sequential=t_seq / t_all)
        return (f"'all' at 1.5K ({len(self.look_sizes)} looks): batched {t_all:.3f} s | one look per pass "
                f"{t_seq:.3f} s | speedup {t_seq / t_all:.2f}x")

    def step_graphs(self) -> str:
        """The same calls with the trunk replayed from CUDA graphs (first calls capture, then timed)."""
        for m in (self.m15, self.m4k):
            m.vision_model.use_cuda_graphs = True
        t15 = timeit(lambda: self.call(self.m15, self.x15, num_look_close=1), self.dev, self.repeats)
        t4k = timeit(lambda: self.call(self.m4k, self.x4k, num_look_close=1), self.dev, self.repeats)
        t_all, t_seq = self._all_pair()
        for m in (self.m15, self.m4k):
            m.vision_model.release_cuda_graphs()
        torch.cuda.empty_cache()
        self.results.update(one_look_1p5k_graphs_s=t15, one_look_4k_graphs_s=t4k, all_1p5k_batched_graphs_s=t_all,
                            all_1p5k_sequential_graphs_s=t_seq)
        return (f"with CUDA graphs: one look 1.5K {t15 * 1e3:.1f} ms | 4K {t4k * 1e3:.1f} ms | 'all' at 1.5K "
                f"batched {t_all * 1e3:.1f} ms, one look per pass {t_seq * 1e3:.1f} ms")

    def step_trunk(self) -> str:
        """The trunk alone on each look size with the low-res cache: one look's achieved rate, and
        "all" one look per pass as the sum over its looks (each pass is independent)."""
        with torch.no_grad():
            _, kv, _ = self.vm.forward_low_res(self.x15)
            per_size = {}
            for n in sorted(set(self.look_sizes), reverse=True):
                tokens = torch.randn(1, n, self.arch.embed_dim, device=self.dev, dtype=self.dt)
                per_size[n] = timeit(lambda: self.vm.trunk.forward_blocks(tokens, kv_cache=kv), self.dev,
                                     **(self.once | dict(repeats=self.repeats)))
            t_trunk = per_size[LOOK_TOKENS]
            self.results.update(trunk_one_look_s=t_trunk, trunk_gflops=self._trunk(LOOK_TOKENS) / t_trunk / 1e9,
                                all_1p5k_sequential_trunk_s=sum(per_size[n] for n in self.look_sizes))
            if self.dev.type == "cuda":
                # Eager on a GPU mostly measures how fast the host launches kernels; replayed from a
                # CUDA graph it measures the kernels.
                from .encoder.cuda_graphs import GraphedBlocks

                graphed = GraphedBlocks(self.vm.trunk)
                tokens = torch.randn(1, LOOK_TOKENS, self.arch.embed_dim, device=self.dev, dtype=self.dt)
                self.results["trunk_one_look_graphs_s"] = timeit(lambda: graphed(tokens, kv_cache=kv), self.dev,
                                                                 self.repeats)
                del graphed
        return f"trunk on one look: {t_trunk:.3f} s, {self.results['trunk_gflops']:.1f} GFLOP/s"

    def _backbone(self, images):
        trunk = self.vm.trunk
        return trunk.forward_blocks(trunk.embed(images))[0]

    def step_s2(self) -> str:
        from .s2 import multiscale_forward

        low = self.scales15[0]
        x = torch.randn(1, 3, low, low, device=self.dev, dtype=self.dt)
        with torch.no_grad():
            t_s2 = timeit(lambda: multiscale_forward(self._backbone, x, img_sizes=list(self.scales15),
                                                     max_split_size=low), self.dev, **self.once)
        self.results["s2_1512_s"] = t_s2
        return (f"S2 ({'/'.join(map(str, self.scales15))} px, {self.s2_pieces} pieces of {low} px) on the same trunk: "
                f"{t_s2:.3f} s")

    def step_full_vit(self) -> str:
        with torch.no_grad():
            t_full = timeit(lambda: self._backbone(self.x15), self.dev, 1)
        self.results["full_vit_1512_s"] = t_full
        return f"full-image ViT at {self.size15} px ({self.full_tokens:,} tokens): {t_full:.3f} s"

    def step_all_4k(self) -> str:
        t = timeit(lambda: self.call(self.m4k, self.x4k, num_look_close="all"), self.dev, 1)
        with measure(self.dev) as cost:
            self.call(self.m4k, self.x4k, num_look_close="all")
        self.results.update(all_4k_s=t, mem_all_4k_mb=cost.extra_bytes / 2**20)
        return (f"'all' at 4K ({self.looks_4k} looks, last layer kept): {t:.3f} s, "
                f"{cost.extra_bytes / 2**20:.0f} MiB")

    # ------------------------------------------------------------------ figures against the matmul rate
    def derive(self, rate: float) -> list[str]:
        r = self.results
        look_flops = self._trunk(LOOK_TOKENS)
        floor = sum(self._trunk(n) for n in self.look_sizes) / rate  # the looks' trunk work at the matmul rate
        t_seq, t_trunk_seq = r["all_1p5k_sequential_s"], r["all_1p5k_sequential_trunk_s"]
        # The call's time outside the trunk is a difference of two timings (each run once on a CPU):
        # on a loaded machine it can come out below zero, which no call takes.
        bound = t_seq / (max(t_seq - t_trunk_seq, 0.0) + floor)
        r.update(matmul_gflops=rate / 1e9, trunk_matmul_fraction=look_flops / r["trunk_one_look_s"] / rate,
                 all_1p5k_trunk_floor_s=floor, all_1p5k_sequential_trunk_matmul_fraction=floor / t_trunk_seq,
                 speedup_all_batched_upper_bound=bound)
        lines = [f"trunk on one look: {r['trunk_gflops']:.1f} GFLOP/s = {r['trunk_matmul_fraction']:.0%} of the "
                 f"matmul rate ({rate / 1e9:.1f} GFLOP/s, best of start and end)"]
        if "trunk_one_look_graphs_s" in r:
            r["trunk_graphs_matmul_fraction"] = look_flops / r["trunk_one_look_graphs_s"] / rate
            lines.append(f"trunk on one look, CUDA graph: {r['trunk_one_look_graphs_s'] * 1e3:.1f} ms = "
                         f"{r['trunk_graphs_matmul_fraction']:.0%} of the matmul rate")
        lines.append(f"'all' at 1.5K, trunk one look per pass: {t_trunk_seq:.3f} s = {floor / t_trunk_seq:.0%} of "
                     f"the matmul rate, so no batching can beat {bound:.2f}x")
        return lines


def _describe_precision(results: dict[str, Any], dev: torch.device, computes_in: torch.dtype,
                        rates: dict[torch.dtype, float]) -> list[str]:
    """Record (and say) what this machine does in the bench's dtype: the CPU's low-precision
    units, the dtype it computes in, and the float32 and dtype matmul rates measured together."""
    results.update({f"matmul_gflops_{str(k).replace('torch.', '')}": v / 1e9 for k, v in rates.items()})
    rate_text = ", ".join(f"{str(k).replace('torch.', '')} {v / 1e9:.1f}" for k, v in rates.items())
    lines = [f"matmul rates measured together: {rate_text} GFLOP/s"]
    if dev.type == "cpu":
        cap = cpu_capability()
        results["cpu"] = cap.as_dict()
        results["computes_in"] = str(computes_in).replace("torch.", "")
        lines.insert(0, cap.describe())
        if results["computes_in"] != results["dtype"]:
            lines.append(f"this CPU has no {results['dtype']} units: the encoder computes in float32 and returns "
                         f"{results['dtype']} (every figure below is a float32 computation)")
    return lines


def kernel_choices(results: dict[str, Any]) -> list[str]:
    """Record (and say) the kernels this process chose (``ps3.encoder.kernels``): per op and shape class,
    the winner, why, and each candidate's measured time and rate; and what choosing cost."""
    chosen = chooser()
    results["kernels"] = chosen.report()
    results["kernel_timing_s"] = chosen.spent_s
    results["kernel_timing_overrun_s"] = chosen.overrun_s
    return ["kernels chosen (candidates timed at first use, rates on the timed part):"] + [
        "  " + line for line in chosen.describe()]


def run_bench(preset: str = "cpu", device: str = "cpu", dtype: str | None = None, repeats: int = 3,
              width: int | None = None, depth: int | None = None, skip_full_vit: bool = False,
              log: Callable[[str], None] = print, full: bool = False) -> dict[str, Any]:
    """Measure every figure (see the module docstring) and return them; ``log`` gets each line as
    it is measured, with the time left."""
    start = time.perf_counter()
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    rates = matmul_rates(dev, (torch.float32, torch.bfloat16, dt))
    # Every figure is against the matmul rate of the dtype the encoder computes in: float32 where
    # this CPU has no units for dt (the encoder falls back to it).
    computes_in = dt if native_dtype(dt, dev) else torch.float32
    first_rate = rates[computes_in]
    bench = _Bench(preset, dev, dt, repeats, width, depth, full, skip_full_vit)
    for line in _describe_precision(bench.results, dev, computes_in, rates):
        log(line)
    steps = bench.steps()
    rate_guess = first_rate * _ASSUMED_MATMUL_SHARE
    total = sum(flops / rate_guess + fixed for _, _, flops, fixed in steps)
    log(f"matmul rate ({str(computes_in)[6:]}): {first_rate / 1e9:.1f} GFLOP/s; {len(steps)} steps, expected "
        f"about {total:.0f} s" + ("" if full else " (--full adds the full-image ViT and repeats every case)"))
    for k, (name, method, flops, fixed) in enumerate(steps):
        step_start = time.perf_counter()
        line = method()
        if k == 0:  # calibrate the estimate on what the first step achieved
            rate_guess = flops / max(time.perf_counter() - step_start - fixed, 1e-9)
        left = sum(f / rate_guess + x for _, _, f, x in steps[k + 1:])
        log(f"[{k + 1}/{len(steps)}] {line}   ({time.perf_counter() - start:.0f} s elapsed, about {left:.0f} s left)")
    # The matmul rate is read again at the end and the higher reading kept, so every figure below
    # is against the machine's best, not a slow moment of a shared machine.
    rate = max(first_rate, matmul_rate(dev, computes_in))
    for line in bench.derive(rate):
        log(line)
    for line in kernel_choices(bench.results):
        log(line)
    bench.results["elapsed_s"] = time.perf_counter() - start
    return bench.results


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure encode time, memory and FLOP rate (random weights)",
                       description="Benchmark PS3 with random weights of a named size: one look at 1.5K vs 4K, "
                                   "'all' with batched vs sequential looks, the trunk's FLOP rate against a plain "
                                   "matmul measured in the same run, S2 for reference (--full: every case "
                                   "repeated, and a full-image ViT).")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="trunk size: " + "; ".join(f"{k}: width {v.width}, depth {v.depth}, {v.description}"
                                                   for k, v in PRESETS.items()))
    p.add_argument("--width", type=int, help="override the trunk width")
    p.add_argument("--depth", type=int, help="override the trunk depth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case after a warm-up (median; default 3)")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: every case with --repeats after a warm-up, plus the full-image ViT "
                        "(several times longer on a CPU)")
    p.add_argument("--skip-full-vit", action="store_true", help="with --full: leave out the full-image ViT")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    for flag in ("width", "depth"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    with user_input("--device"):
        parse_device(args.device)
    # With --json the progress lines go to stderr, so stdout is one JSON object.
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)) if args.json \
        else (lambda s: print(s, flush=True))
    results = run_bench(args.preset, args.device, args.dtype, args.repeats, args.width, args.depth,
                        args.skip_full_vit, log=log, full=args.full)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
