"""Any batch in one call: lists of images of different sizes with per-sample budgets, split back
with per_sample() into exactly what single-image calls return; budgets by VILA-HD's rule; images
smaller than one patch."""
import random

import pytest
import torch

import ps3
from golden import MODEL_DIR
from tolerances import assert_close_paths, assert_same_selection
from ps3.encoder.looks import MAX_PADDING, plan_passes
from ps3.encoder.request import EncodeRequest
from ps3.encoder.selection_pipeline import TopKCells

SIZES = [(224, 224), (224, 56), (56, 224), (100, 180), (150, 224), (60, 240), (240, 60), (224, 160), (33, 47)]


@pytest.fixture(scope="module")
def model():
    return ps3.PS3VisionModel.from_pretrained(MODEL_DIR).eval()


def image(h, w, seed):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same_as_single(one, ref):
    assert one.last_hidden_state.shape == ref.last_hidden_state.shape
    assert len(one.hidden_states) == len(ref.hidden_states)
    if ref.selection_maps is None:
        assert one.selection_maps is None
        same = True
    else:
        same = assert_same_selection(one.selection_maps, ref.selection_maps, ref.selection_probs)
    low = 16  # the fixture's low-res tokens do not depend on the selection
    for a, b in zip(one.hidden_states, ref.hidden_states):
        assert_close_paths(a if same else a[:, :low], b if same else b[:, :low], "hidden_states")
    for field in ("selection_probs", "bottomup_selection_probs", "topdown_selection_probs"):
        got, want = getattr(one, field), getattr(ref, field)
        assert (got is None) == (want is None), field
        for a, b in zip(got or [], want or []):
            assert_close_paths(a, b, field)
    assert (one.pooled_output is None) == (ref.pooled_output is None)
    if ref.pooled_output is not None:
        assert_close_paths(one.pooled_output, ref.pooled_output, "pooled_output")


def random_call(rng: random.Random, batch: int):
    sizes = [rng.choice(SIZES) for _ in range(batch)]
    images = [image(h, w, rng.randrange(10**6)) for h, w in sizes]
    budget = rng.choice(["looks", "tokens", "both"])
    looks = [rng.choice([0, 1, 2, "all"]) for _ in range(batch)] if budget != "tokens" else None
    tokens = [rng.choice([0, 7, 30, 80, 130]) for _ in range(batch)] if budget != "looks" else None
    if budget == "both":
        tokens = [min(t, 80) for t in tokens]  # both given: the token count shrinks the first look
    kw = dict(num_look_close=looks, num_token_look_close=tokens,
              only_select_first_n_scale=[rng.choice([1, 2]) for _ in range(batch)] if rng.random() < 0.6 else None,
              smooth_selection_prob=rng.random() < 0.3)
    if rng.random() < 0.5:
        kw["prompt"] = torch.randn(batch, 64, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    if rng.random() < 0.5:
        kw["gt_selection_maps"] = [None if rng.random() < 0.3 else (torch.rand(h, w) > 0.7).float() for h, w in sizes]
    return images, kw


def single_kwargs(kw, b):
    one = {}
    for name, value in kw.items():
        if name == "prompt":
            one[name] = value[b:b + 1]
        elif name == "gt_selection_maps":
            one[name] = value[b][None] if value[b] is not None else None
        else:
            one[name] = value[b] if isinstance(value, list) else value
    return one


@pytest.mark.parametrize("seed", range(10))
def test_ragged_call_equals_single_calls(model, seed):
    rng = random.Random(seed)
    images, kw = random_call(rng, rng.randint(2, 5))
    with torch.no_grad():
        out = model(images, **kw)
        parts = out.per_sample()
        assert len(parts) == len(images) and out.lengths.shape == (len(images),)
        for b, one in enumerate(parts):
            ref = model(images[b][None], **single_kwargs(kw, b))
            assert int(out.lengths[b]) == ref.last_hidden_state.shape[1]
            assert_same_as_single(one, ref)
    # Padding past a sample's length is zeros.
    width = out.last_hidden_state.shape[1]
    pad = torch.arange(width)[None, :] >= out.lengths[:, None]
    assert bool((out.last_hidden_state[pad] == 0).all())


def test_uniform_list_is_the_tensor_call(model):
    x = torch.stack([image(224, 160, s) for s in range(3)])
    with torch.no_grad():
        want = model(x, num_look_close=2)
        got = model(list(x), num_look_close=[2, 2, 2])
    assert_close_paths(got.last_hidden_state, want.last_hidden_state, "list vs tensor call")
    assert want.lengths is None and got.lengths.tolist() == [want.last_hidden_state.shape[1]] * 3
    assert_close_paths(torch.cat([p.last_hidden_state for p in got.per_sample()]), want.last_hidden_state, "per_sample")


def test_ragged_pretraining_mode_pools_each_image_as_alone(model):
    sizes = [(224, 224), (60, 240), (100, 180)]
    images = [image(h, w, i) for i, (h, w) in enumerate(sizes)]
    gts = [(torch.rand(h, w, generator=torch.Generator().manual_seed(9)) > 0.6).float() for h, w in sizes]
    glob = torch.tensor([[False], [False], [True]])
    with torch.no_grad():
        out = model(images, output_hidden_states=False, gt_selection_maps=gts, pool_gt_token_only=True,
                    is_global_text=glob, num_token_look_close=[80, 40, 80])
        for b, one in enumerate(out.per_sample()):
            ref = model(images[b][None], output_hidden_states=False, gt_selection_maps=gts[b][None],
                        pool_gt_token_only=True, is_global_text=glob[b:b + 1],
                        num_token_look_close=[80, 40, 80][b])
            if assert_same_selection(one.selection_maps, ref.selection_maps, ref.selection_probs):
                assert_close_paths(one.pooled_output, ref.pooled_output, "pooled_output")


def test_ragged_call_backprops(model):
    images = [image(224, 224, 0), image(60, 240, 1)]
    model.zero_grad()
    out = model(images, num_token_look_close=[80, 30])
    out.last_hidden_state.sum().backward()
    grad = model.vision_model.trunk.blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


def test_token_counts_per_sample(model):
    sizes = [(224, 224), (60, 240), (10, 300)]
    looks, first_n = [1, "all", 2], [2, 1, 2]
    counts = model.count_tokens(sizes, num_look_close=looks, only_select_first_n_scale=first_n)
    with torch.no_grad():
        out = model([image(h, w, 0) for h, w in sizes], num_look_close=looks, only_select_first_n_scale=first_n)
    assert [c.total for c in counts] == out.lengths.tolist()
    assert counts[0] == model.count_tokens(224, 224, num_look_close=1, only_select_first_n_scale=2)


def test_every_pass_stays_within_the_padding_bound():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([0, rng.randint(1, 300), 80, 80]) for _ in range(rng.randint(1, 30))]
        min_rows = rng.randint(1, 6)
        passes = plan_passes(lengths, min_rows, rng.choice([None, 1, 500]))
        assert sorted(i for p in passes for i in p) == [i for i, n in enumerate(lengths) if n > 0]
        for p in passes:
            assert max(lengths[i] for i in p) * len(p) <= MAX_PADDING * sum(lengths[i] for i in p)


