"""Selection arithmetic: budgets, spill-over, look plans and top-k cell choice (incl. properties)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ps3.encoder.selection import default_budgets, look_budgets, plan_looks, scale_image_size, select_cells


def test_published_budgets():
    assert default_budgets(2560, [378, 756, 1512, 3780]) == [85, 341, 2134]
    assert default_budgets(2560, [378, 756, 1512]) == [512, 2048]
    assert default_budgets(80, [56, 112, 224]) == [16, 64]
    assert default_budgets(99, [56, 112, 224], each_scale=[9, 90]) == [9, 90]


def test_budget_variants():
    b = [85, 341, 2134]
    assert look_budgets(b, [10**6] * 3, num_tokens=1000) == [33, 133, 834]
    assert look_budgets(b, [10**6] * 3, first_n_scales=2) == [510, 2049, 1]
    assert look_budgets(b, [50, 10**6, 10**6]) == [50, 376, 2134]  # 35 spill to scale 2
    assert look_budgets(b, [50, 20, 10**6]) == [50, 20, 2490]
    assert look_budgets(b, [0, 0, 100]) == [0, 0, 100]  # lost past the last scale


def test_nonsquare_sizes():
    assert scale_image_size(1500, 2250, [378, 756, 1512, 3780], 14, 0) == (378, 378)
    assert scale_image_size(1500, 2250, [378, 756, 1512, 3780], 14, 3) == (int(378 / 2250 * 1500) // 14 * 14 * 10, 3780)
    assert scale_image_size(2250, 1500, [378, 756], 14, 1) == (756, 252 * 2)


def test_token_look_close_splits_last_look():
    plan = plan_looks([(8, 8), (16, 16)], [16, 64], 1, num_token_look_close=130)
    assert [sum(look[i][0] for i in range(2)) for look in plan.budgets] == [80, 50]


def test_select_cells_skips_taken_cells():
    probs = [torch.tensor([[[0.9, 0.8], [0.7, 0.1]]])]
    taken = [torch.tensor([[[True, False], [False, False]]])]
    new = select_cells(probs, taken, [[2]])[0]
    assert new.tolist() == [[[False, True], [True, False]]]


def test_default_ties_are_torch_topk_choices(monkeypatch):
    """Upstream selects with torch.topk over the flattened map: the default takes the same cells."""
    monkeypatch.delenv("PS3_TIE_RULE", raising=False)
    tied = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0)).mul(3).floor().div(3)
    got = select_cells([tied], None, [[5, 5, 9]])[0].flatten(1)
    for b, k in enumerate([5, 5, 9]):
        want = torch.zeros(42, dtype=torch.bool)
        want[tied[b].flatten().topk(k).indices] = True
        assert torch.equal(got[b], want)


def test_lowest_index_rule_on_every_dtype(monkeypatch):
    monkeypatch.setenv("PS3_TIE_RULE", "lowest_index")
    tied = [torch.full((2, 4, 4), 0.5)]
    got = select_cells(tied, None, [[3, 5]])[0].flatten(1)
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2] and got[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    # above the boundary always taken; at it, lowest index first; in bf16 as in float32
    row = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9, 0.1]])
    for dtype in (torch.float32, torch.bfloat16):
        got = select_cells([row.to(dtype).view(1, 2, 3)], None, [[3]])[0].flatten()
        assert got.nonzero().flatten().tolist() == [0, 1, 4]
    monkeypatch.setenv("PS3_TIE_RULE", "random")
    with pytest.raises(ValueError, match="PS3_TIE_RULE"):
        select_cells(tied, None, [[3, 5]])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(0, 40))
def test_top_cells_is_a_stable_descending_sort_prefix(values, k):
    """The lowest_index rule takes the first k of a stable sort by descending value."""
    from ps3.encoder.selection import top_cells

    flat = torch.tensor([values], dtype=torch.float32) / 4
    k = min(k, flat.shape[1])
    want = torch.zeros_like(flat, dtype=torch.bool)
    want[0, torch.sort(flat[0], descending=True, stable=True).indices[:k]] = True
    assert torch.equal(top_cells(flat, [k], "lowest_index"), want)


grids = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(grids=grids, budgets=st.data(), batch=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_all_covers_every_cell_exactly_once(grids, budgets, batch, seed):
    max_budgets = budgets.draw(st.lists(st.integers(1, 30), min_size=len(grids), max_size=len(grids)))
    plan = plan_looks(grids, max_budgets, batch, num_look_close="all")
    g = torch.Generator().manual_seed(seed)
    probs = [torch.rand(batch, h, w, generator=g) for h, w in grids]
    taken = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in grids]
    for look in plan.budgets:
        assert sum(k[0] for k in look) <= sum(max_budgets)  # a look never exceeds the budget
        new = select_cells(probs, taken, look)
        for t, n, ks in zip(taken, new, look):
            assert not (t & n).any()  # never a cell twice
            assert n.flatten(1).sum(1).tolist() == ks  # exactly the planned count per sample
        taken = [t | n for t, n in zip(taken, new)]
    assert all(bool(t.all()) for t in taken)


@settings(max_examples=60, deadline=None)
@given(grids=grids, budgets=st.data(), looks=st.integers(1, 5))
def test_budgets_honoured_with_spill_over(grids, budgets, looks):
    max_budgets = budgets.draw(st.lists(st.integers(1, 30), min_size=len(grids), max_size=len(grids)))
    plan = plan_looks(grids, max_budgets, 1, num_look_close=looks)
    cells = [h * w for h, w in grids]
    remaining = list(cells)
    for look in plan.budgets:
        ks = [k[0] for k in look]
        assert all(0 <= k <= r for k, r in zip(ks, remaining))
        # Whatever a scale could not take moved on: the look is full unless the last scales ran dry.
        assert sum(ks) == sum(max_budgets) or ks[-1] == remaining[-1]
        remaining = [r - k for r, k in zip(remaining, ks)]


@pytest.mark.parametrize("bad", [dict(num_look_close=-2), dict(num_look_close=1.5), dict(num_look_close="any"),
                                 dict(num_token_look_close=True), dict()])
def test_plan_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        plan_looks([(4, 4)], [4], 1, **bad)
