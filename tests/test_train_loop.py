"""Pre-training loop, checkpoints, resume, multi-process, export and the learnability metric.

Runs real training (a micro model on a few synthetic images) in-process and as real
subprocesses: ``python -m ps3.train`` killed with SIGKILL and resumed, and ``torchrun`` with
two gloo ranks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ps3 import PS3Config, PS3Model, PS3TextModel, PS3Tokenizer, PS3VisionModel

pytest.importorskip("webdataset")

from ps3.train.checkpoint import list_checkpoints, load_latest_checkpoint, read_checkpoint  # noqa: E402
from ps3.train.evaluate import selection_precision  # noqa: E402
from ps3.train.export import export, load_run_model  # noqa: E402
from ps3.train.model_setup import (PS3PretrainModule, build_caption_tokenizer, get_model_spec,  # noqa: E402
                             initialise)
from ps3.train.optim import lr_multiplier  # noqa: E402
from ps3.train.synthetic import write_synthetic_dataset  # noqa: E402
from tolerances import SAME_KERNELS

TESTS = Path(__file__).parent
WORKER = TESTS / "_train_worker.py"


def _load_worker():
    spec = importlib.util.spec_from_file_location("_train_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic shards (16 images of 64 px in 2 shard pairs) and the micro model config."""
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    write_synthetic_dataset(data, 16, seed=0, size=64, shard_size=8)
    model_dir = root / "micro"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(worker.MICRO_CONFIG))
    (model_dir / "preprocessor_config.json").write_text(json.dumps(worker.PREPROCESSOR))
    return {"data": data, "config": model_dir / "config.json"}


def argv(setup, out, steps, save_every=2, keep=2, *extra, batch_size=4):
    return ["--model", str(setup["config"]), "--train-data-image", str(setup["data"] / "images"),
            "--train-data-text-box", str(setup["data"] / "text_boxes"), "--output-dir", str(out),
            "--steps", str(steps), "--save-every-steps", str(save_every), "--keep-checkpoints", str(keep),
            "--batch-size", str(batch_size), "--lr", "2e-3", "--warmup", "2", "--workers", "0", "--log-every", "1",
            "--device", "cpu", "--resume", "latest", *map(str, extra)]


def train_in_process(args_list):
    from ps3.train.commands import main_train

    return main_train(args_list + ["--quiet"])


def train_command(args_list):
    return [sys.executable, "-m", "ps3.train", *args_list, "--quiet"]


def final_state(run_dir):
    _, state = load_latest_checkpoint(run_dir)
    return state


# ---------------------------------------------------------------------------------------------
# Configs, tokenizer, initialisation


def test_named_configs():
    tiny = get_model_spec("tiny-synthetic")
    assert tiny.tokenizer_name is None and tiny.preprocessor["image_size"] == 256
    config = tiny.config
    config.text_config.vocab_size = 30
    model = PS3Model(config)
    assert model.vision_model.max_select_num_each_scale == [32, 128]
    assert model.vision_model.highres_selection_feature_module is None
    for name, scales, vocab in [("PS3-4K-SigLIP2", [378, 756, 1512, 3780], 256000),
                                ("PS3-1.5K-SigLIP", [378, 756, 1512], 32000)]:
        spec = get_model_spec(name)
        assert spec.config.vision_config.ps3_scales == scales
        assert spec.config.vision_config.max_select_num == 2560
        assert spec.config.text_config.vocab_size == vocab
        assert spec.preprocessor["image_size"] == scales[-1]
        assert spec.tokenizer_name.startswith("timm/")
    with pytest.raises(ValueError, match="neither a known config"):
        get_model_spec("PS3-8K")


