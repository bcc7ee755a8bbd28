"""PS3 vision encoder behaviours beyond the recorded cases: batches, non-square inputs, budgets,
look batching, pre-training mode, dtypes, checkpoints and errors."""
import json

import pytest
import torch

import ps3
from golden import MODEL_DIR
from tolerances import assert_close_paths, assert_same_selection
from ps3.hub import load_state_dict


@pytest.fixture(scope="module")
def model():
    return ps3.PS3VisionModel.from_pretrained(MODEL_DIR)


def images(b=2, h=224, w=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def run(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw)


@pytest.mark.parametrize("kw", [
    dict(num_look_close=1),
    dict(num_look_close=2),
    dict(num_look_close="all"),
    dict(num_token_look_close=30),
    dict(num_token_look_close=130),
    dict(num_look_close=1, smooth_selection_prob=True),
    dict(num_look_close=2, only_select_first_n_scale=1),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("size", [(224, 224), (224, 160), (150, 224)])
def test_batch_equals_single_images(model, kw, size):
    x = images(2, *size)
    both = run(model, x, **kw)
    for b in range(2):
        one = run(model, x[b:b + 1], **kw)
        if assert_same_selection([m[b:b + 1] for m in both.selection_maps], one.selection_maps, one.selection_probs):
            assert_close_paths(both.last_hidden_state[b:b + 1], one.last_hidden_state, "batch vs single")


@pytest.mark.parametrize("size", [(224, 224), (224, 160), (100, 224), (14, 224)])
@pytest.mark.parametrize("kw", [dict(num_look_close=1), dict(num_look_close="all"), dict(num_token_look_close=50),
                                dict(num_look_close=0), dict(num_look_close=3, only_select_first_n_scale=1)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_token_count_known_ahead(model, size, kw):
    count = model.count_tokens(*size, **kw)
    out = run(model, images(1, *size), **kw)
    assert out.last_hidden_state.shape[1] == count.total
    if out.selection_maps is not None:
        assert [int(m.sum()) for m in out.selection_maps] == count.per_scale
    sizes = model.vision_model.feature_sizes(*size)
    assert [tuple(p.shape[-2:]) for p in out.selection_probs] == sizes[1:]


def test_nonsquare_grid_sizes(model):
    # 224 x 160 at s0 = 56, p = 14: width int(56/224*160)//14*14 = 28 -> grids (8,4) and (16,8).
    assert model.vision_model.feature_sizes(224, 160) == [(4, 4), (8, 4), (16, 8)]
    assert model.vision_model.feature_sizes(160, 224) == [(4, 4), (4, 8), (8, 16)]
    out = run(model, images(1, 224, 160), num_look_close="all")
    assert [tuple(m.shape[-2:]) for m in out.selection_maps] == [(8, 4), (16, 8)]
    maps = model.vision_model.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 4, 4), (1, 64, 8, 4), (1, 64, 16, 8)]


def test_all_encodes_every_cell_once(model):
    out = run(model, images(2), num_look_close="all")
    for m in out.selection_maps:
        assert bool((m == 1).all())
    assert out.last_hidden_state.shape[1] == 16 + 64 + 256


def test_looks_batched_equal_sequential(model):
    x = images(2, seed=3)
    batched = run(model, x, num_look_close="all", max_tokens_per_pass=10_000)
    one_by_one = run(model, x, num_look_close="all", max_tokens_per_pass=1)
    for a, b in zip(batched.hidden_states, one_by_one.hidden_states):
        assert_close_paths(a, b, "looks batched vs one per pass")


def test_looks_do_not_see_each_other(model):
    # The second look's cells encoded alone (as the first look of a gt-forced call would) give the
    # same features as inside a two-look call: each look attends to the low-res cache and itself.
    x = images(1, seed=5)
    two = run(model, x, num_look_close=2)
    one = run(model, x, num_look_close=1)
    first = [m.bool() for m in one.selection_maps]
    fmap_two = model.vision_model.format_features_into_feature_maps(two.last_hidden_state, two.selection_maps)
    fmap_one = model.vision_model.format_features_into_feature_maps(one.last_hidden_state, one.selection_maps)
    for s, sel in enumerate(first):
        a = fmap_two[s + 1].permute(0, 2, 3, 1)[sel]
        b = fmap_one[s + 1].permute(0, 2, 3, 1)[sel]
        assert_close_paths(a, b, "look inside a two-look call vs alone")


def test_hidden_layers_to_return(model):
    x = images(1)
    full = run(model, x, num_look_close=1)
    last2 = run(model, x, num_look_close=1, num_hidden_layers_to_return=2)
    assert len(full.hidden_states) == 4 and len(last2.hidden_states) == 2
    torch.testing.assert_close(last2.hidden_states[0], full.hidden_states[2])
    torch.testing.assert_close(last2.last_hidden_state, full.last_hidden_state)


def test_lowres_only(model):
    out = run(model, images(1), num_look_close=0)
    assert out.selection_maps is None and out.last_hidden_state.shape == (1, 16, 64)


def test_gt_maps_force_selection(model):
    gt = torch.zeros(1, 224, 224)
    gt[:, :56, :56] = 1  # the top-left 2x2 cells at scale 1, 4x4 at scale 2
    out = run(model, images(1), num_look_close=1, gt_selection_maps=gt)
    assert bool((out.selection_probs[0][0, :2, :2] == 1).all())
    assert bool((out.selection_maps[0][0, :2, :2] == 1).all()) and bool((out.selection_maps[1][0, :4, :4] == 1).all())


def test_integer_gt_maps_keep_only_fully_covered_cells(model):
    gt = torch.zeros(1, 224, 224)
    gt[:, :40, :40] = 1  # covers scale-1 cell (0,0) fully, (0,1),(1,0),(1,1) partly
    as_float = run(model, images(1), num_look_close=1, gt_selection_maps=gt).selection_probs[0]
    as_long = run(model, images(1), num_look_close=1, gt_selection_maps=gt.long()).selection_probs[0]
    assert bool((as_float[0, :2, :2] == 1).all())
    assert as_long[0, 0, 0] == 1 and as_long[0, 1, 1] < 1


def test_smoothing_is_blockwise_constant(model):
    out = run(model, images(1, 168, 168), num_look_close=1, smooth_selection_prob=True)
    bottom = run(model, images(1, 168, 168), num_look_close=1).selection_probs[0]
    p = out.selection_probs[0]
    torch.testing.assert_close(p, torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(bottom[:, None], size=(6, 6), mode="area"), size=(8, 8))[:, 0])


def test_topdown_prompt_changes_selection_and_keeps_bottomup(model):
    x = images(1)
    base = run(model, x, num_look_close=1)
    prompt = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    steered = run(model, x, num_look_close=1, prompt=prompt)
    assert not torch.allclose(steered.selection_probs[0], base.selection_probs[0])
    # Inference returns no separate bottom-up / top-down maps and no pooled feature, as upstream;
    # the pre-training mode returns both maps, the bottom-up ones those of the prompt-less call.
    assert steered.bottomup_selection_probs is steered.topdown_selection_probs is steered.pooled_output is None
    with torch.no_grad():
        pooled = model(x, prompt=prompt, output_hidden_states=False)
    torch.testing.assert_close(pooled.bottomup_selection_probs[0], base.selection_probs[0])
    torch.testing.assert_close(pooled.topdown_selection_probs[0], steered.selection_probs[0])


def test_first_n_scales_budgets(model):
    vm = model.vision_model
    assert vm.max_select_num_each_scale == [16, 64]
    # m = 1: [int(16/16*80), 1] = [80, 1], last topped to a total of 80 -> [80, 0]; scale 1 has
    # only 64 cells, so 16 spill over to scale 2.
    out = run(model, images(2), num_look_close=1, only_select_first_n_scale=[1, 2])
    assert [int(m[0].sum()) for m in out.selection_maps] == [64, 16]
    assert [int(m[1].sum()) for m in out.selection_maps] == [16, 64]


def test_pretraining_mode_pools_and_backprops():
    model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR).train()
    x = images(3)
    gt = torch.zeros(3, 224, 224)
    gt[0, 100:180, 20:90] = 1
    gt[1] = 1
    is_global = torch.tensor([[False], [False], [True]])
    out = model(x, gt_selection_maps=gt, is_global_text=is_global, pool_gt_token_only=True,
                output_hidden_states=False)
    assert out.pooled_output.shape == (3, 64)
    assert out.last_hidden_state is None
    with torch.no_grad():
        lowres = model.vision_model.forward_low_res(x, keep_kv=False)[2]
        plain = model(x, gt_selection_maps=gt, output_hidden_states=False).pooled_output
    torch.testing.assert_close(out.pooled_output[2], lowres[2])
    assert not torch.allclose(out.pooled_output[0], plain[0])  # pooling restricted to the gt cells
    loss = out.pooled_output.sum() + sum(p.sum() for p in out.bottomup_selection_probs)
    loss.backward()
    vm = model.vision_model
    for p in (vm.trunk.blocks[0].attn.qkv.weight, vm.selection_feature_proj.fc1.weight,
              vm.highres_selection_feature_module.stem[0].weight, vm.pos_emb_residual[0]):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_smoke(dtype):
    model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, dtype=dtype)
    out = run(model, images(1).to(dtype), num_look_close=2)
    assert out.last_hidden_state.dtype == dtype
    assert torch.isfinite(out.last_hidden_state.float()).all()
    ref = run(ps3.PS3VisionModel.from_pretrained(MODEL_DIR), images(1), num_look_close=0)
    low = run(model, images(1).to(dtype), num_look_close=0)
    torch.testing.assert_close(low.last_hidden_state.float(), ref.last_hidden_state, atol=0.15, rtol=0.05)


