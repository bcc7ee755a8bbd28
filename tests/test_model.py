"""The joint PS3Model: loads a joint repo, its towers agree with the single-tower models, and a
save/load round trip keeps the published layout."""
import pytest
import torch

import ps3
from golden import MODEL_DIR, load_case, CASES
from ps3.hub import load_state_dict


@pytest.fixture(scope="module")
def joint():
    return ps3.PS3Model.from_pretrained(MODEL_DIR)


def topdown_case():
    return load_case([c for c in CASES if c.stem == "topdown_look2"][0])[1]


def test_towers_agree_with_single_tower_models(joint):
    t = topdown_case()
    vision = ps3.PS3VisionModel.from_pretrained(MODEL_DIR)
    text = ps3.PS3TextModel.from_pretrained(MODEL_DIR)
    with torch.no_grad():
        a = joint.encode_text(t["input.text_ids"])
        b = text(t["input.text_ids"])
        torch.testing.assert_close(a.prompt, b.prompt, atol=0, rtol=0)
        both = joint(t["input.pixel_values"], t["input.text_ids"], num_look_close=2)
        alone = vision(t["input.pixel_values"], prompt=b.prompt, num_look_close=2)
    torch.testing.assert_close(both.last_hidden_state, alone.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(both.last_hidden_state, t["expected.last_hidden_state"], atol=2e-4, rtol=2e-4)


def test_missing_logit_parameters_take_siglip_init(joint):
    assert "logit_scale" not in load_state_dict(MODEL_DIR)
    assert joint.logit_scale.item() == pytest.approx(2.302585) and joint.logit_bias.item() == -10.0


def test_round_trip_keeps_layout(tmp_path, joint):
    joint.save_pretrained(tmp_path)
    keys = set(load_state_dict(tmp_path))
    assert keys == set(load_state_dict(MODEL_DIR)) | {"logit_scale", "logit_bias"}
    again = ps3.PS3Model.from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(joint.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert ps3.PS3Config.from_pretrained(tmp_path).vision_config.to_dict() == joint.config.vision_config.to_dict()
    ps3.PS3VisionModel.from_pretrained(tmp_path)
    ps3.PS3TextModel.from_pretrained(tmp_path)


def test_mismatched_widths_and_batch_raise(joint):
    cfg = ps3.PS3Config.from_pretrained(MODEL_DIR)
    cfg.text_config.prompt_proj_dim = 32
    with pytest.raises(ValueError, match="prompt_proj_dim"):
        ps3.PS3Model(cfg)
    t = topdown_case()
    with pytest.raises(ValueError, match="one text per image"):
        joint(t["input.pixel_values"].repeat(2, 1, 1, 1), t["input.text_ids"], num_look_close=1)