def test_caption_tokenizer(tmp_path):
    tokenizer = build_caption_tokenizer(["a red striped circle", "A blue, dotted star!", "a red square"], 8)
    assert tokenizer.tokenizer.token_to_id("[PAD]") == 0 and tokenizer.tokenizer.token_to_id("[UNK]") == 1
    ids = tokenizer(["A RED star.", "a purple star"])
    vocab = tokenizer.tokenizer.get_vocab()
    assert ids[0].tolist() == [vocab["a"], vocab["red"], vocab["star"], 0, 0, 0, 0, 0]
    assert ids[1, 1] == 1  # "purple" was never seen
    tokenizer.save_pretrained(tmp_path)
    assert torch.equal(PS3Tokenizer.from_pretrained(tmp_path)(["A RED star."]), ids[:1])


def _micro_model(seed=0):
    config = PS3Config(**worker.MICRO_CONFIG)
    config.text_config.vocab_size = worker.VOCAB
    torch.manual_seed(seed)
    return PS3Model(config)


def test_siglip_init_maps_timm_and_open_clip_names(tmp_path):
    source = _micro_model(seed=1).state_dict()
    open_clip = {}
    for key, value in source.items():
        if key.startswith("vision_model.trunk."):
            open_clip["visual.trunk." + key[len("vision_model.trunk."):]] = value
        elif key.startswith("text_model.") and not key.startswith("text_model.prompt_proj."):
            open_clip["text." + key[len("text_model."):]] = value
    open_clip["logit_scale"] = torch.tensor([2.5])  # stored as (1,) by some exports
    open_clip["logit_bias"] = torch.tensor(-3.0)
    open_clip["visual.trunk.head.weight"] = torch.zeros(10, 32)  # a classifier head PS3 has no use for
    open_clip["text.positional_embedding"] = torch.zeros(64, 32)  # another context length
    save_file(open_clip, str(tmp_path / "open_clip.safetensors"))

    model = _micro_model(seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise(model, str(tmp_path / "open_clip.safetensors"))
    state = model.state_dict()
    trunk = [k for k in state if k.startswith("vision_model.trunk.")]
    for key in trunk + ["text_model.token_embedding.weight", "text_model.transformer.resblocks.0.attn.in_proj_weight",
                        "text_model.text_projection.weight"]:
        assert torch.equal(state[key], source[key]), key
        assert key in report.loaded
    assert model.logit_scale.item() == 2.5 and model.logit_bias.item() == -3.0
    for key in ["vision_model.prior_prompt", "vision_model.selection_feature_proj.fc1.weight",
                "vision_model.pos_emb_residual.0", "text_model.prompt_proj.fc1.weight",
                "text_model.positional_embedding"]:
        assert torch.equal(state[key], fresh[key]), key
        assert key in report.random
    assert report.ignored == ["visual.trunk.head.weight"]
    assert report.mismatched == ["text_model.positional_embedding: (64, 32) vs (8, 32)"]
    assert "kept random" in report.summary()

    # A bare timm backbone file: unprefixed trunk keys.
    timm = {k[len("vision_model.trunk."):]: v for k, v in source.items() if k.startswith("vision_model.trunk.")}
    save_file(timm, str(tmp_path / "timm.safetensors"))
    model = _micro_model(seed=0)
    report = initialise(model, str(tmp_path / "timm.safetensors"))
    assert sorted(report.loaded) == sorted(trunk)
    assert model.logit_scale.item() == pytest.approx(2.302585) and model.logit_bias.item() == -10.0

    save_file({"unrelated.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no tensor"):
        initialise(_micro_model(), str(tmp_path / "other.safetensors"))


def test_init_from_ps3_checkpoint_dirs(tmp_path):
    source = _micro_model(seed=1)
    source.save_pretrained(tmp_path / "joint")
    model = _micro_model(seed=0)
    report = initialise(model, str(tmp_path / "joint"))
    assert report.random == [] and all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())

    vision = PS3VisionModel(source.config.vision_config)
    vision.vision_model.load_state_dict(source.vision_model.state_dict())
    vision.save_pretrained(tmp_path / "vision")
    model = _micro_model(seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialise(model, str(tmp_path / "vision"))
    for key, value in model.state_dict().items():
        want = source.state_dict()[key] if key.startswith("vision_model.") else fresh[key]
        assert torch.equal(value, want), key
    assert "text_model.token_embedding.weight" in report.random and "logit_scale" in report.random

    other = PS3Config(**worker.MICRO_CONFIG)
    other.text_config.vocab_size = worker.VOCAB
    other.vision_config.max_select_num = 20
    other.vision_config.ps3_scales = [32, 64, 96]
    with pytest.raises(ValueError, match="does not fit"):
        initialise(PS3Model(other), str(tmp_path / "joint"))


# ---------------------------------------------------------------------------------------------
# Training


def test_one_step_changes_parameters_with_finite_loss(setup):
    from ps3.train.loader import build_dataloader

    tokenizer = build_caption_tokenizer(["a red circle"] * 3, 8)
    loader = build_dataloader(setup["data"] / "images", setup["data"] / "text_boxes", image_size=64,
                              mean=[0.5] * 3, std=[0.5] * 3, batch_size=4, tokenize=tokenizer, drop_last=True)
    batch = next(iter(loader))
    model = _micro_model()
    initialise(model, "random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = worker.make_step(model, PS3PretrainModule(model), distributed=False)
    loss = step(batch)
    assert all(torch.isfinite(t) for t in loss.as_dict().values())
    assert float(loss.contrastive) > 0 and float(loss.bottomup) > 0 and float(loss.topdown) > 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []
    # The selection modules got their own learning rate (3e-3 in make_step), the rest 1e-3.
    selection = set(model.selection_parameter_names())
    assert "text_model.prompt_proj.fc1.weight" in selection and "vision_model.prior_prompt" in selection
    lrs = {g["lr"] for g in step.optimizer.param_groups}
    assert len(lrs) == 2
    no_decay = [g for g in step.optimizer.param_groups if g["weight_decay"] == 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for g in no_decay for p in g["params"]}
    assert {"logit_scale", "text_model.token_embedding.weight", "vision_model.trunk.pos_embed",
            "vision_model.trunk.blocks.0.norm1.weight", "vision_model.trunk.blocks.0.attn.qkv.bias"} <= exempt
    assert "vision_model.trunk.blocks.0.attn.qkv.weight" not in exempt


def test_lr_schedule_warmup_then_cosine():
    assert [lr_multiplier(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(8, 4, 12) == pytest.approx(0.5)
    assert lr_multiplier(12, 4, 12) == pytest.approx(0.0)


def _params(setup, out, steps, **changes):
    from ps3.train.loop import TrainParams

    return TrainParams(model=str(setup["config"]), train_data_image=str(setup["data"] / "images"),
                       train_data_text_box=str(setup["data"] / "text_boxes"), output_dir=str(out), steps=steps,
                       save_every_steps=2, batch_size=4, lr=2e-3, warmup=2, workers=0, log_every=1, device="cpu",
                       resume="latest", quiet=True, **changes)


def test_train_from_python_ends_when_the_stop_check_is_met(setup, tmp_path):
    from ps3.train.loop import train

    seen = []

    def check(step, model):
        seen.append((step, model.training, torch.is_grad_enabled()))
        torch.rand(5)  # draws from the RNG, which must not change the run
        return step >= 4

    result = train(_params(setup, tmp_path / "stopped", 8), stop_check=check)
    assert (result.step, result.stopped_early, result.steps_run) == (4, True, 4) and result.seconds > 0
    assert seen == [(2, False, False), (4, False, False)]
    assert [s for s, _ in list_checkpoints(tmp_path / "stopped")] == [2, 4]

    checked = train(_params(setup, tmp_path / "checked", 6), stop_check=lambda step, model: bool(torch.rand(1) > 2))
    plain = train(_params(setup, tmp_path / "plain", 6))
    assert (checked.step, checked.stopped_early) == (plain.step, plain.stopped_early) == (6, False)
    a, b = final_state(tmp_path / "checked"), final_state(tmp_path / "plain")
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    with pytest.raises(ValueError, match="fsdp"):
        train(_params(setup, tmp_path / "fsdp", 2, fsdp=True), stop_check=check)


def _kill_when(proc, path_glob, directory, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(Path(directory).glob(path_glob)):
            proc.send_signal(signal.SIGKILL)
            return proc.wait()
        if proc.poll() is not None:
            return proc.returncode
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical(setup, tmp_path):
    # Batches of 8 with 48 selected cells each are large enough for the CPU kernels to
    # parallelise the gathers' backward: exactness then needs deterministic kernels.
    steps = 24
    reference = tmp_path / "reference"
    assert train_in_process(argv(setup, reference, steps, batch_size=8)) == 0
    ref = final_state(reference)
    assert ref["progress"]["step"] == steps
    assert ref["progress"]["epoch"] >= 1  # 16 images / batch 8: the run crossed epochs
    assert [s for s, _ in list_checkpoints(reference)] == [steps - 2, steps]  # the last 2 kept
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == steps and all(torch.isfinite(torch.tensor(m["total"])) for m in metrics)

    run = tmp_path / "interrupted"
    command = train_command(argv(setup, run, steps, batch_size=8))
    env = {**SAME_KERNELS, **os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for checkpoint in ("step_00000002.pt", "step_00000010.pt"):  # killed twice, at whatever it was doing
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        code = _kill_when(proc, checkpoint, run / "checkpoints")
        assert code == -signal.SIGKILL, f"the run ended (code {code}) before it could be killed"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = final_state(run)
    assert resumed["progress"] == ref["progress"]
    for key, value in ref["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for (i, a), (j, b) in zip(ref["optimizer"]["state"].items(), resumed["optimizer"]["state"].items()):
        assert i == j and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob(".*tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, mode):
    env = {**SAME_KERNELS, **os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path), mode]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, batch = worker.build_problem()
    step = worker.make_step(model, PS3PretrainModule(model), distributed=False)
    loss = step(batch)
    grads = {n: p.grad for n, p in model.named_parameters()}
    tol = dict(rtol=1e-5, atol=1e-5)
    # Each rank's loss is over its half; the halves' gradients average to the full batch's.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.total, **tol)
    for rank, out in enumerate(ranks):
        assert out["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(out["grads"][name], grad, **tol, msg=name)
        if mode == "fsdp" and rank > 0:  # gathered state dicts go to rank 0 only
            assert out["params"] == {} and out["reloaded"] == {}
            continue
        for name, param in model.named_parameters():
            torch.testing.assert_close(out["params"][name], param.detach(), **tol, msg=name)
        if mode == "fsdp":
            for name, value in out["params"].items():
                assert torch.equal(out["reloaded"][name], value), name


# ---------------------------------------------------------------------------------------------
# Checkpoint safety


def test_incomplete_newest_checkpoint_is_skipped(setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_in_process(argv(setup, run, 4, 2, 3)) == 0
    newest = run / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # as a copy cut short would leave it
    found = load_latest_checkpoint(run)
    assert found[0].name == "step_00000002.pt"
    with pytest.raises(ValueError, match="incomplete or unreadable"):
        read_checkpoint(newest)
    capsys.readouterr()
    from ps3.train.commands import main_train

    assert main_train(argv(setup, run, 6, 2, 3)) == 0
    out = capsys.readouterr()
    assert "step_00000004.pt is incomplete or unreadable" in out.err
    assert "resumed from" in out.out and "at step 2" in out.out
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]
    assert (run / "checkpoints" / "step_00000004.pt.incomplete").is_file()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write into, root included (root ignores permission bits, but not
    the immutable attribute)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)]).returncode != 0:
        pytest.skip("running as root and this filesystem cannot make a directory immutable")
    try:
        yield locked
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_read_only_output_dir_is_a_clear_error(setup, read_only_dir, capsys):
    from ps3.train.commands import main_train

    assert main_train(argv(setup, read_only_dir / "run", 2)) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "--output-dir" in err and "Traceback" not in err
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_previous(setup, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(argv(setup, run, 2)) == 0
    previous = run / "checkpoints" / "step_00000002.pt"
    size = previous.stat().st_size

    def small_disk():  # files may not grow past half a checkpoint: the next save fails mid-write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = subprocess.run(train_command(argv(setup, run, 4)), capture_output=True, text=True, timeout=120,
                          preexec_fn=small_disk)
    assert proc.returncode == 2
    assert "could not write checkpoint" in proc.stderr and "step_00000002.pt is intact" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002.pt"]
    assert read_checkpoint(previous)["progress"]["step"] == 2


def test_existing_run_without_resume_is_refused(setup, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(argv(setup, run, 2)) == 0
    args = [a for a in argv(setup, run, 4) if a not in ("--resume", "latest")]
    from ps3.train.commands import main_train

    assert main_train(args + ["--quiet"]) == 2



def test_trains_with_a_height_width_image_size(setup, tmp_path):
    # A preprocessor with image_size [H, W] (not a square): batches of (3, H, W) pixels and (H, W) maps.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(setup["config"].read_text())
    size = worker.PREPROCESSOR["image_size"]
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps({**worker.PREPROCESSOR, "image_size": [size, size * 3 // 4]}))
    args = argv({**setup, "config": model_dir / "config.json"}, tmp_path / "run", 2)
    assert train_in_process(args) == 0
    preprocessor = json.loads((tmp_path / "run" / "preprocessor_config.json").read_text())
    assert preprocessor["image_size"] == [size, size * 3 // 4]
    assert final_state(tmp_path / "run")["progress"]["step"] == 2

def test_user_mistake_is_one_line_and_internal_error_keeps_traceback(setup, tmp_path, capsys):
    from ps3.cli import main

    run = tmp_path / "run"
    assert main(["train", *argv(setup, run, 2), "--lr", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["ps3 train: error: --lr must be a finite number >= 0, "
                                                            "got -1.0"]
    assert train_in_process(argv(setup, run, 2)) == 0
    # A checkpoint that passes the format check but lacks the optimizer state was not written by
    # this trainer: resuming from it is a bug to investigate, so the error keeps its traceback.
    path = run / "checkpoints" / "step_00000002.pt"
    state = read_checkpoint(path)
    del state["optimizer"]
    torch.save(state, path)
    with pytest.raises(KeyError, match="optimizer"):
        main(["train", *argv(setup, run, 4), "--quiet"])


# ---------------------------------------------------------------------------------------------
# Export


def test_export_round_trip(setup, tmp_path):
    run = tmp_path / "run"
    assert train_in_process(argv(setup, run, 3)) == 0
    trained, state, _ = load_run_model(run)
    out = tmp_path / "export"
    assert export(run, out)["step"] == 3
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}

    tokenizer = PS3Tokenizer.from_pretrained(out)
    assert torch.equal(tokenizer(["a red striped circle"]), PS3Tokenizer.from_pretrained(run / "tokenizer")(
        ["a red striped circle"]))
    ids = tokenizer(["a red striped circle", "a blue dotted star"])
    pixels = torch.randn(2, 3, 64, 64)
    joint = PS3Model.from_pretrained(out)
    vision = PS3VisionModel.from_pretrained(out)
    text = PS3TextModel.from_pretrained(out)
    with torch.no_grad():
        want_text = trained.text_model(ids)
        want = trained.vision_model(pixels, prompt=want_text.prompt, num_look_close=1)
        for got_text in (joint.text_model(ids), text(ids)):
            assert torch.equal(got_text.pooled_output, want_text.pooled_output)
            assert torch.equal(got_text.prompt, want_text.prompt)
        for tower in (joint.vision_model, vision):
            got = tower(pixels, prompt=want_text.prompt, num_look_close=1)
            assert torch.equal(got.last_hidden_state, want.last_hidden_state)
            assert torch.equal(got.selection_probs[0], want.selection_probs[0])  # same kernels, same data
    assert torch.equal(joint.logit_scale, state["model"]["logit_scale"])


def test_cli_commands(setup, tmp_path):
    from ps3.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["data", "synthetic", str(tmp_path / "syn"), "--images", "3", "--size", "64",
                              "--quiet"])
    assert args.func(args) == 0 and (tmp_path / "syn" / "images" / "image_00000.tar").is_file()
    run = tmp_path / "run"
    args = parser.parse_args(["train", *argv(setup, run, 1), "--quiet"])
    assert args.func(args) == 0
    args = parser.parse_args(["export", str(run), str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 0 and (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Learnability metric


def test_selection_precision_by_hand():
    gt = torch.zeros(2, 8, 8)
    gt[:, 0:4, 0:4] = 1.0  # the top-left 2x2 of a 4x4 grid
    probs = torch.full((2, 4, 4), 0.1)
    probs[0, :2, :2] = 0.9  # ranks the box first
    probs[1, 2:, 2:] = 0.9  # ranks the opposite corner first
    probs[1, 0, 0] = 0.5  # one box cell next
    precision, chance = selection_precision(probs, gt)
    assert precision.tolist() == [1.0, 0.0] and chance.tolist() == [0.25, 0.25]
    probs[1, 2, 2] = 0.0  # now the box cell (0, 0) is among the top 4
    assert selection_precision(probs, gt)[0].tolist() == [1.0, 0.25]


def test_training_over_damaged_data_completes_and_learns(setup, tmp_path):
    """Good shards mixed with damaged ones (bad JPEGs, a truncated tar, invalid JSON, out-of-range
    and inverted boxes, empty captions): the run finishes, reports the skips, and its loss falls."""
    from damaged_data import write_damaged_dataset

    good, bad = tmp_path / "good", tmp_path / "bad"
    write_synthetic_dataset(good, 40, seed=3, size=64, shard_size=8)
    write_damaged_dataset(bad, seed=0, size=64)
    mixed = tmp_path / "mixed"
    for kind in ("images", "text_boxes"):
        (mixed / kind).mkdir(parents=True)
        for tag, root in (("a", good), ("b", bad)):
            for shard in sorted((root / kind).glob("*.tar")):
                shutil.copy(shard, mixed / kind / f"{tag}_{shard.name}")
    args = argv(setup, tmp_path / "run", 30, 30)
    args[args.index(str(setup["data"] / "images"))] = str(mixed / "images")
    args[args.index(str(setup["data"] / "text_boxes"))] = str(mixed / "text_boxes")
    assert train_in_process(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 30
    skipped = lines[-1]["skipped"]
    assert skipped and sum(skipped.values()) >= 5 and {"bad_image", "bad_json"} <= set(skipped)
    losses = [line["total"] for line in lines]
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_run_summary_warmup_note_and_the_rate_each_step_used(setup, tmp_path, capsys):
    from ps3.train.checkpoint import TOKENIZER_DIR
    from ps3.train.commands import main_train

    first = tmp_path / "first"
    assert train_in_process(argv(setup, first, 1)) == 0  # builds a caption tokenizer to pass below
    capsys.readouterr()
    run = tmp_path / "run"
    assert main_train(argv(setup, run, 3, 3, 2, "--warmup", "5", "--tokenizer", first / TOKENIZER_DIR)) == 0
    lines = capsys.readouterr().out.splitlines()
    notes = [i for i, line in enumerate(lines) if "--warmup 5 is more than --steps 3" in line]
    summaries = [i for i, line in enumerate(lines) if line.startswith("training ") and "parameters" in line]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1"))
    assert len(notes) == 1 and len(summaries) == 1 and summaries[0] < first_step
    assert "3 steps of 4, cpu, fp32" in lines[summaries[0]]
    # Warmup capped at the 3 steps: steps 1, 2, 3 train at 1/3, 2/3 and 3/3 of --lr.
    logged = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([2e-3 / 3, 2e-3 * 2 / 3, 2e-3])
