"""Learnability of the selection: does the trained top-down selection find the captioned box?

For every local caption and box of an evaluation set, the text tower turns the caption into a
prompt and the vision tower runs one look (``num_look_close=1``, inference mode). On the first
high-res scale, with ``k`` = the number of cells the box touches (the gt map area-resized to that
grid, > 0):

* top-down precision = the fraction of the ``k`` cells with the highest top-down probability
  that lie in the box;
* bottom-up precision = the same for the bottom-up (prior prompt) probabilities;
* chance = ``k`` / all cells (the expected precision of a random ranking).

:func:`evaluate_learnability` returns the means over all pairs.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model import PS3Model
from ..processor import PS3ImageProcessor
from ..tokenizer import PS3Tokenizer

__all__ = ["LearnabilityResult", "selection_precision", "iter_box_captions", "evaluate_learnability"]


@dataclass
class LearnabilityResult:
    topdown_precision: float
    bottomup_precision: float
    chance: float
    pairs: int

    def as_dict(self) -> dict[str, Any]:
        return {"topdown_precision": self.topdown_precision, "bottomup_precision": self.bottomup_precision,
                "chance": self.chance, "pairs": self.pairs}


def selection_precision(probs: torch.Tensor, gt_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (precision, chance) of ranking cells by ``probs`` (N, h, w) against boxes
    ``gt_maps`` (N, H, W) (nonzero inside). Ties rank in row-major order. Samples whose box
    touches no cell get NaN."""
    if probs.dim() != 3 or gt_maps.dim() != 3 or probs.shape[0] != gt_maps.shape[0]:
        raise ValueError(f"probs (N, h, w) and gt_maps (N, H, W) must have the same N, got "
                         f"{tuple(probs.shape)} and {tuple(gt_maps.shape)}")
    n, h, w = probs.shape
    inside = (F.interpolate(gt_maps.unsqueeze(1).float(), size=(h, w), mode="area").squeeze(1) > 0).flatten(1)
    k = inside.sum(1)
    order = probs.flatten(1).float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    top = rank < k.unsqueeze(1)
    hits = (top & inside).sum(1).float()
    precision = torch.where(k > 0, hits / k.clamp(min=1), torch.full_like(hits, float("nan")))
    chance = torch.where(k > 0, k.float() / (h * w), torch.full_like(hits, float("nan")))
    return precision, chance


def iter_box_captions(image_shards: Sequence[str], text_box_shards: Sequence[str],
                      processor: PS3ImageProcessor) -> Iterator[tuple[torch.Tensor, list[str], torch.Tensor]]:
    """Per usable image: (pixels (3, S, S), its local captions, their gt maps (n, S, S)).

    Images and records are paired by key within each shard pair (:func:`ps3.data.shards.iter_shard`
    reads both); damaged shards, unusable boxes, captions and images are left out (the evaluation
    counts only what can be scored)."""
    from PIL import Image

    from ..data.boxes import box_to_gt_map
    from ..data.shards import IMAGE_EXTENSIONS, iter_shard
    from .captions import clean_caption

    size = processor.image_size
    for image_shard, record_shard in zip(image_shards, text_box_shards):
        records = {sample["__key__"]: sample["json"] for sample in iter_shard(record_shard) if "json" in sample}
        for sample in iter_shard(image_shard):
            key = sample["__key__"]
            data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if data is None or key not in records:
                continue
            try:
                record = json.loads(records[key])
                image = Image.open(io.BytesIO(data))
                image.load()
            except (ValueError, OSError):
                continue
            texts, boxes = record.get("text") or [], record.get("box") or []
            captions, maps = [], []
            for text, box in zip(texts, boxes):
                caption = " ".join(clean_caption(text)) if isinstance(text, str) else ""
                if not caption:
                    continue
                try:
                    maps.append(box_to_gt_map(box, image.size, size))
                except ValueError:
                    continue
                captions.append(caption)
            if captions:
                yield processor.preprocess_image(image), captions, torch.stack(maps)


@torch.no_grad()
def evaluate_learnability(model: PS3Model, tokenizer: PS3Tokenizer,
                          image_shards: str | os.PathLike | Sequence[str],
                          text_box_shards: str | os.PathLike | Sequence[str], *, image_size: int,
                          mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                          batch_size: int = 32, max_pairs: int | None = None,
                          device: str | torch.device = "cpu") -> LearnabilityResult:
    """Mean top-down precision, bottom-up precision and chance over the (caption, box) pairs of
    the evaluation shards (see the module docstring)."""
    from ..data.shards import list_shard_pairs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, records = list_shard_pairs(image_shards, text_box_shards)
    processor = PS3ImageProcessor(image_size=image_size, mean=mean, std=std)
    model = model.to(device).eval()
    sums = torch.zeros(3, dtype=torch.float64)
    pairs = 0
    pending: list[tuple[torch.Tensor, str, torch.Tensor]] = []

    def flush() -> None:
        nonlocal pairs
        pixels = torch.stack([p for p, _, _ in pending]).to(device)
        gt = torch.stack([g for _, _, g in pending]).to(device)
        prompt = model.text_model(tokenizer([c for _, c, _ in pending]).to(device)).prompt
        # Only the selection maps are scored: one low-res pass, then the prompt's and the prior's
        # probabilities without any look (an inference call returns the probabilities it selects by).
        vision = model.vision_model
        low_res = vision.encode_low_res(pixels, keep_kv=False)
        topdown_probs = vision(pixels, prompt=prompt, num_look_close=0, low_res=low_res).selection_probs
        bottomup_probs = vision(pixels, num_look_close=0, low_res=low_res).selection_probs
        topdown, chance = selection_precision(topdown_probs[0], gt)
        bottomup, _ = selection_precision(bottomup_probs[0], gt)
        valid = ~torch.isnan(chance)
        sums.add_(torch.stack([t[valid].double().sum().cpu() for t in (topdown, bottomup, chance)]))
        pairs += int(valid.sum())
        pending.clear()

    for pixels, captions, maps in iter_box_captions(images, records, processor):
        for caption, gt in zip(captions, maps):
            if max_pairs is not None and pairs + len(pending) >= max_pairs:
                break
            pending.append((pixels, caption, gt))
            if len(pending) == batch_size:
                flush()
        if max_pairs is not None and pairs + len(pending) >= max_pairs:
            break
    if pending:
        flush()
    if pairs == 0:
        raise ValueError("the evaluation shards hold no usable local caption with a box")
    topdown, bottomup, chance = (sums / pairs).tolist()
    return LearnabilityResult(topdown, bottomup, chance, pairs)