def test_save_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "ps3_vision_model" and cfg["vit"]["embed_dim"] == 64
    assert "transformers_version" not in cfg and cfg["vision_tower_name"] == "vit_test_tiny_patch14_map"
    model.save_pretrained(tmp_path / "b", max_shard_bytes=200_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    x = images(1)
    want = run(model, x, num_look_close=2).last_hidden_state
    for d in ("a", "b"):
        again = ps3.PS3VisionModel.from_pretrained(tmp_path / d)
        torch.testing.assert_close(run(again, x, num_look_close=2).last_hidden_state, want, atol=0, rtol=0)


def test_checkpoint_that_does_not_fit_lists_mismatches(tmp_path):
    cfg = ps3.PS3VisionConfig.from_pretrained(MODEL_DIR)
    cfg.vit = {**cfg.vit, "depth": 3}
    cfg.select_based_on_layer = [0, 1, 2]
    with pytest.raises(ValueError, match="unexpected keys .*blocks.3"):
        ps3.PS3VisionModel.from_pretrained(MODEL_DIR, config=cfg)
    cfg = ps3.PS3VisionConfig.from_pretrained(MODEL_DIR)
    cfg.highres_selection_module_out_dim = 16
    with pytest.raises(ValueError, match="shape mismatches"):
        ps3.PS3VisionModel.from_pretrained(MODEL_DIR, config=cfg)


def test_pickled_weights_refused(tmp_path):
    (tmp_path / "config.json").write_text((MODEL_DIR / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only.*save_file"):
        ps3.PS3VisionModel.from_pretrained(tmp_path)


def test_joint_checkpoint_has_both_towers():
    keys = load_state_dict(MODEL_DIR).keys()
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.") for k in keys)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.rand(3, 224, 224), num_look_close=1), "pixel_values must have shape"),
    (lambda m: m(torch.rand(1, 1, 224, 224), num_look_close=1), "pixel_values must have shape"),
    (lambda m: m(torch.zeros(1, 3, 224, 224, dtype=torch.long), num_look_close=1), "float tensor"),
    (lambda m: m(images(1), num_look_close=-1), "num_look_close must be a non-negative int or 'all'"),
    (lambda m: m(images(1), num_look_close="some"), "num_look_close must be"),
    (lambda m: m(images(1), num_token_look_close=2.5), "num_token_look_close must be"),
    (lambda m: m(images(1)), "pass num_look_close"),
    (lambda m: m(images(1), num_look_close=1, prompt=torch.rand(1, 32)), "prompt has width 32"),
    (lambda m: m(images(2), num_look_close=1, prompt=torch.rand(1, 64)), r"prompt must be a \(B=2"),
    (lambda m: m(images(1), num_look_close=1, gt_selection_maps=torch.ones(224, 224)), "gt_selection_maps must be"),
    (lambda m: m(images(1), num_look_close=1, only_select_first_n_scale=3), "only_select_first_n_scale must be"),
    (lambda m: m(images(1), num_look_close=1, only_select_first_n_scale=0), "only_select_first_n_scale must be"),
    (lambda m: m(images(2), num_look_close=1, only_select_first_n_scale=[1]), "entries for a batch of 2"),
    (lambda m: m(images(1), num_look_close=1, num_hidden_layers_to_return=0), "num_hidden_layers_to_return"),
    (lambda m: m(images(1) * float("nan"), num_look_close=1, check_finite=True), "NaN or Inf"),
    (lambda m: m(images(1), output_hidden_states=False, pool_gt_token_only=True), "needs gt_selection_maps"),
])
def test_bad_input_raises(model, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


@pytest.mark.parametrize("change,match", [
    (dict(ps3_scales=[56, 100, 224]), "not multiples of the patch size"),
    (dict(ps3_scales=[56]), "at least one high-res scale"),
    (dict(model_name="vit_unknown", vit=None), "unknown backbone"),
    (dict(select_based_on_layer=[0, 9]), "select_based_on_layer"),
])
def test_bad_config_raises(change, match):
    cfg = ps3.PS3VisionConfig.from_pretrained(MODEL_DIR)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        ps3.PS3VisionModel(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(num_look_close=2), dict(num_look_close="all"), dict(num_token_look_close=50)])
def test_cuda_matches_cpu(model, kw):
    x = images(2, 224, 160)
    cpu = run(model, x, **kw)
    gpu_model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, device="cuda")
    gpu = run(gpu_model, x.cuda(), **kw)
    for a, b in zip(cpu.selection_maps, gpu.selection_maps):
        assert torch.equal(a, b.cpu())
    torch.testing.assert_close(gpu.last_hidden_state.cpu(), cpu.last_hidden_state, atol=1e-3, rtol=1e-3)
    model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, device="cuda", dtype="bfloat16")
    bf16 = run(model, x.cuda().bfloat16(), **kw)
    assert bf16.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(bf16.last_hidden_state.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(num_look_close=1), dict(num_look_close="all", max_tokens_per_pass=10**6),
                                dict(num_look_close="all", max_tokens_per_pass=1), dict(num_token_look_close=50),
                                dict(num_look_close=2, only_select_first_n_scale=1)])
