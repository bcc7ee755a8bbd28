"""``ps3 init``: random-weight models with a published geometry give the published token counts."""
import json

import pytest
import torch

import ps3
from ps3.random_models import random_config, write_random_model
from ps3.registry import SCALES_1P5K, SCALES_4K


def test_random_4k_has_the_published_geometry_and_counts(tmp_path):
    out = write_random_model("random-4k", tmp_path / "m")
    model = ps3.PS3VisionModel.from_pretrained(out)
    assert tuple(model.config.ps3_scales) == SCALES_4K and model.config.max_select_num == 2560
    assert json.loads((out / "preprocessor_config.json").read_text())["image_size"] == 3780
    one = model.count_tokens(3780, 3780, num_look_close=1)
    assert (one.low_res, sum(one.per_scale), one.total) == (729, 2560, 3289)
    assert model.count_tokens(3780, 3780, num_look_close="all").total == 88209
    # The same weights from the same seed: the directory is reproducible.
    again = ps3.PS3VisionModel.from_pretrained(write_random_model("random-4k", tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_random_model_encodes_with_the_counted_shapes(tmp_path):
    model = ps3.PS3VisionModel.from_pretrained(write_random_model("random-1.5k", tmp_path / "m"))
    assert tuple(model.config.ps3_scales) == SCALES_1P5K
    with torch.no_grad():
        out = model(torch.rand(1, 3, 756, 756) * 2 - 1, num_look_close=1)
    count = model.count_tokens(756, 756, num_look_close=1)
    assert out.last_hidden_state.shape == (1, count.total, 64)
    assert [int(m.sum()) for m in out.selection_maps] == count.per_scale


def test_init_command_prints_the_counts_and_refuses_to_overwrite(tmp_path, run_cli):
    code, output = run_cli.in_process("init", "random-4k", tmp_path / "m")
    assert code == 0 and "one look 729 + 2,560 = 3,289; all 729 + 87,480 = 88,209" in output
    code, output = run_cli.in_process("init", "random-4k", tmp_path / "m")
    assert code == 2 and "pass --overwrite" in output and len(output.strip().splitlines()) == 1
    assert run_cli.in_process("init", "random-4k", tmp_path / "m", "--overwrite", "--quiet") == (0, "")
    code, output = run_cli.in_process("init", "random-4k", tmp_path / "w", "--width", "100")
    assert code == 2 and "width must be a multiple of 64" in output


@pytest.mark.parametrize("kwargs,match", [(dict(name="random-8k"), "pass one of random-4k, random-1.5k"),
                                          (dict(name="random-4k", depth=0), "depth must be a positive int")])
def test_random_config_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_config(**kwargs)
