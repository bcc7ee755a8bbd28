"""ps3.data.shards: listing shards, reading real tar files (whole, truncated, corrupt, missing),
lockstep pairing, and the skip counting/strict reporting every consumer shares."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ps3.data.shards import (
    SKIP_REASONS,
    SkipCounter,
    SkipReporter,
    iter_paired_shard,
    iter_shard,
    list_shard_pairs,
    list_shards,
)
from ps3.data.writer import ShardWriter, write_paired_shards
from ps3.train.evaluate import iter_box_captions
from ps3.train.model_setup import read_captions
from ps3.processor import PS3ImageProcessor


class Recorder:
    """An on_skip that keeps every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str, str | None, str]] = []

    def __call__(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        assert reason in SKIP_REASONS
        self.reports.append((reason, shard, key, detail))

    @property
    def reasons(self) -> list[str]:
        return [r[0] for r in self.reports]


def _tar(path: Path, samples: list[dict]) -> str:
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _samples(n: int, prefix: str = "k") -> list[dict]:
    return [{"__key__": f"{prefix}{i}", "txt": f"text {i}".encode(), "json": json.dumps({"i": i}).encode()}
            for i in range(n)]


def _cut_inside(path: Path, member: str) -> None:
    """Truncate the tar in the middle of ``member``'s data."""
    with tarfile.open(path) as archive:
        info = archive.getmember(member)
        cut = info.offset_data + info.size // 2
    path.write_bytes(path.read_bytes()[:cut])


# -- listing ----------------------------------------------------------------------------------


def test_list_shards_directory_brace_list_and_errors(tmp_path):
    for i in range(3):
        _tar(tmp_path / f"image_{i:05d}.tar", _samples(1))
    (tmp_path / "notes.txt").write_text("not a shard")
    from_dir = list_shards(tmp_path)
    assert [Path(p).name for p in from_dir] == ["image_00000.tar", "image_00001.tar", "image_00002.tar"]
    assert list_shards(f"{tmp_path}/image_{{00000..00002}}.tar") == from_dir
    assert list_shards(f"{tmp_path}/image_00000.tar::{tmp_path}/image_00002.tar") == [from_dir[0], from_dir[2]]
    assert list_shards(from_dir[:2]) == from_dir[:2]
    assert list_shards(["pipe:cat x.tar", "https://host/a.tar"]) == ["pipe:cat x.tar", "https://host/a.tar"]
    with pytest.raises(ValueError, match=r"image_shards: shard not found: .*image_00003\.tar"):
        list_shards(f"{tmp_path}/image_{{00000..00003}}.tar", argument="image_shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar shards"):
        list_shards(tmp_path / "empty")
    with pytest.raises(ValueError, match="--data: no shards given"):
        list_shards([], argument="--data")
    with pytest.raises(TypeError, match="must be a directory, a brace pattern or a list"):
        list_shards(3)


def test_list_shard_pairs_needs_the_same_count(tmp_path):
    images, records = tmp_path / "i", tmp_path / "t"
    images.mkdir()
    records.mkdir()
    for i in range(2):
        _tar(images / f"image_{i}.tar", _samples(1))
    _tar(records / "text_box_0.tar", _samples(1))
    with pytest.raises(ValueError, match="images has 2 shards but boxes has 1: they must pair up"):
        list_shard_pairs(images, records, image_argument="images", text_box_argument="boxes")
    _tar(records / "text_box_1.tar", _samples(1))
    assert list_shard_pairs(images, records) == (list_shards(images), list_shards(records))


# -- one shard ----------------------------------------------------------------------------------


def test_reads_samples_in_order_with_key_url_and_bytes(tmp_path):
    url = _tar(tmp_path / "a.tar", _samples(4))
    report = Recorder()
    samples = list(iter_shard(url, report))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2", "k3"]
    assert all(s["__url__"] == url for s in samples)
    assert samples[2]["txt"] == b"text 2" and json.loads(samples[2]["json"]) == {"i": 2}
    assert set(samples[0]) == {"__key__", "__url__", "txt", "json"}
    assert report.reports == []


def test_truncated_tar_keeps_what_came_before_and_reports_once(tmp_path):
    path = tmp_path / "cut.tar"
    _tar(path, _samples(6))
    _cut_inside(path, "k3.json")
    report = Recorder()
    assert [s["__key__"] for s in iter_shard(str(path), report)] == ["k0", "k1", "k2"]
    assert report.reasons == ["tar_error"]
    reason, shard, key, detail = report.reports[0]
    assert shard == str(path) and key is None and "cannot read the tar after key 'k2'" in detail
    # Cut inside the second file of a sample: the sample comes out with the files read whole.
    _tar(path, _samples(6))
    _cut_inside(path, "k3.txt")
    samples = list(iter_shard(str(path), report))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2", "k3"] and set(samples[3]) == {"__key__", "__url__",
                                                                                                "json"}


@pytest.mark.parametrize("content", [None, b"", b"this is not a tar file at all" * 40])
def test_missing_empty_or_garbage_shard_is_one_tar_error(tmp_path, content):
    path = tmp_path / "bad.tar"
    if content is not None:
        path.write_bytes(content)
    report = Recorder()
    assert list(iter_shard(str(path), report)) == []
    assert report.reasons == ["tar_error"]
    if content is None:
        assert "cannot open the shard" in report.reports[0][3]