def test_cuda_forward_never_waits_for_the_device(kw):
    """The forward queues its work without host syncs (no .item(), no blocking copies): checked by
    CUDA's sync debug mode, which raises on any synchronising call."""
    gpu_model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, device="cuda")
    x = images(2, 224, 160).cuda()
    prompt = torch.randn(2, gpu_model.config.hidden_size, device="cuda")
    run(gpu_model, x, prompt=prompt, **kw)  # warm-up: per-device tables are copied once here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(gpu_model, x, prompt=prompt, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.last_hidden_state.is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager():
    gpu_model = ps3.PS3VisionModel.from_pretrained(MODEL_DIR, device="cuda")
    vm = gpu_model.vision_model
    prompt = torch.randn(2, gpu_model.config.hidden_size, device="cuda")
    cases = [dict(num_look_close=1), dict(num_look_close="all", max_tokens_per_pass=10**6),
             dict(num_look_close="all", max_tokens_per_pass=1), dict(num_look_close=2, prompt=prompt)]
    for seed in (0, 1):  # a second image through the same graphs: inputs really are copied in
        x = images(2, 224, 160, seed=seed).cuda()
        for kw in cases:
            vm.use_cuda_graphs = False
            eager = run(gpu_model, x, **kw)
            vm.use_cuda_graphs = True
            graphed = run(gpu_model, x, **kw)
            assert assert_same_selection(graphed.selection_maps, eager.selection_maps, eager.selection_probs)
            for a, b in zip(eager.hidden_states, graphed.hidden_states):
                assert_close_paths(a, b, "CUDA graphs vs eager")
    captured = len(vm._graphed_blocks.graphs)
    run(gpu_model, images(2, 224, 160, seed=2).cuda(), num_look_close=1)
    assert len(vm._graphed_blocks.graphs) == captured  # same shapes replay, no new capture
    x = images(2, 224, 160).cuda()
    with torch.inference_mode():  # captured separately: inference tensors cannot be written outside it
        in_inference = gpu_model(x, num_look_close=1).last_hidden_state.clone()
    torch.testing.assert_close(run(gpu_model, x, num_look_close=1).last_hidden_state, in_inference)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        vm.use_cuda_graphs = False
        eager = gpu_model(x, num_look_close=1).last_hidden_state
        vm.use_cuda_graphs = True
        graphed = gpu_model(x, num_look_close=1).last_hidden_state
    torch.testing.assert_close(graphed, eager)
    # Cast: new parameter storage is noticed and the graphs are captured again.
    gpu_model.to(torch.bfloat16)
    out = run(gpu_model, images(2, 224, 160).cuda().bfloat16(), num_look_close=1)
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.isfinite(out.last_hidden_state.float()).all()
    with torch.enable_grad():  # training-style calls stay eager
        gpu_model.float()(images(1, 224, 160).cuda(), num_look_close=1)


