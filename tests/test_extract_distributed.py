"""``ps3 extract`` under torchrun: 2 real processes (gloo, CPU) split the inputs, each writes its
own shards, and together they cover every input exactly once in one merged index."""
import json
import subprocess
import sys

import pytest

from extract_helpers import environment, fast_model, make_image_shards, make_images
from ps3.extract import load_index, read

pytestmark = pytest.mark.slow  # every test here starts subprocesses

def test_two_ranks_cover_every_input_once(tmp_path):
    model = fast_model(tmp_path / "model")
    make_images(tmp_path / "imgs", 14)
    make_image_shards(tmp_path / "shards", 2, 3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ps3.cli", "extract", tmp_path / "imgs", tmp_path / "shards", "--model", model,
               "--out", tmp_path / "out", "--shard-size", 4, "--workers", 0, "--batch-size", 3]
    proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("20 images") == 1  # the summary, from rank 0 only

    index = load_index(tmp_path / "out")
    expected = {f"img{i:04d}" if i % 2 == 0 else f"sub/img{i:04d}" for i in range(14)}
    expected |= {f"s{s}_{n:03d}" for s in range(2) for n in range(3)}
    keys = [sample.key for sample in read(tmp_path / "out")]
    assert sorted(keys) == sorted(expected) == sorted(index["samples"])  # every input, once
    # 4 file shards (4+4+4+2 images) then one per input shard; shard n was written by rank n % 2.
    ranks = {p.stem: json.loads(p.read_text())["rank"] for p in (tmp_path / "out").glob("part-*.json")}
    assert ranks == {f"part-{n:06d}": n % 2 for n in range(6)}
    assert index["summary"]["images"] == 20 and index["summary"]["shards"] == 6
