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
    # Four steps from random weights cannot reach top-down precision 0.6 with a 0.1 margin over
    # bottom-up and chance: the run says so and exits 1.
    code = demo.main(["--run-dir", str(root), *TOY])
    result = json.loads((root / "result.json").read_text())
    assert code == 1 and result["target_met"] is False and result["pairs"] > 0 and result["matmul_gflops"] > 0
    figures = LearnabilityResult(result["topdown_precision"], result["bottomup_precision"], result["chance"],
                                 pairs=result["pairs"])
    assert not demo.learnability_met(figures) and result["training_reused"] is False
    assert result["train_steps"] in (2, 4) and result["stopped_early"] == (result["train_steps"] == 2)
    for name in ("bottomup", "topdown"):
        assert (root / "viz" / name / "heldout_scale1.png").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (root / "model").iterdir()}
    out = capsys.readouterr().out
    assert "learnability on" in out and f"top-down precision  {figures.topdown_precision:.3f}" in out
    assert "NOT met" in out

    # A rerun reuses the training (no step trained again), prints no time estimate and says so.
    metrics = (root / "run" / "metrics.jsonl").read_text()
    assert demo.main(["--run-dir", str(root), *[a for a in TOY if a != "--quiet"]]) == code
    assert (root / "run" / "metrics.jsonl").read_text() == metrics
    out = capsys.readouterr().out
    assert "expect about" not in out and "is reused (pass --fresh to train again)" in out
    assert "training steps (reused from the earlier run)" in out
    assert json.loads((root / "result.json").read_text())["training_reused"] is True


def test_target_rule_and_time_estimate():
    def result(top, bottom, chance):
        return LearnabilityResult(top, bottom, chance, pairs=100)

    assert demo.learnability_met(result(0.65, 0.3, 0.1))
    assert not demo.learnability_met(result(0.59, 0.3, 0.1))  # below the target
    assert not demo.learnability_met(result(0.65, 0.56, 0.1))  # not 0.1 above bottom-up
    assert not demo.learnability_met(result(0.62, 0.3, 0.1), extra=0.03)  # the check's margin
    slow, fast = demo.expected_seconds(64.0, 200, 50), demo.expected_seconds(204.0, 200, 50)
    assert slow == pytest.approx(fast * 204 / 64) and demo.expected_seconds(64.0, 400, 50) > slow
