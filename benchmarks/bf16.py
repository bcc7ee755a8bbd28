"""float32 vs bfloat16, ours vs upstream's code, on the same random weights: 4K encodes on a CPU.

    PYTHONPATH=src python benchmarks/bf16.py --upstream /tmp/upstream/PS3 \
        --upstream-python /tmp/upstream/venv/bin/python
    PYTHONPATH=src python benchmarks/bf16.py --preset so400m --cases one --rounds 1 ...   # the so400m trunk

One random-weight model per preset (``ps3.bench.build_model``, the published 4K geometry) is saved
once; every way loads it: ours and upstream's ``PS3VisionModel.from_pretrained`` (an NVlabs/PS3
checkout, run by a Python with its pins: ``../shared/tools/setup_upstream_env.sh`` builds one;
upstream is never a dependency), cast to float32 or bfloat16: ``one`` = one look
(``num_look_close=1``) of the 4K model on an image of its top scale (3780 px; 3840 for c-radio),
``one1.5k`` = one look of the 1.5K model (the preset's 1.5K scales, same trunk) on an image of its
top scale (1512 px), ``all`` = every look at 4K. Both sides return the last ``--layers`` layers
(default 2: VILA-HD's ``num_hidden_layers_to_return``; upstream's own default, every layer
concatenated, is ``--layers 0``), and every summary says which mode it measured. Our processes
also report the kernels they chose (``ps3.encoder.kernels``) and what choosing cost. Each
(implementation, dtype, case) runs
in a fresh process (its peak memory is its own: resident set beyond the loaded model and input)
and reports the median of ``--repeats`` calls after a warm-up (wall time, and the process's CPU
time, which a busy shared machine inflates less); ``--no-warmup`` times the first call instead, for
calls that take minutes (4K ``all`` on the so400m trunk). Rounds alternate the order of the
ways, so a shared machine's slow minutes fall on all of them; the table gives each way's best
round. The float32 and bf16 matmul rates are measured at the start and the end, in this process.
Without ``--upstream`` only ours is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _register_bench_vit(name: str, vit: dict) -> None:
    """Upstream builds its trunk with timm.create_model(model_name): give timm our bench trunk."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(name):
        return
    arch = {k: vit[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}

    def build(pretrained=False, **kw):
        kw = {k: v for k, v in kw.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        kw.setdefault("img_size", vit.get("img_size", 378))
        kw.setdefault("class_token", vit.get("class_token", False))
        return VisionTransformer(**arch, **kw)

    build.__name__ = name
    register_model(build)


def _load(impl: str, model_dir: Path, upstream: Path | None, dtype: torch.dtype, layers: int = 2):
    """(model, call) for one implementation, returning the last ``layers`` layers (0: all)."""
    if impl == "ours":
        import ps3

        model = ps3.PS3VisionModel.from_pretrained(model_dir, dtype=dtype)
        keep = layers or None
        return model, lambda x, looks: model(x, num_look_close=looks, num_hidden_layers_to_return=keep)
    import importlib.util
    import warnings

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vit"):
        _register_bench_vit(config["model_name"], config["vit"])
    spec = importlib.util.spec_from_file_location("upstream_ps3", upstream / "ps3" / "__init__.py",
                                                  submodule_search_locations=[str(upstream / "ps3")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["upstream_ps3"] = module
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.PS3VisionModel.from_pretrained(str(model_dir)).eval().to(dtype)
    if layers:  # upstream's default (None) returns and concatenates every layer
        model.vision_model.num_hidden_layers_to_return = layers
    return model, lambda x, looks: model(x, num_look_close=looks, output_hidden_states=True)


def _top_scale(model_dir) -> int:
    """The model's largest scale (3780 px for patch-14 presets, 3840 for C-RADIO): the input size."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return max(config.get("vision_config", config)["ps3_scales"])


def child(args) -> None:
    """One (implementation, dtype, case): print a JSON line with its median seconds and peak memory."""
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.runtime import measure

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = args.model_dir.with_name(args.model_dir.name + "_1p5k") if args.case == "one1.5k" else args.model_dir
    model, call = _load(args.child, model_dir, args.upstream, dtype, args.layers)
    torch.manual_seed(0)
    size = _top_scale(model_dir)
    x = (torch.rand(1, 3, size, size) * 2 - 1).to(dtype)
    looks = "all" if args.case == "all" else 1
    dev = torch.device("cpu")
    times = []
    with torch.no_grad():
        start, start_cpu = time.perf_counter(), time.process_time()
        with measure(dev) as first:  # the warm-up call: its peak is the call's memory
            out = call(x, looks)
        tokens = out.last_hidden_state.shape[1]
        del out
        cpu = []
        if args.no_warmup:  # the first call is the timed one
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        for _ in range(0 if args.no_warmup else args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            call(x, looks)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    kernels = {}
    if args.child == "ours":
        from ps3.encoder.kernels import chooser

        kernels = dict(kernels=chooser().report(), kernel_timing_s=chooser().spent_s)
    print(json.dumps(dict(impl=args.child, dtype=args.dtype, case=args.case, seconds=statistics.median(times),
                          all_seconds=times, cpu_seconds=statistics.median(cpu),
                          peak_extra_mb=first.extra_bytes / 2**20, tokens=tokens, layers=args.layers,
                          torch=torch.__version__, **kernels)))


def _matmul(tag: str, log) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.runtime import cpu_capability, matmul_rates

    rates = {str(k)[6:]: v / 1e9 for k, v in matmul_rates(torch.device("cpu")).items()}
    log(f"matmul rates ({tag}): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    return dict(rates=rates, cpu=cpu_capability().as_dict())


def _layers_text(layers: int) -> str:
    return f"last {layers} (as VILA-HD calls it)" if layers == 2 else (
        "every layer (upstream's default)" if layers == 0 else f"last {layers}")


def _kernels_text(res: dict) -> str:
    """Our process's kernel choices, in one bracket: op=winner (source) per class timed or read."""
    if not res.get("kernels"):
        return ""
    parts = [f"{k['op']}[{k['key']}]={k['winner']} ({k['source']})" for k in res["kernels"]]
    return f"; kernels: {', '.join(parts)}; choosing cost {res['kernel_timing_s']:.2f} s"


def _summary(case: str, best: dict) -> str:
    """One line per case: each dtype's time and memory, ours vs upstream, and bf16 vs float32."""
    parts = []
    for dt, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        ours, up = best.get(("ours", dt, case)), best.get(("upstream", dt, case))
        if ours is None:
            continue
        text = f"ours {short} {ours['seconds']:.2f} s / {ours['peak_extra_mb']:.0f} MiB"
        if up is not None:
            text += (f", upstream {short} {up['seconds']:.2f} s / {up['peak_extra_mb']:.0f} MiB -> ours "
                     f"{up['seconds'] / ours['seconds']:.2f}x upstream (process CPU time "
                     f"{up['cpu_seconds'] / ours['cpu_seconds']:.2f}x)")
        parts.append(text)
    ours32, ours16 = best.get(("ours", "float32", case)), best.get(("ours", "bfloat16", case))
    if ours32 and ours16:
        parts.append(f"ours bf16 {ours32['seconds'] / ours16['seconds']:.2f}x ours fp32, memory "
                     f"{ours16['peak_extra_mb'] / ours32['peak_extra_mb']:.2f}x")
    return f"{case}: " + "; ".join(parts)


def parent(args) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.bench import build_model
    from ps3.registry import preset_scales

    log = lambda s: print(s, flush=True)  # noqa: E731
    start = _matmul("start", log)
    log(f"CPU: {start['cpu']}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads")
    log(f"layers returned: {_layers_text(args.layers)}")
    ways = [(impl, dt, case) for case in args.cases
            for impl in ["ours"] + (["upstream"] if args.upstream and case in args.upstream_cases else [])
            for dt in args.dtypes]
    results: dict[tuple, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        scales_1p5k, scales_4k = preset_scales(args.preset)
        build_model(scales_4k, args.preset, width=args.width, depth=args.depth).save_pretrained(model_dir)
        if "one1.5k" in args.cases:  # the same trunk at the 1.5K scales
            build_model(scales_1p5k, args.preset, width=args.width, depth=args.depth).save_pretrained(
                model_dir.with_name("model_1p5k"))
        for r in range(args.rounds):
            for impl, dt, case in (ways if r % 2 == 0 else ways[::-1]):
                python = args.upstream_python if impl == "upstream" else sys.executable
                cmd = [python, __file__, "--child", impl, "--dtype", dt, "--case", case, "--model-dir", str(model_dir),
                       "--repeats", str(args.repeats if case != "all" else 1), "--layers", str(args.layers)]
                if args.upstream:
                    cmd += ["--upstream", str(args.upstream)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.no_warmup:
                    cmd += ["--no-warmup"]
                env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    log(f"{impl} {dt} {case}: FAILED\n{proc.stderr[-3000:]}")
                    return 1
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results[(impl, dt, case)].append(res)
                log(f"round {r + 1}: {impl:8} {dt:8} {case:3}: {res['seconds']:.2f} s (calls "
                    f"{', '.join(f'{t:.2f}' for t in res['all_seconds'])}; "
                    f"process CPU time {res['cpu_seconds']:.2f} s), "
                    f"peak +{res['peak_extra_mb']:.0f} MiB, "
                    f"{res['tokens']} tokens" + _kernels_text(res))
    end = _matmul("end", log)
    best = {w: min(rs, key=lambda r: r["seconds"]) for w, rs in results.items()}
    rate = {dt: max(start["rates"][dt], end["rates"][dt]) for dt in ("float32", "bfloat16")}
    log(f"\nbest round of each way ({args.preset}, width {args.width or 'preset'}, depth {args.depth or 'preset'}; "
        f"layers returned: {_layers_text(args.layers)}):")
    for case in args.cases:
        log(_summary(case, best))
    log(f"matmul rates (best of start and end): float32 {rate['float32']:.0f}, bfloat16 {rate['bfloat16']:.0f} GFLOP/s "
        f"(bf16/fp32 {rate['bfloat16'] / rate['float32']:.2f}x)")
    if args.json:
        out = dict(preset=args.preset, width=args.width, depth=args.depth, matmul_gflops=rate, cpu=start["cpu"],
                   results={" ".join(w): rs for w, rs in results.items()})
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu",
                        help="ps3 bench preset: cpu (width 768, depth 4), so400m or c-radio (the model's 4K geometry)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--cases", nargs="+", default=["one"], choices=["one", "one1.5k", "all"],
                        help="one: one 4K look; one1.5k: one look of the 1.5K model at 1512 px; all: 4K 'all'")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2,
                        help="layers returned by both sides (default 2, as VILA-HD calls it; 0: every layer, "
                             "upstream's default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed one-look calls per process (all: 1)")
    parser.add_argument("--upstream", type=Path, help="an NVlabs/PS3 checkout")
    parser.add_argument("--upstream-python", default=sys.executable, help="a Python with upstream's pins")
    parser.add_argument("--upstream-cases", nargs="+", default=["one", "one1.5k", "all"],
                        choices=["one", "one1.5k", "all"],
                        help="the cases upstream is measured on (default both)")
    parser.add_argument("--threads", type=int, help="torch threads in each measured process (default: torch's)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time each process's first call, one per process (for calls of minutes: 4K 'all' on "
                             "the so400m trunk), instead of calls after a warm-up")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--child", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