def test_first_n_scales_by_vila_hd_rule():
    scales = [378, 756, 1512, 3780]  # 4K: threshold (1512 + 3780) / 2 = 2646, kept only when strictly above
    assert ps3.first_n_scales_for_sizes([(2645, 100), (100, 2646), (2647, 10), (4000, 3000), (378, 378)],
                                        scales) == [2, 2, 3, 3, 2]
    assert ps3.first_n_scales_for_sizes([torch.zeros(3, 50, 2700)], scales) == [3]
    # 1.5K models (largest scale ≤ 2000 px) never skip, however small the image.
    assert ps3.first_n_scales_for_sizes([(10, 10), (1000, 1000), (2000, 100)], [378, 756, 1512]) == [2, 2, 2]
    assert ps3.first_n_scales_for_sizes([(100, 100)], [56, 112]) == [1]  # one high-res scale: always kept
    assert ps3.first_n_scales_for_sizes([(100, 100)], [378, 3780]) == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(num_look_close=[1, 2]), "num_look_close has 2 entries for a batch of 3"),
    (dict(num_token_look_close=[10, None, 10]), "num_token_look_close mixes None"),
    (dict(num_look_close=[1, 2.5, 1]), "num_look_close must be"),
    (dict(num_look_close=[1, [2], 1]), "num_look_close entries must be"),
    (dict(num_look_close=1, only_select_first_n_scale=[1, 2]), "only_select_first_n_scale has 2 entries"),
    (dict(num_look_close=1, only_select_first_n_scale=[1, "2", 1]), "only_select_first_n_scale must be"),
    (dict(num_look_close=1, gt_selection_maps=[torch.ones(5, 5)]), "gt_selection_maps has 1 entries"),
])
def test_bad_per_sample_arguments_name_the_argument(model, kw, match):
    images = [image(224, 224, 0), image(60, 240, 1), image(50, 50, 2)]
    with pytest.raises(ValueError, match=match):
        model(images, **kw)


