"""MLLM learnability: can an LLM steer PS3's selection to the object a question names?

Synthetic scenes (``ps3.train.synthetic``: 2–4 coloured textured shapes) with one question per
scene naming one object ("what shape is the red striped object ?", or colour, texture and shape
when colour and texture alone are ambiguous in that scene). The model is ``ps3.mllm.TwoPassPS3``:
a random-weight ``tiny-synthetic`` PS3 encoder (frozen; ``ps3.train.model_setup.get_model_spec``), a
random tiny Llama (2 layers, width 64), the projector and the top-down prompt head. The prompt
head, the projector and the LLM (random here, so it stands in for a pretrained LLM that already
reads questions; ``--freeze-llm`` keeps it fixed) are trained on the CPU for a time limit with
the object's box as the selection target (``ps3.mllm.selection_target_loss``); the encoder is
frozen, so its low-res pass over the training images is made once.

Evaluation on held-out scenes (another seed): one look with block-aligned selection (k = 2,
``--budgets`` cells per high-res scale); precision = share of the selected high-res cells whose
centre lies inside the named object's box, top-down (the LLM's prompt) vs bottom-up (the same
encoder's prior prompt) vs chance (the box's share of the image). Exits non-zero unless top-down
precision ≥ 0.6 and ≥ 0.15 above bottom-up.

    PYTHONPATH=src python benchmarks/mllm_learnability.py [--time-limit 180] [--train 2000] [--eval 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ps3 import PS3ImageProcessor, PS3VisionModel
from ps3.encoder.vision import LowResPass
from ps3.mllm import TwoPassPS3, encode_for_llm, selection_target_loss
from ps3.train.model_setup import get_model_spec
from ps3.train.synthetic import COLOURS, SHAPES, TEXTURES, render_scene

WORDS = ["<pad>", "<image>", "user", ":", "what", "shape", "is", "the", "object", "where", "?", "an", "a",
         *COLOURS, *TEXTURES, *SHAPES]
VOCAB = {w: i for i, w in enumerate(WORDS)}
IMAGE_ID = VOCAB["<image>"]


def question(objects: list[tuple[str, str, str]], i: int) -> str:
    colour, texture, shape = objects[i]
    if sum(o[:2] == (colour, texture) for o in objects) == 1:
        return f"what shape is the {colour} {texture} object ?"
    return f"where is the {colour} {texture} {shape} ?"


def make_data(seed: int, count: int, size: int) -> dict[str, torch.Tensor]:
    """Scenes ``0..count-1`` of ``seed``: pixels, token ids ``user : <image> question``, box maps."""
    processor = PS3ImageProcessor(image_size=size)
    rng = np.random.default_rng(seed)
    pixels, rows, boxes = [], [], []
    for index in range(count):
        scene = render_scene(seed, index, size)
        i = int(rng.integers(len(scene.objects)))
        rows.append([VOCAB["user"], VOCAB[":"], IMAGE_ID] + [VOCAB[w] for w in question(scene.objects, i).split()])
        pixels.append(processor(scene.image)["pixel_values"][0])
        boxes.append(scene.boxes[i])
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    box_maps = torch.zeros(count, size, size, dtype=torch.bool)
    for b, (x0, y0, x1, y1) in enumerate(boxes):
        box_maps[b, y0:y1, x0:x1] = 1
    return {"pixel_values": torch.stack(pixels), "input_ids": ids, "attention_mask": (ids != 0).long(),
            "boxes": torch.tensor(boxes, dtype=torch.float32), "box_maps": box_maps}


def build(seed: int = 0, prompt_head_hidden: int | None = 256) -> TwoPassPS3:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vision = PS3VisionModel(get_model_spec("tiny-synthetic").config.vision_config).eval().requires_grad_(False)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128))
    return TwoPassPS3(vision, llm, image_token_id=IMAGE_ID, prompt_head_hidden=prompt_head_hidden, pass1_grad=True)


@torch.no_grad()
def low_res_passes(helper: TwoPassPS3, pixels: torch.Tensor, chunk: int = 100) -> LowResPass:
    """The frozen encoder's low-res pass of every image, made once (it does not change in training)."""
    parts = [helper.vision_model.encode_low_res(pixels[i:i + chunk]) for i in range(0, len(pixels), chunk)]
    return LowResPass([torch.cat([p.hidden_states[i] for p in parts]) for i in range(len(parts[0].hidden_states))],
                      [tuple(torch.cat([p.kv_cache[i][j] for p in parts]) for j in range(2))
                       for i in range(len(parts[0].kv_cache))],
                      torch.cat([p.pooled_output for p in parts]), torch.cat([p.selection_features for p in parts]),
                      None, [s for p in parts for s in p.image_sizes])


