"""The synthetic high-resolution QA generator (``ps3 data hrqa``)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ps3.data.hrqa import INKS, SHAPES, render_hrqa, shape_mask, write_hrqa


def _read_shape(image: np.ndarray, box: list[int], ink: tuple[int, int, int]) -> str:
    """The shape whose mask best matches the ink pixels inside ``box`` (IoU), read from pixels."""
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1].astype(np.float32)
    inked = np.abs(crop - np.asarray(ink, dtype=np.float32)).max(-1) < 60
    scores = {}
    for s in SHAPES:
        m = shape_mask(s, x1 - x0)
        scores[s] = (inked & m).sum() / max((inked | m).sum(), 1)
    return max(scores, key=scores.get)


def test_same_seed_same_files_and_splits_differ(tmp_path):
    a = write_hrqa(tmp_path / "a", 3, size=256, seed=5)
    b = write_hrqa(tmp_path / "b", 3, size=256, seed=5)
    write_hrqa(tmp_path / "t", 3, size=256, seed=5, split="test")
    assert (tmp_path / "a/data.json").read_bytes() == (tmp_path / "b/data.json").read_bytes()
    for name in ("hrqa_train_000000.jpg", "hrqa_train_000002.jpg"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    assert a["answers"] == b["answers"]
    train0 = np.asarray(Image.open(tmp_path / "a/images/hrqa_train_000000.jpg"))
    test0 = np.asarray(Image.open(tmp_path / "t/images/hrqa_test_000000.jpg"))
    assert np.abs(train0.astype(int) - test0.astype(int)).mean() > 5  # another stream, another image
    other = render_hrqa(6, 0, 256)
    assert np.asarray(other.image).tobytes() != np.asarray(render_hrqa(5, 0, 256).image).tobytes()


def test_records_are_llava_with_the_target_box(tmp_path):
    write_hrqa(tmp_path, 4, size=256, seed=1)
    records = json.loads((tmp_path / "data.json").read_text())
    assert len(records) == 4
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] in SHAPES and r["choices"] == list(SHAPES)
        (box,) = human["boxes"]
        assert 0 <= box[0] < box[2] <= 256 and 0 <= box[1] < box[3] <= 256
        assert (tmp_path / "images" / r["image"]).is_file()


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_match_the_drawn_pixels(seed, tmp_path):
    """The asked tag's shape, read back from the saved JPEG at its box, is the answer."""
    write_hrqa(tmp_path, 5, size=512, seed=seed)
    for r in json.loads((tmp_path / "data.json").read_text()):
        pixels = np.asarray(Image.open(tmp_path / "images" / r["image"]).convert("RGB"))
        box = r["conversations"][0]["boxes"][0]
        index = int(r["id"].rsplit("_", 1)[1])
        scene = render_hrqa(seed, index, 512)
        ink = INKS[scene.items[scene.target].colour]
        assert _read_shape(pixels, box, ink) == r["conversations"][1]["value"]


def test_targets_are_smaller_than_a_low_res_patch_and_landmarks_larger():
    for size in (256, 512, 1024):
        for index in range(8):
            scene = render_hrqa(3, index, size)
            cell = size / 8
            for it in scene.items:
                side = max(it.box[2] - it.box[0], it.box[3] - it.box[1])
                if it.kind == "landmark":
                    assert side > cell
                else:
                    assert side < cell, (it, cell)
            # the named landmark's own tag (<= 0.3 c away) is its nearest tag; any other is >= 0.6 c away
            lm = scene.items[scene.landmark].box
            gaps = sorted(_gap(lm, it.box) for it in scene.items if it.kind == "tag")
            assert _gap(lm, scene.items[scene.target].box) == gaps[0] and gaps[1] >= 0.59 * cell


def _gap(a, b):
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return (dx * dx + dy * dy) ** 0.5


def test_every_tag_shape_has_the_same_ink_area():
    """At low res a tag is a blur under one patch: equal ink keeps its mean from telling the shape."""
    from ps3.data.hrqa import tag_side

    for cell in (32.0, 64.0, 472.5):
        areas = [shape_mask(s, tag_side(s, cell)).sum() for s in SHAPES]
        assert max(areas) / min(areas) < 1.12, (cell, areas)
        assert max(tag_side(s, cell) for s in SHAPES) < cell


@pytest.mark.slow
def test_command_writes_the_set_and_refuses_bad_arguments(tmp_path):
    env_cmd = [sys.executable, "-m", "ps3.cli", "data", "hrqa"]
    done = subprocess.run([*env_cmd, str(tmp_path / "d"), "--images", "2", "--size", "128", "--split", "test",
                           "--shards"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 test questions" in done.stdout
    assert len(json.loads((tmp_path / "d/data.json").read_text())) == 2
    assert list((tmp_path / "d/shards/images").glob("*.tar")) and list((tmp_path / "d/shards/text_boxes").glob("*.tar"))
    bad = subprocess.run([*env_cmd, str(tmp_path / "e"), "--images", "2", "--split", "val"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--split" in bad.stderr and "Traceback" not in bad.stderr


def test_hrqa_config_top_scale_is_8x_and_a_tag_is_under_one_low_res_patch():
    from ps3 import PS3VisionConfig
    from ps3.data.hrqa import DEFAULT_SIZE, LOW_RES_GRID
    from ps3.registry import training_config

    joint, pre = training_config("hrqa-synthetic")
    vision = PS3VisionConfig(**joint["vision_config"])
    scales, patch = vision.ps3_scales, joint["vision_config"]["vit"]["patch_size"]
    assert scales[-1] >= 8 * scales[0] and pre["image_size"] == scales[-1] == DEFAULT_SIZE
    assert scales[0] // patch == LOW_RES_GRID  # the generator's cell is this config's low-res patch


def test_every_drawn_tag_has_its_shape_s_side():
    from ps3.data.hrqa import tag_side

    for index in range(6):
        scene = render_hrqa(7, index, 512)
        for it in scene.items:
            if it.kind == "tag":
                assert it.box[2] - it.box[0] == tag_side(it.shape, scene.cell)
