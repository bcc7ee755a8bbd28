"""``ps3 mllm train`` in process with ``--llm tiny`` and the tiny PS3 fixture: align then sft, the
loss falls, what is frozen stays so, masked positions get no loss, the low-res trunk runs once per
image per step, save → load gives identical logits, an interrupted run resumed equals an
uninterrupted one, and ``--fsdp`` used where it cannot work says what to do."""
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _mllm_runs import losses, params, toy_dataset  # noqa: E402
from golden import MODEL_DIR  # noqa: E402
from ps3 import PS3VisionModel  # noqa: E402
from ps3.mllm import IGNORE_INDEX, TwoPassPS3  # noqa: E402
from ps3.mllm.collate import collate  # noqa: E402
from ps3.mllm.conversations import load_conversations  # noqa: E402
from ps3.mllm.tiny_llm import build_tiny_llm  # noqa: E402
from ps3.mllm.trainer import MLLMLoss, lm_loss_sum, train  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_dataset(tmp_path_factory.mktemp("mllm_data"), 8)


@pytest.fixture(scope="module")
def align(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    return out, train(params(data, out, steps=6, lr=1e-2))


@pytest.fixture(scope="module")
def sft(data, align, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return out, train(params(data, out, init=str(align[0]), vision=None, llm=None, stage="sft", steps=6, lr=3e-3))


def test_align_trains_the_projector_only(align):
    run, result = align
    assert result.step == 6 and result.interrupted is None
    lm = losses(run)
    assert sum(lm[-2:]) < sum(lm[:2])
    helper = result.helper
    fresh = PS3VisionModel.from_pretrained(MODEL_DIR).state_dict()
    for name, value in helper.vision_model.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    initial = build_tiny_llm(len(helper.tokenizer), 0).state_dict()
    for name, value in helper.llm.state_dict().items():
        assert torch.equal(value, initial[name]), name
    trainable = {n.split(".")[0] for n, p in helper.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "connector.safetensors", "llm", "metrics.jsonl",
                                                       "mllm_config.json", "tokenizer"]


def test_sft_trains_connector_head_and_llm(sft, align):
    run, result = sft
    lm = losses(run)
    assert sum(lm[-2:]) < sum(lm[:2])
    selection = [float(line.split('"selection": ')[1].split(",")[0]) for line in
                 (run / "metrics.jsonl").read_text().splitlines()]
    assert all(s > 0 for s in selection)  # every toy question has a box: the prompt head is supervised
    trainable = {n.split(".")[0] for n, p in result.helper.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "prompt_head", "llm"}
    before = TwoPassPS3.from_pretrained(align[0])
    assert not torch.equal(before.prompt_head.layers.weight, result.helper.prompt_head.layers.weight)


def test_masked_positions_get_no_loss(data):
    run = params(data, data.parent / "unused")
    from ps3.mllm.tiny_llm import build_tokenizer, conversation_text
    from ps3.mllm.saving import MLLMSettings, build_helper
    from ps3.runtime import load_model

    records = load_conversations(data, data.parent).records[:3]
    tok = build_tokenizer(conversation_text(records))
    loaded = load_model(run.vision)
    helper = build_helper(loaded.vision, build_tiny_llm(len(tok)), tok, MLLMSettings(str(MODEL_DIR), "tiny",
                                                                                     budgets=[16, 64]))
    batch = collate(records, tok, helper.image_token_id, loaded.processor, helper.vision_model.vision_model)
    for stage in ("align", "sft"):
        embeds, mask, labels, _ = MLLMLoss(helper, stage).image_sequence(batch)
        answer_tokens = int((batch.image.labels != IGNORE_INDEX).sum())
        assert int((labels != IGNORE_INDEX).sum()) == answer_tokens  # image and prompt positions unlabelled
        logits = helper.llm(inputs_embeds=embeds, attention_mask=mask).logits.detach().requires_grad_(True)
        total, count = lm_loss_sum(logits, labels)
        total.backward()
        predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
        predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        assert int(count) == answer_tokens
        assert logits.grad[~predicts_answer].abs().max() == 0  # prompt, image and pad positions: no gradient
        assert (logits.grad[predicts_answer].abs().amax(-1) > 0).all()


def test_low_res_pass_runs_once_per_image_per_step(data, tmp_path, monkeypatch):
    """Every low-res trunk pass goes through PS3VisionEncoder.forward_low_res: count its images."""
    from ps3.encoder.vision import PS3VisionEncoder

    calls, steps, original = [], [], PS3VisionEncoder.forward_low_res

    def counted(self, pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(PS3VisionEncoder, "forward_low_res", counted)
    for stage in ("align", "sft"):
        calls.clear()
        result = train(params(data, tmp_path / stage, stage=stage, steps=2), on_step=steps.append)
        assert calls == [4, 4], stage  # one low-res pass of the step's 4 images per step, in both stages
        assert result.samples == 8


def test_save_load_gives_identical_logits(sft, tmp_path):
    run, result = sft
    loaded = TwoPassPS3.from_pretrained(run)
    trained = result.helper.eval()
    batch = _first_batch(loaded)
    with torch.no_grad():
        want = _logits(trained, batch)
        got = _logits(loaded, batch)
        loaded.save_pretrained(tmp_path / "copy")
        again = _logits(TwoPassPS3.from_pretrained(tmp_path / "copy"), batch)
    assert torch.equal(got, want) and torch.equal(again, want)


def _first_batch(helper):
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tok = helper.tokenizer
    ids = [tok.bos_token_id, *tok("USER: ", add_special_tokens=False)["input_ids"], helper.image_token_id,
           *tok("what shape is the red object?\nASSISTANT:", add_special_tokens=False)["input_ids"]]
    return pixels, torch.tensor([ids, ids])


def _logits(helper, batch):
    pixels, ids = batch
    out = helper(pixels, ids)
    return helper.llm(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask).logits


def test_interrupted_run_resumed_equals_uninterrupted(data, tmp_path):
    common = dict(stage="sft", steps=4, batch=3, lora=4, save_every=100)
    whole = train(params(data, tmp_path / "whole", **common))

    def terminate(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(params(data, tmp_path / "cut", **common), on_step=terminate)
    assert first.interrupted == "SIGTERM" and first.step == 2
    assert (tmp_path / "cut" / "checkpoints" / "step_00000002.pt").is_file()
    assert (tmp_path / "cut" / "llm_adapter" / "adapter_model.safetensors").is_file()
    second = train(params(data, tmp_path / "cut", resume=True, **common))
    assert second.step == 4 and second.steps_run == 2
    want = dict(whole.helper.named_parameters())
    for name, value in second.helper.named_parameters():
        assert torch.equal(value, want[name]), name
    assert whole.last_loss == second.last_loss


def test_cached_low_res_passes_run_once_per_image(data, tmp_path, monkeypatch):
    from ps3.encoder.vision import PS3VisionEncoder
    from tolerances import assert_close_paths

    calls, original = [], PS3VisionEncoder.forward_low_res

    def counted(self, pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(PS3VisionEncoder, "forward_low_res", counted)
    train(params(data, tmp_path / "cached", stage="sft", steps=4, cache_low_res=True))
    assert sum(calls) == 8 and calls[:2] == [4, 4]  # 8 records: each pass made once over two epochs
    calls.clear()
    train(params(data, tmp_path / "plain", stage="sft", steps=4))
    assert calls == [4, 4, 4, 4]
    cached, plain = losses(tmp_path / "cached"), losses(tmp_path / "plain")
    assert_close_paths(torch.tensor(cached), torch.tensor(plain), "lm loss per step, cached vs computed low-res")


def test_bf16_autocast_trains(data, tmp_path):
    result = train(params(data, tmp_path / "bf16", stage="sft", steps=2, precision="bf16", lora=2))
    lm = losses(tmp_path / "bf16")
    assert result.step == 2 and all(torch.isfinite(torch.tensor(lm)))
    assert {p.dtype for p in result.helper.parameters()} == {torch.float32}  # autocast: weights stay float32


def test_fsdp_flag_errors_name_what_to_do(data, align, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="--fsdp shards the LLM across processes: launch with torchrun"):
        train(params(data, tmp_path / "alone", fsdp=True))
    assert not (tmp_path / "alone").exists()
    with pytest.raises(ValueError, match="--fsdp and --lora cannot be combined"):
        train(params(data, tmp_path / "lora", stage="sft", lora=4, fsdp=True))
    # A checkpoint written under --fsdp (its optimizer state keyed by name) needs --fsdp to resume.
    run = shutil.copytree(align[0], tmp_path / "run")
    [checkpoint] = sorted((run / "checkpoints").glob("step_*.pt"))
    state = torch.load(checkpoint, weights_only=False)
    state["args"]["fsdp"] = True
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="written with --fsdp: resume with the same --fsdp"):
        train(params(data, run, steps=8, lr=1e-2, resume=True))


def test_align_step_on_text_only_rows_trains_nothing_and_does_not_fail(tmp_path):
    import json
    import math

    data = tmp_path / "text.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": f"question {i}?"},
                                                                 {"from": "gpt", "value": "yes"}]} for i in range(4)]))
    result = train(params(data, tmp_path / "run", stage="align", steps=2, batch=2, save_every=1))
    assert result.steps_run == 2 and math.isfinite(result.last_loss)
    # No trained part sees text rows under a frozen LLM: the gradient is an exact zero, AdamW moves nothing.
    first, second = (torch.load(tmp_path / "run" / "checkpoints" / f"step_{s:08d}.pt", weights_only=False)["model"]
                     for s in (1, 2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
