"""The LLaVA conversation loader on a hand-written file with every kind of bad record, and the
token layout: labels on answer tokens only."""
import json

import pytest
import torch
from PIL import Image

from ps3.mllm import IGNORE_INDEX
from ps3.mllm.conversations import SKIP_REASONS, Turn, encode_conversation, load_conversations, read_records

pytest.importorskip("transformers")


def q(value, boxes=None):
    turn = {"from": "human", "value": value}
    if boxes is not None:
        turn["boxes"] = boxes
    return turn


def a(value):
    return {"from": "gpt", "value": value}


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


RECORDS = [
    # usable: tag in the middle, multi-turn, a box inside the image
    {"id": "ok1", "image": "red.png", "conversations": [q("Look: <image> what colour?", [[0, 0, 40, 30]]), a("red"),
                                                         q("sure?"), a("yes")]},
    {"id": "ok2", "image": "red.png", "conversations": [q("what colour?"), a("red")]},  # tag prepended
    {"id": "ok3", "conversations": [{"from": "user", "value": "hello"}, {"from": "assistant", "value": "hi"}]},
    {"id": "missing", "image": "nope.png", "conversations": [q("<image>x"), a("y")]},
    {"id": "corrupt", "image": "broken.png", "conversations": [q("<image>x"), a("y")]},
    {"id": "order", "image": "red.png", "conversations": [a("y"), q("<image>x")]},
    {"id": "twice", "image": "red.png", "conversations": [q("<image>x"), q("again"), a("y")]},
    {"id": "no answer", "image": "red.png", "conversations": [q("<image>x"), a("y"), q("more?")]},
    {"id": "empty", "image": "red.png", "conversations": [q("<image>x"), a("  ")]},
    {"id": "box out", "image": "red.png", "conversations": [q("<image>x", [[10, 10, 41, 20]]), a("y")]},
    {"id": "box flat", "image": "red.png", "conversations": [q("<image>x", [[10, 10, 10, 20]]), a("y")]},
    {"id": "box bad", "image": "red.png", "conversations": [q("<image>x", [[1, 2, 3]]), a("y")]},
    {"id": "box text-only", "conversations": [q("x", [[0, 0, 1, 1]]), a("y")]},
    {"id": "tag later", "image": "red.png", "conversations": [q("x"), a("y"), q("<image> z"), a("w")]},
    {"id": "tag no image", "conversations": [q("<image> x"), a("y")]},
    {"id": "no turns", "image": "red.png", "conversations": []},
    "not a record",
    {"id": "value not text", "conversations": [q(3), a("y")]},
]


def test_every_bad_record_kind_is_counted(folder):
    (folder / "data.json").write_text(json.dumps(RECORDS))
    data = load_conversations(folder / "data.json", folder)
    assert [r.id for r in data.records] == ["ok1", "ok2", "ok3"]
    assert dict(data.skipped) == {"image missing": 2, "image corrupt": 1, "turns not alternating": 3,
                                  "empty answer": 1, "box outside the image": 3, "box without image": 1,
                                  "misplaced <image>": 1, "malformed record": 3}
    assert set(data.skipped) <= set(SKIP_REASONS) and data.total == len(RECORDS)
    ok1, ok2, ok3 = data.records
    assert ok1.image_size == (40, 30) and ok1.turns[0].boxes == [(0.0, 0.0, 40.0, 30.0)] and len(ok1.turns) == 2
    assert ok2.turns[0].question == "<image>\nwhat colour?" and ok3.image is None
    assert "3 of 18 records usable" in data.summary()


def test_jsonl_with_a_broken_line(folder):
    lines = [json.dumps(RECORDS[1]), "{not json", json.dumps(RECORDS[2])]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert len(read_records(folder / "data.jsonl")) == 3
    data = load_conversations(folder / "data.jsonl", folder)
    assert len(data.records) == 2 and dict(data.skipped) == {"malformed record": 1}
    with pytest.raises(ValueError, match="not found"):
        load_conversations(folder / "absent.json", folder)


def test_only_answer_tokens_are_labelled():
    from ps3.mllm.tiny_llm import build_tokenizer

    turns = [Turn("before <image> after?", "a red square."), Turn("and the size?", "big")]
    tok = build_tokenizer(["before after? a red square. and the size? big USER: ASSISTANT:"] * 5)
    image_id = tok.convert_tokens_to_ids("<image>")
    enc = encode_conversation(tok, turns, image_id, selection_turn=1)
    ids, labels = torch.tensor(enc.input_ids), torch.tensor(enc.labels)
    assert int((ids == image_id).sum()) == 1 and labels[ids == image_id].eq(IGNORE_INDEX).all()
    answers = tok.decode(ids[labels != IGNORE_INDEX])
    assert answers == " a red square.</s> big</s>"  # the answers and their ends, nothing of the prompts
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    prompt = encode_conversation(tok, turns, image_id, selection_turn=1, answer_last=False)
    assert tok.decode(prompt.input_ids).endswith("and the size?\nASSISTANT:")
    assert prompt.prompt_end == len(prompt.input_ids) - 1 == enc.prompt_end
