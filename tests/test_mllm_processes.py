"""``ps3 mllm train`` as real processes: Ctrl-C (SIGINT) mid-run writes a checkpoint and the
resumed run ends where an uninterrupted one does; ``torchrun`` with 2 processes (DDP, or FSDP
with ``--fsdp``; gloo) trains the same weights as one process with the same global batch."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _mllm_runs import BUDGETS, params, toy_dataset  # noqa: E402
from golden import MODEL_DIR  # noqa: E402
from ps3.mllm import TwoPassPS3  # noqa: E402
from ps3.mllm.trainer import train  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tolerances import assert_close_paths  # noqa: E402
from tolerances import SAME_KERNELS

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = {**SAME_KERNELS, **os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


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


def one_answer_dataset(root):
    """8 scenes with one answer each, all "yes": every row has the same number of answer tokens, so
    the mean of the processes' losses is the one process's loss over the global batch."""
    data = toy_dataset(root, 8, answer="yes")
    records = json.loads(data.read_text())
    for record in records:
        record["conversations"] = record["conversations"][:2]
    data.write_text(json.dumps(records))
    return data


def text_rows_first_on_rank_0(data):
    """Make rank 0's first batch of 2 (of 2 processes) text-only rows, the same answer: in the first
    step one process has no image rows while the other has only image rows."""
    from ps3.mllm.trainer import batch_order
    from ps3.train.distributed import DistInfo

    records = json.loads(data.read_text())
    for i in batch_order(len(records), 0, 0, DistInfo(rank=0, world_size=2), 2)[0]:
        records[i] = {"id": f"text{i}", "conversations": [{"from": "human", "value": f"question number {i}?"},
                                                          records[i]["conversations"][1]]}
    data.write_text(json.dumps(records))


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(tmp_path):
    data = one_answer_dataset(tmp_path / "data")
    one = subprocess.run(command(data, tmp_path / "one", "--steps", "2", "--batch", "4"), capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*command(data, tmp_path / "two", "--steps", "2", "--batch", "2")[1:])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("step 2/2") == 1  # rank 0 logs
    want = load_file(tmp_path / "one" / "connector.safetensors")
    got = load_file(tmp_path / "two" / "connector.safetensors")
    for name in want:
        assert_close_paths(got[name], want[name], name)


@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process_and_resumes_from_the_gathered_checkpoint(tmp_path):
    data = one_answer_dataset(tmp_path / "data")
    text_rows_first_on_rank_0(data)  # the processes' steps differ: they must still call the LLM alike
    # The whole LLM trains (every sharded tensor moves). With selection weight 0 the mean of the
    # processes' losses is the one process's loss even though only one process has boxes.
    sft = ("--stage", "sft", "--steps", "2", "--selection-weight", "0")
    train(params(data, tmp_path / "one", stage="sft", steps=2, selection_weight=0.0, batch=4))  # in process
    fsdp = (*sft, "--batch", "2", "--fsdp", "--save-every", "1")
    two = torchrun(*command(data, tmp_path / "two", *fsdp)[1:])
    assert two.returncode == 0, two.stderr[-3000:]
    [line] = [line for line in two.stdout.splitlines() if line.startswith("--fsdp:")]
    assert "2 decoder layers of LlamaForCausalLM sharded over 2 processes (this one stores" in line
    assert 45 <= int(line.split("stores ")[1].split("%")[0]) <= 55  # half the LLM's weights
    files = ("connector.safetensors", "llm/model.safetensors")
    trained = {name: load_file(tmp_path / "two" / name) for name in files}
    for name in files:  # the run directory holds full tensors, equal to one process's
        want = load_file(tmp_path / "one" / name)
        assert want.keys() == trained[name].keys(), name
        for key in want:
            assert_close_paths(trained[name][key], want[key], f"{name}:{key}")
    # Resume from step 1: every rank loads the full checkpoint into its shards and repeats step 2.
    (tmp_path / "two" / "checkpoints" / "step_00000002.pt").unlink()
    (tmp_path / "two" / "connector.safetensors").unlink()
    resumed = torchrun(*command(data, tmp_path / "two", *fsdp, "--resume")[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "done: 2 steps" in resumed.stdout
    for name in files:
        got = load_file(tmp_path / "two" / name)
        assert all(torch.equal(got[k], trained[name][k]) for k in got), name
    helper = TwoPassPS3.from_pretrained(tmp_path / "two")
    for key, value in trained["connector.safetensors"].items():
        assert torch.equal(helper.state_dict()[key], value), key
