"""Training and evaluation data in the LLaVA conversation format, and its token layout.

A dataset is a JSON list (or a JSONL file, one record a line) of records::

    {"id": "...", "image": "relative/to/images_dir.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?", "boxes": [[x0, y0, x1, y1]]},
                       {"from": "gpt", "value": "..."}, ...]}

the format of LLaVA-Instruct, ShareGPT4V and VILA's SFT sets. Turns alternate human / gpt
(``user`` / ``assistant`` are accepted too) and end with an answer. ``<image>`` may stand anywhere
in the first human turn; a record with an image and no tag gets one prepended. Records without
``image`` are text-only. ``boxes`` (pixels of the original image) on a human turn mark the region
that turn asks about: they supervise top-down selection and give the selection recall in evaluation.

A record that cannot be used is skipped and counted by reason (:data:`SKIP_REASONS`); loading
never raises on a record, only on a file that is not JSON/JSONL at all.

Token layout (every LLM, so training, chat and evaluation agree)::

    [bos] USER: <before image><IMAGE><after image>\\nASSISTANT: <answer></s>\\nUSER: ...

Only answer tokens and their end-of-sequence token carry labels; the prompt, the image and the
padding are :data:`~ps3.mllm.IGNORE_INDEX`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .topdown import IGNORE_INDEX

IMAGE_TAG = "<image>"
USER, ASSISTANT = "USER: ", "\nASSISTANT: "
TURN_END = "\n"
SKIP_REASONS = ("malformed record", "turns not alternating", "empty answer", "misplaced <image>",
                "image missing", "image corrupt", "box outside the image", "box without image")
_HUMAN, _GPT = {"human", "user"}, {"gpt", "assistant"}

Box = tuple[float, float, float, float]


@dataclass
class Turn:
    """One question and its answer; ``boxes`` the regions the question asks about (original pixels)."""

    question: str
    answer: str
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Conversation:
    """A usable record: ``image`` an existing readable file (or None), ``image_size`` its (width, height)."""

    id: str
    image: Path | None
    image_size: tuple[int, int] | None
    turns: list[Turn]

    def selection_turn(self) -> int:
        """The turn whose question steers the training look: the first with boxes, else the first."""
        return next((i for i, t in enumerate(self.turns) if t.boxes), 0)


@dataclass
class Dataset:
    records: list[Conversation]
    skipped: Counter
    total: int

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{len(self.records)} of {self.total} records usable; skipped: {reasons}"


def read_records(path: str | Path) -> list[Any]:
    """The raw records of a JSON list or a JSONL file (``ValueError`` naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from exc
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append(None)  # counted as a malformed record, like any other bad line
    return records


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) of a readable image, else the skip reason."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image missing"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return "image corrupt"


def _boxes(raw: Any) -> list[Box] | None:
    if raw is None:
        return []
    if not isinstance(raw, list):
        return None
    out = []
    for box in raw:
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            return None
        out.append(tuple(float(v) for v in box))
    return out


def _turns(conversations: Any) -> list[Turn] | str:
    if not isinstance(conversations, list) or not conversations:
        return "malformed record"
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return "malformed record"
        role = str(message.get("from", "")).lower()
        if role not in (_HUMAN if i % 2 == 0 else _GPT):
            return "turns not alternating"
        if i % 2 == 0:
            boxes = _boxes(message.get("boxes"))
            if boxes is None:
                return "box outside the image"
            turns.append(Turn(message["value"], "", boxes))
        elif not message["value"].strip():
            return "empty answer"
        else:
            turns[-1].answer = message["value"]
    if len(conversations) % 2:
        return "turns not alternating"  # a question without an answer
    return turns


def parse_record(raw: Any, images_dir: str | Path | None) -> Conversation | str:
    """A usable :class:`Conversation`, or the reason (one of :data:`SKIP_REASONS`) it cannot be used."""
    if not isinstance(raw, dict):
        return "malformed record"
    turns = _turns(raw.get("conversations"))
    if isinstance(turns, str):
        return turns
    if any(IMAGE_TAG in t.question for t in turns[1:]) or turns[0].question.count(IMAGE_TAG) > 1:
        return "misplaced <image>"
    image = raw.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if image is None:
        if IMAGE_TAG in turns[0].question:
            return "image missing"
        if any(t.boxes for t in turns):
            return "box without image"
        return Conversation(str(raw.get("id", "")), None, None, turns)
    if not isinstance(image, str) or not image:
        return "malformed record"
    path = Path(images_dir or ".") / image
    size = _image_size(path)
    if isinstance(size, str):
        return size
    width, height = size
    for t in turns:
        if any(not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height) for x0, y0, x1, y1 in t.boxes):
            return "box outside the image"
    if IMAGE_TAG not in turns[0].question:
        turns[0].question = f"{IMAGE_TAG}\n{turns[0].question}"
    return Conversation(str(raw.get("id", "")), path, size, turns)


def load_conversations(path: str | Path, images_dir: str | Path | None = None) -> Dataset:
    """Every record of a LLaVA JSON/JSONL file, parsed and checked; unusable ones counted by reason."""
    raw = read_records(path)
    if not isinstance(raw, list):
        raise ValueError(f"{path} must hold a JSON list of records (or one record per line)")
    records, skipped = [], Counter()
    for item in raw:
        parsed = parse_record(item, images_dir)
        if isinstance(parsed, str):
            skipped[parsed] += 1
        else:
            records.append(parsed)
    return Dataset(records, skipped, len(raw))


# --------------------------------------------------------------------------------------------
# Token layout


@dataclass
class Encoded:
    """Token ids of one conversation; ``labels`` IGNORE_INDEX but on answers; ``prompt_end``:
    index of the last prompt token of the selection turn (what the top-down prompt reads)."""

    input_ids: list[int]
    labels: list[int]
    prompt_end: int
    has_image: bool


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_conversation(tokenizer, turns: Sequence[Turn], image_token_id: int | None, *, selection_turn: int = 0,
                        answer_last: bool = True) -> Encoded:
    """Tokens of ``turns`` in the layout of the module docstring. ``answer_last=False`` stops after
    the last question's ``ASSISTANT:`` (the prompt for generating its answer). ``image_token_id``
    None drops the ``<image>`` tag (text-only)."""
    ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX] * len(ids)
    prompt_end, has_image = 0, False
    for i, turn in enumerate(turns):
        before, tag, after = turn.question.partition(IMAGE_TAG)
        prompt = _ids(tokenizer, USER + before)
        if tag and image_token_id is not None:
            prompt += [image_token_id]
            has_image = True
        prompt += _ids(tokenizer, after.strip("\n") if tag else "") + _ids(tokenizer, ASSISTANT.rstrip(" "))
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if i == selection_turn:
            prompt_end = len(ids) - 1
        if i == len(turns) - 1 and not answer_last:
            break
        answer = _ids(tokenizer, " " + turn.answer.strip()) + [tokenizer.eos_token_id]
        ids += answer
        labels += answer
        newline = _ids(tokenizer, TURN_END)
        ids += newline
        labels += [IGNORE_INDEX] * len(newline)
    return Encoded(ids, labels, prompt_end, has_image)
