"""What every converter shares, driven through ``ps3 data from-jsonl``: boxes land on the pixels the
source put them on (also after --max-side and EXIF rotations), clipping, duplicates, merges, drop
counts, global-only images, byte-for-byte JPEG copies, parallel workers and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("webdataset")

from ps3.cli import main  # noqa: E402
from ps3.data.convert_common import DropLog, SampleOptions, SourceImage, build_sample  # noqa: E402
from ps3.images import load_image  # noqa: E402

from _data_sources import assert_box_covers, dropped_counts, make_image, read_samples # noqa: E402


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _convert(run_cli, *args) -> tuple[int, str]:
    return run_cli.in_process("data", "from-jsonl", *args, "--workers", "1")


@pytest.fixture
def source(tmp_path):
    """A JPEG with three rectangles, a PNG with one, and a JSONL with good and bad regions and lines."""
    make_image(tmp_path / "src/a.jpg", (96, 64), [("red", [4, 6, 30, 40]), ("green", [40, 10, 70, 30]),
                                                  ("blue", [60, 40, 96, 64])])
    make_image(tmp_path / "src/b.png", (50, 70), [("yellow", [10, 20, 35, 60])], fmt="PNG")
    lines = [
        {"image": "a.jpg", "global_text": "Three rectangles  on grey.",
         "regions": [{"text": "red", "box": [4, 6, 30, 40]},
                     {"text": " green ", "box": [40, 10, 70, 30]},
                     {"text": "blue", "box": [60, 40, 120, 90]},     # partly outside: clipped to the image
                     {"text": "red", "box": [4, 6, 30, 40]},          # duplicate
                     {"text": "a red block", "box": [4, 6, 30, 40]},  # same box: merged
                     {"text": "outside", "box": [100, 70, 120, 90]},
                     {"text": "inverted", "box": [30, 40, 4, 6]},
                     {"text": "   ", "box": [1, 1, 5, 5]},
                     {"text": "thin", "box": [1, 1, 1.5, 30]}]},
        {"image": "b.png", "key": "the.png/image", "regions": [{"text": "yellow", "box": [10, 20, 35, 60]}]},
        {"image": "missing.jpg", "regions": [{"text": "red", "box": [0, 0, 4, 4]}]},
        "{not json",
        {"regions": []},
        "",
    ]
    return {"jsonl": _jsonl(tmp_path / "src/data.jsonl", lines), "root": tmp_path}


def test_boxes_land_on_their_rectangles_and_drops_are_counted(source, capsys, run_cli):
    out = source["root"] / "out"
    code, output = _convert(run_cli, source["jsonl"], "--out", out)
    assert code == 0
    samples = read_samples(out)
    assert [key for key, *_ in samples] == ["00000000", "the_png_image"]
    (_, image_a, record_a, bytes_a), (_, image_b, record_b, bytes_b) = samples
    assert bytes_a == (source["root"] / "src/a.jpg").read_bytes()  # JPEG copied as it is
    assert image_b.size == (50, 70) and bytes_b[:2] == b"\xff\xd8"  # PNG re-encoded as JPEG
    assert record_a == {"text": ["red. a red block.", "green", "blue"], "box": [[4, 6, 30, 40], [40, 10, 70, 30],
                        [60, 40, 96, 64]], "global_text": "Three rectangles on grey.", "source": "a.jpg"}
    for text, box in zip(record_a["text"], record_a["box"]):
        assert_box_covers(image_a, box, text.split(".")[0])
    assert_box_covers(image_b, record_b["box"][0], "yellow")
    assert "global_text" not in record_b
    assert dropped_counts(output) == {"duplicate_region": 1, "merged_same_box": 1, "box_outside_image": 1,
                                      "bad_box": 1, "empty_text": 1, "small_box": 1, "missing_image_file": 1,
                                      "bad_line": 2}
    assert "wrote 2 images with 4 regions" in output and "e.g. line 4: invalid JSON" in output


def test_max_side_scales_images_and_boxes(source, capsys, run_cli):
    out = source["root"] / "small"
    code, _ = _convert(run_cli, source["jsonl"], "--out", out, "--max-side", "48")
    assert code == 0
    (_, image_a, record_a, _), (_, image_b, record_b, _) = read_samples(out)
    assert image_a.size == (48, 32) and image_b.size == (34, 48)
    assert record_a["box"] == [[2, 3, 15, 20], [20, 5, 35, 15], [30, 20, 48, 32]]
    for text, box in zip(record_a["text"], record_a["box"]):
        assert_box_covers(image_a, box, text.split(".")[0], margin=2)
    assert record_b["box"] == [[6.8, 13.71, 23.8, 41.14]]
    assert_box_covers(image_b, record_b["box"][0], "yellow", margin=2)


@pytest.mark.parametrize("max_side", [None, 60, 40])  # 40: decoded at half scale first (JPEG draft)
def test_exif_rotated_images_get_rotated_boxes(tmp_path, max_side):
    """The annotation is in the stored pixels; the trainer sees the image upright."""
    drops = DropLog()
    options = SampleOptions(max_side=max_side)
    for orientation in range(1, 9):
        rectangles = [("red", [8, 4, 30, 20]), ("blue", [50, 24, 72, 44])]
        path = make_image(tmp_path / f"o{orientation}.jpg", (80, 48), rectangles, orientation=orientation)
        source = SourceImage(key=f"o{orientation}", path=str(path), name=path.name, declared_size=(80, 48),
                             regions=[("red", [8, 4, 30, 20]), ("blue", [50, 24, 72, 44])])
        sample = build_sample(source, options, drops)
        upright = load_image(sample.jpeg)
        long, short = {None: (80, 48), 60: (60, 36), 40: (40, 24)}[max_side]
        assert upright.size == ((short, long) if orientation >= 5 else (long, short))
        for text, box in zip(sample.record["text"], sample.record["box"]):
            assert_box_covers(upright, box, text, margin=2)
    assert not drops.counts


def test_declared_size_decides_the_frame_or_drops_the_image(tmp_path):
    path = make_image(tmp_path / "r.jpg", (80, 48), [("red", [8, 4, 30, 20])], orientation=6)
    upright_box = [28, 8, 44, 30]  # the same rectangle, in the upright (48 x 80) image
    drops = DropLog()
    upright = build_sample(SourceImage("u", str(path), "r.jpg", [("red", upright_box)], [], (48, 80)),
                           SampleOptions(), drops)
    assert upright.record["box"] == [upright_box]
    assert_box_covers(load_image(upright.jpeg), upright_box, "red")
    assert build_sample(SourceImage("m", str(path), "r.jpg", [("red", upright_box)], [], (100, 100)),
                        SampleOptions(), drops) is None
    assert drops.counts == {"size_mismatch": 1}


def test_images_without_regions_kept_for_global_captions_or_skipped(tmp_path, capsys, run_cli):
    make_image(tmp_path / "g.jpg", (40, 40), [])
    jsonl = _jsonl(tmp_path / "g.jsonl", [
        {"image": "g.jpg", "global_text": ["", "A grey square.", "A plain grey image, nothing on it."]},
        {"image": "g.jpg", "regions": [{"text": "nothing", "box": [50, 50, 60, 60]}]},
    ])
    code, output = _convert(run_cli, jsonl, "--out", tmp_path / "keep", "--global-caption", "longest")
    assert code == 0 and dropped_counts(output) == {"box_outside_image": 1, "no_caption": 1, "empty_global_text": 1}
    [(_, _, record, _)] = read_samples(tmp_path / "keep")
    assert record["text"] == [] and record["global_text"] == "A plain grey image, nothing on it."
    code, output = _convert(run_cli, jsonl, "--out", tmp_path / "all", "--global-caption", "all")
    assert read_samples(tmp_path / "all")[0][2]["global_text"] == "A grey square. A plain grey image, nothing on it."
    code, output = _convert(run_cli, jsonl, "--out", tmp_path / "skip", "--skip-images-without-regions")
    assert code == 1 and dropped_counts(output)["no_region"] == 1 and "wrote 0 images" in output
    assert not list((tmp_path / "skip/images").glob("*.tar"))


def _many(tmp_path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        make_image(tmp_path / f"src/{i}.jpg", (40 + i, 32), [("green", [2, 2, 20, 20])])
        lines.append({"image": f"{i}.jpg", "regions": [{"text": f"green {i}", "box": [2, 2, 20, 20]}]})
    return _jsonl(tmp_path / "src/many.jsonl", lines)


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def test_parallel_workers_resume_and_settings_guard(tmp_path, capsys, run_cli):
    jsonl = _many(tmp_path, 5)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert _convert(run_cli, jsonl, "--out", serial, "--shard-size", "2")[0] == 0
    code = main(["data", "from-jsonl", str(jsonl), "--out", str(parallel), "--shard-size", "2", "--workers", "2",
                 "--quiet"])
    assert code == 0 and capsys.readouterr().out == ""
    first = _shard_bytes(parallel)
    assert first == _shard_bytes(serial) and len(first) == 6  # 3 shard pairs, byte-identical

    # A run killed in shard 1: its stats file (written last) and one tar are missing.
    (parallel / "conversion/shard_00001.json").unlink()
    (parallel / "text_boxes/text_box_00001.tar").unlink()
    code, output = _convert(run_cli, jsonl, "--out", parallel, "--shard-size", "2")
    assert code == 0 and "resumed: 2 shard(s)" in output and "wrote 5 images with 5 regions" in output
    assert _shard_bytes(parallel) == first

    code, output = _convert(run_cli, jsonl, "--out", parallel, "--shard-size", "2", "--max-side", "32")
    assert code == 2 and "other inputs or settings (options differ)" in output
    code, output = _convert(run_cli, jsonl, "--out", parallel, "--shard-size", "2", "--max-side", "32", "--overwrite")
    assert code == 0 and "resumed" not in output
    assert all(image.size[0] <= 32 for _, image, _, _ in read_samples(parallel))
    (tmp_path / "other/images").mkdir(parents=True)
    (tmp_path / "other/images/x.tar").write_bytes(b"")
    code, output = _convert(run_cli, jsonl, "--out", tmp_path / "other")
    assert code == 2 and "no conversion there wrote" in output


def test_argument_errors_are_one_line(tmp_path, capsys, run_cli):
    jsonl = _many(tmp_path, 1)
    for args, message in [(["--shard-size", "0"], "shard_size must be an int >= 1"),
                          (["--max-side", "4"], "max_side must be an int >= 16"),
                          (["--jpeg-quality", "101"], "jpeg_quality must be in 1..100")]:
        code, output = _convert(run_cli, jsonl, "--out", tmp_path / "x", *args)
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1
    code, output = _convert(run_cli, tmp_path / "nope.jsonl", "--out", tmp_path / "x")
    assert code == 2 and "cannot read" in output
    code, output = _convert(run_cli, _jsonl(tmp_path / "bad.jsonl", ["[1]", '{"image": 3}']), "--out", tmp_path / "x")
    assert code == 1 and dropped_counts(output) == {"bad_line": 2} and "nothing to convert" in output
    assert "e.g. line 2: no 'image' path" in output
