"""The demo pipeline at toy size: data, training with held-out checks, export, heatmaps and the
learnability summary, all through function calls; a second run reuses the finished one."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("webdataset")

from ps3 import demo  # noqa: E402
from ps3.train.evaluate import LearnabilityResult  # noqa: E402

TOY = ["--train-images", "24", "--eval-images", "6", "--check-images", "6", "--max-steps", "4", "--check-every", "2",
       "--batch-size", "8", "--workers", "0", "--quiet"]


def test_toy_demo_runs_end_to_end_and_reuses_its_run(tmp_path, capsys):
    root = tmp_path / "demo"
    code = demo.main(["--run-dir", str(root), *TOY])
    assert code in (0, 1)  # four steps rarely meet the target; the summary says which
    result = json.loads((root / "result.json").read_text())
    assert result["target_met"] == (code == 0) and result["pairs"] > 0 and result["matmul_gflops"] > 0
    assert result["train_steps"] in (2, 4) and result["stopped_early"] == (result["train_steps"] == 2)
    for name in ("bottomup", "topdown"):
        assert (root / "viz" / name / "heldout_scale1.png").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (root / "model").iterdir()}
    out = capsys.readouterr().out
    assert "learnability on" in out and "top-down precision" in out

    metrics = (root / "run" / "metrics.jsonl").read_text()
    assert demo.main(["--run-dir", str(root), *TOY]) == code  # reused: no step trained again
    assert (root / "run" / "metrics.jsonl").read_text() == metrics


def test_target_rule_and_time_estimate():
    def result(top, bottom, chance):
        return LearnabilityResult(top, bottom, chance, pairs=100)

    assert demo.learnability_met(result(0.65, 0.3, 0.1))
    assert not demo.learnability_met(result(0.59, 0.3, 0.1))  # below the target
    assert not demo.learnability_met(result(0.65, 0.56, 0.1))  # not 0.1 above bottom-up
    assert not demo.learnability_met(result(0.62, 0.3, 0.1), extra=0.03)  # the check's margin
    slow, fast = demo.expected_seconds(64.0, 200, 50), demo.expected_seconds(204.0, 200, 50)
    assert slow == pytest.approx(fast * 204 / 64) and demo.expected_seconds(64.0, 400, 50) > slow
