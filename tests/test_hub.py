"""Loading weights from damaged files: every failure is a ValueError that names the file and says
what to do (real truncated, foreign and missing files; no mocks)."""
import shutil
from pathlib import Path

import pytest
import torch

import ps3
from ps3.hub import load_state_dict, save_state_dict

MODEL_DIR = Path(__file__).parent / "fixtures" / "ps3_tiny" / "model"


@pytest.fixture
def model_dir(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(MODEL_DIR, out)
    return out


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_header", "html_page", "empty"])
def test_corrupt_weights_file_names_it_and_says_to_redownload(model_dir, damage):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated_data": data[: len(data) // 2], "truncated_header": data[:20],
                         "html_page": b"<!DOCTYPE html><title>404 Not Found</title>", "empty": b""}[damage])
    with pytest.raises(ValueError, match="delete .*model.safetensors and download it again") as info:
        ps3.PS3VisionModel.from_pretrained(model_dir)
    assert str(weights) in str(info.value) and "not a readable safetensors file" in str(info.value)


def test_hub_cache_link_points_at_the_blob_to_delete(model_dir, tmp_path):
    # The hub cache keeps a blob and links the snapshot's file name to it: deleting the blob is
    # what makes the next from_pretrained download it again.
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_bytes((model_dir / "model.safetensors").read_bytes()[:100])
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").symlink_to(blob)
    with pytest.raises(ValueError, match=f"delete {blob} and download it again"):
        load_state_dict(model_dir)


def test_sharded_checkpoint_with_a_missing_or_broken_shard(model_dir, tmp_path):
    state = load_state_dict(model_dir)
    sharded = tmp_path / "sharded"
    save_state_dict(state, sharded, max_shard_bytes=4096)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert load_state_dict(sharded).keys() == state.keys()
    shards[1].write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{shards[1].name} is not a readable safetensors file"):
        load_state_dict(sharded)
    shards[1].unlink()
    with pytest.raises(ValueError, match=f"{shards[1].name} .* is missing"):
        load_state_dict(sharded)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a safetensors index"):
        load_state_dict(sharded)


def test_intact_copy_still_loads(model_dir):
    model = ps3.PS3VisionModel.from_pretrained(model_dir)
    reference = load_state_dict(MODEL_DIR, ["vision_model."])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key])


def test_offline_hub_id_is_one_short_error_without_a_chain(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real client, refusing to reach the network
    with pytest.raises(ValueError, match="could not be fetched.*pass a local model directory") as info:
        ps3.PS3VisionModel.from_pretrained("nvidia/PS3-4K-SigLIP2", cache_dir=tmp_path)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert "'nvidia/PS3-4K-SigLIP2'" in str(info.value) and str(info.value).count("\n") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_and_dtype_are_checked_before_loading(model_dir):
    with pytest.raises(ValueError, match="device 'cuda' given but CUDA is not available"):
        ps3.PS3VisionModel.from_pretrained(model_dir, device="cuda")
    with pytest.raises(ValueError, match="dtype must be a torch dtype or one of"):
        ps3.PS3VisionModel.from_pretrained(model_dir, dtype="int8")
    model = ps3.PS3VisionModel.from_pretrained(model_dir, dtype="bf16", device="cpu")
    assert model.dtype is torch.bfloat16
    assert ps3.PS3VisionModel.from_pretrained(model_dir, dtype="auto").dtype is torch.float32
