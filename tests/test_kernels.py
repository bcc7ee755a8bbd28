"""Kernel choice by measurement (ps3.encoder.kernels): the candidates agree, the timing budget holds, a
forced or persisted choice times nothing, and the cache and the environment are read safely.

Tolerances: two formulations of one op in bf16 round at different places. Attention: the test
in test_precision.py's module docstring (2^-6 · max|v|). The ConvNet stem: a 2352-term dot
product per output, rounded to bf16 (2^-9 relative) before its LayerNorm, whose output is O(1):
2^-5 absolute (the largest seen is 2^-6). In float32 the two stems differ in summation order only:
PATH_RTOL / PATH_ATOL.
"""
import json
import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ps3.encoder.kernels as kernels
import ps3.encoder.precision as precision
from ps3.encoder.kernels import OPS, KernelChooser, Op, shape_class
from ps3.encoder.selection_features import HighresSelectionFeatures
from tolerances import assert_close_paths


def rand(*shape, seed=0, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(autouse=True)
def no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PS3_KERNEL_CACHE", "off")
    monkeypatch.setenv("PS3_CPU_LOW_PRECISION", "native")  # the bf16 paths, emulated without units


@pytest.mark.parametrize("masked", [False, True])
def test_forced_attention_choices_agree(monkeypatch, masked):
    q, k, v = rand(1, 4, 300, 64, seed=1), rand(1, 4, 420, 64, seed=2), rand(1, 4, 420, 64, seed=3)
    mask = (torch.rand(1, 1, 1, 420, generator=torch.Generator().manual_seed(4)) > 0.3) if masked else None
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    outs = {}
    for name in ("sdpa", "chunked"):
        monkeypatch.setenv("PS3_ATTENTION", name)
        with torch.no_grad():
            outs[name] = precision.attention(q, k, v, mask)
        torch.testing.assert_close(outs[name].float(), want, rtol=0, atol=2 ** -6 * v.abs().max().item())
    torch.testing.assert_close(outs["sdpa"].float(), outs["chunked"].float(), rtol=0,
                               atol=2 ** -6 * v.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_stem_choices_agree(monkeypatch, dtype):
    torch.manual_seed(0)
    module = HighresSelectionFeatures(32, 16, 1, 28).eval().to(dtype)
    x = (torch.rand(2, 3, 224, 252, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)
    outs = {}
    for name in ("conv", "matmul"):
        monkeypatch.setenv("PS3_CONV_STEM", name)
        with torch.no_grad():
            outs[name] = module._stem(x)
        assert outs[name].shape == (2, 32, 8, 9)
    if dtype == torch.float32:
        assert_close_paths(outs["matmul"], outs["conv"], "stem")
    else:
        torch.testing.assert_close(outs["matmul"].float(), outs["conv"].float(), rtol=0, atol=2 ** -5)


def _op(budget: float) -> Op:
    return Op("probe_test", ("one", "two"), "PS3_PROBE_TEST", "a test op", budget_s=budget)


def _matmuls(n: int, times: int):
    a = torch.randn(n, n)
    return lambda: [a @ a for _ in range(times)][-1]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([32, 64, 96, 128])), min_size=1, max_size=8),
       st.sampled_from([0.0, 0.002, 0.01, 0.05]))
def test_timing_never_exceeds_the_budget(calls, budget):
    """Random calls over a few shape classes: what timing costs beyond the calls stays within
    the budget, except by what a run took beyond its allowance (counted in overrun_s)."""
    chooser = KernelChooser(budget_s=1.0)
    op = _op(budget)
    with env(PS3_KERNEL_CACHE="off"):
        for cls, n in calls:
            out = chooser.run(op, f"class {cls}", torch.device("cpu"), {"one": _matmuls(n, 1), "two": _matmuls(n, 2)},
                              "two")
            assert out.shape == (n, n)
    assert chooser.spent_s <= budget + chooser.overrun_s + 1e-9
    assert chooser.overrun_s <= chooser.spent_s
    for choice in chooser.choices.values():
        assert choice.source in ("measured", "measured in part (budget)", "default (budget spent)")
        if choice.source != "measured":
            assert choice.winner == "two"  # the default stands where a candidate was not timed


