"""``ps3 mllm chat`` and ``ps3 mllm eval`` on a run trained to answer "yes": look-closer turns
encode no high-res cell twice (counted at the trunk), and evaluation scores known answers."""
import io
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _mllm_runs import params, yes_dataset  # noqa: E402
from ps3.cli import main  # noqa: E402
from ps3.mllm import TwoPassPS3  # noqa: E402
from ps3.mllm.chat import ChatSession  # noqa: E402
from ps3.mllm.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def yes_run(tmp_path_factory):
    data = yes_dataset(tmp_path_factory.mktemp("yes_data"))
    out = tmp_path_factory.mktemp("yes_run")
    train(params(data, out, stage="sft", steps=16, batch=4, lr=3e-3))
    return out, data


def test_look_closer_encodes_no_cell_twice(yes_run, monkeypatch):
    from ps3.encoder.vision import PS3VisionEncoder

    run, data = yes_run
    helper = TwoPassPS3.from_pretrained(run)
    low_res_passes, original = [], PS3VisionEncoder.forward_low_res

    def counted(self, pixel_values, *args, **kwargs):
        low_res_passes.append(len(pixel_values))
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(PS3VisionEncoder, "forward_low_res", counted)
    trunk_tokens = []
    hook = helper.vision_model.vision_model.trunk.blocks[0].register_forward_pre_hook(
        lambda module, args: trunk_tokens.append(args[0].shape[1]))
    session = ChatSession(helper, data.parent / "images" / "scene000001.png")
    answers = [session.ask(q) for q in ("what shape is the red object?", "and its colour?", "anything else?")]
    hook.remove()
    low = helper.projector.low_res_tokens * helper.k ** 2  # the fixture's 4x4 low-res grid
    assert low_res_passes == [1]  # the follow-ups reuse the first turn's low-res pass
    assert trunk_tokens[0] == low and len(trunk_tokens) == 4  # low-res pass, then one look per turn
    assert [a.new_cells for a in answers] == trunk_tokens[1:] == [80, 80, 80]
    union = sum(int(m.sum()) for m in answers[-1].selection_maps)
    assert union == sum(trunk_tokens[1:])  # 240 different cells: none encoded twice
    assert [a.image_tokens for a in answers] == [24, 44, 64]  # 4 low-res + 20 blocks, then 20 new blocks a turn
    assert [a.text for a in answers] == ["yes"] * 3


def test_chat_command_one_question_and_session(yes_run, capsys, monkeypatch):
    run, data = yes_run
    image = str(data.parent / "images" / "scene000000.png")
    assert main(["mllm", "chat", str(run), image, "what shape is it?"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "yes" and out[1].startswith("  [24 LLM image tokens, 80 new high-res cells encoded")
    monkeypatch.setattr("sys.stdin", io.StringIO("what shape?\nand the colour?\n\n"))
    assert main(["mllm", "chat", str(run), image, "--no-look-closer"]) == 0
    out = capsys.readouterr().out
    assert out.count("yes\n") == 2 and "[24 LLM image tokens, no new look" in out
    assert main(["mllm", "chat", str(run), "absent.png", "q"]) == 2
    assert "image not found" in capsys.readouterr().err


def test_eval_scores_known_answers(yes_run, tmp_path, capsys):
    run, data = yes_run
    records = json.loads(data.read_text())[:3]
    for record, reference in zip(records, ["yes", "Yes.", "no"]):
        record["conversations"] = record["conversations"][:2]
        record["conversations"][1]["value"] = reference
    records[0]["conversations"][0]["boxes"] = [[0, 0, 112, 112]]  # the whole image: recall = encoded share
    records.append({"id": "bad", "image": "images/absent.png", "conversations": records[1]["conversations"]})
    (tmp_path / "eval.json").write_text(json.dumps(records))
    out_json = tmp_path / "report" / "eval.json"
    assert main(["mllm", "eval", str(run), "--data", str(tmp_path / "eval.json"), "--images", str(data.parent),
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr()
    assert "exact 0.333  normalised 0.667  image tokens/record 24.0" in printed.out
    report = json.loads(out_json.read_text())
    assert report["records"] == 3 and report["skipped"] == {"image missing": 1}
    assert [r["answer"] for r in report["results"]] == ["yes"] * 3
    assert report["results"][0]["recall"] == pytest.approx(80 / 320)  # 16 + 64 of the 8x8 + 16x16 cells
    assert report["records_with_boxes"] == 3 and 0 <= report["selection_recall"] <= 1
    assert all(r["seconds"] > 0 for r in report["results"])


def test_eval_without_images_and_bad_run(yes_run, tmp_path, capsys):
    run, _ = yes_run
    (tmp_path / "text.json").write_text(json.dumps([{"id": "t", "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "yes"}]}]))
    assert main(["mllm", "eval", str(run), "--data", str(tmp_path / "text.json")]) == 0
    assert "image tokens/record 0.0" in capsys.readouterr().out
    assert main(["mllm", "eval", str(tmp_path), "--data", str(tmp_path / "text.json")]) == 2
    assert "not an MLLM run directory" in capsys.readouterr().err
