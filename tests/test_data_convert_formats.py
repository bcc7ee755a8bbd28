"""COCO, Visual Genome and Flickr30k Entities sources written by hand from the formats' public
documentation, converted with ``ps3 data from-*``: the boxes land on the rectangles drawn at the
source's boxes, what each converter drops is counted, ``ps3 data check`` accepts the shards and
``ps3 train`` trains on them (together with a JSON Lines conversion)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("webdataset")

from _data_sources import (assert_box_covers, dropped_counts, make_image, read_samples,  # noqa: E402
                           train_two_steps)


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------------------------
# COCO: instances (bbox = [x, y, width, height]) and captions


def _coco(root: Path) -> dict[str, Path]:
    images = root / "val2017"
    make_image(images / "000000000001.jpg", (120, 80), [("red", [10, 10, 50, 40]), ("green", [60, 30, 110, 75])])
    make_image(images / "000000000002.jpg", (64, 48), [("blue", [4, 4, 60, 44])])
    instances = {
        "info": {"description": "hand-made"}, "licenses": [],
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 120, "height": 80},
                   {"id": 2, "file_name": "000000000002.jpg", "width": 64, "height": 48},
                   {"id": 3, "file_name": "000000000003.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 17, "bbox": [10, 10, 40, 30], "area": 1200.0, "iscrowd": 0,
             "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]},
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [60.0, 30.0, 50.0, 45.0], "area": 2250.0,
             "iscrowd": 0, "segmentation": [[60, 30, 110, 30, 110, 75, 60, 75]]},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [4, 4, 56, 40], "area": 2240.0, "iscrowd": 1,
             "segmentation": {"counts": [0, 10], "size": [48, 64]}},
            {"id": 13, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 0},
            {"id": 14, "image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 17, "name": "cat", "supercategory": "animal"},
                       {"id": 18, "name": "dog", "supercategory": "animal"}],
    }
    captions = {"images": instances["images"], "annotations": [
        {"id": 1, "image_id": 1, "caption": "A cat and a dog on a grey floor."},
        {"id": 2, "image_id": 1, "caption": "Two animals."},
        {"id": 3, "image_id": 2, "caption": "A crowd of people in blue."}]}
    return {"images": images, "instances": _write_json(root / "annotations/instances_val2017.json", instances),
            "captions": _write_json(root / "annotations/captions_val2017.json", captions)}


def test_coco(tmp_path, capsys, run_cli):
    source = _coco(tmp_path)
    out = tmp_path / "coco"
    code, output = run_cli.in_process("data", "from-coco", "--images", source["images"], "--instances",
                              source["instances"], "--captions", source["captions"], "--out", out, "--local-text",
                              "a {name}", "--workers", "1")
    assert code == 0, output
    assert dropped_counts(output) == {"crowd": 1, "unknown_category": 1, "unknown_image": 1, "missing_image_file": 1}
    (key1, image1, record1, _), (key2, _, record2, _) = read_samples(out)
    assert (key1, key2) == ("000000000001", "000000000002")
    assert record1["text"] == ["a cat", "a dog"] and record1["box"] == [[10, 10, 50, 40], [60, 30, 110, 75]]
    assert record1["global_text"] == "A cat and a dog on a grey floor."
    assert_box_covers(image1, record1["box"][0], "red")
    assert_box_covers(image1, record1["box"][1], "green")
    assert record2 == {"text": [], "box": [], "global_text": "A crowd of people in blue.",
                       "source": "000000000002.jpg"}  # the crowd box is dropped, the caption kept

    code, output = run_cli.in_process("data", "from-coco", "--images", source["images"], "--instances",
                              source["instances"], "--out", tmp_path / "crowd", "--keep-crowd", "--max-side", "60",
                              "--workers", "1")
    assert code == 0 and "crowd" not in dropped_counts(output)
    (_, image1, record1, _), (_, image2, record2, _) = read_samples(tmp_path / "crowd")
    assert record1["text"] == ["cat", "dog"] and "global_text" not in record1
    assert record1["box"] == [[5, 5, 25, 20], [30, 15, 55, 37.5]] and image1.size == (60, 40)
    assert_box_covers(image1, record1["box"][0], "red")
    assert record2["text"] == ["person"] and record2["box"] == [[3.75, 3.75, 56.25, 41.25]]
    assert_box_covers(image2, record2["box"][0], "blue", margin=3)


# --------------------------------------------------------------------------------------------
# Visual Genome: region_descriptions.json (x, y, width, height) and image_data.json


def _visual_genome(root: Path) -> dict[str, Path]:
    images = root / "vg"
    make_image(images / "VG_100K/1.jpg", (100, 80), [("red", [5, 5, 45, 35]), ("blue", [50, 40, 95, 75])])
    make_image(images / "VG_100K_2/2.jpg", (60, 60), [("yellow", [10, 10, 30, 50])])
    make_image(images / "3.jpg", (50, 50), [])

    def region(rid, image_id, phrase, x, y, w, h):
        return {"region_id": rid, "image_id": image_id, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}

    regions = [
        {"id": 1, "regions": [region(1, 1, "a red box ", 5, 5, 40, 30), region(2, 1, "blue\nsquare", 50, 40, 45, 35),
                              region(3, 1, "A red box", 5, 5, 40, 30), region(4, 1, "red thing", 5, 5, 40, 30)]},
        {"id": 2, "regions": [region(5, 2, "yellow bar", 10, 10, 20, 40), {"region_id": 6, "phrase": "no box"}]},
        {"id": 3, "regions": [region(7, 3, "far away", 200, 200, 5, 5)]},
    ]
    base = "https://cs.stanford.edu/people/rak248"
    image_data = [{"image_id": 1, "width": 100, "height": 80, "url": f"{base}/VG_100K/1.jpg", "coco_id": None,
                   "flickr_id": None},
                  {"image_id": 2, "width": 60, "height": 60, "url": f"{base}/VG_100K_2/2.jpg", "coco_id": 5,
                   "flickr_id": 7},
                  {"image_id": 3, "width": 50, "height": 50, "url": f"{base}/VG_100K/3.jpg"}]
    return {"images": images, "regions": _write_json(root / "vg/region_descriptions.json", regions),
            "image_data": _write_json(root / "vg/image_data.json", image_data)}


def test_visual_genome(tmp_path, capsys, run_cli):
    source = _visual_genome(tmp_path)
    out = tmp_path / "vg_out"
    code, output = run_cli.in_process("data", "from-vg", "--images", source["images"], "--regions", source["regions"],
                              "--image-data", source["image_data"], "--out", out, "--workers", "1")
    assert code == 0, output
    assert dropped_counts(output) == {"duplicate_region": 1, "merged_same_box": 1, "bad_annotation": 1,
                                      "box_outside_image": 1, "no_caption": 1}
    (key1, image1, record1, _), (key2, image2, record2, _) = read_samples(out)
    assert (key1, key2) == ("1", "2")
    assert record1 == {"text": ["a red box. red thing.", "blue square"], "box": [[5, 5, 45, 35], [50, 40, 95, 75]],
                       "source": "VG_100K/1.jpg"}
    assert_box_covers(image1, record1["box"][0], "red")
    assert_box_covers(image1, record1["box"][1], "blue")
    assert record2["text"] == ["yellow bar"] and record2["source"] == "VG_100K_2/2.jpg"
    assert_box_covers(image2, record2["box"][0], "yellow")

    # Without image_data.json the files are found as VG_100K*/ID.jpg or ID.jpg.
    code, output = run_cli.in_process("data", "from-vg", "--images", source["images"], "--regions", source["regions"],
                              "--out", tmp_path / "no_image_data", "--workers", "1")
    assert code == 0 and "missing_image_file" not in output
    assert [r["source"] for _, _, r, _ in read_samples(tmp_path / "no_image_data")] == ["VG_100K/1.jpg",
                                                                                       "VG_100K_2/2.jpg"]


# --------------------------------------------------------------------------------------------
# Flickr30k Entities: Sentences/ID.txt markup and Annotations/ID.xml (1-based inclusive boxes)


def _object(names, box=None, scene=0) -> str:
    tags = "".join(f"<name>{n}</name>" for n in names)
    if box is not None:
        xmin, ymin, xmax, ymax = box
        return (f"<object>{tags}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                f"<ymax>{ymax}</ymax></bndbox></object>")
    return f"<object>{tags}<nobndbox>1</nobndbox><scene>{scene}</scene></object>"


def _flickr(root: Path) -> dict[str, Path]:
    images, annotations, sentences = root / "flickr30k-images", root / "Annotations", root / "Sentences"
    make_image(images / "1000.jpg", (120, 90), [("red", [10, 10, 25, 60]), ("red", [30, 10, 40, 60]),
                                                ("blue", [60, 20, 100, 50])])
    make_image(images / "2000.jpg", (50, 50), [])
    annotations.mkdir(parents=True)
    sentences.mkdir(parents=True)
    objects = [_object(["1"], (11, 11, 25, 60)), _object(["1"], (31, 11, 40, 60)), _object(["2"], (61, 21, 100, 50)),
               _object(["3"], scene=1), _object(["4"], scene=0)]
    (annotations / "1000.xml").write_text(
        "<annotation><filename>1000.jpg</filename><size><width>120</width><height>90</height><depth>3</depth>"
        f"</size>{''.join(objects)}</annotation>")
    (annotations / "3000.xml").write_text("<annotation><filename>3000.jpg</filename></annotation>")
    (sentences / "1000.txt").write_text(
        "[/EN#1/people Two young men] in [/EN#2/clothing blue shirts] stand on [/EN#3/scene a street] .\n"
        "[/EN#1/people Two men] look at [/EN#4/other something] with [/EN#0/notvisual interest] .\n")
    (sentences / "2000.txt").write_text("[/EN#7/other/scene A grey square] , nothing else .\n")
    return {"images": images, "annotations": annotations, "sentences": sentences}


def test_flickr30k_entities(tmp_path, capsys, run_cli):
    source = _flickr(tmp_path)
    out = tmp_path / "flickr"
    code, output = run_cli.in_process("data", "from-flickr30k-entities", "--images", source["images"], "--annotations",
                              source["annotations"], "--sentences", source["sentences"], "--out", out, "--workers", "1")
    assert code == 0, output
    assert dropped_counts(output) == {"scene": 1, "no_box": 1, "not_visual": 1, "merged_same_box": 1,
                                      "missing_annotation": 1, "missing_sentences": 1}
    (key1, image1, record1, _), (key2, _, record2, _) = read_samples(out)
    assert (key1, key2) == ("1000", "2000")
    # Entity 1 has two boxes: the region is the box enclosing both; its two phrases are merged.
    assert record1["text"] == ["Two young men. Two men.", "blue shirts"]
    assert record1["box"] == [[10, 10, 40, 60], [60, 20, 100, 50]]
    assert record1["global_text"] == "Two young men in blue shirts stand on a street."
    assert_box_covers(image1, [10, 10, 25, 60], "red")
    assert_box_covers(image1, [30, 10, 40, 60], "red")
    assert_box_covers(image1, record1["box"][1], "blue")
    assert record2 == {"text": [], "box": [], "global_text": "A grey square, nothing else.", "source": "2000.jpg"}

    split = tmp_path / "train.txt"
    split.write_text("1000\n")
    code, output = run_cli.in_process("data", "from-flickr30k-entities", "--images", source["images"], "--annotations",
                              source["annotations"], "--sentences", source["sentences"], "--split", split,
                              "--global-caption", "longest", "--out", tmp_path / "split", "--workers", "1")
    [(_, _, record, _)] = read_samples(tmp_path / "split")
    assert code == 0 and record["global_text"] == "Two young men in blue shirts stand on a street."


# --------------------------------------------------------------------------------------------
# All four: ps3 data check accepts them, ps3 train trains on them


@pytest.mark.slow
def test_check_and_train_on_every_converter(tmp_path, capsys, run_cli):
    outputs = []
    coco, vg, flickr = _coco(tmp_path / "c"), _visual_genome(tmp_path / "v"), _flickr(tmp_path / "f")
    commands = [
        ["from-coco", "--images", coco["images"], "--instances", coco["instances"], "--captions", coco["captions"]],
        ["from-vg", "--images", vg["images"], "--regions", vg["regions"], "--image-data", vg["image_data"]],
        ["from-flickr30k-entities", "--images", flickr["images"], "--annotations", flickr["annotations"],
         "--sentences", flickr["sentences"]],
    ]
    make_image(tmp_path / "j/x.jpg", (70, 50), [("purple", [20, 10, 50, 40])])
    (tmp_path / "j/x.jsonl").write_text(json.dumps({"image": "x.jpg", "global_text": "A purple square.",
                                                    "regions": [{"text": "purple", "box": [20, 10, 50, 40]}]}))
    commands.append(["from-jsonl", tmp_path / "j/x.jsonl"])
    for index, command in enumerate(commands):
        out = tmp_path / f"out{index}"
        code, output = run_cli.in_process("data", *command, "--out", out, "--workers", "1", "--quiet")
        assert code == 0 and output == ""
        code, output = run_cli.in_process("data", "check", out)
        assert code == 0 and "skipped: nothing" in output, output
        outputs.append(out)
    code, output = run_cli.in_process("data", "check", outputs[0])
    assert "2 image/record pair(s) read, 2 usable" in output and "1 image(s) with a global caption only" in output
    assert "image width:         min 64, median 92, mean 92.0, max 120" in output

    data = tmp_path / "all"
    (data / "images").mkdir(parents=True)
    (data / "text_boxes").mkdir()
    for index, out in enumerate(outputs):  # one dataset of all four: shard pairs side by side
        (data / f"images/image_{index:05d}.tar").symlink_to(out / "images/image_00000.tar")
        (data / f"text_boxes/text_box_{index:05d}.tar").symlink_to(out / "text_boxes/text_box_00000.tar")
    result = train_two_steps(run_cli, data, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