@pytest.mark.parametrize("images,match", [
    ([], "empty list"),
    ([torch.rand(3, 0, 5)], "is empty"),
    (torch.rand(0, 3, 224, 224), "is empty"),
    ([torch.rand(1, 20, 20)], r"pixel_values\[0\] must be a \(3, H, W\) tensor"),
])
def test_bad_images_raise(model, images, match):
    with pytest.raises(ValueError, match=match):
        model(images, num_look_close=1)


@pytest.mark.parametrize("size,grids", [
    # s_0 = 56, p = 14: the square side is 56·z, the other int(56/long·short)//14 (at least 1) · 14·z.
    ((8, 8), [(4, 4), (8, 8), (16, 16)]),
    ((10, 300), [(4, 4), (2, 8), (4, 16)]),  # int(56/300·10) = 1 -> one patch row: 14·2 px, 14·4 px
    ((300, 10), [(4, 4), (8, 2), (16, 4)]),
    ((1, 1), [(4, 4), (8, 8), (16, 16)]),
])
def test_images_smaller_than_one_patch_are_encoded(model, size, grids):
    assert model.vision_model.feature_sizes(*size) == grids
    with torch.no_grad():
        out = model(image(*size, 0)[None], num_look_close="all")
    assert [tuple(m.shape[-2:]) for m in out.selection_maps] == grids[1:]
    cells = sum(h * w for h, w in grids)
    assert out.last_hidden_state.shape == (1, cells, 64)
    assert torch.isfinite(out.last_hidden_state).all()


def test_rows_of_other_lengths_share_a_masked_pass(model):
    trunk = model.vision_model.trunk
    passes = []
    original = trunk.forward_blocks

    def counting(x, kv_cache=None, **kw):
        if kv_cache is not None:
            passes.append((x.shape[0] * x.shape[1], kw.get("key_mask") is not None))
        return original(x, kv_cache=kv_cache, **kw)

    images = [image(224, 224, 0), image(60, 240, 1), image(100, 180, 2), image(224, 56, 3)]
    trunk.forward_blocks = counting
    try:
        with torch.no_grad():
            # A token budget per pass packs rows (the GPU default; a CPU runs one look per pass).
            out = model(images, num_token_look_close=[80, 30, 25, 7], max_tokens_per_pass=16384)
    finally:
        del trunk.forward_blocks
    assert out.lengths.tolist() == [16 + 80, 16 + 30, 16 + 25, 16 + 7]
    assert [masked for _, masked in passes].count(True) == 1  # the rows of 30 and 25 tokens
    assert sum(n for n, _ in passes) <= MAX_PADDING * (80 + 30 + 25 + 7)
    for b, one in enumerate(out.per_sample()):
        with torch.no_grad():
            ref = model(images[b][None], num_token_look_close=[80, 30, 25, 7][b])
        assert_same_as_single(one, ref)


def test_a_plugged_in_cell_rule_runs_the_encoders_pipeline(model, monkeypatch):
    # The entry ps3.mllm uses: a request built once, cells chosen by a rule from outside the
    # encoder (here the encoder's own rule, counting its calls), the low-res pass reused.
    enc = model.vision_model
    batch = [image(224, 224, 1), image(100, 180, 2), image(56, 224, 3)]
    picks = []

    class CountingTopK(TopKCells):
        def pick(self, probs, plan, old):
            picks.append(plan.num_looks)
            return super().pick(probs, plan, old)

    with torch.no_grad():
        ref = enc.encode_looks(batch, num_look_close=2, num_token_look_close=[40, 20, 30])
        low_res = enc.encode_low_res(batch)
        low_res_calls = []
        monkeypatch.setattr(enc, "forward_low_res", lambda *a, **k: low_res_calls.append(1))
        request = EncodeRequest.build(batch, width=enc.width, num_look_close=2, num_token_look_close=[40, 20, 30],
                                      low_res=low_res)
        out, pooled = enc.encode_request(request, CountingTopK(tuple(enc.max_select_num_each_scale)))
    assert low_res_calls == [] and picks == ref.num_looks == [2, 2, 1]  # one pick per group (one image each)
    assert out.lengths.tolist() == ref.lengths.tolist() and out.num_looks == ref.num_looks
    assert pooled is low_res.pooled_output and out.pooled_output is None
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert_close_paths(a, b, "plugged-in rule vs encode_looks")
    with pytest.raises(ValueError, match="num_look_close must be"):
        EncodeRequest.build(batch, width=enc.width, num_look_close=[1, -2, 1])
