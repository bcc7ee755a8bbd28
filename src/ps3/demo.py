"""``make demo`` / ``python -m ps3.demo``: PS3 end to end on this machine, offline.

0. measures this machine's float32 matmul rate and says how long the demo should take;
1. writes synthetic scenes with captioned objects under ``RUN_DIR/data`` (train: seed S,
   evaluation: S+1, held-out check: S+2; reused when already there);
2. trains ``tiny-synthetic-128`` from random weights on the CPU until a held-out check (a few
   hundred caption/box pairs of the check scenes, every ``--check-every`` steps) meets the
   target with a margin, at most ``--max-steps`` steps (a finished run is reused, an interrupted
   one resumes);
3. exports the run in the published checkpoint layout to ``RUN_DIR/model``;
4. encodes a held-out scene bottom-up and with one of its captions, heatmaps in ``RUN_DIR/viz``;
5. prints the learnability figures on the evaluation scenes (never seen by the training or the
   check): of the k first-scale cells with the highest top-down probability (k = cells the
   caption's box covers), the fraction inside the box, against bottom-up selection and chance.

``benchmarks/learnability.py`` runs the same pipeline with the fixed, stricter recipe (the
256 px ``tiny-synthetic`` model, 600 steps, no early stop) and fails when the figures miss
their target.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

RECIPE: dict[str, Any] = {
    "batch_size": 32,
    "lr": 2e-3,
    "warmup": 50,
    "wd": 0.05,
    "beta2": 0.98,
    "grad_clip": 1.0,
    "bottomup_loss_weight": 1.0,
    "topdown_loss_weight": 3.0,
    "workers": 1,
}
MODEL, IMAGE_SIZE, MAX_STEPS, CHECK_EVERY, CHECK_PAIRS = "tiny-synthetic-128", 128, 300, 50, 400
TARGET, MARGIN = 0.6, 0.1
# The held-out check asks for this much more than the target, so that the evaluation on other
# scenes (its own sampling noise about ±0.02) still meets it.
CHECK_EXTRA = 0.04
# Cost of the demo as seconds × float32 matmul GFLOP/s, so that dividing by a machine's rate gives
# its seconds: per training step of 32 scenes, per held-out check, and the rest (data, export,
# heatmaps, evaluation). From a run on 2 quiet cores (324 GFLOP/s: 250 steps and 5 checks in
# 62 s, 71 s in all); the rest is mostly single-threaded Python.
STEP_GFLOP, CHECK_GFLOP, FIXED_GFLOP = 70.0, 400.0, 3000.0
TYPICAL_STEPS = 250


def make_data(root: Path, name: str, images: int, seed: int, size: int, quiet: bool = False) -> Path:
    """Synthetic shards under ``root/name``; reused when the same request made them before."""
    from .train.synthetic import write_synthetic_dataset

    out = root / name
    marker = out / "done.json"
    want = {"images": images, "seed": seed, "size": size}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out
    from tqdm import tqdm

    with tqdm(total=images, desc=f"writing {name} scenes", disable=quiet) as bar:
        write_synthetic_dataset(out, images, seed, size=size, shard_size=100, overwrite=True, progress=bar.update)
    marker.write_text(json.dumps(want))
    return out


def matmul_gflops() -> float:
    """This machine's float32 matmul rate (2048², best of 10), as ``ps3 bench`` measures it."""
    import torch

    from .runtime import matmul_rate

    return matmul_rate(torch.device("cpu"), torch.float32, 2048) / 1e9


def expected_seconds(gflops: float, steps: int, check_every: int) -> float:
    """The demo's wall-clock time at a matmul rate of ``gflops`` when training takes ``steps``."""
    checks = steps // check_every if check_every else 0
    return (FIXED_GFLOP + steps * STEP_GFLOP + checks * CHECK_GFLOP) / gflops


def learnability_met(result, extra: float = 0.0) -> bool:
    """Top-down precision >= the target and >= the margin above bottom-up and chance (plus ``extra``)."""
    top = result.topdown_precision
    return (top >= TARGET + extra and top >= result.bottomup_precision + MARGIN + extra
            and top >= result.chance + MARGIN + extra)


def evaluate(model, tokenizer, data: Path, model_dir: Path, max_pairs: int | None = None):
    """Learnability of ``model`` on the scenes in ``data``, preprocessed as ``model_dir`` says."""
    from .train.evaluate import evaluate_learnability

    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    return evaluate_learnability(model, tokenizer, data / "images", data / "text_boxes", image_size=pre["image_size"],
                                 mean=pre["mean"], std=pre["std"], max_pairs=max_pairs)


