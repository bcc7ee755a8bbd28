"""Small LLaVA datasets and training runs the ``test_mllm_*`` tests share (``--llm tiny`` on the
tiny PS3 fixture)."""
from __future__ import annotations

import json
from pathlib import Path

from golden import MODEL_DIR
from ps3.mllm.toy_data import write_toy_data
from ps3.mllm.train_setup import MLLMTrainParams

BUDGETS = [16, 64]  # cells per high-res scale: 4 + 16 blocks of 2x2 on the fixture's 8x8 and 16x16 grids


def toy_dataset(root: Path, count: int, answer: str | None = None) -> Path:
    """``count`` synthetic scenes as LLaVA JSON; ``answer`` replaces every answer (a known one)."""
    path = write_toy_data(root, count, size=112)
    if answer is not None:
        records = json.loads(path.read_text())
        for record in records:
            for turn in record["conversations"][1::2]:
                turn["value"] = answer
        path.write_text(json.dumps(records))
    return path


def params(data: Path, out: Path, **kwargs) -> MLLMTrainParams:
    base = dict(data=str(data), images=str(data.parent), out=str(out), vision=str(MODEL_DIR), llm="tiny",
                batch=4, log_every=1, save_every=100, budgets=BUDGETS, quiet=True)
    base.update(kwargs)
    return MLLMTrainParams(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["lm"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def yes_dataset(root: Path) -> Path:
    """3 scenes and 9 text-only records, every answer "yes": 16 steps of sft at lr 3e-3 teach the
    tiny LLM to answer exactly that (greedy), cheaply (most rows skip the encoder)."""
    path = toy_dataset(root, 3, answer="yes")
    records = json.loads(path.read_text())
    records += [{"id": f"text{i}", "conversations": [{"from": "human", "value": f"question number {i}?"},
                                                     {"from": "gpt", "value": "yes"}]} for i in range(9)]
    path.write_text(json.dumps(records))
    return path
