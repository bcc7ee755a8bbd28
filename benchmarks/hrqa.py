"""Accuracy per LLM image token of every high-resolution strategy on the hrqa set (``ps3 data hrqa``).

Pipeline: (1) write a train and a test split (disjoint random streams) and pre-training shards
of the train scenes; (2) pre-train the ``hrqa-synthetic`` PS3 encoder on the generator's own
captions with ``ps3 train`` and export it (or reuse ``--encoder``); (3) for every front-end of
:mod:`ps3.mllm.frontends` and every token budget, train a fresh copy of the same random tiny
Llama (2 layers, width 64) with the front-end's projector on the same questions, steps, batch
order and learning rate (LM loss on the one answer token; PS3 top-down also learns its prompt
head from the question's box, the selection loss of ``ps3.mllm.selection_target_loss``); the
frozen encoder's rows are computed once per image; (4) evaluate on the test split: accuracy
(the answer is the highest-scoring of the six shape words at the answer position), its 95 %
Wilson interval, seconds per answer (encode + LLM, test images one at a time through the
encoder) and peak memory of that evaluation; (5) write a table and a plot (accuracy against LLM
image tokens, one line per front-end).

    PYTHONPATH=src python benchmarks/hrqa.py --quick              # the whole pipeline small (minutes)
    PYTHONPATH=src python benchmarks/hrqa.py --out runs/hrqa      # the benchmark (docs/hrqa_results.md)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ps3 import LowResPass, PS3VisionConfig, PS3VisionModel
from ps3.data.hrqa import SHAPES, write_hrqa
from ps3.mllm import IGNORE_INDEX, encode_for_llm, selection_target_loss, splice_image_tokens
from ps3.mllm.frontends import FRONTENDS, RowFrontend, knob_for_tokens, plan_for, top_down

from ps3.registry import training_config
from ps3.runtime import matmul_rate, measure

CPU = torch.device("cpu")
SPECIALS = ["<pad>", "<image>", "user", ":", "answer"]


# ------------------------------------------------------------------------------------------ data
def question_words(record: dict) -> list[str]:
    """The question of a record as words (the answer-format sentence dropped: the choices are fixed)."""
    text = record["conversations"][0]["value"].replace("<image>", "").split(" Answer with")[0]
    return re.findall(r"[a-z]+|\?", text.lower())


def load_split(root: Path, vocab: dict[str, int]) -> dict:
    """Images (uint8), token ids ``user : <image> question ? answer : ANSWER``, answer positions, boxes."""
    records = json.loads((root / "data.json").read_text())
    rows, answers, boxes, images = [], [], [], []
    for r in records:
        words = ["user", ":", "<image>", *question_words(r), "answer", ":", r["conversations"][1]["value"]]
        rows.append([vocab[w] for w in words])
        answers.append(vocab[r["conversations"][1]["value"]])
        boxes.append(r["conversations"][0]["boxes"][0])
        images.append(np.asarray(Image.open(root / "images" / r["image"]).convert("RGB")))
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = (ids != 0).long()
    answer_pos = mask.sum(1) - 1
    labels = torch.full_like(ids, IGNORE_INDEX).scatter(1, answer_pos[:, None], torch.tensor(answers)[:, None])
    return {"images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), "input_ids": ids,
            "attention_mask": mask, "labels": labels, "answer_pos": answer_pos, "answers": torch.tensor(answers),
            "boxes": torch.tensor(boxes)}


def build_vocab(roots: list[Path]) -> dict[str, int]:
    words = list(SPECIALS) + list(SHAPES)
    for root in roots:
        for r in json.loads((root / "data.json").read_text()):
            words += question_words(r)
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def pixels_of(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → the encoder's input in [-1, 1] (mean = std = 0.5)."""
    return images.float() / 127.5 - 1


