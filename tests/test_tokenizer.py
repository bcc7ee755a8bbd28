"""PS3Tokenizer: cleaning modes, special tokens, truncation and padding, loading and saving.

Every tokenizer here is trained locally with the `tokenizers` library; nothing is downloaded.
"""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from ps3.tokenizer import CLEAN_MODES, PS3Tokenizer, canonicalize_text, clean_text

SENTENCES = [
    "a photo of a dog on the grass",
    "the red car is parked near the house",
    "a cat sleeping on a sofa",
    "two people walking along the beach at sunset",
    "hello world foo bar",
]
PAD, EOS, UNK = 0, 1, 2


def word_tokenizer(append_eos: bool = True) -> Tokenizer:
    """A word-level tokenizer with Gemma-like specials: <pad>=0, <eos>=1 appended, <unk>=2."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS)])
    return tok


def bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", EOS)])
    return tok


def make_repo(path, tok: Tokenizer, **config):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def ids_of(tok: Tokenizer, words: str) -> list[int]:
    return [tok.token_to_id(w) for w in words.split()]


# --- cleaning ------------------------------------------------------------------------------------

def test_clean_modes_on_hand_written_text():
    text = "  Hello,\tWorld_foo!  &amp;amp; A.B \n"
    assert clean_text(text, "canonicalize") == "hello world foo ab"
    assert clean_text(text, "lower") == "hello, world_foo! & a.b"
    assert clean_text(text, "whitespace") == "Hello, World_foo! & A.B"
    assert clean_text(text, "none") == text
    assert canonicalize_text("It's  a_B-c {x}") == "its a bc x"


def test_html_is_unescaped_twice_not_three_times():
    # With tags present ftfy leaves entities alone, so only the two html.unescape passes act.
    assert clean_text("<b>&amp;amp;amp;</b>", "whitespace") == "<b>&amp;</b>"
    assert clean_text("&amp;amp; &lt;", "whitespace") == "& <"


def test_unicode_whitespace_is_collapsed_and_non_ascii_punctuation_kept():
    assert clean_text("a\u00a0\u2003b\u3000c", "whitespace") == "a b c"
    assert clean_text("Ünïcode «quoted»", "canonicalize") == "ünïcode «quoted»"


def test_mojibake_is_fixed():
    pytest.importorskip("ftfy")
    assert clean_text("cafÃ©", "whitespace") == "café"


def test_without_ftfy_cleaning_still_unescapes_and_warns(monkeypatch):
    import ps3.tokenizer as module

    monkeypatch.setattr(module, "ftfy", None)
    monkeypatch.setattr(module, "_warned_no_ftfy", False)
    with pytest.warns(UserWarning, match="ftfy"):
        assert clean_text(" A &amp;amp; B ", "lower") == "a & b"
    assert clean_text("cafÃ©", "whitespace") == "cafÃ©"  # left as is without ftfy


def test_unknown_clean_mode():
    with pytest.raises(ValueError, match="clean"):
        clean_text("x", "upper")
    with pytest.raises(ValueError, match="clean"):
        PS3Tokenizer(word_tokenizer(), 8, clean="upper")


# --- encoding ------------------------------------------------------------------------------------

def test_pads_right_with_eos_appended():
    base = word_tokenizer()
    tok = PS3Tokenizer(word_tokenizer(), context_length=8, clean="canonicalize", pad_token="<pad>")
    out = tok(["A photo of a DOG!", "hello world"])
    assert out.dtype == torch.long and out.shape == (2, 8)
    assert out[0].tolist() == ids_of(base, "a photo of a dog") + [EOS, PAD, PAD]
    assert out[1].tolist() == ids_of(base, "hello world") + [EOS] + [PAD] * 5


def test_truncation_keeps_the_appended_eos():
    base = word_tokenizer()
    tok = PS3Tokenizer(word_tokenizer(), context_length=5, clean="lower")
    long = "two people walking along the beach at sunset"
    out = tok([long, "a cat"])
    assert out.shape == (2, 5)
    assert out[0].tolist() == ids_of(base, "two people walking along") + [EOS]
    assert out[1].tolist() == ids_of(base, "a cat") + [EOS, PAD, PAD]


def test_without_special_tokens_truncation_cuts_plainly():
    base = word_tokenizer(append_eos=False)
    tok = PS3Tokenizer(word_tokenizer(append_eos=False), context_length=3, clean="lower")
    assert tok(["the red car is parked"])[0].tolist() == ids_of(base, "the red car")


def test_clean_mode_changes_tokens():
    lower = PS3Tokenizer(word_tokenizer(), 8, clean="lower")
    whitespace = PS3Tokenizer(word_tokenizer(), 8, clean="whitespace")
    # "Dog" is not in the lower-case vocabulary: unknown unless lower-cased
    assert UNK not in lower(["a Dog"])[0].tolist()
    assert UNK in whitespace(["a Dog"])[0].tolist()


def test_pad_token_resolution():
    by_token = PS3Tokenizer(word_tokenizer(), 6, pad_token="<eos>")  # SigLIP (T5) pads with </s>
    assert (by_token.pad_id, by_token.pad_token) == (EOS, "<eos>")
    assert by_token(["a cat"])[0].tolist()[-3:] == [EOS, EOS, EOS]
    by_id = PS3Tokenizer(word_tokenizer(), 6, pad_id=UNK)
    assert by_id.pad_token == "<unk>" and by_id(["a cat"])[0, -1].item() == UNK
    assert PS3Tokenizer(word_tokenizer(), 6).pad_id == 0
    with pytest.raises(ValueError, match="pad_token"):
        PS3Tokenizer(word_tokenizer(), 6, pad_token="<nope>")
    with pytest.raises(ValueError, match="pad_id"):
        PS3Tokenizer(word_tokenizer(), 6, pad_id=10_000)


def test_single_string_and_decode():
    tok = PS3Tokenizer(bpe_tokenizer(), 16, clean="canonicalize")
    one = tok("A cat, sleeping on a sofa.")
    assert one.shape == (1, 16)
    assert tok.decode(one[0]).replace(" ", "") == "acatsleepingonasofa"
    assert torch.equal(one, tok(["a cat sleeping on a sofa"]))


@pytest.mark.parametrize("texts, error", [
    ([], ValueError),
    (["ok", 3], TypeError),
    (["ok", None], TypeError),
    (b"bytes", TypeError),
    (42, TypeError),
])
def test_bad_texts(texts, error):
    tok = PS3Tokenizer(word_tokenizer(), 8)
    with pytest.raises(error, match="texts"):
        tok(texts)


@pytest.mark.parametrize("length", [0, -3, 2.5, True])
def test_bad_context_length(length):
    with pytest.raises(ValueError, match="context_length"):
        PS3Tokenizer(word_tokenizer(), length)


# --- loading and saving --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer])
def test_save_load_round_trip(tmp_path, make):
    tok = PS3Tokenizer(make(), context_length=10, clean="canonicalize", pad_token="<pad>", tokenizer_name="org/name")
    tok.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_name"] == "org/name" and config["context_length"] == 10
    assert config["clean"] == "canonicalize"
    # the saved vocabulary carries no padding/truncation of its own
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    again = PS3Tokenizer.from_pretrained(tmp_path / "saved")
    texts = ["The red car, parked near the HOUSE!", "hello world", "two people walking along the beach at sunset"]
    assert torch.equal(tok(texts), again(texts))
    assert (again.context_length, again.clean, again.pad_id) == (10, "canonicalize", PAD)


def test_published_layout_loads_tokenizer_named_by_tokenizer_name(tmp_path):
    """A PS3 repo holds only tokenizer_config.json; the vocabulary comes from `tokenizer_name`
    (here a local directory laid out like a transformers tokenizer repo, pad token in its config)."""
    hf = make_repo(tmp_path / "hf_tokenizer", word_tokenizer(), pad_token="<eos>", tokenizer_class="SomeTokenizer")
    ps3 = tmp_path / "ps3"
    ps3.mkdir()
    (ps3 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_name": str(hf), "context_length": 7, "clean": "canonicalize"}))
    tok = PS3Tokenizer.from_pretrained(ps3)
    assert (tok.context_length, tok.clean, tok.pad_token) == (7, "canonicalize", "<eos>")
    base = word_tokenizer()
    assert tok(["A cat!"])[0].tolist() == ids_of(base, "a cat") + [EOS] * 5


def test_special_tokens_map_gives_the_pad_token(tmp_path):
    hf = make_repo(tmp_path / "hf", word_tokenizer(), model_max_length=64)
    (hf / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<unk>", "lstrip": False}}))
    ps3 = make_repo(tmp_path / "ps3", word_tokenizer(), context_length=5)
    (ps3 / "tokenizer.json").unlink()
    cfg = json.loads((ps3 / "tokenizer_config.json").read_text())
    (ps3 / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_name": str(hf)}))
    assert PS3Tokenizer.from_pretrained(ps3).pad_id == UNK


def test_overrides_and_defaults(tmp_path):
    repo = make_repo(tmp_path / "r", word_tokenizer(), context_length=6)
    tok = PS3Tokenizer.from_pretrained(repo, context_length=4, clean="lower")
    assert (tok.context_length, tok.clean) == (4, "lower")
    assert PS3Tokenizer.from_pretrained(repo).clean == "whitespace"  # open_clip's HFTokenizer default
    assert tok(["a cat on the grass"]).shape == (1, 4)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        PS3Tokenizer.from_pretrained(tmp_path)
    no_len = make_repo(tmp_path / "no_len", word_tokenizer(), clean="lower")
    with pytest.raises(ValueError, match="context_length"):
        PS3Tokenizer.from_pretrained(no_len)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "tokenizer_config.json").write_text(json.dumps({"context_length": 8}))
    with pytest.raises(ValueError, match="tokenizer_name"):
        PS3Tokenizer.from_pretrained(nothing)
    with pytest.raises(ValueError, match="neither"):
        PS3Tokenizer.from_pretrained(str(tmp_path / "missing" / "deep" / "dir"))
    with pytest.raises(ValueError, match="is a file"):
        PS3Tokenizer.from_pretrained(no_len / "tokenizer.json")
    with pytest.raises(TypeError, match="path_or_hub_id"):
        PS3Tokenizer.from_pretrained(3)
    bad = make_repo(tmp_path / "bad", word_tokenizer(), context_length=8, tokenizer_name=str(tmp_path / "nowhere/x/y"))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer_name"):
        PS3Tokenizer.from_pretrained(bad)


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not in the local cache"):
        PS3Tokenizer.from_pretrained("someorg/some-repo", local_files_only=True, cache_dir=tmp_path)


def test_clean_modes_constant():
    assert set(CLEAN_MODES) == {"canonicalize", "lower", "whitespace", "none"}
