"""A small paired dataset with every kind of damage the pre-training data pipeline must survive.

Test helper (not part of the package): real shards written with :mod:`ps3.data.writer`, then
damaged, plus a description of what was damaged and what the pipeline must report.
"""
from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from ps3.data.writer import ShardWriter, encode_record, prepare_paired_output
from ps3.train.synthetic import MIN_SIZE, encode_jpeg, render_scene, sample_key


def write_damaged_dataset(out_dir: str | os.PathLike, seed: int = 0, size: int = 64, *,
                          overwrite: bool = False) -> dict[str, Any]:
    """Write 3 paired shards of 6 samples each with every kind of damage the pipeline must
    survive, and describe it.

    Returns ``{"images": [...], "text_boxes": [...], "expected_skips": {reason: count},
    "usable_keys": [keys that must come out], "damage": {key: what was done}}``. The counts are
    what :mod:`ps3.train.loader` reports for the whole dataset (reasons in ``SKIP_REASONS``).
    Damage: garbage and truncated JPEG bytes, invalid JSON and a non-object record, an image
    missing for a key and a record missing for another, a box outside the image, an inverted and a
    zero-area box, an empty caption and one that is empty after shaping, captions and boxes of
    different lengths, a record with no caption at all, two keys swapped between the sets, a box
    partly outside (clipped, kept), and an image tar cut in the middle of a file.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    image_dir, record_dir = prepare_paired_output(out_dir, overwrite=overwrite)
    keys = [sample_key(i) for i in range(18)]
    scenes = [render_scene(seed, i, size) for i in range(18)]
    jpegs = [encode_jpeg(s.image) for s in scenes]
    records: list[Any] = [s.record() for s in scenes]
    raw_records: dict[int, bytes] = {}
    damage: dict[str, str] = {}
    expected: Counter[str] = Counter()
    inside = [1, 1, size // 2, size // 2]

    # Shard 0: broken images and records.
    jpegs[1] = b"\xff\xd8 this is not a JPEG " + bytes(range(64))
    damage[keys[1]] = "garbage image bytes"
    expected["bad_image"] += 1
    jpegs[2] = jpegs[2][: len(jpegs[2]) // 2]
    damage[keys[2]] = "JPEG truncated to half"
    expected["bad_image"] += 1
    raw_records[3] = b'{"text": ["a red circle"], "box": [[1, 1, 5, 5]'
    damage[keys[3]] = "invalid JSON"
    expected["bad_json"] += 1
    records[4] = [1, 2, 3]
    damage[keys[4]] = "record is a JSON list, not an object"
    expected["bad_json"] += 1
    damage[keys[5]] = "image missing from the image shard"
    expected["missing_image"] += 1
    # Shard 1: bad pairs inside otherwise usable records.
    records[6]["text"].append("a box outside the image")
    records[6]["box"].append([size + 5, size + 5, size + 20, size + 20])
    damage[keys[6]] = "one box entirely outside the image"
    expected["box_outside_image"] += 1
    records[7]["text"] += ["an inverted box", "a zero-area box"]
    records[7]["box"] += [[20, 20, 10, 30], [5, 5, 5, 9]]
    damage[keys[7]] = "an inverted and a zero-area box"
    expected["bad_box"] += 2
    records[8]["text"] += ["   ", "The image is a close-up of"]
    records[8]["box"] += [inside, inside]
    damage[keys[8]] = "an empty caption and one empty after shaping"
    expected["empty_caption"] += 2
    records[9]["text"].append("a caption without a box")
    damage[keys[9]] = "more captions than boxes (the global caption remains)"
    expected["length_mismatch"] += 1
    damage[keys[10]] = "record missing from the text-box shard"
    expected["missing_json"] += 1
    records[11] = {"text": [], "box": [], "global_text": ""}
    damage[keys[11]] = "no caption at all"
    expected["no_usable_caption"] += 1
    # Shard 2: keys out of lockstep, a partly outside box, a truncated image tar.
    damage[keys[12]] = "swapped with the next key in the text-box shard (this one is realigned and kept)"
    damage[keys[13]] = "swapped with the previous key in the text-box shard (lost)"
    expected["key_mismatch"] += 2
    records[15]["box"][0] = [-10, -10, size + 10, size // 2]
    damage[keys[15]] = "first box partly outside the image (clipped, kept)"
    damage[keys[16]] = "image tar cut in the middle of this image"
    damage[keys[17]] = "after the cut of the image tar"
    expected["tar_error"] += 1
    expected["missing_image"] += 2

    def record_bytes(i: int) -> bytes:
        return raw_records.get(i) or encode_record(records[i])

    image_shards = [[{"__key__": keys[i], "jpg": jpegs[i]} for i in range(s * 6, s * 6 + 6) if i != 5]
                    for s in range(3)]
    record_order = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 11], [13, 12, 14, 15, 16, 17]]
    record_shards = [[{"__key__": keys[i], "json": record_bytes(i)} for i in order] for order in record_order]
    paths: dict[str, list[str]] = {"images": [], "text_boxes": []}
    for shard in range(3):
        image_path, record_path = image_dir / f"image_{shard:05d}.tar", record_dir / f"text_box_{shard:05d}.tar"
        for path, samples in ((image_path, image_shards[shard]), (record_path, record_shards[shard])):
            with ShardWriter(path) as writer:
                for sample in samples:
                    writer.write(sample)
        paths["images"].append(str(image_path))
        paths["text_boxes"].append(str(record_path))

    last = Path(paths["images"][2])
    with tarfile.open(last) as archive:
        member = archive.getmember(f"{keys[16]}.jpg")
        cut = member.offset_data + member.size // 2
    last.write_bytes(last.read_bytes()[:cut])

    usable = [keys[i] for i in (0, 6, 7, 8, 9, 12, 14, 15)]
    return {**paths, "expected_skips": dict(expected), "usable_keys": usable, "damage": damage}
