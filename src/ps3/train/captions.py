"""Caption shaping for pre-training (design §5).

:func:`clean_caption` is the deterministic part: a leading "The image is a close-up of" /
"The second image is a close-up of" (:data:`LEADING_PHRASES`, any case) is dropped, and so is a
final sentence that mentions both "text" and "visible" (whole words, any case) when other
sentences exist. :func:`mask_sentences` keeps a random contiguous run of sentences.
:func:`shape_caption` does both for one caption string.

For one text-box record, :func:`usable_captions` keeps the local (caption, box) pairs and the
global caption that can be used (reporting the rest) and :func:`choose_captions` draws the texts
an image is trained with.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from ..data.boxes import Box, clip_box
from ..data.shards import OnSkip

__all__ = [
    "LEADING_PHRASES",
    "LocalCaption",
    "clean_caption",
    "mask_sentences",
    "shape_caption",
    "usable_captions",
    "choose_captions",
]

#: Leading phrases removed from captions (design §5), compared case-insensitively.
LEADING_PHRASES = ("The second image is a close-up of", "The image is a close-up of")

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_TEXT_WORD = re.compile(r"\btexts?\b", re.IGNORECASE)
_VISIBLE_WORD = re.compile(r"\bvisible\b", re.IGNORECASE)


def clean_caption(text: str) -> list[str]:
    """The deterministic part of caption shaping: the caption's sentences after dropping a
    leading phrase (:data:`LEADING_PHRASES`) and a final "text … visible" sentence when other
    sentences exist. Sentences end at ``.``, ``!`` or ``?`` followed by whitespace."""
    stripped = text.strip()
    for phrase in LEADING_PHRASES:
        if stripped.lower().startswith(phrase.lower()):
            stripped = stripped[len(phrase):].strip()
            break
    sentences = [s.strip() for s in _SENTENCE_BREAK.split(stripped) if s.strip()]
    if len(sentences) > 1 and _TEXT_WORD.search(sentences[-1]) and _VISIBLE_WORD.search(sentences[-1]):
        sentences.pop()
    return sentences


def mask_sentences(sentences: Sequence[str], rng: random.Random) -> list[str]:
    """Keep a random contiguous run of sentences: start in [0, min(n-1, 2)], length in
    [min(n, 1), max(n - start, 1)] (design §5)."""
    n = len(sentences)
    if n == 0:
        return []
    start = rng.randint(0, min(n - 1, 2))
    length = rng.randint(min(n, 1), max(n - start, 1))
    return list(sentences[start:start + length])


def shape_caption(text: str, *, sentence_masking: bool = False, rng: random.Random | None = None) -> str:
    """Shape one caption as in pre-training (design §5); ``""`` when nothing is left.

    ``rng`` drives sentence masking (a fresh unseeded one when omitted)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    sentences = clean_caption(text)
    if sentence_masking:
        sentences = mask_sentences(sentences, rng or random.Random())
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------
# The captions of one text-box record

#: A usable local caption: its sentences and its box clipped to the image.
LocalCaption = tuple[list[str], Box]


def usable_captions(record: dict[str, Any], size: tuple[int, int], on_skip: OnSkip, shard: str,
                    key: str) -> tuple[list[LocalCaption], list[str] | None]:
    """The usable local (sentences, clipped box) pairs of a text-box ``record`` for an image of
    ``size = (width, height)``, and the global caption's sentences (None when there is none).
    Every unusable part is reported through ``on_skip(reason, shard, key, detail)``."""
    texts, boxes = record.get("text"), record.get("box")
    texts = [] if texts is None else texts
    boxes = [] if boxes is None else boxes
    local = []
    if not isinstance(texts, list) or not isinstance(boxes, list):
        on_skip("bad_json", shard, key, "'text' and 'box' must be lists")
    elif len(texts) != len(boxes):
        on_skip("length_mismatch", shard, key, f"{len(texts)} captions but {len(boxes)} boxes")
    else:
        for text, box in zip(texts, boxes):
            if not isinstance(text, str):
                on_skip("bad_json", shard, key, f"a caption must be a string, got {type(text).__name__}")
                continue
            sentences = clean_caption(text)
            if not sentences:
                on_skip("empty_caption", shard, key, f"caption {text!r} is empty after shaping")
                continue
            clipped = clip_box(box, *size)
            if isinstance(clipped, str):
                on_skip(clipped, shard, key, f"box {box!r} for an image of {size[0]}x{size[1]}")
                continue
            local.append((sentences, clipped))

    global_text = record.get("global_text")
    global_sentences = None
    if global_text is not None and global_text != "":
        if not isinstance(global_text, str):
            on_skip("bad_json", shard, key, f"'global_text' must be a string, got {type(global_text).__name__}")
        else:
            global_sentences = clean_caption(global_text) or None
            if global_sentences is None:
                on_skip("empty_caption", shard, key, f"global caption {global_text!r} is empty after shaping")
    return local, global_sentences


def choose_captions(local: Sequence[LocalCaption], global_sentences: list[str] | None, rng: random.Random, *,
                    n: int, global_caption_prob: float, sentence_masking: bool) -> list[tuple[str, Box | None]]:
    """The ``n`` (caption, box) texts of one image (design §5); box None = the global caption.

    With both kinds, the global caption with probability ``global_caption_prob`` (repeated ``n``
    times); only a global one → global; otherwise ``n`` local pairs without replacement, drawing
    again from a fresh permutation when the image has fewer. Needs at least one caption."""
    if global_sentences is not None and (not local or rng.random() < global_caption_prob):
        chosen: list[tuple[list[str], Box | None]] = [(global_sentences, None)] * n
    else:
        order: list[int] = []
        while len(order) < n:  # without replacement, refilled only if too few
            order += rng.sample(range(len(local)), len(local))
        chosen = [local[i] for i in order[:n]]
    texts = []
    for sentences, box in chosen:
        if sentence_masking:
            sentences = mask_sentences(sentences, rng)
        texts.append((" ".join(sentences), box))
    return texts