def _held_out_check(run_dir: Path, data: Path, say: Callable[..., None],
                    deadline: float | None) -> Callable:
    """The stop check: learnability on ``CHECK_PAIRS`` pairs of the check scenes."""
    from .tokenizer import PS3Tokenizer

    def check(step: int, model) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeoutError(f"training passed the --time-limit at step {step}")
        tokenizer = PS3Tokenizer.from_pretrained(run_dir / "tokenizer")
        result = evaluate(model, tokenizer, data, run_dir, CHECK_PAIRS)
        met = learnability_met(result, CHECK_EXTRA)
        say(f"      held-out check at step {step}: top-down {result.topdown_precision:.3f}, bottom-up "
            f"{result.bottomup_precision:.3f}, chance {result.chance:.3f} -> {'stop' if met else 'continue'}")
        return met

    return check


def finished_training(run_dir: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The result of an earlier training of ``run_dir`` with the same ``request``, or None."""
    marker = run_dir / "demo_training.json"
    if not marker.is_file():
        return None
    stored = json.loads(marker.read_text())
    return {**stored["result"], "reused": True} if stored.get("request") == request else None


def train(data: Path, check_data: Path | None, run_dir: Path, recipe: dict[str, Any], *, model: str,
          max_steps: int, check_every: int, seed: int, quiet: bool = False,
          time_limit: float | None = None, say: Callable[..., None] = print) -> dict[str, Any]:
    """Train (or resume, or reuse) the run; returns ``{"step", "stopped_early", "steps_run", "seconds",
    "reused"}`` (``reused``: the run had finished before this call, the figures are that run's)."""
    from .train.loop import TrainParams, train as train_run

    want = {"model": model, "max_steps": max_steps, "check_every": check_every, "seed": seed, **recipe}
    marker = run_dir / "demo_training.json"
    done = finished_training(run_dir, want)
    if done is not None:
        return done
    params = TrainParams(model=model, train_data_image=str(data / "images"),
                         train_data_text_box=str(data / "text_boxes"), output_dir=str(run_dir), steps=max_steps,
                         resume="latest", save_every_steps=check_every or 100, log_every=check_every or 100,
                         device="cpu", seed=seed, quiet=quiet, **recipe)
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    stop = None
    if check_data is not None and check_every:
        stop = _held_out_check(run_dir, check_data, say, deadline)
    result = train_run(params, stop_check=stop)
    if deadline is not None and time.perf_counter() > deadline:
        raise TimeoutError(f"training took longer than --time-limit {time_limit:.0f} s")
    done = {"step": result.step, "stopped_early": result.stopped_early, "steps_run": result.steps_run,
            "seconds": result.seconds}
    marker.write_text(json.dumps({"request": want, "result": done}, indent=2) + "\n")
    return {**done, "reused": False}


def show_heldout(model_dir: Path, out: Path, image_size: int) -> tuple[Path, str]:
    """Encode one held-out scene bottom-up and with its first caption (one look); heatmaps of the
    first high-res scale into ``out/viz/{bottomup,topdown}``."""
    import torch
    from PIL import Image

    from .runtime import load_model
    from .train.synthetic import render_scene
    from .viz import overlay_selection

    scene = render_scene(seed=1234, index=0, size=image_size)
    image = out / "heldout.png"
    scene.image.save(image)
    caption = scene.captions[0]
    loaded = load_model(model_dir, device="cpu", text=True)
    vision, text, tokenizer, processor = loaded.vision, loaded.text, loaded.tokenizer, loaded.processor
    pixels = processor(str(image))["pixel_values"][0][None]
    side = max(256, image_size)  # drawn at 256 px or more, so that the title fits
    shown = scene.image.resize((side, side), Image.Resampling.NEAREST)
    with torch.no_grad():
        prompts = {"bottomup": None, "topdown": text(tokenizer([caption])).prompt}
        for name, prompt in prompts.items():
            output = vision(pixels, prompt=prompt, num_look_close=1)
            title = f"scale 1 ({vision.config.ps3_scales[1]} px), one look\n"
            title += f"top-down: {caption!r}" if prompt is not None else "bottom-up (no prompt)"
            (out / "viz" / name).mkdir(parents=True, exist_ok=True)
            overlay_selection(shown, output, scale=1, title=title).save(out / "viz" / name / "heldout_scale1.png")
    return image, caption


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ps3.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0, help="training seed; the scenes use S, S+1 and S+2")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--check-images", type=int, default=150, help="scenes of the held-out check")
    parser.add_argument("--model", default=MODEL, help=f"training config (default {MODEL})")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="scene size; the model's input size")
    parser.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=MAX_STEPS,
                        help="step cap (and the length of the learning-rate schedule)")
    parser.add_argument("--check-every", type=int, default=CHECK_EVERY,
                        help="steps between held-out checks (0: no check, train all --max-steps)")
    parser.add_argument("--time-limit", type=float, help="fail if training takes longer (seconds)")
    parser.add_argument("--fresh", action="store_true", help="train from scratch even if a run exists")
    parser.add_argument("--quiet", action="store_true")
    for key, value in RECIPE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = {k: getattr(args, k) for k in RECIPE}
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    root = Path(args.run_dir)
    gflops = matmul_gflops()
    _say_estimate(args, recipe, root, gflops, say)
    start = time.perf_counter()
    sets = [("train", args.train_images, 0), ("eval", args.eval_images, 1)]
    sets += [("check", args.check_images, 2)] if args.check_every else []
    data = {name: make_data(root / "data", name, count, args.seed + offset, args.image_size, args.quiet)
            for name, count, offset in sets}
    counts = ", ".join(f"{count} {name}" for name, count, _ in sets)
    say(f"[1/5] data: {counts} scenes of {args.image_size} px in {root / 'data'} "
        f"({time.perf_counter() - start:.0f} s)")
    if args.fresh:
        shutil.rmtree(root / "run", ignore_errors=True)
    stop_rule = (f"until the held-out check every {args.check_every} steps meets the target, at most "
                 f"{args.max_steps} steps" if args.check_every else f"for {args.max_steps} steps")
    say(f"[2/5] training {args.model} {stop_rule} of {recipe['batch_size']} (CPU)")
    trained = train(data["train"], data.get("check"), root / "run", recipe, model=args.model, max_steps=args.max_steps,
                    check_every=args.check_every, seed=args.seed, quiet=args.quiet,
                    time_limit=args.time_limit, say=say)
    return _finish(args, root, recipe, trained, data["eval"], gflops, start, say)


