"""Checkpoint files (atomic save, retention, listing, latest readable, RNG state) and the training
parameters (flags and Python callers build the same TrainParams; bad values name their flag)."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from ps3.train.checkpoint import (CHECKPOINT_FORMAT, checkpoint_path, list_checkpoints, load_latest_checkpoint,
                                  read_checkpoint, rng_state, save_checkpoint, set_rng_state, write_atomic)
from ps3.train.params import TrainParams, add_arguments


def _state(step: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "progress": {"step": step, "epoch": 0, "batches_in_epoch": step},
            "model": {"w": torch.full((2, 2), float(step))}}


def test_save_list_read_and_keep_the_last(tmp_path):
    for step in (3, 1, 2, 10):
        path = save_checkpoint(tmp_path, step, _state(step), keep=3)
        assert path == checkpoint_path(tmp_path, step) and path.name == f"step_{step:08d}.pt"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 10]  # oldest dropped, sorted by step
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporaries left
    state = read_checkpoint(checkpoint_path(tmp_path, 10))
    assert state["progress"]["step"] == 10 and torch.equal(state["model"]["w"], torch.full((2, 2), 10.0))
    path, latest = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000010.pt" and latest["progress"]["step"] == 10
    assert list_checkpoints(tmp_path / "elsewhere") == [] and load_latest_checkpoint(tmp_path / "elsewhere") is None


def test_unreadable_checkpoints_are_reported_and_moved_aside(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), keep=5)
    newest = save_checkpoint(tmp_path, 2, _state(2), keep=5)
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    foreign = checkpoint_path(tmp_path, 3)
    torch.save({"weights": torch.zeros(1)}, foreign)  # a torch file, but not a ps3 checkpoint
    with pytest.raises(ValueError, match="incomplete or unreadable"):
        read_checkpoint(newest)
    with pytest.raises(ValueError, match="not a ps3 training checkpoint"):
        read_checkpoint(foreign)
    warnings: list[str] = []
    path, state = load_latest_checkpoint(tmp_path, warnings.append, move_aside=True)
    assert path.name == "step_00000001.pt" and state["progress"]["step"] == 1
    assert len(warnings) == 2 and "moved aside" in warnings[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000001.pt", "step_00000002.pt.incomplete", "step_00000003.pt.incomplete"]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    state = rng_state()
    first = (torch.rand(3), np.random.normal(size=3), random.random())
    save_checkpoint(tmp_path, 1, {**_state(1), "rng": state}, keep=1)
    set_rng_state(read_checkpoint(checkpoint_path(tmp_path, 1))["rng"])  # loaded with weights_only
    again = (torch.rand(3), np.random.normal(size=3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_write_atomic_replaces_whole_files(tmp_path):
    target = tmp_path / "config.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


REQUIRED = ["--train-data-image", "img", "--train-data-text-box", "txt", "--steps", "5", "--output-dir", "out"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.set_defaults(func=print)  # what the CLI adds; not a parameter
    return parser.parse_args(argv)


def test_flags_and_python_build_the_same_params():
    from_flags = TrainParams.from_args(_parse(REQUIRED + ["--lr", "1e-3", "--fsdp", "--selection-lr", "2e-3"]))
    direct = TrainParams(train_data_image="img", train_data_text_box="txt", steps=5, output_dir="out", lr=1e-3,
                         fsdp=True, selection_lr=2e-3)
    assert from_flags == direct
    assert TrainParams.from_args(_parse(REQUIRED)) == TrainParams("img", "txt", 5, "out")  # same defaults
    record = direct.as_dict()
    assert record["lr"] == 1e-3 and record["selection_lr"] == 2e-3 and "func" not in record
    direct.check()


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps must be a positive integer"),
    ({"batch_size": 2.5}, "--batch-size must be a positive integer"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"grad_clip": float("nan")}, "--grad-clip must be a finite number"),
    ({"selection_lr": -1.0}, "--selection-lr must be > 0"),
    ({"beta2": 1.0}, r"--beta2 must be in \[0, 1\)"),
    ({"global_caption_prob": 1.5}, "--global-caption-prob must be in"),
    ({"precision": "fp16"}, "--precision must be fp32 or bf16"),
    ({"resume": "no/such/file.pt"}, "--resume must be 'latest' or an existing checkpoint file"),
])
def test_bad_params_name_their_flag(change, message):
    params = TrainParams(**{"train_data_image": "img", "train_data_text_box": "txt", "steps": 5, "output_dir": "out",
                            **change})
    with pytest.raises(ValueError, match=message):
        params.check()
