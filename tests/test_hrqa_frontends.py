"""Every strategy as an MLLM front-end on one PS3 model: the LLM gets the count the plan predicted."""
from __future__ import annotations

import pytest
import torch

from ps3 import PS3VisionConfig, PS3VisionModel
from ps3.mllm import count_llm_tokens
from ps3.mllm.frontends import (FRONTENDS, RowFrontend, knob_for_tokens, knob_values, plan_for, ps3_budgets,
                                top_down)
from ps3.registry import training_config

SIZE = 256  # a small image keeps the test fast; the model's top scale stays 512


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    config = PS3VisionConfig(**training_config("hrqa-synthetic")[0]["vision_config"])
    return PS3VisionModel(config).eval().requires_grad_(False)


@pytest.mark.parametrize("name", [n for n in FRONTENDS if n != "ps3_top_down"])
def test_rows_and_embeddings_have_the_planned_count(name, vision):
    image = torch.rand(3, SIZE, SIZE)
    counts = set()
    for tokens in (60, 250):
        value = knob_for_tokens(name, vision, SIZE, SIZE, tokens)
        front = RowFrontend(name, vision, 48, SIZE, SIZE, value)
        rows = front.rows(image)
        assert rows.shape[0] == front.num_tokens == plan_for(name, vision, SIZE, SIZE, value).num_tokens
        embeds = front(torch.stack([rows, rows]))
        assert embeds.shape == (2, front.num_tokens, 48)
        counts.add(front.num_tokens)
    assert (len(counts) == 1) == (name == "low_res")  # every knobbed strategy spans budgets


def test_top_down_gets_the_count_of_the_ps3_plan(vision):
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    value = knob_for_tokens("ps3_top_down", vision, SIZE, SIZE, 60)
    plan = plan_for("ps3_top_down", vision, SIZE, SIZE, value)
    helper = top_down(vision, llm, image_token_id=1, knob_value=value)
    pixels = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    ids = torch.tensor([[2, 1, 3, 4], [2, 1, 5, 4]])
    with torch.no_grad():
        out = helper(pixels, ids)
    assert out.image_lengths.tolist() == [plan.num_tokens] * 2
    assert helper.count_llm_tokens(SIZE, SIZE) == plan.num_tokens
    budgets = ps3_budgets(vision, value)
    assert count_llm_tokens(vision, SIZE, SIZE, max_select_num_each_scale=budgets).total == plan.num_tokens


def test_unknown_front_end_names_the_choices(vision):
    with pytest.raises(ValueError, match="qwen2_vl"):
        knob_values("tiles", vision)
    with pytest.raises(ValueError, match="TwoPassPS3"):
        RowFrontend("ps3_top_down", vision, 32, SIZE, SIZE)
