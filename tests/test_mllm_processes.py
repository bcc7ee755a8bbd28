"""``ps3 mllm train`` as real processes: Ctrl-C (SIGINT) mid-run writes a checkpoint and the
resumed run ends where an uninterrupted one does; ``torchrun`` with 2 processes (DDP, gloo)
trains the same connector as one process with the same global batch."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _mllm_runs import BUDGETS, toy_dataset  # noqa: E402
from golden import MODEL_DIR  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tolerances import assert_close_paths  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def command(data, out, *extra):
    return [sys.executable, "-m", "ps3.cli", "mllm", "train", "--vision", str(MODEL_DIR), "--llm", "tiny",
            "--data", str(data), "--images", str(data.parent), "--out", str(out), "--budgets",
            *map(str, BUDGETS), "--log-every", "1", *map(str, extra)]


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    data = toy_dataset(tmp_path / "data", 6)
    args = ("--stage", "sft", "--steps", "5", "--batch", "2")
    whole = subprocess.run(command(data, tmp_path / "whole", *args), capture_output=True, text=True, timeout=300,
                           env=ENV)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(command(data, tmp_path / "cut", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("step 2/5"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in rest
    step = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert step < 5 and (tmp_path / "cut" / "checkpoints" / f"step_{step:08d}.pt").is_file()
    resumed = subprocess.run(command(data, tmp_path / "cut", *args, "--resume"), capture_output=True, text=True,
                             timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "done: 5 steps" in resumed.stdout
    for name in ("connector.safetensors", "llm/model.safetensors"):
        want, got = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(tmp_path):
    data = toy_dataset(tmp_path / "data", 8, answer="yes")
    records = json.loads(data.read_text())
    for record in records:  # one answer each: every row has the same number of answer tokens
        record["conversations"] = record["conversations"][:2]
    data.write_text(json.dumps(records))
    one = subprocess.run(command(data, tmp_path / "one", "--steps", "2", "--batch", "4"), capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *command(data, tmp_path / "two", "--steps", "2", "--batch", "2")[1:]],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("step 2/2") == 1  # rank 0 logs
    want = load_file(tmp_path / "one" / "connector.safetensors")
    got = load_file(tmp_path / "two" / "connector.safetensors")
    for name in want:
        assert_close_paths(got[name], want[name], name)