def _say_estimate(args, recipe: dict[str, Any], root: Path, gflops: float, say: Callable[..., None]) -> None:
    """The [0/5] line: this machine's rate and this run's time, or no estimate when the training is
    reused (a rerun takes seconds)."""
    request = {"model": args.model, "max_steps": args.max_steps, "check_every": args.check_every, "seed": args.seed,
               **recipe}
    if not args.fresh and finished_training(root / "run", request) is not None:
        say(f"[0/5] this machine: float32 matmul {gflops:.0f} GFLOP/s; the finished training in {root / 'run'} "
            "is reused (pass --fresh to train again)")
        return
    typical = min(TYPICAL_STEPS, args.max_steps) if args.check_every else args.max_steps
    say(f"[0/5] this machine: float32 matmul {gflops:.0f} GFLOP/s -> expect about "
        f"{expected_seconds(gflops, typical, args.check_every) / 60:.1f} min "
        f"(at most {expected_seconds(gflops, args.max_steps, args.check_every) / 60:.1f} min)")


def _finish(args, root: Path, recipe: dict[str, Any], trained: dict[str, Any], eval_data: Path, gflops: float,
            start: float, say: Callable[..., None]) -> int:
    from . import PS3Model, PS3Tokenizer
    from .train.export import export

    info = export(root / "run", root / "model")
    say(f"[3/5] exported step {info['step']} to {root / 'model'}")
    image, caption = show_heldout(root / "model", root, args.image_size)
    say(f"[4/5] heatmaps of {image} in {root / 'viz'} (bottom-up, and top-down for {caption!r})")
    result = evaluate(PS3Model.from_pretrained(root / "model"), PS3Tokenizer.from_pretrained(root / "model"),
                      eval_data, root / "model")
    ok = learnability_met(result)
    total = time.perf_counter() - start
    samples = trained["steps_run"] * recipe["batch_size"]
    summary = {**result.as_dict(), "train_steps": trained["step"], "stopped_early": trained["stopped_early"],
               "train_seconds": trained["seconds"], "train_samples_per_s": samples / max(trained["seconds"], 1e-9),
               "total_seconds": total, "matmul_gflops": gflops, "seed": args.seed, "recipe": recipe,
               "target_met": ok, "training_reused": trained["reused"]}
    (root / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[5/5] learnability on {result.pairs} held-out caption/box pairs (first high-res scale):")
    print(f"      top-down precision  {result.topdown_precision:.3f}   (selection steered by the caption)")
    print(f"      bottom-up precision {result.bottomup_precision:.3f}   (saliency, no caption)")
    print(f"      chance              {result.chance:.3f}")
    print(f"      target: top-down >= {TARGET} and >= {MARGIN} above both: {'met' if ok else 'NOT met'}")
    how = "reused from the earlier run" if trained["reused"] else f"{summary['train_samples_per_s']:.0f} samples/s"
    say(f"      {trained['step']} training steps ({how}); {total / 60:.1f} min in all at {gflops:.0f} GFLOP/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
