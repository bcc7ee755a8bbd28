"""ps3.mllm: the k×k merge, the all-cells-selected rule, block-aligned encoding, and the exact LLM
token count checked against what the projector actually returns."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golden import MODEL_DIR
from tolerances import assert_close_paths, assert_same_selection
from ps3 import PS3VisionConfig, PS3VisionModel
from ps3.encoder.request import EncodeRequest
from ps3.mllm.block_looks import BlockCells
from ps3.mllm import (PS3Projector, count_llm_tokens, encode_for_llm, encode_low_res, first_n_scales_for_sizes,
                      merge_grid)


@pytest.fixture(scope="module")
def model():
    return PS3VisionModel.from_pretrained(MODEL_DIR)


def images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_merge_pads_low_res_and_orders_rows():
    x = torch.arange(27 * 27, dtype=torch.float32).view(1, 27, 27, 1)
    merged = merge_grid(x, 2)
    assert merged.shape == (1, 14 * 14, 4)
    assert merged[0, 0].tolist() == [0, 1, 27, 28]  # the block's cells, row-major
    assert merged[0, 13].tolist() == [26, 0, 53, 0]  # right edge: zero padding
    assert merged[0, 14 * 13].tolist() == [702, 703, 0, 0]  # bottom edge
    assert merge_grid(torch.ones(2, 54, 54, 3), 3).shape == (2, 18 * 18, 27)


def test_all_cells_rule_and_ragged_lengths():
    torch.manual_seed(0)
    proj = PS3Projector(4, 8, low_res_grid=(2, 2), num_high_res_scales=2, k=2, scale_embeddings=True)
    with torch.no_grad():
        proj.scale_embed.normal_()
    maps = [torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 5, 6, dtype=torch.long)]
    maps[0][0, 0:2, 2:4] = 1        # a full block (block 1) for image 0
    maps[0][1, 0, 0] = 1            # a lone cell for image 1: encoded, but its block is not kept
    maps[1][0, 4, 0:2] = 1          # cells of the 5th row: no full block there (5 is odd)
    maps[1][1, 2:4, 4:6] = 1        # a full block (row 1, col 2 → block 5) for image 1
    counts = [int(m.sum()) for m in torch.cat([x.flatten(1) for x in maps], 1)]
    tokens = torch.randn(2, 4 + max(counts), 4)
    out = proj(tokens, maps)
    assert out.lengths.tolist() == [1 + 1, 1 + 1] and out.low_res_tokens == 1
    # The kept token of image 0 is the merge of its block's four cells, in selection order.
    expected = proj.fc2(proj.act(proj.fc1(proj.norm(tokens[0, 4:8].reshape(1, 16))))) + proj.scale_embed[1]
    torch.testing.assert_close(out.embeds[0, 1:2], expected)
    # Image 1's lone cell at scale 1 is dropped; its scale-2 block is its 2nd..5th selected tokens.
    expected = proj.fc2(proj.act(proj.fc1(proj.norm(tokens[1, 5:9].reshape(1, 16))))) + proj.scale_embed[2]
    torch.testing.assert_close(out.embeds[1, 1:2], expected)
    assert out.attention_mask.all()


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(14, 300), w=st.integers(14, 300), k=st.sampled_from([1, 2, 3]),
       b1=st.integers(0, 40), b2=st.integers(0, 150), looks=st.sampled_from([0, 1, 2, 3, "all"]),
       first_n=st.sampled_from([None, 1, 2]))
def test_count_equals_projector_output(model, h, w, k, b1, b2, looks, first_n):
    kw = dict(k=k, max_select_num_each_scale=[b1, b2], num_look_close=looks, only_select_first_n_scale=first_n)
    count = count_llm_tokens(model, h, w, **kw)
    with torch.no_grad():
        out = encode_for_llm(model, images(2, h, w), **kw)
        projected = PS3Projector.for_vision_model(model, 16, k=k)(out)
    assert projected.lengths.tolist() == [count.total] * 2
    assert projected.embeds.shape == (2, count.total, 16)
    cells = [int(m[0].sum()) for m in out.selection_maps] if out.selection_maps else [0, 0]
    assert cells == [k * k * n for n in count.per_scale]  # nothing encoded is thrown away
    assert out.last_hidden_state.shape[1] == model.vision_model.low_res_token_num + sum(cells)


def test_count_published_4k():
    config = PS3VisionConfig(ps3_scales=[378, 756, 1512, 3780], max_select_num=2560,
                             max_select_num_each_scale=[85, 340, 2125])
    c = count_llm_tokens(config, 3780, 3780)
    assert (c.low_res, c.per_scale, c.total) == (196, [21, 85, 531], 833)
    assert count_llm_tokens(config, 3780, 3780, num_look_close="all").total == 196 + 27 * 27 + 54 * 54 + 135 * 135
    skip = count_llm_tokens(config, 2000, 1500, only_select_first_n_scale=2)
    assert skip.per_scale[2] == 0 and sum(skip.per_scale) == 637
    assert first_n_scales_for_sizes([(3000, 1000), (2000, 2600), (2700, 10)], [378, 756, 1512, 3780]) == [3, 2, 3]


def test_block_looks_equal_plain_call_when_a_look_covers_everything(model):
    config = PS3VisionConfig.from_dict({**model.config.to_dict(), "max_select_num_each_scale": [64, 256]})
    full = PS3VisionModel(config)
    full.load_state_dict(model.state_dict())
    x = images(2, 224, 224, seed=3)
    with torch.no_grad():
        plain = full(x, num_look_close=1)
        low = encode_low_res(full, x)
        blocks = encode_for_llm(full, x, low_res=low, max_select_num_each_scale=[64, 256])
    if assert_same_selection(blocks.selection_maps, plain.selection_maps, plain.selection_probs):
        for a, b in zip(plain.hidden_states, blocks.hidden_states):
            assert_close_paths(a, b, "block looks vs plain call")


def test_errors(model):
    with pytest.raises(ValueError, match="k"):
        count_llm_tokens(model, 224, 224, k=4)
    with pytest.raises(ValueError, match="only_select_first_n_scale"):
        count_llm_tokens(model, 224, 224, only_select_first_n_scale=3)
    with pytest.raises(ValueError, match=r"max_select_num_each_scale .*ps3_scales=\[56, 112, 224\]"):
        count_llm_tokens(model, 224, 224, max_select_num_each_scale=[10])
    with pytest.raises(ValueError, match="num_token_look_close"):  # the block rule plugged into the encoder
        request = EncodeRequest.build(images(1, 224, 224), width=64, num_token_look_close=10)
        model.vision_model.encode_request(request, BlockCells(2, (8, 16)))
    with pytest.raises(TypeError, match="PS3VisionModel"):
        count_llm_tokens("model", 224, 224)
    x = images(2, 224, 224)
    low = encode_low_res(model, x)
    with pytest.raises(ValueError, match="low_res"):
        encode_for_llm(model, images(1, 224, 224), low_res=low)
    with pytest.raises(ValueError, match="key/value"):
        encode_for_llm(model, x, low_res=model.encode_low_res(x, keep_kv=False))
    with pytest.raises(ValueError, match="only_select_first_n_scale"):
        encode_for_llm(model, x, only_select_first_n_scale=[1, 2, 2])
    with pytest.raises(ValueError, match="selection_maps"):
        PS3Projector.for_vision_model(model, 8)(torch.zeros(1, 20, 64), [torch.zeros(1, 8, 8)])


def test_ragged_batches_match_single_images(model):
    """A list of images of different sizes with per-image skipped scales: one call, per-image
    counts as predicted, and each image's part equal to encoding it alone."""
    sizes, firsts = [(224, 224), (100, 224), (224, 60), (150, 150)], [2, 1, 2, 1]
    pixels = [images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    proj = PS3Projector.for_vision_model(model, 16, k=2)
    kw = dict(max_select_num_each_scale=[20, 40], num_look_close=2)
    with torch.no_grad():
        out = encode_for_llm(model, pixels, prompt=prompt, only_select_first_n_scale=firsts, **kw)
        projected = proj(out)
        singles = [encode_for_llm(model, p[None], prompt=prompt[i:i + 1], only_select_first_n_scale=firsts[i], **kw)
                   for i, p in enumerate(pixels)]
    counts = [count_llm_tokens(model, h, w, only_select_first_n_scale=m, **kw).total
              for (h, w), m in zip(sizes, firsts)]
    assert projected.lengths.tolist() == counts and len(set(counts)) > 1
    # A mixed output says how many looks each image took (fewer where a look took every block).
    assert out.num_looks == [count_llm_tokens(model, h, w, only_select_first_n_scale=m, **kw).num_looks
                             for (h, w), m in zip(sizes, firsts)] == [2, 1, 2, 2]
    for i, (part, single) in enumerate(zip(out.per_sample(), singles)):
        if assert_same_selection(part.selection_maps, single.selection_maps, single.selection_probs):
            assert_close_paths(part.last_hidden_state, single.last_hidden_state, "ragged vs single")
        alone = proj(single)
        assert_close_paths(projected.embeds[i:i + 1, :counts[i]], alone.embeds, "ragged vs single projection")
    assert not projected.embeds[~projected.attention_mask].any()


def test_old_option_names_still_work_with_a_deprecation_warning(model):
    x = images(1, 224, 224, seed=4)
    with torch.no_grad():
        new = encode_for_llm(model, x, max_select_num_each_scale=[8, 16], num_look_close=2)
        with pytest.warns(DeprecationWarning, match="num_looks is deprecated: pass num_look_close"):
            with pytest.warns(DeprecationWarning, match="budgets is deprecated: pass max_select_num_each_scale"):
                old = encode_for_llm(model, x, budgets=[8, 16], num_looks=2)
    assert torch.equal(old.last_hidden_state, new.last_hidden_state)  # same kernels, same data
    with pytest.warns(DeprecationWarning, match="budgets"):
        assert count_llm_tokens(model, 224, 224, budgets=[8, 16]) == count_llm_tokens(
            model, 224, 224, max_select_num_each_scale=[8, 16])
    with pytest.raises(TypeError, match="not both"):
        count_llm_tokens(model, 224, 224, budgets=[8, 16], max_select_num_each_scale=[8, 16])
