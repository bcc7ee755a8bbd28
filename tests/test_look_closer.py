"""Look closer: a later call on the same image passes the cells encoded so far
(``old_selection_maps``, upstream's name) and the earlier low-res pass, and encodes only new cells.
Looks of one call do not see each other, so two calls of one look equal one call of two looks."""
import pytest
import torch

import ps3
from golden import MODEL_DIR
from tolerances import assert_close_paths
from ps3.encoder.selection import plan_looks
from ps3.mllm.block_looks import encode_for_llm


@pytest.fixture(scope="module")
def model():
    return ps3.PS3VisionModel.from_pretrained(MODEL_DIR).eval()


def pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def feature_maps(model, out):
    return model.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)


@torch.no_grad()
def test_two_calls_of_one_look_equal_one_call_of_two(model):
    x = pixels(2, 3, 224, 160)
    low = model.encode_low_res(x)
    first = model(x, num_look_close=1, low_res=low)
    second = model(x, num_look_close=1, low_res=low, old_selection_maps=first.selection_maps)
    both = model(x, num_look_close=2)
    for a, b, ab in zip(first.selection_maps, second.selection_maps, both.selection_maps):
        assert not (a.bool() & b.bool()).any(), "a cell was encoded twice"
        assert torch.equal(a + b, ab)
    assert second.last_hidden_state.shape == first.last_hidden_state.shape
    maps = [feature_maps(model, out)[1:] for out in (first, second, both)]
    for fa, fb, fab in zip(*maps):
        assert_close_paths(fa + fb, fab, "look 1 + look 2 vs one call of two looks")


@torch.no_grad()
def test_all_after_old_maps_encodes_exactly_the_rest(model):
    x = pixels(1, 3, 224, 224, seed=1)
    low = model.encode_low_res(x)
    first = model(x, num_token_look_close=30, low_res=low)
    rest = model(x, num_look_close="all", low_res=low, old_selection_maps=first.selection_maps)
    for a, b in zip(first.selection_maps, rest.selection_maps):
        assert torch.equal(a + b, torch.ones_like(a))
    counts = model.count_tokens(224, 224, num_look_close="all")
    assert first.last_hidden_state.shape[1] + rest.last_hidden_state.shape[1] - 16 == counts.total
    everything = [torch.ones_like(a) for a in first.selection_maps]
    done = model(x, num_look_close="all", low_res=low, old_selection_maps=everything)
    assert done.last_hidden_state.shape[1] == 16 and all(m.sum() == 0 for m in done.selection_maps)


@torch.no_grad()
def test_mixed_batch_takes_its_own_padded_maps_back(model):
    images = [pixels(3, 224, 160, seed=2), pixels(3, 112, 200, seed=3)]
    first = model(images, num_look_close=1)
    second = model(images, num_look_close=1, old_selection_maps=first.selection_maps)
    both = model(images, num_look_close=2)
    for a, b, ab in zip(first.selection_maps, second.selection_maps, both.selection_maps):
        assert not (a.bool() & b.bool()).any()
        assert torch.equal(a + b, ab)


@torch.no_grad()
def test_llm_blocks_are_never_taken_twice(model):
    x = pixels(2, 3, 224, 160, seed=4)
    low = model.encode_low_res(x)
    first = encode_for_llm(model, x, low_res=low, num_look_close=1)
    second = encode_for_llm(model, x, low_res=low, num_look_close=1, old_selection_maps=first.selection_maps)
    both = encode_for_llm(model, x, low_res=low, num_look_close=2)
    for a, b, ab in zip(first.selection_maps, second.selection_maps, both.selection_maps):
        assert not (a.bool() & b.bool()).any()
        assert torch.equal(a + b, ab)


def test_plan_counts_only_the_cells_left():
    plan = plan_looks([(4, 4), (8, 8)], [4, 16], 2, num_look_close="all", encoded=[[0, 0], [14, 60]])
    assert plan.tokens_per_scale(0) == [16, 64]
    assert plan.tokens_per_scale(1) == [2, 4]


def test_bad_old_maps_say_what_to_pass(model):
    x = pixels(1, 3, 224, 224, seed=5)
    with pytest.raises(ValueError, match="one map per high-res scale"):
        model(x, num_look_close=1, old_selection_maps=[torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match=r"old_selection_maps\[1\]"):
        model(x, num_look_close=1, old_selection_maps=[torch.zeros(1, 8, 8), torch.zeros(1, 4, 4)])
    with pytest.raises(TypeError, match="list"):
        model(x, num_look_close=1, old_selection_maps=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="not for pre-training"):
        model(x, output_hidden_states=False, old_selection_maps=[torch.zeros(1, 8, 8), torch.zeros(1, 16, 16)])
