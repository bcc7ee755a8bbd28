"""``ps3 mllm eval RUN --data JSON --images DIR [--json OUT]``: answer the last question of every
record and score it.

Each record's earlier turns (with their reference answers) are the context; the last question
steers one look, and the generated answer is compared with the record's last answer: exact match
(after stripping surrounding whitespace) and normalised match (lower case, punctuation and the
articles a/an/the removed, whitespace collapsed). Also reported: the LLM image tokens per record,
seconds per record and, where the last question has boxes, the selection recall: the share of
high-res cells whose centre lies in a box that the look encoded, over all high-res scales.
"""
from __future__ import annotations

import re
import string
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .collate import box_map, load_pixels
from .conversations import Conversation, encode_conversation
from .block_looks import encode_for_llm
from .saving import look_options
from .topdown import splice_image_tokens

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    text = text.lower()
    text = "".join(c for c in text if c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class RecordResult:
    id: str
    question: str
    reference: str
    answer: str
    exact: bool
    normalised: bool
    image_tokens: int
    seconds: float
    recall: float | None


def selection_recall(maps, boxes, original: tuple[int, int]) -> float:
    """Encoded share of the high-res cells inside ``boxes`` (all scales together)."""
    inside = hit = 0.0
    for m in maps:
        target = box_map(boxes, original, tuple(m.shape[-2:])).bool()
        inside += float(target.sum())
        hit += float((target & m[0].bool().cpu()).sum())
    return hit / inside if inside else 0.0


@torch.no_grad()
def answer_record(helper, record: Conversation, max_new_tokens: int = 32) -> RecordResult:
    """Generate the answer to ``record``'s last question; score it."""
    tok, start = helper.tokenizer, time.perf_counter()
    device = next(helper.projector.parameters()).device
    turns = record.turns
    enc = encode_conversation(tok, turns, helper.image_token_id if record.image else None,
                              selection_turn=len(turns) - 1, answer_last=False)
    ids = torch.tensor([enc.input_ids], device=device)
    embeds, mask = helper.llm.get_input_embeddings()(ids), torch.ones_like(ids)
    image_tokens, recall = 0, None
    if record.image is not None:
        pixels = load_pixels(record, helper.processor).unsqueeze(0).to(device)
        prompt, low = helper.top_down_prompt(pixels, ids, mask, prompt_end=torch.tensor([enc.prompt_end]))
        vision = encode_for_llm(helper.vision_model, pixels, prompt=prompt.to(low.selection_features.dtype),
                                low_res=low, **look_options(helper))
        image = helper.projector(vision, feature_layer=helper.feature_layer)
        image_tokens = int(image.lengths[0])
        seq = splice_image_tokens(embeds, mask, ids.eq(helper.image_token_id).long().argmax(1), image.embeds,
                                  image.lengths)
        embeds, mask = seq.inputs_embeds, seq.attention_mask
        if turns[-1].boxes:
            recall = selection_recall(vision.selection_maps, turns[-1].boxes, record.image_size)
    out = helper.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              suppress_tokens=[helper.image_token_id])
    answer = tok.decode(out[0], skip_special_tokens=True).strip()
    reference = turns[-1].answer.strip()
    return RecordResult(record.id, turns[-1].question, reference, answer, answer == reference,
                        normalise(answer) == normalise(reference), image_tokens, time.perf_counter() - start, recall)


def evaluate(helper, records, *, max_new_tokens: int = 32, progress: bool | None = None) -> dict:
    """Score every record; returns the summary and the per-record results (``records``)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    results = [answer_record(helper, r, max_new_tokens) for r in tqdm(records, desc="eval", unit="record",
                                                                        disable=not show)]
    n = max(len(results), 1)
    recalls = [r.recall for r in results if r.recall is not None]
    return {"records": len(results),
            "exact_match": sum(r.exact for r in results) / n,
            "normalised_match": sum(r.normalised for r in results) / n,
            "image_tokens_per_record": sum(r.image_tokens for r in results) / n,
            "seconds_per_record": sum(r.seconds for r in results) / n,
            "selection_recall": sum(recalls) / len(recalls) if recalls else None,
            "records_with_boxes": len(recalls),
            "results": [asdict(r) for r in results]}
