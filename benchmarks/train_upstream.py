"""``ps3 train`` vs upstream's OpenCLIP-based trainer (NVlabs/PS3 ``train/``), fp32 and bf16, on a CPU.

    PYTHONPATH=src python benchmarks/train_upstream.py --upstream /tmp/upstream/PS3 \
        --upstream-python /tmp/upstream/venv/bin/python

Both trainers get the same run: the ``tiny-synthetic`` architecture (stated to upstream as an
open_clip model config, its trunk registered with timm as upstream builds it), the same synthetic
shards (upstream reads the image and text-box webdatasets ``ps3 data synthetic`` writes), the same
word-level tokenizer (saved once; upstream loads it through its Hugging Face tokenizer path), the
same hyper-parameters (SigLIP loss plus prior and posterior box supervision, selection on the
ground-truth boxes, AdamW lr/betas/wd, warmup then cosine, gradient clipping at 1) and the same
seeds. bf16 is ``--precision bf16`` for ours and open_clip's ``--precision amp_bf16`` (autocast,
float32 weights) for upstream. Each run is its own process; samples/s is the median over the log
windows after the first (which holds the start-up), peak memory the process's maximum resident
set. Rounds alternate the order of the ways. Upstream is never a dependency: it runs in the
Python given by ``--upstream-python`` (``../shared/tools/setup_upstream_env.sh`` builds one; its
trainer also needs ``pip install pandas braceexpand nltk "webdataset<=0.2.86"`` there, the training
requirements of ``train/`` that the encoder does not need).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "PS3-tiny-synthetic"  # upstream picks its PS3 SigLIP loss by "ps3" in the model name


def open_clip_config(joint: dict, preprocessor: dict, vocab_size: int, tokenizer_dir: Path) -> dict:
    """``tiny-synthetic``'s architecture in open_clip's model-config layout."""
    vision = {k: v for k, v in joint["vision_config"].items() if k != "vit"}
    text = dict(joint["text_config"], vocab_size=vocab_size, hf_tokenizer_name=str(tokenizer_dir))
    embed_dim = text.pop("output_dim")
    text.pop("prompt_proj_dim", None)
    pre = {k: preprocessor[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    return {"embed_dim": embed_dim, "init_logit_bias": -10, "custom_text": True, "vision_cfg": vision,
            "text_cfg": text, "preprocess_cfg": pre}


def upstream_child(argv: list[str]) -> None:
    """Runs in upstream's Python: register the trunk with timm, add the model config, run open_clip."""
    upstream, config_path, vit_json = Path(argv[0]), Path(argv[1]), argv[2]
    sys.path[:0] = [str(upstream), str(upstream / "train" / "src")]
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    vit = json.loads(vit_json)
    name = json.loads(config_path.read_text())["vision_cfg"]["model_name"]

    def build(pretrained=False, **kw):
        kw = {k: v for k, v in kw.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        for key, value in vit.items():
            kw.setdefault(key, value)
        return VisionTransformer(**kw)

    build.__name__ = name
    if not timm.is_model(name):
        register_model(build)
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(config_path)
    main(argv[3:])


def _peak_mb(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log_path``: (seconds, peak resident set in MiB)."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{log_path.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def run_ours(args, data: Path, out: Path, seed: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "ps3.cli", "train", "--model", "tiny-synthetic",
           "--train-data-image", str(data / "images"), "--train-data-text-box", str(data / "text_boxes"),
           "--tokenizer", str(data / "tokenizer"), "--output-dir", str(out), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--log-every", str(args.log_every), "--save-every-steps", str(10 ** 9), "--workers", str(args.workers),
           "--device", "cpu", "--seed", str(seed), "--precision", precision, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    seconds, peak = _peak_mb(cmd, env, out.parent / f"{out.name}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    return dict(impl="ours", seed=seed, precision=precision, seconds=seconds, peak_mb=peak,
                samples_per_s=statistics.median(rates), loss=[r["total"] for r in rows])


_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+),.*?Logit Scale: [0-9.]+ (.*)$")
_LOSS = re.compile(r"(\w+): ([-0-9.e+]+) \(")


def run_upstream(args, data: Path, work: Path, seed: int, precision: str) -> dict:
    name = f"up_{precision}_{seed}"
    def shards(kind: str) -> str:  # upstream expands brace patterns; a comma between paths is no list to it
        names = [p.name for p in sorted((data / kind).glob("*.tar"))]
        return str(data / kind / names[0]) if len(names) == 1 else f"{data / kind}/{{{','.join(names)}}}"

    open_clip_args = [
        "--model", MODEL_NAME, "--siglip", "--train-data-image", shards("images"),
        "--train-data-text-box", shards("text_boxes"), "--dataset-type", "webdataset_separate_image_text_box",
        "--dataset-resampled", "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
        "--beta1", "0.9", "--beta2", "0.95", "--eps", "1e-8", "--wd", "3e-4", "--grad-clip-norm", "1.0",
        "--select_w_gt", "--use_global_caption", "--pool_gt_token_only", "--global_caption_prob", "0",
        "--selection_prob_loss_weight", "0", "--prior_box_supervision_loss_weight", "1",
        "--posterior_box_supervision_loss_weight", "1", "--precision", "amp_bf16" if precision == "bf16" else "fp32",
        "--workers", str(args.workers), "--seed", str(seed), "--log-every-n-steps", str(args.log_every),
        "--logs", str(work / "logs"), "--name", name, "--save-frequency", "0", "--report-to", "", "--device", "cpu"]
    cmd = [args.upstream_python, __file__, "--upstream-child", str(args.upstream), str(work / f"{MODEL_NAME}.json"),
           json.dumps(args.vit)] + open_clip_args
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seconds, peak = _peak_mb(cmd, env, work / f"{name}.log")
    windows = [m.groups() for m in map(_LINE.search, (work / f"{name}.log").read_text().splitlines()) if m]
    if not windows:
        raise SystemExit(f"no training lines in {work / f'{name}.log'}")
    rates = [args.batch_size / float(batch_t) for _, batch_t, _ in windows[1:]] or [0.0]
    loss = [dict(_LOSS.findall(losses))["Loss"] for _, _, losses in windows]  # the total of its terms
    loss = [float(v) for v in loss]
    return dict(impl="upstream", seed=seed, precision=precision, seconds=seconds, peak_mb=peak,
                samples_per_s=statistics.median(rates), loss=loss)


def prepare(args, tmp: Path) -> Path:
    """Shards, the shared tokenizer and upstream's model config; sets ``args.vit``."""
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.registry import training_config
    from ps3.train.model_setup import build_caption_tokenizer, read_captions
    from ps3.data.shards import list_shards

    data = tmp / "data"
    images = max(args.steps * args.batch_size, 4 * args.batch_size)
    subprocess.run([sys.executable, "-m", "ps3.cli", "data", "synthetic", str(data), "--images", str(images),
                    "--seed", "0", "--quiet"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    joint, preprocessor = training_config("tiny-synthetic")
    text = joint["text_config"]
    tokenizer = build_caption_tokenizer(read_captions(list_shards(str(data / "text_boxes")), 10000),
                                        text["context_length"], text["tokenizer_kwargs"]["clean"])
    tokenizer.save_pretrained(data / "tokenizer")
    # The same vocabulary for upstream, which loads it with transformers' AutoTokenizer.
    hf_dir = data / "tokenizer_hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_bytes((data / "tokenizer" / "tokenizer.json").read_bytes())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    vit = joint["vision_config"]["vit"]
    args.vit = dict(vit)
    config = open_clip_config(joint, preprocessor, tokenizer.vocab_size, hf_dir)
    (tmp / f"{MODEL_NAME}.json").write_text(json.dumps(config))  # open_clip names a model by its file's stem
    return data


def summarize(runs: list[dict], log) -> None:
    """Per (implementation, precision): samples/s, tail loss and peak memory over the seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["impl"], r["precision"]), []).append(r)
    median = {}
    for (impl, precision), rs in sorted(groups.items()):
        sps = [r["samples_per_s"] for r in rs]
        median[impl, precision] = statistics.median(sps)
        log(f"{impl:8s} {precision}: samples/s {min(sps):.1f}-{max(sps):.1f} (median {median[impl, precision]:.1f}), "
            f"last logged loss {min(r['loss'][-1] for r in rs):.2f}-{max(r['loss'][-1] for r in rs):.2f}, "
            f"peak RSS {min(r['peak_mb'] for r in rs):.0f}-{max(r['peak_mb'] for r in rs):.0f} MiB, "
            f"whole runs {min(r['seconds'] for r in rs):.0f}-{max(r['seconds'] for r in rs):.0f} s")
    for precision in ("fp32", "bf16"):
        if ("ours", precision) in median and ("upstream", precision) in median:
            ratio = median["ours", precision] / median["upstream", precision]
            log(f"{precision}: ours {ratio:.2f}x upstream's samples/s")
    for impl in ("ours", "upstream"):
        if (impl, "fp32") in median and (impl, "bf16") in median:
            log(f"{impl}: bf16 {median[impl, 'bf16'] / median[impl, 'fp32']:.2f}x its fp32 samples/s")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--upstream-child":
        upstream_child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, required=True, help="an NVlabs/PS3 checkout")
    parser.add_argument("--upstream-python", required=True, help="a Python with upstream's pins")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    if not (args.upstream / "train" / "src" / "open_clip_train").is_dir():
        parser.error(f"--upstream {args.upstream} has no train/src/open_clip_train: pass an NVlabs/PS3 checkout")
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from ps3.runtime import cpu_capability, matmul_rates

    log = lambda s: print(s, flush=True)  # noqa: E731
    def rates() -> str:
        return ", ".join(f"{str(k)[6:]} {v / 1e9:.0f}" for k, v in matmul_rates(torch.device("cpu")).items())
    log(cpu_capability().describe() + f"; torch {torch.__version__}, {torch.get_num_threads()} threads")
    log(f"matmul rates (start): {rates()} GFLOP/s")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(args, tmp)
        ways = [(impl, p) for p in args.precisions for impl in ("ours", "upstream")]
        for i, seed in enumerate(args.seeds):
            for impl, precision in (ways if i % 2 == 0 else ways[::-1]):
                if impl == "ours":
                    r = run_ours(args, data, tmp / f"ours_{precision}_{seed}", seed, precision)
                else:
                    r = run_upstream(args, data, tmp, seed, precision)
                runs.append(r)
                log(f"seed {seed} {impl} {precision}: {r['samples_per_s']:.1f} samples/s, {r['seconds']:.0f} s, "
                    f"peak {r['peak_mb']:.0f} MiB; loss " + " ".join(f"{v:.3f}" for v in r["loss"]))
    log(f"matmul rates (end): {rates()} GFLOP/s\n")
    summarize(runs, log)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, runs=runs),
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
