"""``ps3 mllm toy-data``: a small LLaVA-format dataset of synthetic scenes, for offline walkthroughs,
tests and benchmarks.

Each scene (``ps3.train.synthetic``: 2–4 coloured, textured shapes) becomes one record whose
question names one object by colour and texture ("what shape is the red striped object?") and
whose answer is its shape; the question's turn carries the object's box. Every third record adds
a follow-up turn ("and what colour is the <shape>?" → the colour) so conversations are multi-turn.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..train.synthetic import render_scene


def scene_record(seed: int, index: int, size: int, image_name: str) -> tuple[dict, object]:
    """(LLaVA record, rendered scene) of scene ``index``."""
    scene = render_scene(seed, index, size)
    pick = index % len(scene.objects)
    colour, texture, shape = scene.objects[pick]
    if sum(o[:2] == (colour, texture) for o in scene.objects) > 1:
        side = "left" if scene.boxes[pick][0] < size // 2 else "right"
        question = f"what shape is the {colour} {texture} object on the {side}?"
    else:
        question = f"what shape is the {colour} {texture} object?"
    turns = [{"from": "human", "value": f"<image>\n{question}", "boxes": [scene.boxes[pick]]},
             {"from": "gpt", "value": shape}]
    if index % 3 == 2:
        turns += [{"from": "human", "value": f"and what colour is the {shape}?"}, {"from": "gpt", "value": colour}]
    return {"id": f"scene{index:06d}", "image": image_name, "conversations": turns}, scene


def write_toy_data(out: str | Path, count: int, *, size: int = 224, seed: int = 0) -> Path:
    """Write ``out/images/*.png`` and ``out/data.json`` (``count`` records); returns the JSON path."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32 (pixels), got {size!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        name = f"images/scene{index:06d}.png"
        record, scene = scene_record(seed, index, size, name)
        scene.image.save(out / name)
        records.append(record)
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
