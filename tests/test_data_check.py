"""``ps3 data check`` counts what the trainer would skip, with examples, and fails on nothing usable;
``ps3 data show`` draws a sample's boxes where its record puts them."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")

from ps3.data.shards import iter_shard  # noqa: E402
from ps3.data.writer import write_paired_shards  # noqa: E402
from ps3.train.synthetic import encode_jpeg, write_synthetic_dataset  # noqa: E402

from damaged_data import write_damaged_dataset  # noqa: E402


def _skipped(output: str) -> dict[str, int]:
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^skipped\s+(\d+) (\w+):", output, re.MULTILINE)}


def test_check_counts_every_skip_reason_like_the_trainer(tmp_path, capsys, run_cli):
    manifest = write_damaged_dataset(tmp_path, seed=0, size=48)
    code, output = run_cli.in_process("data", "check", tmp_path)
    assert code == 0, output
    assert _skipped(output) == manifest["expected_skips"]
    assert f"{len(manifest['usable_keys'])} usable" in output
    # Examples name the shard, the key and what is wrong.
    assert re.search(r"e\.g\. text_box_00001\.tar key \S+: box \[\d+, \d+, \d+, \d+\] for an image of 48x48", output)
    assert re.search(r"e\.g\. image_00000\.tar key \S+: ", output)


def test_check_fails_when_nothing_is_usable(tmp_path, capsys, run_cli):
    jpeg = encode_jpeg(Image.new("RGB", (32, 32), (90, 90, 90)))
    records = [{"text": ["off the image"], "box": [[40, 40, 50, 50]]}, {"text": [], "box": [], "global_text": " "}]
    write_paired_shards(tmp_path, [(f"k{i}", jpeg, record) for i, record in enumerate(records)], shard_size=5)
    code, output = run_cli.in_process("data", "check", tmp_path)
    assert code == 1 and "nothing usable" in output
    assert _skipped(output) == {"box_outside_image": 1, "empty_caption": 1, "no_usable_caption": 2}
    code, output = run_cli.in_process("data", "check", tmp_path / "missing")
    assert code == 2 and len(output.strip().splitlines()) == 1


def test_show_draws_the_boxes_of_the_record(tmp_path, capsys, run_cli):
    write_synthetic_dataset(tmp_path / "data", 3, seed=0, size=96, shard_size=2)
    code, output = run_cli.in_process("data", "show", tmp_path / "data", "--key", "00000002",
                                      "--out", tmp_path / "s.png")
    assert code == 0 and "key 00000002" in output
    drawing = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
    assert drawing.shape[1] == 96 and drawing.shape[0] > 96  # a band for the global caption under the image
    record = next(json.loads(s["json"]) for s in iter_shard(str(tmp_path / "data/text_boxes/text_box_00001.tar")))
    x0, y0, x1, y1 = record["box"][0]
    first_colour = np.array([230, 25, 75])
    # The left edge of the first box is drawn in the first colour (below its label).
    edge = drawing[int(y1) - 3, x0]
    assert np.abs(edge - first_colour).max() < 10, edge
    code, output = run_cli.in_process("data", "show", tmp_path / "data", "--key", "nope", "--out", tmp_path / "n.png")
    assert code == 2 and "no sample 'nope'" in output
    assert "its keys are '00000000', '00000001', '00000002'\n" in output and len(output.splitlines()) == 1
    assert run_cli.in_process("data", "show", tmp_path / "data", "--out", tmp_path / "first.png")[0] == 0