def test_a_measured_choice_is_kept_and_the_faster_wins():
    chooser = KernelChooser()
    calls = {"one": 0, "two": 0}

    def counted(name, fn):
        def run():
            calls[name] += 1
            return fn()
        return run

    cands = {"one": counted("one", _matmuls(256, 1)), "two": counted("two", _matmuls(256, 8))}
    chooser.run(_op(1.0), "k", torch.device("cpu"), cands, "two")
    choice = chooser.choices[("probe_test", "k")]
    assert choice.source == "measured" and choice.winner == "one" and set(choice.seconds) == {"one", "two"}
    assert choice.cost_s <= 1.0 and chooser.spent_s == choice.cost_s
    before = dict(calls)
    chooser.run(_op(1.0), "k", torch.device("cpu"), cands, "two")
    assert calls == {"one": before["one"] + 1, "two": before["two"]}  # the winner only, untimed
    assert chooser.spent_s == choice.cost_s


def test_forced_and_persisted_choices_time_nothing(tmp_path, monkeypatch):
    calls = []
    cands = {"one": lambda: calls.append("one"), "two": lambda: calls.append("two")}
    cache = tmp_path / "kernels.json"
    monkeypatch.setenv("PS3_KERNEL_CACHE", str(cache))
    monkeypatch.setenv("PS3_PROBE_TEST", "one")
    forced = KernelChooser()
    forced.run(_op(1.0), "k", torch.device("cpu"), cands, "two")
    assert calls == ["one"] and forced.spent_s == 0 and forced.choices[("probe_test", "k")].source == "forced"
    assert not cache.exists()  # a forced choice is not a measurement
    monkeypatch.delenv("PS3_PROBE_TEST")
    first = KernelChooser()  # a process that measures and persists
    first.run(_op(1.0), "k", torch.device("cpu"), cands, "two")
    winner = first.choices[("probe_test", "k")].winner
    saved = json.loads(cache.read_text())["machines"][kernels.machine_key()]
    assert saved["probe_test k"]["winner"] == winner
    calls.clear()
    second = KernelChooser()  # the next process reads it
    second.run(_op(1.0), "k", torch.device("cpu"), cands, "two")
    assert calls == [winner] and second.spent_s == 0 and second.choices[("probe_test", "k")].source == "persisted"


def test_unreadable_cache_and_bad_forcing_are_handled(tmp_path, monkeypatch):
    cache = tmp_path / "kernels.json"
    cache.write_text("{not json")
    monkeypatch.setenv("PS3_KERNEL_CACHE", str(cache))
    chooser = KernelChooser()
    chooser.run(_op(1.0), "k", torch.device("cpu"), {"one": _matmuls(64, 1), "two": _matmuls(64, 2)}, "two")
    assert chooser.choices[("probe_test", "k")].source.startswith("measured")
    assert "probe_test k" in json.loads(cache.read_text())["machines"][kernels.machine_key()]  # rewritten
    monkeypatch.setenv("PS3_ATTENTION", "flash")
    q = rand(1, 2, 300, 64)
    with pytest.raises(ValueError, match="PS3_ATTENTION.*sdpa, chunked"), torch.no_grad():
        precision.attention(q, q, q)
    monkeypatch.setenv("PS3_KERNEL_CACHE", "off")
    assert kernels.cache_path() is None


def test_attention_records_its_choice_with_rates(monkeypatch):
    monkeypatch.delenv("PS3_ATTENTION", raising=False)
    monkeypatch.setattr(kernels, "_CHOOSER", KernelChooser())
    q, k = rand(2, 3, 600, 64, seed=1), rand(2, 3, 700, 64, seed=2)
    with torch.no_grad():
        out = precision.attention(q, k, k)
    assert out.shape == q.shape
    (choice,) = kernels.chooser().choices.values()
    assert choice.op == "attention" and choice.key.startswith("cpu bfloat16 no mask B*H 8 N 1024 P 1024 d 64")
    assert choice.winner in OPS["attention"].candidates and choice.flops == 4.0 * 6 * 512 * 700 * 64
    assert "GFLOP/s" in choice.describe() or choice.source.startswith("default")
    assert 0 <= kernels.chooser().spent_s <= OPS["attention"].budget_s


def test_shape_class_rounds_up_to_powers_of_two():
    assert shape_class(1, 2, 3, 729, 2560, 3289) == "1x2x4x1024x4096x4096"