def test_duplicate_member_is_reported_and_the_first_copy_kept(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in (("a.txt", b"first"), ("a.txt", b"second"), ("b.txt", b"bee")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    report = Recorder()
    samples = list(iter_shard(str(path), report))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("a", b"first"), ("b", b"bee")]
    assert report.reports[0][:3] == ("duplicate_file", str(path), "a")


def test_without_on_skip_problems_are_ignored(tmp_path):
    path = tmp_path / "cut.tar"
    _tar(path, _samples(4))
    _cut_inside(path, "k2.json")
    assert [s["__key__"] for s in iter_shard(str(path))] == ["k0", "k1"]


def test_strict_reporter_raises_naming_reason_shard_and_key(tmp_path):
    path = tmp_path / "cut.tar"
    _tar(path, _samples(4))
    _cut_inside(path, "k2.txt")
    with pytest.raises(ValueError, match=r"bad training data \(tar_error\) in shard .*cut\.tar: cannot read"):
        list(iter_shard(str(path), SkipReporter(strict=True)))
    with pytest.raises(ValueError, match=r"\(bad_box\) in shard s, key 'k': a box"):
        SkipReporter(strict=True)("bad_box", "s", "k")
    with pytest.raises(RuntimeError, match="unknown skip reason"):
        SkipReporter()("no_such_reason", "s", None)


def test_reporter_and_counter_count_by_reason():
    report = SkipReporter()
    for reason in ("bad_json", "bad_json", "tar_error"):
        report(reason, "shard", None, "")
    assert report.take() == {"bad_json": 2, "tar_error": 1} and report.take() == {}
    counter = SkipCounter({"bad_box": 1})
    counter.update({"bad_box": 2, "tar_error": 0, "bad_json": 1})
    assert counter.as_dict() == {"bad_box": 3, "bad_json": 1} and counter.total == 4
    assert counter["tar_error"] == 0 and "bad_box" in repr(counter)
    counter.reset()
    assert counter.total == 0


# -- lockstep pairing -------------------------------------------------------------------------------


def _pair(tmp_path: Path, image_keys: list[str], record_keys: list[str]) -> tuple[str, str]:
    images = _tar(tmp_path / "image.tar", [{"__key__": k, "jpg": k.encode()} for k in image_keys])
    records = _tar(tmp_path / "text_box.tar", [{"__key__": k, "json": b"{}"} for k in record_keys])
    return images, records


def test_pairs_by_key_in_lockstep(tmp_path):
    images, records = _pair(tmp_path, ["a", "b", "c"], ["a", "b", "c"])
    pairs = list(iter_paired_shard(images, records))
    assert [p.key for p in pairs] == ["a", "b", "c"]
    assert pairs[1].image["jpg"] == b"b" and pairs[1].record["json"] == b"{}"
    assert (pairs[0].image_shard, pairs[0].record_shard) == (images, records)


def test_missing_files_cost_one_sample_each(tmp_path):
    images, records = _pair(tmp_path, ["a", "b", "c", "d", "e"], ["a", "c", "d", "x", "e"])
    report = Recorder()
    assert [p.key for p in iter_paired_shard(images, records, report)] == ["a", "c", "d", "e"]
    assert sorted(report.reasons) == ["missing_image", "missing_json"]
    assert ("missing_json", images, "b") in [r[:3] for r in report.reports]
    assert ("missing_image", records, "x") in [r[:3] for r in report.reports]


def test_swapped_keys_are_realigned(tmp_path):
    images, records = _pair(tmp_path, ["a", "b", "c", "d"], ["a", "c", "b", "d"])
    report = Recorder()
    keys = [p.key for p in iter_paired_shard(images, records, report)]
    assert keys[0] == "a" and keys[-1] == "d" and len(keys) == 3
    assert report.reasons == ["key_mismatch", "key_mismatch"]
    with pytest.raises(ValueError, match=r"key_mismatch.*text-box shard .* has key 'c' at this position"):
        list(iter_paired_shard(images, records, SkipReporter(strict=True), strict=True))


def test_a_truncated_side_drops_only_what_is_lost(tmp_path):
    images, records = _pair(tmp_path, [f"k{i}" for i in range(6)], [f"k{i}" for i in range(6)])
    _cut_inside(Path(images), "k4.jpg")
    report = Recorder()
    assert [p.key for p in iter_paired_shard(images, records, report)] == ["k0", "k1", "k2", "k3"]
    assert sorted(report.reasons) == ["missing_image", "missing_image", "tar_error"]


# -- the other consumers read through the same reader ---------------------------------------------


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_read_captions_and_iter_box_captions_survive_a_truncated_shard(tmp_path):
    records = [{"text": [f"object {i}"], "box": [[0, 0, 8, 8]], "global_text": f"scene {i}"} for i in range(6)]
    written = write_paired_shards(tmp_path, ((f"k{i}", _jpeg(16, 16), r) for i, r in enumerate(records)), shard_size=3)
    _cut_inside(Path(written["text_boxes"][1]), "k4.json")
    captions = read_captions(written["text_boxes"], limit=100)
    assert captions == [c for i in range(4) for c in (f"object {i}", f"scene {i}")]
    assert read_captions(written["text_boxes"], limit=2) == ["object 0", "scene 0", "object 1", "scene 1"]
    processor = PS3ImageProcessor(image_size=8)
    found = [captions for _, captions, _ in iter_box_captions(written["images"], written["text_boxes"], processor)]
    assert found == [[f"object {i}"] for i in range(4)]
