"""A small run of benchmarks/mllm_learnability.py: a question naming one object steers the
selection (through a tiny random LLM and a trained prompt head) into that object's box on
held-out scenes, well above the same encoder's bottom-up selection."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "mllm_learnability.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mllm_learnability", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_question_names_one_object():
    bench = load_benchmark()
    objects = [("red", "striped", "circle"), ("red", "striped", "star"), ("blue", "solid", "square")]
    assert bench.question(objects, 0) == "where is the red striped circle ?"
    assert bench.question(objects, 2) == "what shape is the blue solid object ?"


def test_top_down_selection_learns_the_named_box():
    bench = load_benchmark()
    train_data, eval_data = bench.make_data(0, 150, 256), bench.make_data(1, 50, 256)
    helper = bench.build(0)
    losses = bench.train(helper, train_data, steps=150, batch=16, lr=5e-3)
    result = bench.evaluate(helper, eval_data, [4, 16])
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    assert result["top_down"] >= 0.5 and result["top_down"] >= result["bottom_up"] + 0.15, result
    assert result["bottom_up"] > result["chance"] > 0.02
