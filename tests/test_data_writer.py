"""ps3.data.writer: atomic shards (no final file after an error), byte-reproducible output, and
the paired images/ + text_boxes/ layout read back by ps3.data.shards."""
from __future__ import annotations

import json
import os
import tarfile
import time

import pytest

from ps3.data.shards import iter_paired_shard, iter_shard
from ps3.data.writer import (
    FIXED_MTIME,
    PairedShardWriter,
    ShardWriter,
    encode_record,
    prepare_paired_output,
    write_paired_shards,
)


def _samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:04d}", "jpg": bytes([i]) * (100 + i), "json": encode_record({"i": i, "a": [1]})}
            for i in range(n)]


def test_shard_is_renamed_into_place_only_on_a_clean_close(tmp_path):
    path = tmp_path / "shard.tar"
    with ShardWriter(path) as writer:
        writer.write(_samples(1)[0])
        assert writer.temporary == tmp_path / "shard.tar.tmp" and writer.temporary.exists()
        assert not path.exists()  # nothing under the final name while writing
    assert path.exists() and not writer.temporary.exists()
    assert [s["__key__"] for s in iter_shard(str(path))] == ["0000"]
    with pytest.raises(ValueError, match="is closed"):
        writer.write(_samples(1)[0])


def test_an_exception_leaves_no_file_and_keeps_an_older_shard(tmp_path):
    path = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="interrupted"):
        with ShardWriter(path) as writer:
            for sample in _samples(3):
                writer.write(sample)
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with ShardWriter(path) as writer:
        writer.write(_samples(1)[0])
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(path) as writer:
            writer.write(_samples(2)[1])
            raise KeyboardInterrupt
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["shard.tar"]


def test_output_is_byte_reproducible_with_fixed_members(tmp_path):
    for name in ("a.tar", "b.tar"):
        with ShardWriter(tmp_path / name) as writer:
            for sample in _samples(5):
                writer.write(sample)
        time.sleep(0.01 if name == "a.tar" else 0)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as archive:
        members = archive.getmembers()
    assert [m.name for m in members[:2]] == ["0000.jpg", "0000.json"]  # extensions in sorted order
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(FIXED_MTIME, "ps3", "ps3", 0o444)}


def test_bad_samples_are_refused_with_the_reason(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as writer:
        for bad in ({"jpg": b"x"}, {"__key__": "a.b", "jpg": b"x"}, {"__key__": "", "jpg": b"x"}):
            with pytest.raises(ValueError, match="__key__"):
                writer.write(bad)
        with pytest.raises(ValueError, match="bytes"):
            writer.write({"__key__": "a", "json": {"not": "bytes"}})
        writer.write({"__key__": "dir.v1/a", "jpg": b"x"})  # dots in a folder part are fine
    assert [s["__key__"] for s in iter_shard(str(tmp_path / "s.tar"))] == ["dir.v1/a"]


def test_paired_layout_rolls_shards_with_the_same_keys(tmp_path):
    samples = [(f"{i:04d}", bytes([i]) * 10, {"text": [f"t{i}"], "box": [[0, 0, 1, 1]]}) for i in range(7)]
    written = write_paired_shards(tmp_path / "out", samples, shard_size=3)
    assert [os.path.basename(p) for p in written["images"]] == ["image_00000.tar", "image_00001.tar",
                                                                 "image_00002.tar"]
    assert [os.path.basename(p) for p in written["text_boxes"]] == ["text_box_00000.tar", "text_box_00001.tar",
                                                                     "text_box_00002.tar"]
    pairs = [pair for image, record in zip(written["images"], written["text_boxes"])
             for pair in iter_paired_shard(image, record)]
    assert [p.key for p in pairs] == [s[0] for s in samples]
    assert json.loads(pairs[4].record["json"]) == samples[4][2] and pairs[4].image["jpg"] == samples[4][1]
    assert pairs[4].record["json"] == encode_record(samples[4][2])  # dicts are encoded with sorted keys
    again = write_paired_shards(tmp_path / "again", samples, shard_size=3)
    for first, second in zip(written["images"] + written["text_boxes"], again["images"] + again["text_boxes"]):
        assert open(first, "rb").read() == open(second, "rb").read()


def test_paired_writer_interrupted_keeps_finished_pairs_only(tmp_path):
    with pytest.raises(RuntimeError):
        with PairedShardWriter(tmp_path, shard_size=2, image_ext="png") as writer:
            for i in range(3):
                writer.write(f"k{i}", b"img", b"{}")
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path / "images")) == ["image_00000.tar"]
    assert sorted(os.listdir(tmp_path / "text_boxes")) == ["text_box_00000.tar"]
    assert writer.written["images"] == [str(tmp_path / "images/image_00000.tar")]
    assert set(next(iter_shard(writer.written["images"][0]))) == {"__key__", "__url__", "png"}


def test_existing_shards_are_refused_or_replaced(tmp_path):
    write_paired_shards(tmp_path, [("a", b"1", b"{}"), ("b", b"2", b"{}")], shard_size=1)
    with pytest.raises(ValueError, match="already holds shards .* overwrite=True"):
        write_paired_shards(tmp_path, [("c", b"3", b"{}")], shard_size=1)
    written = write_paired_shards(tmp_path, [("c", b"3", b"{}")], shard_size=1, overwrite=True)
    assert sorted(os.listdir(tmp_path / "images")) == ["image_00000.tar"] and len(written["images"]) == 1
    with pytest.raises(ValueError, match="shard_size must be an int >= 1"):
        PairedShardWriter(tmp_path / "x", shard_size=0)
    images, records = prepare_paired_output(tmp_path / "new")
    assert images.is_dir() and records.is_dir() and images.name == "images" and records.name == "text_boxes"