def take(low: LowResPass, index: torch.Tensor) -> LowResPass:
    """The images ``index`` of a low-res pass."""
    return LowResPass([h[index] for h in low.hidden_states], [(k[index], v[index]) for k, v in low.kv_cache],
                      low.pooled_output[index], low.selection_features[index], None,
                      [low.image_sizes[i] for i in index.tolist()])


def train(helper: TwoPassPS3, data: dict, *, steps: int, batch: int = 32, lr: float = 2e-3,
          time_limit: float | None = None, seed: int = 0) -> list[float]:
    """Selection-target training of the prompt head, projector and LLM (pass 1 only: the loss
    reads the top-down probabilities, which need no high-res look)."""
    params = [p for name, p in helper.named_parameters() if p.requires_grad and not name.startswith("vision_model.")]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.monotonic()
    low_all = low_res_passes(helper, data["pixel_values"])
    helper.train()
    for step in range(steps):
        pick = torch.randint(0, len(data["input_ids"]), (batch,), generator=generator)
        pixels, low = data["pixel_values"][pick], take(low_all, pick)
        prompt, _ = helper.top_down_prompt(pixels, data["input_ids"][pick], data["attention_mask"][pick], low_res=low)
        vision = encode_for_llm(helper.vision_model, pixels, prompt=prompt, low_res=low, num_look_close=0)
        probs = vision.topdown_selection_probs
        loss = selection_target_loss(probs, data["box_maps"][pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if time_limit is not None and time.monotonic() - start > time_limit:
            break
    return losses


def _precision(maps: list[torch.Tensor], boxes: torch.Tensor, size: int) -> float:
    """Share of the selected cells (all scales) whose centre lies inside each sample's box."""
    inside = total = 0.0
    for m in maps:
        h, w = m.shape[-2:]
        ys = (torch.arange(h) + 0.5) * size / h
        xs = (torch.arange(w) + 0.5) * size / w
        x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
        rows, cols = ys.view(1, -1, 1), xs.view(1, 1, -1)
        within = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        inside += float((within & m.bool()).sum())
        total += float(m.sum())
    return inside / max(total, 1.0)


@torch.no_grad()
def evaluate(helper: TwoPassPS3, data: dict, budgets: list[int], batch: int = 50) -> dict[str, float]:
    helper.eval()
    size = data["pixel_values"].shape[-1]
    counts = {"top_down": [], "bottom_up": []}
    for start in range(0, len(data["input_ids"]), batch):
        part = slice(start, start + batch)
        pixels, boxes = data["pixel_values"][part], data["boxes"][part]
        prompt, low = helper.top_down_prompt(pixels, data["input_ids"][part], data["attention_mask"][part])
        for name, p in (("top_down", prompt), ("bottom_up", None)):
            out = encode_for_llm(helper.vision_model, pixels, prompt=p, low_res=low, max_select_num_each_scale=budgets)
            counts[name].append((_precision(out.selection_maps, boxes, size), len(pixels)))
    result = {name: sum(p * n for p, n in v) / sum(n for _, n in v) for name, v in counts.items()}
    areas = (data["boxes"][:, 2] - data["boxes"][:, 0]) * (data["boxes"][:, 3] - data["boxes"][:, 1])
    result["chance"] = float((areas / size ** 2).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training scenes (seed 0)")
    parser.add_argument("--eval", type=int, default=200, help="held-out scenes (seed 1)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--time-limit", type=float, default=180.0, help="seconds of training at most")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 16], help="cells per high-res scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze-llm", action="store_true", help="train only the prompt head and the projector")
    args = parser.parse_args(argv)
    size = 256  # tiny-synthetic's largest scale
    t0 = time.monotonic()
    train_data, eval_data = make_data(0, args.train, size), make_data(1, args.eval, size)
    helper = build(args.seed)
    if args.freeze_llm:
        helper.llm.requires_grad_(False)
    t1 = time.monotonic()
    losses = train(helper, train_data, steps=args.steps, time_limit=args.time_limit, seed=args.seed)
    t2 = time.monotonic()
    result = evaluate(helper, eval_data, args.budgets)
    report = {**{k: round(v, 3) for k, v in result.items()}, "steps": len(losses),
              "loss_first": round(sum(losses[:20]) / len(losses[:20]), 4),
              "loss_last": round(sum(losses[-20:]) / len(losses[-20:]), 4),
              "data_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1), "budgets": args.budgets,
              "freeze_llm": args.freeze_llm}
    print(json.dumps(report))
    ok = result["top_down"] >= 0.6 and result["top_down"] >= result["bottom_up"] + 0.15
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
