"""The pre-training data pipeline against real webdataset shards written in tmp_path."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from ps3.processor import PS3ImageProcessor
from ps3.data.boxes import box_to_gt_map
from ps3.data.shards import SKIP_REASONS, list_shards
from ps3.train.loader import build_dataloader
from ps3.train.synthetic import write_synthetic_dataset

from damaged_data import write_damaged_dataset

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _jpeg(width: int = 24, height: int = 16, colour=(120, 60, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _record(texts, boxes, global_text=None) -> dict:
    record = {"text": texts, "box": boxes}
    if global_text is not None:
        record["global_text"] = global_text
    return record


def _write(root: Path, images: list[list[tuple[str, bytes]]], records: list[list[tuple[str, object]]]):
    """Write paired shard sets; a record may be a dict (JSON-encoded) or raw bytes."""
    image_dir, record_dir = root / "images", root / "text_boxes"
    image_dir.mkdir(parents=True)
    record_dir.mkdir(parents=True)
    for i, samples in enumerate(images):
        with TarWriter(str(image_dir / f"image_{i:05d}.tar"), encoder=False, mtime=0) as writer:
            for key, data in samples:
                writer.write({"__key__": key, "jpg": data})
    for i, samples in enumerate(records):
        with TarWriter(str(record_dir / f"text_box_{i:05d}.tar"), encoder=False, mtime=0) as writer:
            for key, record in samples:
                data = record if isinstance(record, bytes) else json.dumps(record).encode()
                writer.write({"__key__": key, "json": data})
    return str(image_dir), str(record_dir)


def _simple(root: Path, shards: int = 2, per_shard: int = 3, record=None):
    """shards × per_shard samples, keys s{shard}k{i}, each with one local caption naming its key."""
    images, records = [], []
    for s in range(shards):
        images.append([(f"s{s}k{i}", _jpeg(colour=(40 * i, 30 * s, 100))) for i in range(per_shard)])
        records.append([(f"s{s}k{i}", record or _record([f"object {s} {i}"], [[2, 2, 10, 8]], f"scene {s} {i}"))
                        for i in range(per_shard)])
    return _write(root, images, records)


def _load(image_dir, record_dir, **kwargs):
    options = dict(image_size=8, mean=MEAN, std=STD, batch_size=2, shuffle=False)
    options.update(kwargs)
    return build_dataloader(image_dir, record_dir, **options)


def _all(loader) -> list[dict]:
    return list(loader)


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


# -- shards ---------------------------------------------------------------------------------


def test_shard_sets_must_pair_up(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=3, per_shard=1)
    from_dir = list_shards(image_dir)
    with pytest.raises(ValueError, match="pair up shard by shard"):
        build_dataloader(from_dir[:2], record_dir, image_size=8, mean=MEAN, std=STD, batch_size=1)


def test_builder_argument_errors(tmp_path):
    image_dir, record_dir = _simple(tmp_path)
    for bad in ({"batch_size": 0}, {"global_caption_prob": 1.5}, {"sample_n_box_each_image": 0},
                {"workers": -1}, {"rank": 0}, {"rank": 2, "world_size": 2}, {"image_size": 0},
                {"mean": [0.5, 0.5]}):
        with pytest.raises(ValueError):
            _load(image_dir, record_dir, **bad)
    with pytest.raises(ValueError, match="cannot be split between 3 ranks"):
        _load(image_dir, record_dir, rank=0, world_size=3)


# -- per-sample content ---------------------------------------------------------------------


def test_batch_layout_and_normalisation(tmp_path):
    colour = (255, 0, 128)
    jpeg = _jpeg(40, 20, colour)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[10, 20].astype(np.float64)
    image_dir, record_dir = _write(tmp_path, [[("a", jpeg), ("b", jpeg)]],
                                   [[("a", _record(["x"], [[0, 0, 4, 4]])), ("b", _record(["y"], [[0, 0, 4, 4]]))]])
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    (batch,) = _all(_load(image_dir, record_dir, mean=mean, std=std, image_size=6))
    assert set(batch) == {"pixel_values", "texts", "gt_selection_maps", "is_global_text", "keys", "skipped"}
    assert batch["pixel_values"].shape == (2, 3, 6, 6) and batch["pixel_values"].dtype == torch.float32
    expected = (decoded / 255.0 - np.array(mean)) / np.array(std)
    got = batch["pixel_values"][0, :, 3, 3].double().numpy()
    np.testing.assert_allclose(got, expected, atol=2.0 / 255 / min(std))
    assert batch["texts"] == ["x", "y"] and batch["keys"] == ["a", "b"]
    assert batch["gt_selection_maps"].shape == (2, 6, 6) and batch["gt_selection_maps"].dtype == torch.float32
    assert batch["is_global_text"].shape == (2, 1) and batch["is_global_text"].dtype == torch.bool
    assert batch["skipped"] == {}


def test_pixels_match_the_inference_processor(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    image_dir, record_dir = _write(tmp_path, [[("a", buffer.getvalue())]], [[("a", _record(["x"], [[0, 0, 4, 4]]))]])
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    (batch,) = _all(_load(image_dir, record_dir, mean=mean, std=std, image_size=20, batch_size=1))
    expected = PS3ImageProcessor(image_size=20, mean=mean, std=std).preprocess_image(buffer.getvalue())
    assert torch.equal(batch["pixel_values"][0], expected)


def test_max_pixels_is_honoured(tmp_path):
    image_dir, record_dir = _write(tmp_path, [[("a", _jpeg(40, 30)), ("b", _jpeg(10, 10))]],
                                   [[("a", _record(["x"], [[0, 0, 4, 4]])), ("b", _record(["y"], [[0, 0, 4, 4]]))]])
    loader = _load(image_dir, record_dir, max_pixels=1000)
    assert _keys(_all(loader)) == ["b"] and loader.counter.as_dict() == {"bad_image": 1}


def test_box_map_exact_for_hand_computed_case(tmp_path):
    # The case of test_data_boxes.test_box_map_exact_for_hand_computed_case, through the pipeline.
    expected = torch.zeros(10, 10)
    expected[1:5, 1:6] = 1
    image_dir, record_dir = _write(tmp_path, [[("a", _jpeg(100, 50))]],
                                   [[("a", _record(["the box"], [[15, 5, 42.5, 20]]))]])
    (batch,) = _all(_load(image_dir, record_dir, image_size=10, batch_size=1))
    assert torch.equal(batch["gt_selection_maps"][0], expected)
    assert not batch["is_global_text"].any()



def test_height_width_image_size_gives_matching_pixels_and_maps(tmp_path):
    # A (height, width) image_size: pixels (3, H, W) and gt maps (H, W), the box scaled per axis.
    image_dir, record_dir = _write(tmp_path, [[("a", _jpeg(100, 50))]],
                                   [[("a", _record(["the box"], [[15, 5, 42.5, 20]]))]])
    (batch,) = _all(_load(image_dir, record_dir, image_size=[10, 12], batch_size=1))
    assert batch["pixel_values"].shape == (1, 3, 10, 12) and batch["gt_selection_maps"].shape == (1, 10, 12)
    assert torch.equal(batch["gt_selection_maps"][0], box_to_gt_map([15, 5, 42.5, 20], (100, 50), (10, 12)))
    expected = torch.zeros(10, 12)
    expected[1:5, 1:7] = 1  # rows 5·10/50 = 1 .. 20·10/50 = 4; columns ⌊15·12/100⌋ = 1 .. ⌈42.5·12/100⌉ = 6
    assert torch.equal(batch["gt_selection_maps"][0], expected)

def _captioned(tmp_path, records: list[dict]):
    samples = [(f"k{i}", _jpeg(32, 32)) for i in range(len(records))]
    return _write(tmp_path, [samples], [[(f"k{i}", r) for i, r in enumerate(records)]])


def test_global_versus_local_choice(tmp_path):
    both = _record(["left thing", "right thing"], [[0, 0, 8, 8], [16, 16, 32, 32]], "the whole scene")
    only_global = _record([], [], "only a global caption")
    image_dir, record_dir = _captioned(tmp_path, [both] * 12 + [only_global])

    batches = _all(_load(image_dir, record_dir, batch_size=13, global_caption_prob=0.0, image_size=8))
    texts, is_global = batches[0]["texts"], batches[0]["is_global_text"].view(-1).tolist()
    assert all(t in ("left thing", "right thing") for t in texts[:12]) and not any(is_global[:12])
    assert texts[12] == "only a global caption" and is_global[12]  # only global → global
    assert torch.equal(batches[0]["gt_selection_maps"][12], torch.ones(8, 8))

    batches = _all(_load(image_dir, record_dir, batch_size=13, global_caption_prob=1.0, image_size=8))
    assert batches[0]["texts"][:12] == ["the whole scene"] * 12
    assert batches[0]["is_global_text"].all()
    assert torch.equal(batches[0]["gt_selection_maps"], torch.ones(13, 8, 8))

    mixed = _all(_load(image_dir, record_dir, batch_size=13, global_caption_prob=0.5, image_size=8, seed=3))
    flags = mixed[0]["is_global_text"].view(-1)[:12].tolist()
    assert 0 < sum(flags) < 12


def test_n_boxes_per_image_without_replacement(tmp_path):
    boxes = [[0, 0, 8, 8], [8, 8, 16, 16], [16, 16, 32, 32]]
    three = _record(["one", "two", "three"], boxes, "all")
    image_dir, record_dir = _captioned(tmp_path, [three] * 4)
    (batch,) = _all(_load(image_dir, record_dir, batch_size=4, sample_n_box_each_image=2, image_size=32))
    assert len(batch["texts"]) == 8 and batch["gt_selection_maps"].shape == (8, 32, 32)
    assert batch["is_global_text"].shape == (8, 1)
    for image in range(4):
        pair = batch["texts"][2 * image: 2 * image + 2]
        assert len(set(pair)) == 2  # without replacement
        for j, text in enumerate(pair):
            box = boxes[["one", "two", "three"].index(text)]
            assert torch.equal(batch["gt_selection_maps"][2 * image + j], box_to_gt_map(box, (32, 32), 32))
    # More boxes asked than exist: every one is used, then the draw starts again.
    (batch,) = _all(_load(image_dir, record_dir, batch_size=1, sample_n_box_each_image=5, image_size=8, num_batches=1))
    assert len(batch["texts"]) == 5 and set(batch["texts"][:3]) == {"one", "two", "three"}


def test_sentence_masking_in_the_pipeline(tmp_path):
    caption = "First. Second. Third. Fourth."
    image_dir, record_dir = _captioned(tmp_path, [_record([caption], [[0, 0, 4, 4]])] * 8)
    plain = _all(_load(image_dir, record_dir, batch_size=8))[0]["texts"]
    assert plain == [caption] * 8
    masked = _all(_load(image_dir, record_dir, batch_size=8, sentence_masking=True, seed=1))[0]["texts"]
    assert len(set(masked)) > 1
    for text in masked:
        assert text and text in caption


def test_tokenize_callable(tmp_path):
    image_dir, record_dir = _simple(tmp_path)
    tokenize = lambda texts: torch.tensor([[len(t), 7] for t in texts])  # noqa: E731
    for batch in _load(image_dir, record_dir, tokenize=tokenize):
        assert torch.equal(batch["text_ids"], torch.tensor([[len(t), 7] for t in batch["texts"]]))


# -- order, determinism, splitting, resume ---------------------------------------------------


def _signature(batches) -> list:
    return [(b["keys"], b["texts"], b["pixel_values"].sum().item(), b["is_global_text"].sum().item()) for b in batches]


def test_deterministic_for_seed_and_epoch(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=4, per_shard=4,
                                    record=_record(["a. b. c.", "d"], [[0, 0, 3, 3], [4, 4, 9, 9]], "g"))
    options = dict(shuffle=True, shuffle_buffer=5, global_caption_prob=0.5, sentence_masking=True, batch_size=3)
    first = _all(_load(image_dir, record_dir, seed=7, **options))
    again = _all(_load(image_dir, record_dir, seed=7, **options))
    assert _signature(first) == _signature(again)
    assert sorted(_keys(first)) == sorted(f"s{s}k{i}" for s in range(4) for i in range(4))
    other_seed = _all(_load(image_dir, record_dir, seed=8, **options))
    other_epoch = _all(_load(image_dir, record_dir, seed=7, epoch=1, **options))
    assert _keys(other_seed) != _keys(first) and _keys(other_epoch) != _keys(first)
    assert sorted(_keys(other_epoch)) == sorted(_keys(first))
    unshuffled = _keys(_all(_load(image_dir, record_dir, seed=7, batch_size=3)))
    assert unshuffled == [f"s{s}k{i}" for s in range(4) for i in range(4)]


def test_rank_and_worker_splitting_is_disjoint_and_complete(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=4, per_shard=3)
    everything = sorted(f"s{s}k{i}" for s in range(4) for i in range(3))
    per_rank = []
    for rank in range(2):
        loader = _load(image_dir, record_dir, rank=rank, world_size=2, workers=2, shuffle=True, seed=5, batch_size=2)
        keys = _keys(_all(loader))
        assert len(keys) == len(set(keys)) == 6
        # Each worker reads whole shards, and each shard belongs to one worker of one rank.
        shard_owner = {}
        for worker in range(2):
            for index in loader.dataset.shards_of(worker, 2):
                assert index not in shard_owner
                shard_owner[index] = worker
        assert len(shard_owner) == 2
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1])
    assert sorted(per_rank[0] | per_rank[1]) == everything


def test_workers_give_the_same_samples_as_one_process(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=4, per_shard=3)
    single = _keys(_all(_load(image_dir, record_dir, shuffle=True, seed=2)))
    multi = _keys(_all(_load(image_dir, record_dir, shuffle=True, seed=2, workers=2)))
    assert sorted(single) == sorted(multi)
    assert multi == _keys(_all(_load(image_dir, record_dir, shuffle=True, seed=2, workers=2)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_by_skipping_batches_continues_exactly(tmp_path, workers):
    manifest = write_damaged_dataset(tmp_path / "damaged", seed=1, size=48)
    image_dir, record_dir = str(tmp_path / "damaged/images"), str(tmp_path / "damaged/text_boxes")
    options = dict(shuffle=True, shuffle_buffer=3, seed=11, epoch=2, batch_size=2, workers=workers,
                   global_caption_prob=0.5)
    full = _all(_load(image_dir, record_dir, **options))
    assert len(full) >= 3
    for skip in (1, 3):
        resumed = _all(_load(image_dir, record_dir, skip_batches=skip, **options))
        assert _signature(resumed) == _signature(full[skip:])
    loader = _load(image_dir, record_dir, **options)
    loader.set_epoch(2, skip_batches=2)
    assert _signature(_all(loader)) == _signature(full[2:])
    assert _signature(_all(loader)) == _signature(full)  # the offset applied to one pass only
    assert sorted(_keys(full)) == sorted(manifest["usable_keys"])


def test_num_batches_resample_and_drop_last(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=2, per_shard=3)
    assert [len(b["keys"]) for b in _all(_load(image_dir, record_dir, batch_size=4))] == [4, 2]
    assert [len(b["keys"]) for b in _all(_load(image_dir, record_dir, batch_size=4, drop_last=True))] == [4]
    assert len(_all(_load(image_dir, record_dir, batch_size=1, num_batches=4))) == 4
    options = dict(batch_size=4, resample=True, num_batches=5, seed=3, shuffle=True)
    resampled = _all(_load(image_dir, record_dir, **options))
    assert len(resampled) == 5 and all(len(b["keys"]) == 4 for b in resampled)  # endless source, cut at 5
    assert _signature(resampled) == _signature(_all(_load(image_dir, record_dir, **options)))
    two_workers = _all(_load(image_dir, record_dir, workers=2, **options))
    assert len(two_workers) == 5


# -- bad data -------------------------------------------------------------------------------


def test_key_mismatch_is_detected_and_realigned(tmp_path):
    jpeg = _jpeg()
    rec = _record(["x"], [[0, 0, 4, 4]])
    images = [[("a", jpeg), ("b", jpeg), ("c", jpeg), ("d", jpeg), ("e", jpeg)]]
    records = [[("a", rec), ("c", rec), ("b", rec), ("d", rec), ("e", rec)]]  # b and c swapped
    image_dir, record_dir = _write(tmp_path, images, records)
    loader = _load(image_dir, record_dir, batch_size=10)
    keys = _keys(_all(loader))
    assert keys == ["a", "b", "d", "e"]  # one of the swapped pair is realigned, the other lost
    assert loader.counter.as_dict() == {"key_mismatch": 2}
    with pytest.raises(ValueError, match=r"key_mismatch.*image_00000\.tar, key 'b'.*text_box_00000\.tar has key 'c'"):
        _all(_load(image_dir, record_dir, strict=True))


def test_one_missing_record_costs_one_sample(tmp_path):
    jpeg, rec = _jpeg(), _record(["x"], [[0, 0, 4, 4]])
    keys = [f"k{i}" for i in range(6)]
    image_dir, record_dir = _write(tmp_path, [[(k, jpeg) for k in keys]], [[(k, rec) for k in keys if k != "k2"]])
    loader = _load(image_dir, record_dir, batch_size=10)
    assert _keys(_all(loader)) == ["k0", "k1", "k3", "k4", "k5"]
    assert loader.counter.as_dict() == {"missing_json": 1}


def test_unreadable_shard_is_counted_once(tmp_path):
    image_dir, record_dir = _simple(tmp_path, shards=2, per_shard=3)
    loader = _load(image_dir, record_dir, batch_size=10)
    strict = _load(image_dir, record_dir, batch_size=10, strict=True)
    (Path(image_dir) / "image_00001.tar").unlink()  # vanishes after the loaders were built
    assert _keys(_all(loader)) == ["s0k0", "s0k1", "s0k2"]
    assert loader.counter.as_dict() == {"tar_error": 1, "missing_image": 3}
    with pytest.raises(ValueError, match=r"\(tar_error\) in shard .*image_00001\.tar: cannot open"):
        _all(strict)


def _single_problem(tmp_path, reason: str):
    """A dataset of one good sample ('good') and one sample ('bad') with exactly one problem."""
    good_jpeg, rec = _jpeg(), _record(["fine"], [[0, 0, 4, 4]])
    images = [("good", good_jpeg), ("bad", good_jpeg)]
    records: list = [("good", rec), ("bad", rec)]
    if reason == "bad_image":
        images[1] = ("bad", good_jpeg[: len(good_jpeg) // 2])
    elif reason == "bad_json":
        records[1] = ("bad", b"{not json")
    elif reason == "missing_image":
        images = images[:1]
    elif reason == "missing_json":
        records = records[:1]
    elif reason == "length_mismatch":
        records[1] = ("bad", _record(["a", "b"], [[0, 0, 4, 4]], "global survives"))
    elif reason == "bad_box":
        records[1] = ("bad", _record(["inverted", "ok"], [[9, 0, 4, 4], [0, 0, 4, 4]]))
    elif reason == "box_outside_image":
        records[1] = ("bad", _record(["outside", "ok"], [[100, 100, 120, 120], [0, 0, 4, 4]]))
    elif reason == "empty_caption":
        records[1] = ("bad", _record(["", "ok"], [[0, 0, 4, 4], [0, 0, 4, 4]]))
    elif reason == "no_usable_caption":
        records[1] = ("bad", _record([], [], ""))
    elif reason == "key_mismatch":
        images = [("good", good_jpeg), ("bad", good_jpeg)]
        records = [("good", rec), ("other", rec)]
    image_dir, record_dir = _write(tmp_path, [images], [records])
    if reason == "tar_error":
        path = Path(image_dir) / "image_00000.tar"
        with tarfile.open(path) as archive:
            member = archive.getmember("bad.jpg")
        path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])  # inside bad.jpg
    elif reason == "duplicate_file":
        with TarWriter(str(Path(image_dir) / "image_00000.tar"), encoder=False, mtime=0) as writer:
            writer.write({"__key__": "good", "jpg": good_jpeg})
            writer.write({"__key__": "bad", "jpg": good_jpeg})
            writer.write({"__key__": "bad", "jpg": good_jpeg})  # same file name again
    return image_dir, record_dir


_EXPECTED = {
    "bad_image": ({"bad_image": 1}, ["good"]),
    "bad_json": ({"bad_json": 1}, ["good"]),
    "missing_image": ({"missing_image": 1}, ["good"]),
    "missing_json": ({"missing_json": 1}, ["good"]),
    "length_mismatch": ({"length_mismatch": 1}, ["good", "bad"]),
    "bad_box": ({"bad_box": 1}, ["good", "bad"]),
    "box_outside_image": ({"box_outside_image": 1}, ["good", "bad"]),
    "empty_caption": ({"empty_caption": 1}, ["good", "bad"]),
    "no_usable_caption": ({"no_usable_caption": 1}, ["good"]),
    "key_mismatch": ({"key_mismatch": 2}, ["good"]),
    "tar_error": ({"tar_error": 1, "missing_image": 1}, ["good"]),
    "duplicate_file": ({"duplicate_file": 1}, ["good", "bad"]),
}


def test_every_reason_has_a_case():
    assert set(_EXPECTED) == set(SKIP_REASONS)


@pytest.mark.parametrize("reason", sorted(_EXPECTED))
def test_each_bad_sample_reason_is_counted_and_strict_raises(tmp_path, reason):
    image_dir, record_dir = _single_problem(tmp_path, reason)
    loader = _load(image_dir, record_dir, batch_size=4)
    batches = _all(loader)
    counts, keys = _EXPECTED[reason]
    assert loader.counter.as_dict() == counts
    assert _keys(batches) == keys
    assert sum(sum(b["skipped"].values()) for b in batches) <= loader.counter.total
    with pytest.raises(ValueError, match=rf"\({reason}\) in shard .*(image|text_box)_00000\.tar") as info:
        _all(_load(image_dir, record_dir, strict=True))
    if reason == "tar_error":
        assert "after key 'good'" in str(info.value)
    else:
        assert "key 'bad'" in str(info.value) or "key 'other'" in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_dataset_iterates_to_completion(tmp_path, workers):
    manifest = write_damaged_dataset(tmp_path / "damaged", seed=0, size=48)
    loader = build_dataloader(manifest["images"], manifest["text_boxes"], image_size=16, mean=MEAN, std=STD,
                              batch_size=3, workers=workers, shuffle=True, seed=4)
    batches = _all(loader)
    assert sorted(_keys(batches)) == sorted(manifest["usable_keys"])
    assert loader.counter.as_dict() == dict(sorted(manifest["expected_skips"].items()))
    for batch in batches:
        maps = batch["gt_selection_maps"]
        assert torch.all((maps == 0) | (maps == 1)) and maps.flatten(1).sum(1).min() > 0
        assert torch.isfinite(batch["pixel_values"]).all()
    with pytest.raises(ValueError, match="bad training data"):
        _all(build_dataloader(manifest["images"], manifest["text_boxes"], image_size=16, mean=MEAN, std=STD,
                              batch_size=3, workers=workers, strict=True))


def test_synthetic_dataset_reads_cleanly(tmp_path):
    written = write_synthetic_dataset(tmp_path / "syn", images=7, seed=0, size=48, shard_size=3)
    loader = build_dataloader(tmp_path / "syn/images", tmp_path / "syn/text_boxes", image_size=16, mean=MEAN,
                              std=STD, batch_size=4, shuffle=True)
    batches = _all(loader)
    assert len(written["images"]) == 3
    assert sorted(_keys(batches)) == [f"{i:08d}" for i in range(7)]
    assert loader.counter.total == 0
