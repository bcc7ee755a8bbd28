"""Ctrl-C / SIGTERM to a real ``ps3 train`` process: the finished step is saved, the run resumes
from it and exports it."""
import importlib.util
import json
import re
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("webdataset")

from ps3.train.checkpoint import list_checkpoints  # noqa: E402
from ps3.train.synthetic import write_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "_train_worker.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("_train_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    root = tmp_path_factory.mktemp("train")
    write_synthetic_dataset(root / "data", 16, seed=0, size=64, shard_size=8)
    (root / "config.json").write_text(json.dumps(worker.MICRO_CONFIG))
    (root / "preprocessor_config.json").write_text(json.dumps(worker.PREPROCESSOR))
    return root


def _train_args(root, out, steps):
    return ["train", "--model", root / "config.json", "--train-data-image", root / "data" / "images",
            "--train-data-text-box", root / "data" / "text_boxes", "--output-dir", out, "--steps", steps,
            "--save-every-steps", 1000, "--batch-size", 4, "--workers", 0, "--log-every", 1, "--device", "cpu",
            "--resume", "latest"]


def _signal_after_steps(proc, metrics: Path, steps: int, signum: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            proc.send_signal(signum)
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"the run did not reach step {steps} (exit code {proc.poll()})")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_finished_step_and_the_run_continues(setup, tmp_path, run_cli, signum):
    run = tmp_path / "run"
    proc = run_cli.popen(*_train_args(setup, run, 1000))  # far from any --save-every-steps checkpoint
    _signal_after_steps(proc, run / "metrics.jsonl", 2, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    step = int(re.search(rf"interrupted \({signal.Signals(signum).name}\) at step (\d+), saved", out).group(1))
    assert step >= 2 and [s for s, _ in list_checkpoints(run)] == [step]
    if signum != signal.SIGINT:
        return
    code, exported = run_cli.in_process("export", run, tmp_path / "model")
    assert code == 0 and f"(step {step})" in exported and (tmp_path / "model" / "model.safetensors").is_file()
    code, resumed = run_cli.in_process(*_train_args(setup, run, step + 1))
    assert code == 0 and "resumed from" in resumed and f"at step {step} (epoch" in resumed
    assert [s for s, _ in list_checkpoints(run)][-1] == step + 1
