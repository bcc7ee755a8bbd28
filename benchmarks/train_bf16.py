"""``ps3 train --precision bf16`` vs ``fp32`` on a CPU: samples/s and the loss trajectory, several seeds.

    PYTHONPATH=src python benchmarks/train_bf16.py                       # width 768, 3 seeds, 20 steps of 16
    PYTHONPATH=src python benchmarks/train_bf16.py --width 384 --steps 40

The model is ``tiny-synthetic`` (its data, tokenizer, hyper-parameters and 4-block trunk) widened
to ``--width`` (heads = width / 64, the text tower as wide): a mid-size training config. Synthetic
shards are written once; each (seed, precision) is one ``ps3 train`` process, fp32 and bf16
alternating which goes first, so a shared machine's slow minutes fall on both. samples/s is the
median over the log windows after the first (which holds the start-up); the whole run's time is
printed too. The loss trajectory of bf16 is compared with float32's seed-to-seed spread at every
logged step. The float32 and bf16 matmul rates are measured at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ps3.registry import training_config  # noqa: E402
from ps3.runtime import cpu_capability, matmul_rates  # noqa: E402


def write_config(directory: Path, width: int) -> Path:
    joint, preprocessor = training_config("tiny-synthetic")
    heads = max(1, width // 64)
    vision = joint["vision_config"]
    vision["vit"].update(embed_dim=width, num_heads=heads)
    vision.update(hidden_size=width, model_name=f"vit_synthetic_w{width}_patch8")
    joint["text_config"].update(width=width, heads=heads, output_dim=width, prompt_proj_dim=width)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(joint))
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory / "config.json"


def run(args, config: Path, data: Path, out: Path, seed: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "ps3.cli", "train", "--model", str(config), "--train-data-image", str(data / "images"),
           "--train-data-text-box", str(data / "text_boxes"), "--output-dir", str(out), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--log-every", str(args.log_every), "--save-every-steps", str(10 ** 9), "--workers", str(args.workers),
           "--device", "cpu", "--seed", str(seed), "--precision", precision, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                     "PYTHONPATH": str(ROOT / "src")})
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"ps3 train failed ({precision}, seed {seed}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    return dict(seed=seed, precision=precision, seconds=seconds, samples_per_s=statistics.median(rates),
                steps=[r["step"] for r in rows], loss=[r["total"] for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    start_rates = matmul_rates(torch.device("cpu"))
    log(cpu_capability().describe() + f"; torch {torch.__version__}, {torch.get_num_threads()} threads")
    log("matmul rates (start): " + ", ".join(f"{str(k)[6:]} {v / 1e9:.0f}" for k, v in start_rates.items())
        + " GFLOP/s")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_config(tmp / "model", args.width)
        data = tmp / "data"
        images = max(args.steps * args.batch_size, 4 * args.batch_size)
        subprocess.run([sys.executable, "-m", "ps3.cli", "data", "synthetic", str(data), "--images", str(images),
                        "--seed", "0", "--quiet"], check=True, env={**__import__("os").environ,
                                                                    "PYTHONPATH": str(ROOT / "src")})
        for i, seed in enumerate(args.seeds):
            for precision in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
                r = run(args, config, data, tmp / f"run_{precision}_{seed}", seed, precision)
                runs.append(r)
                log(f"seed {seed} {precision}: {r['samples_per_s']:.2f} samples/s ({r['seconds']:.0f} s in all); loss "
                    + " ".join(f"{s}:{v:.3f}" for s, v in zip(r["steps"], r["loss"])))
    end_rates = matmul_rates(torch.device("cpu"))
    log("matmul rates (end): " + ", ".join(f"{str(k)[6:]} {v / 1e9:.0f}" for k, v in end_rates.items()) + " GFLOP/s")
    by = {p: [r for r in runs if r["precision"] == p] for p in ("fp32", "bf16")}
    sps = {p: statistics.median(r["samples_per_s"] for r in rs) for p, rs in by.items()}
    log(f"\nwidth {args.width}, {args.steps} steps of {args.batch_size}, seeds {args.seeds}: samples/s fp32 "
        + ", ".join(f"{r['samples_per_s']:.2f}" for r in by["fp32"]) + " | bf16 "
        + ", ".join(f"{r['samples_per_s']:.2f}" for r in by["bf16"])
        + f" -> bf16 {sps['bf16'] / sps['fp32']:.2f}x (medians)")
    outside = 0
    for j, step in enumerate(by["fp32"][0]["steps"]):
        f32 = [r["loss"][j] for r in by["fp32"]]
        b16 = [r["loss"][j] for r in by["bf16"]]
        spread = max(f32) - min(f32)
        gap = abs(statistics.mean(b16) - statistics.mean(f32))
        outside += gap > spread
        log(f"step {step}: loss fp32 {min(f32):.3f}-{max(f32):.3f} (mean {statistics.mean(f32):.3f}), bf16 "
            f"{min(b16):.3f}-{max(b16):.3f} (mean {statistics.mean(b16):.3f}); |mean gap| {gap:.3f} vs fp32 "
            f"seed spread {spread:.3f}")
    log(f"bf16's mean loss within float32's seed-to-seed spread at {len(by['fp32'][0]['steps']) - outside} of "
        f"{len(by['fp32'][0]['steps'])} logged steps")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), runs=runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
