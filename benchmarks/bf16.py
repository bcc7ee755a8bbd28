"""float32 vs bfloat16, ours vs upstream's code, on the same random weights: 4K encodes on a CPU.

    PYTHONPATH=src python benchmarks/bf16.py --upstream /tmp/upstream/PS3 \
        --upstream-python /tmp/upstream/venv/bin/python
    PYTHONPATH=src python benchmarks/bf16.py --preset so400m --cases one --rounds 1 ...   # the so400m trunk

One random-weight model per preset (``ps3.bench.build_model``, the published 4K geometry) is saved
once; every way loads it: ours and upstream's ``PS3VisionModel.from_pretrained`` (an NVlabs/PS3
checkout, run by a Python with its pins: ``../shared/tools/setup_upstream_env.sh`` builds one;
upstream is never a dependency), cast to float32 or bfloat16, encoding an image of the model's top scale (3780 px; 3840 for c-radio): ``one``
= one look (``num_look_close=1``), ``all`` = every look. Each (implementation, dtype, case) runs
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


def _load(impl: str, model_dir: Path, upstream: Path | None, dtype: torch.dtype):
    """(model, call) for one implementation."""
    if impl == "ours":
        import ps3

        model = ps3.PS3VisionModel.from_pretrained(model_dir, dtype=dtype)
        return model, lambda x, looks: model(x, num_look_close=looks, num_hidden_layers_to_return=1)
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
    model.vision_model.num_hidden_layers_to_return = 1
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
    model, call = _load(args.child, args.model_dir, args.upstream, dtype)
    torch.manual_seed(0)
    size = _top_scale(args.model_dir)
    x = (torch.rand(1, 3, size, size) * 2 - 1).to(dtype)
    looks = 1 if args.case == "one" else "all"
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
    print(json.dumps(dict(impl=args.child, dtype=args.dtype, case=args.case, seconds=statistics.median(times),
                          all_seconds=times, cpu_seconds=statistics.median(cpu),
                          peak_extra_mb=first.extra_bytes / 2**20, tokens=tokens,
                          torch=torch.__version__)))


def _matmul(tag: str, log) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.runtime import cpu_capability, matmul_rates

    rates = {str(k)[6:]: v / 1e9 for k, v in matmul_rates(torch.device("cpu")).items()}
    log(f"matmul rates ({tag}): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    return dict(rates=rates, cpu=cpu_capability().as_dict())


def parent(args) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.bench import build_model
    from ps3.registry import preset_scales

    log = lambda s: print(s, flush=True)  # noqa: E731
    start = _matmul("start", log)
    log(f"CPU: {start['cpu']}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads")
    ways = [(impl, dt, case) for case in args.cases
            for impl in ["ours"] + (["upstream"] if args.upstream and case in args.upstream_cases else [])
            for dt in ("float32", "bfloat16")]
    results: dict[tuple, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(preset_scales(args.preset)[1], args.preset, width=args.width, depth=args.depth).save_pretrained(model_dir)
        for r in range(args.rounds):
            for impl, dt, case in (ways if r % 2 == 0 else ways[::-1]):
                python = args.upstream_python if impl == "upstream" else sys.executable
                cmd = [python, __file__, "--child", impl, "--dtype", dt, "--case", case, "--model-dir", str(model_dir),
                       "--repeats", str(args.repeats if case == "one" else 1)]
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
                    f"{res['tokens']} tokens")
    end = _matmul("end", log)
    best = {w: min(rs, key=lambda r: r["seconds"]) for w, rs in results.items()}
    rate = {dt: max(start["rates"][dt], end["rates"][dt]) for dt in ("float32", "bfloat16")}
    log(f"\nbest round of each way ({args.preset}, width {args.width or 'preset'}, depth {args.depth or 'preset'}):")
    for case in args.cases:
        ours32, ours16 = best[("ours", "float32", case)], best[("ours", "bfloat16", case)]
        line = (f"{case}: ours fp32 {ours32['seconds']:.2f} s / {ours32['peak_extra_mb']:.0f} MiB, ours bf16 "
                f"{ours16['seconds']:.2f} s / {ours16['peak_extra_mb']:.0f} MiB -> bf16 "
                f"{ours32['seconds'] / ours16['seconds']:.2f}x "
                f"faster, memory {ours16['peak_extra_mb'] / ours32['peak_extra_mb']:.2f}x")
        if ("upstream", "float32", case) in best:
            up32, up16 = best[("upstream", "float32", case)], best[("upstream", "bfloat16", case)]
            line += (f"; upstream fp32 {up32['seconds']:.2f} s / {up32['peak_extra_mb']:.0f} MiB, bf16 "
                     f"{up16['seconds']:.2f} s / {up16['peak_extra_mb']:.0f} MiB -> ours bf16 "
                     f"{up16['seconds'] / ours16['seconds']:.2f}x upstream bf16, ours fp32 "
                     f"{up32['seconds'] / ours32['seconds']:.2f}x upstream fp32")
        log(line)
    log(f"matmul rates (best of start and end): float32 {rate['float32']:.0f}, bfloat16 {rate['bfloat16']:.0f} GFLOP/s "
        f"(bf16/fp32 {rate['bfloat16'] / rate['float32']:.2f}x)")
    if args.json:
        out = dict(preset=args.preset, width=args.width, depth=args.depth, matmul_gflops=rate, cpu=start["cpu"],
                   results={" ".join(w): rs for w, rs in results.items()})
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="ps3 bench preset: cpu (width 768, depth 4), so400m or c-radio (the model's 4K geometry)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--cases", nargs="+", default=["one"], choices=["one", "all"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed one-look calls per process (all: 1)")
    parser.add_argument("--upstream", type=Path, help="an NVlabs/PS3 checkout")
    parser.add_argument("--upstream-python", default=sys.executable, help="a Python with upstream's pins")
    parser.add_argument("--upstream-cases", nargs="+", default=["one", "all"], choices=["one", "all"],
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
