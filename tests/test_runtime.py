"""The runtime layer under the commands: user errors vs bugs, device/dtype parsing, timing and
peak memory, and loading a model with its processor, text tower and tokenizer."""
import argparse
import mmap
import shutil
import time

import pytest
import torch

import ps3
from golden import MODEL_DIR
from ps3 import runtime
from ps3.runtime import (UserError, load_model, matmul_rate, measure, parse_device,
                         parse_dtype, run_command, timeit, user_input)


def test_user_input_names_the_flag_and_keeps_the_cause():
    with pytest.raises(UserError, match=r"^--model: no such thing$") as info:
        with user_input("--model"):
            raise ValueError("no such thing\nsecond line")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(UserError, match=r"^cannot read --out here$"):  # already named: no prefix
        with user_input("--out"):
            raise PermissionError("cannot read --out here")
    with pytest.raises(UserError, match=r"^first$"):  # a UserError passes through unchanged
        with user_input("--x"):
            raise UserError("first")


def test_user_input_leaves_other_errors_alone():
    for exc in (RuntimeError("bug"), KeyError("bug"), IndexError("bug")):
        with pytest.raises(type(exc)):
            with user_input("--model"):
                raise exc
    with pytest.raises(TypeError):  # only the listed kinds are the user's
        with user_input("--x", errors=(OSError,)):
            raise TypeError("bug")


def _args(**kw):
    return argparse.Namespace(**kw)


def test_run_command_prints_only_user_errors(capsys, monkeypatch):
    monkeypatch.delenv("PS3_DEBUG", raising=False)
    assert run_command(lambda a: None, _args(), "ps3 x") == 0
    assert run_command(lambda a: 3, _args(), "ps3 x") == 3

    def user_mistake(args):
        raise UserError("--looks must be >= 0\nmore detail")

    assert run_command(user_mistake, _args(), "ps3 encode") == 2
    assert capsys.readouterr().err == "ps3 encode: error: --looks must be >= 0\n"

    def bug(args):
        raise ValueError("deep inside")

    with pytest.raises(ValueError, match="deep inside"):
        run_command(bug, _args(), "ps3 encode")

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(interrupted, _args(), "ps3 train") == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setenv("PS3_DEBUG", "1")
    with pytest.raises(UserError):
        run_command(user_mistake, _args(), "ps3 encode")


def test_training_commands_print_only_user_errors(tmp_path, capsys):
    from ps3.cli import main

    # A missing run directory is the user's mistake: one line, exit code 2.
    assert main(["export", str(tmp_path / "no-run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ps3 export: error: ") and "is not a training run directory" in err
    assert len(err.strip().splitlines()) == 1

    def bug(args):  # any other ValueError/OSError is a bug and propagates with its traceback
        raise ValueError("an internal invariant broke")

    with pytest.raises(ValueError, match="internal invariant"):
        run_command(bug, _args(), "ps3 train")


def test_device_and_dtype_parsing():
    assert parse_device(None) == torch.device("cpu") and parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")).type == "cpu"
    for bad in ("gpu0", "tpu", 3.5):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            parse_device("cuda")
    assert parse_dtype(None, "cpu") is torch.float32 and parse_dtype(None) is torch.float32
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="dtype must be"):
        parse_dtype("int8")


def test_timeit_counts_calls_and_measures():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.01 * len(calls))

    cpu = torch.device("cpu")
    median = timeit(work, cpu, repeats=3)  # warm-up 0.01, then 0.02, 0.03, 0.04
    assert len(calls) == 4 and 0.03 <= median < 0.1
    calls.clear()
    best = timeit(work, cpu, repeats=2, best=True, warmup=False)  # 0.01, 0.02
    assert len(calls) == 2 and 0.01 <= best < 0.02
    with pytest.raises(ValueError, match="repeats"):
        timeit(work, cpu, repeats=0)
    rate = matmul_rate(cpu, n=256)
    assert 1e8 < rate < 1e14  # FLOP/s of a real matmul on any CPU


def test_matmul_reference_size_follows_its_time_budget(monkeypatch):
    """The reference product shrinks for a dtype the machine multiplies slowly (bf16 without bf16
    units: ~1/60 of float32) and is the full size otherwise; the budget decides, not the CPU."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "_MATMUL_CALL_BUDGET_S", 0.0)
    assert runtime._matmul_size(cpu, torch.float32, 2048) == 256
    monkeypatch.setattr(runtime, "_MATMUL_CALL_BUDGET_S", float("inf"))
    assert runtime._matmul_size(cpu, torch.float32, 1024) == 1024


def test_measure_sees_time_and_peak_memory():
    cpu = torch.device("cpu")
    with measure(cpu) as cost:
        # 64 MiB of fresh pages, touched: an anonymous map, as a tensor this size could be carved
        # from memory the allocator already holds (then the resident set would not grow).
        block = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        time.sleep(0.02)
        block.close()
    assert cost.seconds >= 0.02
    assert cost.peak_bytes > cost.start_bytes >= 0
    if cost.start_bytes:  # Linux: the peak of the block alone, not the process's lifetime peak
        assert 60 * 2**20 < cost.extra_bytes < 200 * 2**20
    with measure(cpu) as small:
        torch.ones(16)
    if small.start_bytes:
        assert small.extra_bytes < 32 * 2**20  # the reset forgot the 64 MiB block


def test_load_model_vision_only():
    loaded = load_model(MODEL_DIR)
    assert isinstance(loaded.vision, ps3.PS3VisionModel) and loaded.text is None
    assert loaded.processor.image_size == loaded.vision.config.ps3_scales[-1]  # no preprocessor file there
    assert loaded.device.type == "cpu" and loaded.dtype is torch.float32
    with pytest.raises(ValueError, match="text=True"):
        loaded.prompts(["a boat"])
    with pytest.raises(ValueError, match="no tokenizer_config.json"):
        load_model(MODEL_DIR, text=True)
    assert load_model(MODEL_DIR, dtype="bf16").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
        load_model("no/such/dir/x")


def test_load_model_with_text_matches_the_joint_model(tmp_path):
    from ps3.train.model_setup import build_caption_tokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model_dir)
    joint = ps3.PS3Model.from_pretrained(MODEL_DIR)
    tokenizer = build_caption_tokenizer(["a red circle", "a blue star"], joint.config.text_config.context_length)
    tokenizer.save_pretrained(model_dir)
    ps3.PS3ImageProcessor(image_size=112).save_pretrained(model_dir)
    loaded = load_model(model_dir, text=True)
    assert loaded.processor.image_size == 112
    with torch.no_grad():
        want = joint.encode_text(tokenizer(["a red circle"])).prompt
    torch.testing.assert_close(loaded.prompts(["a red circle"]), want)
