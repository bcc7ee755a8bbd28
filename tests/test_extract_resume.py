"""``ps3 extract`` resume: a run killed with SIGKILL leaves only complete shards; the rerun keeps
them, finishes the rest, and every key appears exactly once; ``--overwrite`` redoes everything."""
import json
import os
import signal
import subprocess
import time

import pytest

from extract_helpers import environment, fast_model, make_images
from ps3.data.shards import iter_shard
from ps3.extract import extract, load_index, read

IMAGES, SHARD_SIZE = 80, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(fast_model(tmp_path_factory.mktemp("model")))


def kill_after_first_shard(run_cli, images, out, model) -> list[str]:
    """Start a real `ps3 extract` process, SIGKILL it once its first shard is complete."""
    command = run_cli.command("extract", images, "--model", model, "--out", out, "--shard-size", SHARD_SIZE,
                              "--batch-size", 2, "--workers", 1, "--quiet")
    proc = subprocess.Popen(command, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("part-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    return sorted(p.name for p in out.glob("part-*.tar"))


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_every_key_once(tmp_path, model, run_cli):
    make_images(tmp_path / "imgs", IMAGES)
    out = tmp_path / "out"
    finished = kill_after_first_shard(run_cli, tmp_path / "imgs", out, model)
    assert 1 <= len(finished) < IMAGES // SHARD_SIZE, finished  # killed mid-run
    assert not (out / "index.json").exists()
    for name in finished:  # a shard under its final name is complete: it matches its sidecar
        keys = [s["__key__"] for s in iter_shard(str(out / name), lambda *problem: pytest.fail(str(problem)))]
        sidecar = json.loads((out / name.replace(".tar", ".json")).read_text())
        assert keys == [key for key, _tokens in sidecar["samples"]]
        assert len(keys) == SHARD_SIZE
    before = {name: (out / name).stat().st_mtime_ns for name in finished}

    summary = extract(tmp_path / "imgs", out, model=model, batch_size=4, workers=0, shard_size=SHARD_SIZE,
                      progress=False)
    assert summary["resumed_shards"] == len(finished) and summary["images"] == IMAGES
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == before  # kept, not redone
    keys = [sample.key for sample in read(out)]
    assert len(keys) == len(set(keys)) == IMAGES
    assert not list(out.glob("*.tmp"))
    assert len(load_index(out)["samples"]) == IMAGES

    again = extract(tmp_path / "imgs", out, model=model, workers=0, shard_size=SHARD_SIZE, progress=False)
    assert again["resumed_shards"] == IMAGES // SHARD_SIZE and again["images"] == IMAGES

    redone = extract(tmp_path / "imgs", out, model=model, workers=0, shard_size=SHARD_SIZE,
                     overwrite=True, progress=False)
    assert redone["resumed_shards"] == 0 and redone["images"] == IMAGES
    assert all((out / name).stat().st_mtime_ns != before[name] for name in finished)


def test_rerun_with_other_settings_or_inputs_is_refused(tmp_path, model):
    make_images(tmp_path / "imgs", 6)
    extract(tmp_path / "imgs", tmp_path / "out", model=model, workers=0, shard_size=3, progress=False)
    with pytest.raises(ValueError, match="written .*other settings.*--overwrite"):
        extract(tmp_path / "imgs", tmp_path / "out", model=model, workers=0, shard_size=3, layers=2,
                progress=False)
    make_images(tmp_path / "imgs", 1, seed=1, prefix="new")  # new0000.jpg sorts first: every unit changes
    with pytest.raises(ValueError, match="written from other inputs"):
        extract(tmp_path / "imgs", tmp_path / "out", model=model, workers=0, shard_size=3, progress=False)
