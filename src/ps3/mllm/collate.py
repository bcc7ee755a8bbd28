"""Records → one training or evaluation batch: images preprocessed and stacked, conversations
tokenized (right-padded), image placeholder and prompt-end positions, and box target maps.

Rows with an image and text-only rows are kept apart (the text-only ones skip the encoder and
the image splice). An image that fails to decode here, although its header read fine when the
data was loaded, drops its row and is counted as ``image corrupt``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .conversations import Conversation, encode_conversation
from .topdown import IGNORE_INDEX


@dataclass
class TextRows:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)


@dataclass
class MLLMBatch:
    """``image``: rows with an image (plus ``pixel_values``, ``image_position``, ``prompt_end``);
    ``box_rows``: which image rows have boxes, ``box_maps`` their (n, h, w) 0/1 targets on the
    largest scale's cell grid; ``text``: text-only rows."""

    image: TextRows | None = None
    pixel_values: torch.Tensor | None = None
    image_position: torch.Tensor | None = None
    prompt_end: torch.Tensor | None = None
    box_rows: torch.Tensor | None = None
    box_maps: torch.Tensor | None = None
    text: TextRows | None = None
    records: list[Conversation] = field(default_factory=list)
    image_keys: list[int] = field(default_factory=list)  # a key per image row (its record's identity)
    skipped: Counter = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return sum(0 if rows is None else rows.input_ids.shape[0] for rows in (self.image, self.text))


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    length = max(map(len, rows))
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def _text_rows(encoded, pad_id: int) -> TextRows:
    ids = pad_rows([e.input_ids for e in encoded], pad_id)
    mask = pad_rows([[1] * len(e.input_ids) for e in encoded], 0)
    return TextRows(ids, mask, pad_rows([e.labels for e in encoded], IGNORE_INDEX))


def box_map(boxes, original: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) 0/1 map of the cells whose centre lies inside any box (boxes in original pixels)."""
    (width, height), (h, w) = original, grid
    ys = (torch.arange(h) + 0.5) * height / h
    xs = (torch.arange(w) + 0.5) * width / w
    out = torch.zeros(h, w)
    for x0, y0, x1, y1 in boxes:
        inside = ((ys >= y0) & (ys < y1)).view(-1, 1) & ((xs >= x0) & (xs < x1)).view(1, -1)
        out = torch.maximum(out, inside.float())
    return out


def load_pixels(record: Conversation, processor) -> torch.Tensor:
    from PIL import Image

    with Image.open(record.image) as image:
        return processor(image.convert("RGB"))["pixel_values"][0]


def collate(records: Sequence[Conversation], tokenizer, image_token_id: int, processor, encoder, *,
            answer_last: bool = True, box_turn: str = "selection") -> MLLMBatch:
    """One batch of ``records``. ``answer_last=False`` ends every row at its last question's
    ``ASSISTANT:`` (evaluation); ``box_turn`` "selection" (training: the turn that steers the
    look) or "last" (evaluation: the last question) picks whose boxes become targets."""
    batch = MLLMBatch(records=list(records))
    with_image, pixels, boxes, sizes, text_only = [], [], [], [], []
    for record in records:
        if record.image is None:
            text_only.append(encode_conversation(tokenizer, record.turns, None, answer_last=answer_last))
            continue
        try:
            pixels.append(load_pixels(record, processor))
        except (OSError, ValueError, SyntaxError):
            batch.skipped["image corrupt"] += 1
            continue
        turn = record.selection_turn() if box_turn == "selection" else len(record.turns) - 1
        with_image.append(encode_conversation(tokenizer, record.turns, image_token_id, selection_turn=turn,
                                              answer_last=answer_last))
        boxes.append(record.turns[turn].boxes)
        batch.image_keys.append(id(record))
        sizes.append(record.image_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if with_image:
        batch.image = _text_rows(with_image, pad)
        batch.pixel_values = torch.stack(pixels)
        batch.image_position = batch.image.input_ids.eq(image_token_id).long().argmax(1)
        batch.prompt_end = torch.tensor([e.prompt_end for e in with_image])
        rows = [i for i, b in enumerate(boxes) if b]
        if rows:
            height, width = batch.pixel_values.shape[-2:]
            grid = encoder.feature_sizes(height, width)[-1]
            batch.box_rows = torch.tensor(rows)
            batch.box_maps = torch.stack([box_map(boxes[i], sizes[i], grid) for i in rows])
    if text_only:
        batch.text = _text_rows(text_only, pad)
    return batch

