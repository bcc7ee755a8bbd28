"""``ps3 extract``: each input kind, the stored features against direct model calls, prompts,
bad inputs, and the command line's errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from extract_helpers import make_image_shards, make_images
from golden import MODEL_DIR
from tolerances import assert_same_selection
from ps3 import PS3ImageProcessor, PS3TextModel, PS3Tokenizer, PS3VisionModel
from ps3.cli import main
from ps3.extract import extract, load_index, read


@pytest.fixture(scope="module")
def model():
    return PS3VisionModel.from_pretrained(MODEL_DIR)


def direct(model, path, layers=1, prompt=None, **selection):
    pixels = PS3ImageProcessor(image_size=224)(str(path))["pixel_values"][0][None]
    with torch.no_grad():
        return model(pixels, num_hidden_layers_to_return=layers, prompt=prompt, **(selection or {"num_look_close": 1}))


def direct_pooled(model, path):
    """The low-res pooled feature of one image (the inference output, like upstream's, has none)."""
    pixels = PS3ImageProcessor(image_size=224)(str(path))["pixel_values"][0][None]
    with torch.no_grad():
        return model.encode_low_res(pixels, keep_kv=False).pooled_output


def samples_by_key(directory):
    return {s.key: s for s in read(directory)}


def test_folder_round_trip_matches_direct_calls(tmp_path, model):
    paths = make_images(tmp_path / "imgs", 7)
    summary = extract(tmp_path / "imgs", tmp_path / "out", model=str(MODEL_DIR), layers=2, batch_size=3,
                      workers=2, shard_size=4, progress=False)  # each worker takes every other image of a shard
    assert summary["images"] == 7 and summary["shards"] == 2 and summary["skipped"] == {}
    got = samples_by_key(tmp_path / "out")
    assert sorted(got) == sorted(str(p.relative_to(tmp_path / "imgs").with_suffix("")) for p in paths)
    index = load_index(tmp_path / "out")
    for path in paths:
        key = str(path.relative_to(tmp_path / "imgs").with_suffix(""))
        sample, ref = got[key], direct(model, path, layers=2)
        assert sample.hidden_states.shape == (2, 96, 64)  # 16 low-res + 80 selected tokens
        torch.testing.assert_close(sample.hidden_states, torch.stack(ref.hidden_states, 1)[0], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(sample.pooled_output, direct_pooled(model, path)[0], atol=2e-4, rtol=2e-4)
        assert_same_selection([m[None] for m in sample.selection_maps], ref.selection_maps, ref.selection_probs)
        assert sample.tokens_per_scale == [16, int(ref.selection_maps[0].sum()), int(ref.selection_maps[1].sum())]
        assert sum(sample.tokens_per_scale) == 96 == index["samples"][key]["tokens"]
        with Image.open(path) as image:
            assert (sample.info["width"], sample.info["height"]) == image.size
        assert sample.info["source"] == str(path) and index["samples"][key]["shard"] == sample.shard
    assert summary["tokens"] == 7 * 96


def test_keep_aspect_images_of_different_shapes_go_in_one_ragged_call(tmp_path, model):
    repo = tmp_path / "model"
    shutil.copytree(MODEL_DIR, repo)
    processor = PS3ImageProcessor(image_size=224, resize_mode="keep_aspect", patch_size=14)
    processor.save_pretrained(repo)
    paths = make_images(tmp_path / "imgs", 4)
    shapes = {tuple(processor(str(p))["pixel_values"][0].shape) for p in paths}
    assert len(shapes) > 1  # the batch below is mixed
    extract(tmp_path / "imgs", tmp_path / "out", model=str(repo), batch_size=4, workers=0, layers=2,
            feature_maps=True, progress=False)
    got = samples_by_key(tmp_path / "out")
    for path in paths:
        sample = got[str(path.relative_to(tmp_path / "imgs").with_suffix(""))]
        with torch.no_grad():
            ref = model(processor(str(path))["pixel_values"][0][None], num_look_close=1, num_hidden_layers_to_return=2)
        torch.testing.assert_close(sample.hidden_states, torch.stack(ref.hidden_states, 1)[0], atol=2e-4, rtol=2e-4)
        assert_same_selection([m[None] for m in sample.selection_maps], ref.selection_maps, ref.selection_probs)
        assert sum(sample.tokens_per_scale) == ref.last_hidden_state.shape[1]
        maps = model.vision_model.format_features_into_feature_maps(ref.last_hidden_state, ref.selection_maps)
        for stored, expected in zip(sample.feature_maps, maps, strict=True):
            torch.testing.assert_close(stored, expected[0], atol=2e-4, rtol=2e-4)


def test_list_file_and_image_arguments(tmp_path):
    paths = make_images(tmp_path / "data", 4)
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"# images\n{paths[0].relative_to(tmp_path / 'data')}\n{paths[1]}\n\nsub/missing.jpg\n")
    summary = extract(listing, tmp_path / "out", model=str(MODEL_DIR), workers=0, progress=False)
    index = load_index(tmp_path / "out")
    assert sorted(index["samples"]) == ["img0000", "sub/img0001"]
    assert index["skipped"] == {"missing_file": ["sub/missing"]} and summary["skipped"] == {"missing_file": 1}
    extract([paths[2], paths[3]], tmp_path / "loose", model=str(MODEL_DIR), workers=0, progress=False)
    assert sorted(load_index(tmp_path / "loose")["samples"]) == ["img0002", "sub/img0003"]


@pytest.mark.parametrize("kind", ["tar", "directory", "brace"])
def test_image_shards(tmp_path, kind):
    shards = make_image_shards(tmp_path / "shards", 2, 5)
    spec = {"tar": [shards[0], shards[1]], "directory": [tmp_path / "shards"],
            "brace": [str(tmp_path / "shards" / "image_{00000..00001}.tar")]}[kind]
    summary = extract(spec, tmp_path / "out", model=str(MODEL_DIR), workers=2, batch_size=2, progress=False)
    assert summary["images"] == 10 and summary["shards"] == 2
    got = samples_by_key(tmp_path / "out")
    assert sorted(got) == [f"s{s}_{n:03d}" for s in range(2) for n in range(5)]  # each key once
    assert {s.shard for k, s in got.items() if k.startswith("s1_")} == {"part-000001.tar"}
    assert got["s0_002"].info["source"] == f"{shards[0]}:s0_002.jpg"
    assert load_index(tmp_path / "out")["duplicate_keys"] == {}


def test_keys_repeated_across_input_shards_are_listed(tmp_path):
    shard = make_image_shards(tmp_path / "shards", 1, 2)[0]
    summary = extract([shard, shard], tmp_path / "out", model=str(MODEL_DIR), workers=0, progress=False)
    index = load_index(tmp_path / "out")
    assert summary["duplicate_keys"] == 2 and summary["images"] == 4  # as stored: read() yields 4
    assert index["duplicate_keys"] == {"s0_000": ["part-000000.tar", "part-000001.tar"],
                                       "s0_001": ["part-000000.tar", "part-000001.tar"]}


def test_bad_inputs_are_skipped_by_reason_or_stop_a_strict_run(tmp_path):
    from ps3.data.writer import ShardWriter

    make_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "zero.jpg").write_bytes(b"")
    good = (tmp_path / "imgs" / "img0000.jpg").read_bytes()
    (tmp_path / "imgs" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "imgs" / "text.png").write_bytes(b"this is not an image")
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(tmp_path / "imgs" / "huge.png")
    with ShardWriter(tmp_path / "in.tar") as writer:
        writer.write({"__key__": "ok", "jpg": good})
        writer.write({"__key__": "caption_only", "txt": b"a dog"})
    summary = extract([tmp_path / "imgs", tmp_path / "in.tar"], tmp_path / "out", model=str(MODEL_DIR),
                      max_pixels=96 * 96, workers=0, progress=False)
    index = load_index(tmp_path / "out")
    assert {r: sorted(k) for r, k in index["skipped"].items()} == {
            "empty_file": ["zero"], "unreadable": ["text", "truncated"], "too_many_pixels": ["huge"],
            "missing_image": ["caption_only"]}
    assert sorted(index["samples"]) == ["img0000", "ok", "sub/img0001"]
    assert summary["skipped"] == {"empty_file": 1, "missing_image": 1, "too_many_pixels": 1, "unreadable": 2}
    with pytest.raises(ValueError, match=r"bad input \(unreadable.*'text'"):
        extract(tmp_path / "imgs", tmp_path / "strict", model=str(MODEL_DIR), strict=True, workers=0,
                progress=False)
    assert not list((tmp_path / "strict").glob("*.tar")) and not (tmp_path / "strict" / "index.json").exists()


