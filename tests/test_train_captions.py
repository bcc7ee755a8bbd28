"""ps3.train.captions: caption shaping (design §5) and the choice of an image's texts from its record."""
from __future__ import annotations

import random

from ps3.train.captions import choose_captions, clean_caption, mask_sentences, shape_caption, usable_captions


def test_caption_shaping_rules():
    assert shape_caption("The image is a close-up of a red door.") == "a red door."
    assert shape_caption("The second image is a close-up of a cat. It sleeps.") == "a cat. It sleeps."
    assert shape_caption("A shop front. Red awning. No text is visible.") == "A shop front. Red awning."
    assert shape_caption("The visible text says OPEN.") == "The visible text says OPEN."  # the only sentence stays
    assert shape_caption("A wall. The texture is visible.") == "A wall. The texture is visible."  # "texture" ≠ "text"
    assert shape_caption("   ") == "" and shape_caption("The image is a close-up of") == ""
    assert clean_caption("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]


def test_sentence_masking_ranges():
    sentences = ["s0.", "s1.", "s2.", "s3.", "s4."]
    allowed = {(start, length) for start in range(3) for length in range(1, 6 - start)}
    seen = set()
    rng = random.Random(0)
    for _ in range(2000):
        kept = mask_sentences(sentences, rng)
        start = sentences.index(kept[0])
        assert kept == sentences[start:start + len(kept)]  # contiguous
        seen.add((start, len(kept)))
    assert seen == allowed
    assert mask_sentences(["only."], rng) == ["only."]
    assert {tuple(mask_sentences(["a.", "b."], rng)) for _ in range(200)} == {("a.",), ("a.", "b."), ("b.",)}


def test_usable_captions_keep_good_pairs_and_report_the_rest():
    reports = []
    record = {"text": ["The image is a close-up of a red door.", "   ", 7, "a box outside", "an inverted box",
                       "a cat. It sleeps. No text is visible."],
              "box": [[-5, 0, 10, 10], [0, 0, 1, 1], [0, 0, 1, 1], [50, 50, 60, 60], [9, 9, 1, 1], [0, 0, 40, 20]],
              "global_text": "A street."}
    local, global_sentences = usable_captions(record, (40, 20), lambda *r: reports.append(r[:3]), "shard", "k")
    assert local == [(["a red door."], (0.0, 0.0, 10.0, 10.0)), (["a cat.", "It sleeps."], (0.0, 0.0, 40.0, 20.0))]
    assert global_sentences == ["A street."]
    assert [r[0] for r in reports] == ["empty_caption", "bad_json", "box_outside_image", "bad_box"]
    assert all(r[1:] == ("shard", "k") for r in reports)
    reports.clear()
    assert usable_captions({"text": ["a"], "box": []}, (4, 4), lambda *r: reports.append(r[0]), "s", "k") == ([], None)
    assert usable_captions({"global_text": 3}, (4, 4), lambda *r: reports.append(r[0]), "s", "k") == ([], None)
    assert reports == ["length_mismatch", "bad_json"]


def test_choose_captions_global_local_and_refill():
    local = [(["one."], (0, 0, 1, 1)), (["two."], (1, 1, 2, 2))]
    rng = random.Random(0)
    options = dict(global_caption_prob=0.0, sentence_masking=False)
    chosen = choose_captions(local, ["all."], rng, n=2, **options)
    assert sorted(chosen) == [("one.", (0, 0, 1, 1)), ("two.", (1, 1, 2, 2))]  # without replacement
    assert choose_captions([], ["all.", "of it."], rng, n=3, **options) == [("all. of it.", None)] * 3
    assert choose_captions(local, ["all."], rng, n=2, global_caption_prob=1.0, sentence_masking=False) == \
        [("all.", None)] * 2
    refilled = choose_captions(local, None, rng, n=5, **options)
    assert len(refilled) == 5 and {t for t, _ in refilled[:2]} == {"one.", "two."}
    # The same seed gives the same choice (the pipeline seeds per sample).
    assert choose_captions(local, ["all."], random.Random(4), n=1, global_caption_prob=0.5, sentence_masking=True) == \
        choose_captions(local, ["all."], random.Random(4), n=1, global_caption_prob=0.5, sentence_masking=True)