def test_cuda_graphs_flag_is_a_no_op_off_the_gpu(model):
    x = images(1, 224, 160)
    eager = run(model, x, num_look_close=1)
    model.vision_model.use_cuda_graphs = True
    try:
        flagged = run(model, x, num_look_close=1)
    finally:
        model.vision_model.use_cuda_graphs = False
    assert model.vision_model._graphed_blocks is None
    torch.testing.assert_close(flagged.last_hidden_state, eager.last_hidden_state, rtol=0, atol=0)


def test_low_precision_resize_is_the_float32_resize_to_one_rounding():
    from ps3.encoder.selection_features import bicubic_resize as _resize

    x = images(2, 300, 260).bfloat16()
    expected = torch.nn.functional.interpolate(x.float(), size=(378, 378), mode="bicubic", align_corners=False)
    got = _resize(x, (378, 378))
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: one rounding of the float32 result is within 2^-8 relative
    # (another kernel may round the float32 sum once more: twice that bound still fails a wrong resize).
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -7, atol=2 ** -7 * expected.abs().max().item())
    assert _resize(x, (300, 260)) is x


@pytest.mark.parametrize("kw", [dict(num_look_close=2), dict(num_look_close=0), dict(num_token_look_close=50),
                                dict(output_hidden_states=False)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_reused_low_res_pass_gives_the_same_output_without_rerunning_it(model, kw):
    vm = model.vision_model
    x = images(2, 224, 160, seed=7)
    prompt = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    want = run(model, x, prompt=prompt, **kw)
    with torch.no_grad():
        low_res = model.encode_low_res(x)
    calls = []
    hooks = [vm.trunk.patch_embed.register_forward_hook(lambda *a: calls.append("low-res trunk")),
             vm.highres_selection_feature_module.register_forward_hook(lambda *a: calls.append("1512 px ConvNet"))]
    try:
        got = run(model, x, prompt=prompt, low_res=low_res, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    for field in ("selection_probs", "bottomup_selection_probs", "topdown_selection_probs"):
        assert (getattr(got, field) is None) == (getattr(want, field) is None), field
        for a, b in zip(getattr(got, field) or [], getattr(want, field) or []):
            assert_close_paths(a, b, field)
    same = want.selection_maps is None or assert_same_selection(got.selection_maps, want.selection_maps,
                                                                want.selection_probs)
    for field in ("last_hidden_state", "pooled_output"):
        if getattr(want, field) is not None and same:
            assert_close_paths(getattr(got, field), getattr(want, field), field)
    assert len(low_res.hidden_states) == 4 and low_res.kv_cache[0][0].shape == (2, 4, 16, 16)


def test_low_res_pass_of_other_images_is_refused(model):
    with torch.no_grad():
        low_res = model.encode_low_res(images(2, 224, 160))
        with pytest.raises(ValueError, match="low_res was computed for images"):
            model(images(2, 224, 224), num_look_close=1, low_res=low_res)
        no_kv = model.encode_low_res(images(1), keep_kv=False)
        assert model(images(1), num_look_close=0, low_res=no_kv).last_hidden_state.shape == (1, 16, 64)
        with pytest.raises(ValueError, match="no key/value cache"):
            model(images(1), num_look_close=1, low_res=no_kv)


def test_explicit_modes_are_what_the_upstream_flag_selects(model):
    x = images(2, 224, 160, seed=4)
    gt = torch.zeros(2, 224, 160)
    gt[:, 50:150, 20:90] = 1
    with torch.no_grad():
        looks = model.encode_looks(x, num_look_close=2, gt_selection_maps=gt)
        pooled = model.encode_pooled(x, gt_selection_maps=gt, pool_gt_token_only=True)
        assert torch.equal(looks.last_hidden_state, model(x, num_look_close=2, gt_selection_maps=gt).last_hidden_state)
        shim = model(x, gt_selection_maps=gt, pool_gt_token_only=True, output_hidden_states=False)
    assert torch.equal(pooled.pooled_output, shim.pooled_output) and pooled.last_hidden_state is None
    # One signature, stated once: the model and the joint model show the encoder's.
    import inspect

    encoder = inspect.signature(ps3.encoder.vision.PS3VisionEncoder.forward)
    assert inspect.signature(ps3.PS3VisionModel.forward) == encoder
    assert inspect.signature(ps3.PS3Model.encode_image) == encoder
    assert list(inspect.signature(model.forward).parameters)[:3] == ["pixel_values", "num_look_close",
                                                                     "num_token_look_close"]


def test_release_cuda_graphs_turns_replay_off(model):
    encoder = model.vision_model
    encoder.use_cuda_graphs = True
    encoder.release_cuda_graphs()
    assert encoder.use_cuda_graphs is False and encoder._graphed_blocks is None
