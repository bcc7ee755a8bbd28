"""The two-pass LLM helper on a real (tiny, random) transformers Llama and the tiny PS3 model:
splicing, the low-res trunk running once per image, generation, and end-to-end training."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from golden import MODEL_DIR  # noqa: E402
from ps3 import PS3VisionModel  # noqa: E402
from ps3.mllm import (IGNORE_INDEX, TwoPassPS3, encode_for_llm, selection_target_loss,  # noqa: E402
                      splice_image_tokens)

IMAGE = 99


def tiny_llm(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


@pytest.fixture()
def helper():
    return TwoPassPS3(PS3VisionModel.from_pretrained(MODEL_DIR), tiny_llm(), image_token_id=IMAGE)


def batch():
    ids = torch.tensor([[1, 2, IMAGE, 5, 6, 7], [1, IMAGE, 5, 6, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return pixels, ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_splice_matches_row_by_row(side):
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(3, 5, 4, generator=g), torch.randn(3, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    pos, lengths = torch.tensor([4, 0, 1]), torch.tensor([3, 1, 2])
    labels = torch.arange(15).view(3, 5)
    out = splice_image_tokens(text, mask, pos, image, lengths, labels, side)
    assert out.inputs_embeds.shape == (3, 7, 4)
    for b in range(3):
        n, p = int(mask[b].sum()), int(pos[b])
        row = torch.cat([text[b, :p], image[b, :lengths[b]], text[b, p + 1:n]])
        lab = torch.cat([labels[b, :p], torch.full((int(lengths[b]),), IGNORE_INDEX), labels[b, p + 1:n]])
        real = out.attention_mask[b].bool()
        assert real.sum() == len(row) and (real[-len(row):].all() if side == "left" else real[:len(row)].all())
        torch.testing.assert_close(out.inputs_embeds[b][real], row)
        assert torch.equal(out.labels[b][real], lab)
        assert not out.inputs_embeds[b][~real].any()


def test_low_res_trunk_runs_once_per_image(helper):
    pixels, ids, mask = batch()
    seen = []
    hook = helper.vision_model.vision_model.trunk.patch_embed.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        out = helper(pixels, ids, mask)
    hook.remove()
    assert seen == [2]  # one full-image (low-res) patch embedding of the batch: pass 2 reused pass 1's
    assert out.image_lengths.tolist() == [helper.count_llm_tokens(224, 224)] * 2 == [24, 24]
    with torch.no_grad():  # pass 2 on the reused low-res pass equals a fresh encode with the same prompt
        fresh = encode_for_llm(helper.vision_model, pixels, prompt=out.prompt, k=2)
    torch.testing.assert_close(fresh.last_hidden_state, out.vision.last_hidden_state)
    assert torch.equal(out.vision.topdown_selection_probs[0], out.vision.selection_probs[0])


def test_prompt_reads_the_end_of_the_user_prompt(helper):
    pixels, ids, mask = batch()
    with torch.no_grad():
        by_default, _ = helper.top_down_prompt(pixels, ids, mask)
        by_position, _ = helper.top_down_prompt(pixels, ids, mask, prompt_end=torch.tensor([5, 3]))
        by_marker, _ = helper.top_down_prompt(pixels, ids, mask, prompt_end=6)  # token 6 ends both questions
        earlier, _ = helper.top_down_prompt(pixels, ids, mask, prompt_end=5)
        # Reference: the LLM over the row's [text, low-res tokens, question] alone.
        low = helper.projector(helper.vision_model.encode_low_res(pixels[1:]).hidden_states[-1], []).embeds
        emb = helper.llm.get_input_embeddings()(ids[1:, :4])
        seq = torch.cat([emb[:, :1], low, emb[:, 2:4]], 1)
        state = helper.llm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(by_default, by_position)
    torch.testing.assert_close(by_default[1:], helper.prompt_head(state), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_marker[1], by_default[1])
    assert not torch.allclose(earlier, by_default)


def test_generate(helper):
    pixels, ids, mask = batch()
    new = helper.generate(pixels, ids, mask, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, 3)
    with pytest.raises(ValueError, match="placeholder"):
        helper(pixels, ids.masked_fill(ids == IMAGE, 3), mask)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_steps_lower_the_loss(helper, checkpointing):
    pixels, ids, mask = batch()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    target = torch.zeros(2, 224, 224)
    target[:, :112, :112] = 1  # the "named object": top-left quarter
    encoder = helper.vision_model.vision_model
    encoder.gradient_checkpointing = checkpointing
    helper.train()
    optimizer = torch.optim.AdamW([p for p in helper.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(6):
        out = helper(pixels, ids, mask, labels=labels)
        lm = helper.llm(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask, labels=out.labels).loss
        loss = lm + selection_target_loss(out.vision.topdown_selection_probs, target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            trained = (helper.projector, helper.prompt_head, encoder.trunk.blocks[0], encoder.selection_feature_proj)
            for module in trained:
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_frozen_encoder_gets_no_gradient(helper):
    pixels, ids, mask = batch()
    helper.vision_model.requires_grad_(False)
    out = helper(pixels, ids, mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))
    loss = helper.llm(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask, labels=out.labels).loss
    (loss + selection_target_loss(out.vision.topdown_selection_probs, torch.ones(2, 224, 224))).backward()
    assert all(p.grad is None for p in helper.vision_model.parameters())
    assert helper.prompt_head.layers.weight.grad is not None and helper.projector.fc1.weight.grad is not None


def test_bf16_qwen2_with_a_bf16_encoder():
    # Another LLM family, everything in bfloat16 (the new modules follow the LLM's precision).
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    vision = PS3VisionModel.from_pretrained(MODEL_DIR, torch_dtype=torch.bfloat16)
    helper = TwoPassPS3(vision, llm, image_token_id=IMAGE, k=3, num_look_close=2)
    assert helper.projector.fc1.weight.dtype == helper.prompt_head.layers.weight.dtype == torch.bfloat16
    pixels, ids, mask = batch()
    with torch.no_grad():
        out = helper(pixels.bfloat16(), ids, mask)
    assert out.inputs_embeds.dtype == torch.bfloat16
    assert out.image_lengths.tolist() == [helper.count_llm_tokens(224, 224)] * 2
    assert helper.generate(pixels.bfloat16(), ids, mask, max_new_tokens=2, do_sample=False).shape == (2, 2)


def test_images_of_different_sizes_in_one_call(helper):
    pixels, ids, mask = batch()
    images = [pixels[0], pixels[1, :, :100]]  # 224×224 and 100×224, the second skipping the largest scale
    with torch.no_grad():
        out = helper(images, ids, mask, only_select_first_n_scale=[2, 1])
    expected = [helper.count_llm_tokens(224, 224, 2), helper.count_llm_tokens(100, 224, 1)]
    assert out.image_lengths.tolist() == expected and expected[0] != expected[1]
    assert out.attention_mask.sum(1).tolist() == [6 - 1 + expected[0], 4 - 1 + expected[1]]


def test_budgets_are_checked_when_the_helper_is_built():
    # A 4K model's budgets on a model with other scales fail here, not at generate().
    vision = PS3VisionModel.from_pretrained(MODEL_DIR)
    with pytest.raises(ValueError, match=r"max_select_num_each_scale .*ps3_scales=\[56, 112, 224\]"):
        TwoPassPS3(vision, tiny_llm(), image_token_id=IMAGE, max_select_num_each_scale=[85, 340, 2125])
    with pytest.raises(ValueError, match="num_look_close must be"):
        TwoPassPS3(vision, tiny_llm(), image_token_id=IMAGE, num_look_close=-1)
    with pytest.warns(DeprecationWarning, match="budgets"):
        helper = TwoPassPS3(vision, tiny_llm(), image_token_id=IMAGE, budgets=[8, 16])
    assert helper.max_select_num_each_scale == [8, 16]
