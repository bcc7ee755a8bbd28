"""The ``ps3`` command line, run as a user would (a real subprocess on real image files)."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from golden import MODEL_DIR


pytestmark = pytest.mark.slow  # every test here starts subprocesses

@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_help_and_version(run_cli):
    out = run_cli("--help", check=True).stdout
    for command in ("encode", "bench"):
        assert command in out
    assert run_cli("--version", check=True).stdout.startswith("ps3 ")
    assert "--looks" in run_cli("encode", "--help", check=True).stdout


def test_encode_writes_features_and_heatmaps(tmp_path, photo, run_cli):
    out = tmp_path / "feat.safetensors"
    proc = run_cli("encode", photo, "--model", MODEL_DIR, "--looks", "2", "--out", out, "--viz", f"{tmp_path}/viz/",
                   "--feature-maps", "--image-size", "224", check=True)
    assert "tokens per high-res scale" in proc.stdout and "[32, 128]" in proc.stdout
    assert f"heatmaps written to {tmp_path}/viz/\n" in proc.stdout  # one slash, however --viz was spelled
    tensors = load_file(str(out))
    assert tensors["0.last_hidden_state"].shape == (16 + 160, 64)
    assert tensors["0.selection_maps.1"].sum() == 128
    assert tensors["0.feature_maps.2"].shape == (64, 16, 16)
    for scale in (1, 2):
        image = Image.open(tmp_path / "viz" / f"photo_scale{scale}.png")
        assert image.width == 200 and image.height > 300  # the photo plus a title bar


def test_encode_all_and_tokens(tmp_path, photo, run_cli):
    proc = run_cli("encode", photo, "--model", MODEL_DIR, "--all", "--image-size", "112", "--quiet", check=True)
    assert proc.stdout == ""
    proc = run_cli("encode", photo, "--model", MODEL_DIR, "--tokens", "20", "--image-size", "112", check=True)
    assert "[4, 16]" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["encode", "missing.png", "--model", MODEL_DIR], "image not found: missing.png"),
    (["encode", "PHOTO", "--model", "no/such/dir/x"], "neither an existing directory nor a hub id"),
    (["encode", "PHOTO", "--model", MODEL_DIR, "--prompt", "a boat"], "no tokenizer_config.json"),
    (["encode", "PHOTO", "--model", MODEL_DIR, "--looks", "-1"], "num_look_close must be"),
    (["encode", "PHOTO", "--model", MODEL_DIR, "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
])
def test_user_mistakes_give_one_line(photo, args, message, run_cli):
    proc = run_cli(*[photo if a == "PHOTO" else a for a in args], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_flag_exits_nonzero(run_cli):
    proc = run_cli("encode", "--looks", "1", "--all", "x.png", "--model", "m", check=False)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_internal_bug_shows_traceback_user_mistake_one_line(photo, run_cli):
    # The same ValueError class, two origins: raised deep inside the encoder (a bug, injected
    # here) it keeps its traceback; a user mistake caught at the flag is one line.
    bug = ("import sys, ps3.cli, ps3.encoder.vision\n"
           "def broken(self, *a, **k):\n"
           "    raise ValueError('internal invariant broken')\n"
           "ps3.encoder.vision.PS3VisionEncoder.forward = broken\n"
           "sys.exit(ps3.cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", bug, "encode", str(photo), "--model", str(MODEL_DIR),
                           "--image-size", "112"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: internal invariant broken" in proc.stderr
    proc = run_cli("encode", photo, "--model", MODEL_DIR, "--tokens", "-3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["ps3 encode: error: --tokens: num_token_look_close must be a "
                                                "non-negative int or 'all', got -3"]
