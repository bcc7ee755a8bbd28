"""The synthetic dataset: layout, determinism, unique captions, boxes around the objects."""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ps3.train.synthetic import (
    COLOURS,
    DEFAULT_SIZE,
    SHAPES,
    TEXTURES,
    add_arguments,
    render_scene,
    run_from_args,
    write_synthetic_dataset,
)

from damaged_data import write_damaged_dataset


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]


def test_layout_and_counts(tmp_path):
    written = write_synthetic_dataset(tmp_path / "out", images=5, seed=0, size=48, shard_size=2)
    image_dir, record_dir = tmp_path / "out/images", tmp_path / "out/text_boxes"
    assert sorted(p.name for p in image_dir.iterdir()) == ["image_00000.tar", "image_00001.tar", "image_00002.tar"]
    assert sorted(p.name for p in record_dir.iterdir()) == [
        "text_box_00000.tar", "text_box_00001.tar", "text_box_00002.tar"]
    assert written["images"] == [str(image_dir / f"image_{i:05d}.tar") for i in range(3)]
    all_keys = []
    for image_shard, record_shard, count in zip(written["images"], written["text_boxes"], [2, 2, 1]):
        images, records = _members(image_shard), _members(record_shard)
        assert len(images) == len(records) == count
        image_keys = [name.removesuffix(".jpg") for name, _ in images]
        assert [name for name, _ in images] == [f"{k}.jpg" for k in image_keys]
        assert [name for name, _ in records] == [f"{k}.json" for k in image_keys]  # same keys, same order
        for (_, jpeg), (_, raw) in zip(images, records):
            image = Image.open(io.BytesIO(jpeg))
            assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"
            record = json.loads(raw)
            assert set(record) == {"text", "box", "global_text"}
            assert len(record["text"]) == len(record["box"])
        all_keys += image_keys
    assert len(set(all_keys)) == 5