def test_prompts_file_steers_its_images_and_the_rest_stay_bottom_up(tmp_path, model):
    repo = tmp_path / "model"
    shutil.copytree(MODEL_DIR, repo)
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["a red boat on the sea", "text on a sign"],
                              trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    tokenizer = PS3Tokenizer(words, context_length=16)
    tokenizer.save_pretrained(repo)
    paths = make_images(tmp_path / "imgs", 3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"key": "img0000", "prompt": "a red boat"}) + "\n")
    extract(tmp_path / "imgs", tmp_path / "out", model=str(repo), prompts=prompts, tokens=20, workers=0,
            batch_size=3, progress=False)
    got = samples_by_key(tmp_path / "out")
    with torch.no_grad():
        vector = PS3TextModel.from_pretrained(repo)(tokenizer(["a red boat"])).prompt
    steered = direct(model, paths[0], prompt=vector, num_token_look_close=20)
    plain = direct(model, paths[2], num_token_look_close=20)
    assert got["img0000"].info["prompt"] == "a red boat" and "prompt" not in got["img0002"].info
    for sample, ref in ((got["img0000"], steered), (got["img0002"], plain)):
        assert_same_selection([m[None] for m in sample.selection_maps], ref.selection_maps, ref.selection_probs)
        torch.testing.assert_close(sample.last_hidden_state, ref.last_hidden_state[0], atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_command_line_all_patches_with_feature_maps(tmp_path, run_cli):
    make_images(tmp_path / "imgs", 3)
    proc = run_cli("extract", tmp_path / "imgs", "--model", MODEL_DIR, "--out", tmp_path / "out", "--all",
                   "--feature-maps", "--workers", "1", "--layers", "3", check=True)
    assert "3 images, 1008 tokens in 1 shards" in proc.stdout  # 16 + 64 + 256 per image
    sample = next(read(tmp_path / "out"))
    assert sample.hidden_states.shape == (3, 336, 64) and sample.tokens_per_scale == [16, 64, 256]
    assert [tuple(f.shape) for f in sample.feature_maps] == [(64, 4, 4), (64, 8, 8), (64, 16, 16)]


def test_registered_on_the_ps3_command():
    from ps3.cli import build_parser

    assert "extract" in build_parser().format_help()


@pytest.mark.parametrize("args,message", [
    (["NOPE", "--out", "OUT"], "nope: no such file or directory"),
    (["IMGS", "--out", "OUT", "--layers", "9"], "layers must be an int from 1 to 4"),
    (["IMGS", "--out", "OUT", "--prompt", "a boat"], "no tokenizer_config.json"),
    (["IMGS", "--out", "OUT", "--batch-size", "0"], "batch_size must be an int >= 1"),
    (["IMGS", "--out", "OUT", "--looks", "-1"], "num_look_close must be"),
    (["IMGS", "--out", "OUT", "--model", "no/such/model"], "neither an existing directory nor a hub id"),
    (["CLASH", "--out", "OUT"], "two inputs get the key 'a'"),
])
def test_user_mistakes_give_one_line(tmp_path, capsys, args, message):
    make_images(tmp_path / "imgs", 1)
    (tmp_path / "clash").mkdir()
    for name in ("a.jpg", "a.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / "clash" / name)
    names = {"NOPE": tmp_path / "nope", "OUT": tmp_path / "out", "IMGS": tmp_path / "imgs",
             "CLASH": tmp_path / "clash"}
    argv = ["extract", "--model", str(MODEL_DIR), *[str(names.get(a, a)) for a in args], "--quiet"]
    assert main(argv) == 2  # the CLI's entry point, in this process (a subprocess test is above)
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1
