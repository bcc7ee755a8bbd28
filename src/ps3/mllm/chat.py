"""``ps3 mllm chat RUN IMAGE ["QUESTION"]``: talk about one image with a trained run.

The first question steers the first high-res look (pass 1: the LLM reads the low-res image
tokens and the question; its prompt selects the blocks of pass 2). Each follow-up question may
**look closer**: it steers a further look that reuses the first turn's low-res pass (the low-res
trunk never runs again) and passes the cells encoded so far as ``old_selection_maps``, so only
cells not encoded yet go through the encoder. The LLM then sees the image tokens of every look so
far: the first turn's (low-res, then its blocks) followed by each later look's new blocks.
Every answer says how many LLM image tokens it used and how many high-res cells were encoded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .collate import load_pixels
from .conversations import IMAGE_TAG, Conversation, Turn, encode_conversation
from .block_looks import encode_for_llm
from .saving import look_options
from .topdown import splice_image_tokens


@dataclass
class Answer:
    text: str
    image_tokens: int  # LLM tokens of the image this answer read
    new_cells: int  # high-res cells encoded for this answer (0: no new look)
    seconds: float
    selection_maps: list[torch.Tensor] | None  # union of every look so far, per high-res scale (1, h, w)


class ChatSession:
    """A multi-turn conversation about one image. ``look_closer``: each follow-up question takes a
    further look (until every block is encoded); False keeps the first turn's image tokens."""

    def __init__(self, helper, image: str | Path, *, max_new_tokens: int = 32, look_closer: bool = True):
        self.helper, self.max_new_tokens, self.look_closer = helper, max_new_tokens, look_closer
        record = Conversation("", Path(image), None, [])
        self.device = next(helper.projector.parameters()).device
        self.pixels = load_pixels(record, helper.processor).unsqueeze(0).to(self.device)
        self.turns: list[Turn] = []
        self.low = None
        self.maps: list[torch.Tensor] | None = None
        self.embeds: torch.Tensor | None = None  # (1, N, D) projected image tokens so far
        self.cells_encoded = 0

    def _look(self, ids: torch.Tensor, prompt_end: int) -> int:
        """One steered look; returns the number of high-res cells it encoded."""
        h = self.helper
        mask = torch.ones_like(ids)
        prompt, self.low = h.top_down_prompt(self.pixels, ids, mask, prompt_end=torch.tensor([prompt_end]),
                                             low_res=self.low)
        extra = {} if self.maps is None else {"old_selection_maps": self.maps}
        vision = encode_for_llm(h.vision_model, self.pixels, prompt=prompt.to(self.low.selection_features.dtype),
                                low_res=self.low, **look_options(h), **extra)
        image = h.projector(vision, feature_layer=h.feature_layer)
        new = [m.bool() for m in vision.selection_maps]
        cells = sum(int(m.sum()) for m in new)
        if self.maps is None:
            self.embeds, self.maps = image.embeds[:, :int(image.lengths[0])], new
        else:
            self.embeds = torch.cat([self.embeds, image.embeds[:, image.low_res_tokens:int(image.lengths[0])]], 1)
            self.maps = [a | b for a, b in zip(self.maps, new)]
        return cells

    def _all_encoded(self) -> bool:
        k = self.helper.k
        return self.maps is not None and all(
            bool(m[:, :m.shape[1] // k * k, :m.shape[2] // k * k].all()) for m in self.maps)

    @torch.no_grad()
    def ask(self, question: str) -> Answer:
        """Answer ``question`` (the conversation so far is the context)."""
        h, tok = self.helper, self.helper.tokenizer
        start = time.perf_counter()
        text = question.replace(IMAGE_TAG, "").strip()
        turns = self.turns + [Turn(f"{IMAGE_TAG}\n{text}" if not self.turns else text, "")]
        enc = encode_conversation(tok, turns, h.image_token_id, selection_turn=len(turns) - 1, answer_last=False)
        ids = torch.tensor([enc.input_ids], device=self.device)
        cells = 0
        if self.maps is None or (self.look_closer and not self._all_encoded()):
            cells = self._look(ids, enc.prompt_end)
        self.cells_encoded += cells
        embeds = h.llm.get_input_embeddings()(ids)
        lengths = torch.tensor([self.embeds.shape[1]], device=self.device)
        seq = splice_image_tokens(embeds, torch.ones_like(ids), ids.eq(h.image_token_id).long().argmax(1),
                                  self.embeds, lengths)
        out = h.llm.generate(inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask,
                             max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, suppress_tokens=[h.image_token_id])
        answer = tok.decode(out[0], skip_special_tokens=True).strip()
        turns[-1].answer = answer
        self.turns = turns
        return Answer(answer, int(self.embeds.shape[1]), cells, time.perf_counter() - start,
                      [m.clone() for m in self.maps])