def box_maps(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ys = torch.arange(size[0]).view(1, -1, 1)
    xs = torch.arange(size[1]).view(1, 1, -1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).float()


# ------------------------------------------------------------------------------------------ encoder
def pretrain(out: Path, steps: int, batch: int) -> Path:
    """``ps3 train --model hrqa-synthetic`` on the train split's shards, exported to ``out/encoder``."""
    if steps == 0:
        return Path()
    cmd = [sys.executable, "-m", "ps3.cli", "train", "--model", "hrqa-synthetic",
           "--train-data-image", str(out / "train/shards/images"),
           "--train-data-text-box", str(out / "train/shards/text_boxes"), "--steps", str(steps),
           "--batch-size", str(batch), "--lr", "1e-3", "--warmup", str(max(steps // 10, 1)),
           "--output-dir", str(out / "pretrain"), "--resume", "latest"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "ps3.cli", "export", str(out / "pretrain"), str(out / "encoder"),
                    "--quiet"], check=True)
    return out / "encoder"


def load_encoder(path: Path | None, seed: int) -> PS3VisionModel:
    if path and str(path) not in ("", "."):
        vision = PS3VisionModel.from_pretrained(str(path))
    else:
        torch.manual_seed(seed)
        vision = PS3VisionModel(PS3VisionConfig(**training_config("hrqa-synthetic")[0]["vision_config"]))
    return vision.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ the LLM
def make_llm(vocab_size: int, seed: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_positions))


def llm_logits(llm, embeds: torch.Tensor, lengths: torch.Tensor, data: dict, pick: torch.Tensor):
    """Splice image embeddings into the questions of ``pick``; (loss on the answers, choice scores)."""
    ids, mask = data["input_ids"][pick], data["attention_mask"][pick]
    image_pos = (ids == 1).long().argmax(1)
    seq = splice_image_tokens(llm.get_input_embeddings()(ids), mask, image_pos, embeds, lengths,
                              data["labels"][pick])
    out = llm(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask, labels=seq.labels, use_cache=False)
    answer_at = seq.attention_mask.long().sum(1) - 1  # right padding: the answer is each row's last token
    logits = out.logits.gather(1, (answer_at - 1).view(-1, 1, 1).expand(-1, 1, out.logits.shape[-1]))[:, 0]
    return out.loss, logits


def choice_ids(vocab: dict[str, int]) -> torch.Tensor:
    return torch.tensor([vocab[s] for s in SHAPES])


# ------------------------------------------------------------------------------------------ row front-ends
def compute_rows(front: RowFrontend, images: torch.Tensor) -> torch.Tensor:
    return torch.stack([front.rows(images[i].float() / 255) for i in range(len(images))])


def train_rows(front: RowFrontend, llm, rows: torch.Tensor, data: dict, args) -> list[float]:
    params = list(front.projector.parameters()) + list(llm.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.steps):
        pick = torch.randint(0, len(rows), (args.batch,), generator=gen)
        embeds = front(rows[pick])
        lengths = torch.full((len(pick),), embeds.shape[1], dtype=torch.long)
        loss, _ = llm_logits(llm, embeds, lengths, data, pick)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def eval_rows(front: RowFrontend, llm, data: dict, choices: torch.Tensor, batch: int = 16) -> list[bool]:
    correct = []
    for start in range(0, len(data["answers"]), batch):
        pick = torch.arange(start, min(start + batch, len(data["answers"])))
        rows = compute_rows(front, data["images"][pick])  # the encoder's time counts per answer
        embeds = front(rows)
        _, logits = llm_logits(llm, embeds, torch.full((len(pick),), embeds.shape[1]), data, pick)
        guess = choices[logits[:, choices].argmax(1)]
        correct += (guess == data["answers"][pick]).tolist()
    return correct


# ------------------------------------------------------------------------------------------ PS3 top-down
@torch.no_grad()
def low_res_all(vision, images: torch.Tensor, chunk: int = 64) -> LowResPass:
    parts = [vision.encode_low_res(pixels_of(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    cat = torch.cat
    return LowResPass([cat([p.hidden_states[i] for p in parts]) for i in range(len(parts[0].hidden_states))],
                      [tuple(cat([p.kv_cache[i][j] for p in parts]) for j in range(2))
                       for i in range(len(parts[0].kv_cache))],
                      cat([p.pooled_output for p in parts]), cat([p.selection_features for p in parts]), None,
                      [s for p in parts for s in p.image_sizes])


def take(low: LowResPass, index: torch.Tensor) -> LowResPass:
    return LowResPass([h[index] for h in low.hidden_states], [(k[index], v[index]) for k, v in low.kv_cache],
                      low.pooled_output[index], low.selection_features[index], None,
                      [low.image_sizes[i] for i in index.tolist()])


def top_down_step(helper, data: dict, pick: torch.Tensor, low: LowResPass | None):
    """One two-pass forward: (LM loss, choice logits, selection loss against the question's box)."""
    pixels = pixels_of(data["images"][pick])
    ids, mask = data["input_ids"][pick], data["attention_mask"][pick]
    ends = data["answer_pos"][pick] - 3  # the question's "?": the answer never steers the selection
    prompt, low = helper.top_down_prompt(pixels, ids, mask, prompt_end=ends, low_res=low)
    vision = encode_for_llm(helper.vision_model, pixels, prompt=prompt, low_res=low, k=helper.k,
                            max_select_num_each_scale=helper.max_select_num_each_scale,
                            num_look_close=helper.num_look_close)
    image = helper.projector(vision, feature_layer=helper.feature_layer)
    loss, logits = llm_logits(helper.llm, image.embeds, image.lengths, data, pick)
    target = box_maps(data["boxes"][pick], tuple(pixels.shape[-2:]))
    return loss, logits, selection_target_loss(vision.topdown_selection_probs, target)


def train_top_down(helper, data: dict, args) -> list[float]:
    params = [p for n, p in helper.named_parameters() if p.requires_grad and not n.startswith("vision_model.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    low = low_res_all(helper.vision_model, data["images"])
    losses = []
    helper.train()
    for _ in range(args.steps):
        pick = torch.randint(0, len(data["answers"]), (args.batch,), generator=gen)
        loss, _, sel = top_down_step(helper, data, pick, take(low, pick))
        opt.zero_grad()
        (loss + sel).backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def eval_top_down(helper, data: dict, choices: torch.Tensor, batch: int = 16) -> list[bool]:
    helper.eval()
    correct = []
    for start in range(0, len(data["answers"]), batch):
        pick = torch.arange(start, min(start + batch, len(data["answers"])))
        _, logits, _ = top_down_step(helper, data, pick, None)
        correct += (choices[logits[:, choices].argmax(1)] == data["answers"][pick]).tolist()
    return correct


# ------------------------------------------------------------------------------------------ one run
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def run_one(name: str, budget: int, vision, train: dict, test: dict, vocab: dict, args) -> dict:
    """Train and evaluate one front-end at one token budget; the table row."""
    h, w = train["images"].shape[-2:]
    value = knob_for_tokens(name, vision, h, w, budget)
    tokens = plan_for(name, vision, h, w, value).num_tokens
    llm = make_llm(len(vocab), args.seed, train["input_ids"].shape[1] + tokens + 8)
    choices = choice_ids(vocab)
    t0 = time.perf_counter()
    if name == "ps3_top_down":
        torch.manual_seed(args.seed)
        model = top_down(vision, llm, 1, value, prompt_head_hidden=128, pass1_grad=True)
        losses = train_top_down(model, train, args)
        evaluate = lambda: eval_top_down(model, test, choices)  # noqa: E731
    else:
        torch.manual_seed(args.seed)
        front = RowFrontend(name, vision, 64, h, w, value)
        rows = compute_rows(front, train["images"])
        losses = train_rows(front, llm, rows, train, args)
        evaluate = lambda: eval_rows(front, llm, test, choices)  # noqa: E731
    t1 = time.perf_counter()
    with measure(CPU) as cost:
        correct = evaluate()
    lo, hi = wilson(sum(correct), len(correct))
    return {"frontend": name, "budget": budget, "knob": None if value is None else str(value), "tokens": tokens,
            "accuracy": sum(correct) / len(correct), "ci95": [lo, hi], "n_test": len(correct),
            "s_per_answer": cost.seconds / len(correct), "peak_mib": cost.extra_bytes / 2 ** 20,
            "train_s": t1 - t0, "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}


# ------------------------------------------------------------------------------------------ report
def format_table(rows: list[dict]) -> str:
    head = "| front-end | knob | LLM image tokens | accuracy | 95 % interval | s / answer | peak MiB | train s |"
    lines = [head, "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {r['frontend']} | {r['knob'] or '-'} | {r['tokens']} | {100 * r['accuracy']:.1f} % | "
                     f"{100 * lo:.1f}–{100 * hi:.1f} % | {r['s_per_answer']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["frontend"] for r in rows):
        mine = sorted((r for r in rows if r["frontend"] == name), key=lambda r: r["tokens"])
        xs = [r["tokens"] for r in mine]
        ys = [100 * r["accuracy"] for r in mine]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in mine],
               [100 * (r["ci95"][1] - r["accuracy"]) for r in mine]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(100 / len(SHAPES), color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("LLM image tokens per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


QUICK = {"train": 64, "test": 40, "pretrain_steps": 10, "steps": 30, "budgets": [64, 256]}
FULL = {"train": 1200, "test": 300, "pretrain_steps": 300, "steps": 300, "budgets": [64, 256, 1024]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hrqa", help="working directory (data, encoder, results)")
    parser.add_argument("--quick", action="store_true", help="the whole pipeline small: " + json.dumps(QUICK))
    parser.add_argument("--train", type=int, help=f"train questions (default {FULL['train']})")
    parser.add_argument("--test", type=int, help=f"test questions (default {FULL['test']})")
    parser.add_argument("--pretrain-steps", type=int, help=f"encoder pre-training steps, 0: random encoder "
                        f"(default {FULL['pretrain_steps']})")
    parser.add_argument("--encoder", help="a PS3 model directory to use instead of pre-training one")
    parser.add_argument("--steps", type=int, help=f"MLLM training steps per run (default {FULL['steps']})")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--budgets", type=int, nargs="+", help=f"LLM image token budgets (default {FULL['budgets']})")
    parser.add_argument("--frontends", default=",".join(FRONTENDS), help="comma-separated front-ends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", help="also write the table and plot here (e.g. docs/)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    names = args.frontends.split(",")
    unknown = [n for n in names if n not in FRONTENDS]
    if unknown:
        raise SystemExit(f"--frontends: unknown {unknown}; pass some of {','.join(FRONTENDS)}")
    t0 = time.perf_counter()
    rate = matmul_rate(CPU) / 1e9
    print(f"float32 matmul rate of this machine now: {rate:.0f} GFLOP/s; torch threads {torch.get_num_threads()}")
    write_hrqa(out / "train", args.train, seed=args.seed, split="train", shards=not args.encoder)
    write_hrqa(out / "test", args.test, seed=args.seed, split="test")
    encoder = Path(args.encoder) if args.encoder else pretrain(out, args.pretrain_steps, args.batch)
    vision = load_encoder(encoder, args.seed)
    vocab = build_vocab([out / "train", out / "test"])
    train, test = load_split(out / "train", vocab), load_split(out / "test", vocab)
    t1 = time.perf_counter()
    print(f"data and encoder: {t1 - t0:.0f} s ({args.train} train / {args.test} test questions, "
          f"{args.pretrain_steps if not args.encoder else 0} pre-training steps)")
    rows = []
    for name in names:
        for budget in (args.budgets if name != "low_res" else args.budgets[:1]):
            rows.append(run_one(name, budget, vision, train, test, vocab, args))
            r = rows[-1]
            print(f"{name:16s} budget {budget:5d}: {r['tokens']:5d} tokens  accuracy {100 * r['accuracy']:5.1f} %  "
                  f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  train {r['train_s']:.0f} s", flush=True)
    total = time.perf_counter() - t0
    title = (f"hrqa: {args.train} train / {args.test} test questions, {args.steps} steps x {args.batch}, encoder "
             f"pre-trained {args.pretrain_steps if not args.encoder else 'given'} steps; {total / 60:.1f} min")
    table = format_table(rows)
    print(title)
    print(table)
    result = {"args": vars(args), "matmul_gflops": rate, "total_s": total, "rows": rows, "title": title}
    for folder in [out] + ([Path(args.docs)] if args.docs else []):
        folder.mkdir(parents=True, exist_ok=True)
        stem = "hrqa_quick" if args.quick else "hrqa_results"
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (folder / f"{stem}.md").write_text(f"{title}\n\n{table}\n")
        if importlib.util.find_spec("matplotlib") is None:
            print(f"matplotlib is not installed: no plot written to {folder} (pip install matplotlib)")
        else:
            plot(rows, folder / f"{stem}.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
