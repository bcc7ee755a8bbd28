"""A tiny end-to-end run of benchmarks/hrqa.py: data, pre-training, training, evaluation, report."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hrqa.py"
    spec = importlib.util.spec_from_file_location("hrqa_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ps3 train runs as a subprocess
def test_tiny_pipeline_writes_a_table_with_the_planned_tokens(tmp_path):
    bench = _benchmark()
    out = tmp_path / "run"
    code = bench.main(["--out", str(out), "--train", "6", "--test", "5", "--pretrain-steps", "2", "--steps", "2",
                       "--batch", "3", "--budgets", "40", "--frontends", "low_res,ps3_top_down,internvl_tiling",
                       "--docs", str(tmp_path / "docs")])
    assert code == 0
    assert (out / "encoder" / "config.json").is_file()  # pre-trained with ps3 train on the generator's shards
    result = json.loads((out / "hrqa_results.json").read_text())
    rows = {r["frontend"]: r for r in result["rows"]}
    assert set(rows) == {"low_res", "ps3_top_down", "internvl_tiling"}
    assert rows["low_res"]["tokens"] == 16  # 8x8 low-res grid merged 2x2
    assert rows["ps3_top_down"]["tokens"] == 40 and rows["internvl_tiling"]["tokens"] == 16  # one 64 px tile
    for r in rows.values():
        assert r["n_test"] == 5 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (benchmarks' extra)
        assert (tmp_path / "docs" / "hrqa_results.png").stat().st_size > 1000
    assert "| ps3_top_down |" in (tmp_path / "docs" / "hrqa_results.md").read_text()


def test_wilson_interval():
    bench = _benchmark()
    lo, hi = bench.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert bench.wilson(0, 10)[0] == 0.0