def test_deterministic_given_seed(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", images=3, seed=5, size=40, shard_size=2)
    second = write_synthetic_dataset(tmp_path / "b", images=3, seed=5, size=40, shard_size=2)
    other = write_synthetic_dataset(tmp_path / "c", images=3, seed=6, size=40, shard_size=2)
    for kind in ("images", "text_boxes"):
        for x, y, z in zip(first[kind], second[kind], other[kind]):
            assert Path(x).read_bytes() == Path(y).read_bytes()
            assert Path(x).read_bytes() != Path(z).read_bytes()
    # A scene depends on (seed, index) only, not on the shard size.
    regrouped = write_synthetic_dataset(tmp_path / "d", images=3, seed=5, size=40, shard_size=3)
    assert _members(regrouped["images"][0])[2] == _members(first["images"][1])[0]


def test_refuses_to_mix_with_existing_shards(tmp_path):
    write_synthetic_dataset(tmp_path, images=2, seed=0, size=32)
    with pytest.raises(ValueError, match="already holds shards"):
        write_synthetic_dataset(tmp_path, images=1, seed=0, size=32)
    written = write_synthetic_dataset(tmp_path, images=1, seed=0, size=32, overwrite=True)
    assert len(list((tmp_path / "images").glob("*.tar"))) == 1 and len(written["images"]) == 1
    for bad in ({"images": 0}, {"size": 16}, {"shard_size": 0}, {"seed": -1}):
        arguments = {"images": 1, "seed": 0, "size": 32, "shard_size": 1, **bad}
        with pytest.raises(ValueError):
            write_synthetic_dataset(tmp_path / "x", **arguments)


def test_scenes_have_unique_captions_and_tight_boxes():
    size = 96
    for index in range(25):
        scene = render_scene(3, index, size)
        assert 2 <= len(scene.captions) <= 4
        assert len(set(scene.captions)) == len(scene.captions)  # each caption names one object
        assert len(set(scene.objects)) == len(scene.objects)
        for caption, (colour, texture, shape) in zip(scene.captions, scene.objects):
            assert caption.split()[-3:] == [colour, texture, shape]
            assert colour in COLOURS and texture in TEXTURES and shape in SHAPES
            assert caption in scene.global_text
        pixels = np.asarray(scene.image).astype(np.int32)
        for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            object_pixels = scene.labels == k
            rows, cols = np.nonzero(object_pixels)
            # The box is exactly the extent of the object's visible pixels.
            assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert 0.12 * size <= max(x1 - x0, y1 - y0) <= 0.40 * size + 1
            # Those pixels carry the caption's colour (or its dark texture shade) in the image.
            colour = np.asarray(COLOURS[scene.objects[k][0]])
            distance = np.minimum(np.abs(pixels[object_pixels] - colour).sum(-1),
                                  np.abs(pixels[object_pixels] - (colour * 0.3).astype(int)).sum(-1))
            assert np.median(distance) < 10
        # Little overlap: the boxes' pairwise intersections are small.
        for a in range(len(scene.boxes)):
            for b in range(a + 1, len(scene.boxes)):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = scene.boxes[a], scene.boxes[b]
                overlap = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
                smaller = min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
                assert overlap <= 0.15 * smaller


def test_textures_are_visible():
    scene = next(s for s in (render_scene(0, i, 128) for i in range(40))
                 if {"solid", "striped", "dotted"} <= {t for _, t, _ in s.objects})
    pixels = np.asarray(scene.image).astype(np.int32)
    for k, (colour, texture, _) in enumerate(scene.objects):
        values = pixels[scene.labels == k]
        dark = np.abs(values - np.asarray(COLOURS[colour]) * 0.3).sum(-1) < 40
        if texture == "solid":
            assert dark.mean() < 0.02
        else:
            assert 0.08 < dark.mean() < 0.7


def test_jpeg_in_the_shard_matches_the_scene(tmp_path):
    written = write_synthetic_dataset(tmp_path, images=1, seed=9, size=64)
    (name, jpeg), = _members(written["images"][0])
    (_, raw), = _members(written["text_boxes"][0])
    scene = render_scene(9, 0, 64)
    assert json.loads(raw) == scene.record()
    decoded = np.asarray(Image.open(io.BytesIO(jpeg))).astype(np.int32)
    assert np.abs(decoded - np.asarray(scene.image)).mean() < 6


def test_damaged_dataset_is_damaged(tmp_path):
    manifest = write_damaged_dataset(tmp_path, seed=0, size=48)
    assert len(manifest["images"]) == len(manifest["text_boxes"]) == 3
    with pytest.raises(tarfile.ReadError):
        _members(manifest["images"][2])  # cut in the middle of a file
    records = dict((name, raw) for name, raw in _members(manifest["text_boxes"][0]))
    with pytest.raises(json.JSONDecodeError):
        json.loads(records["00000003.json"])
    assert sum(manifest["expected_skips"].values()) == 18
    assert len(manifest["usable_keys"]) == 8 and set(manifest["usable_keys"]) <= {f"{i:08d}" for i in range(18)}


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ps3 data synthetic")
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "out"), "--images", "3", "--seed", "2", "--size", "40",
                              "--shard-size", "2"])
    assert run_from_args(args) == 0
    out = capsys.readouterr()
    assert "wrote 3 images in 2 shard pair(s)" in out.out
    assert len(list((tmp_path / "out/images").glob("*.tar"))) == 2
    assert out.err == ""  # stderr is not a terminal here: no progress bar drawn into it
    quiet = parser.parse_args([str(tmp_path / "q"), "--images", "2", "--quiet"])
    assert run_from_args(quiet) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    # The default size is the one the tiny-synthetic config trains at.
    from ps3.train.model_setup import get_model_spec

    side = get_model_spec("tiny-synthetic").preprocessor["image_size"]
    assert DEFAULT_SIZE == side
    assert Image.open(io.BytesIO(_members(tmp_path / "q/images/image_00000.tar")[0][1])).size == (side, side)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "z")])  # --images is required
