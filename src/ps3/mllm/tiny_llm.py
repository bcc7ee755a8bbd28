"""``--llm tiny``: a small Llama-style causal LM (random weights) and a byte-level BPE tokenizer
trained on the dataset's own text, for offline runs and tests.

The tokenizer round-trips any text exactly (byte level), so exact-match evaluation works on words
it never saw; it has ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and the image token as special tokens.
"""
from __future__ import annotations

from typing import Iterable

from .conversations import ASSISTANT, IMAGE_TAG, USER, Conversation

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TAG]
# Width 64, 2 layers: a few hundred thousand parameters plus the vocabulary.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def conversation_text(records: Iterable[Conversation]) -> Iterable[str]:
    """Every question and answer of ``records``, and the template's words."""
    yield USER + ASSISTANT
    for record in records:
        for turn in record.turns:
            yield turn.question.replace(IMAGE_TAG, " ")
            yield " " + turn.answer


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` (a transformers fast tokenizer, so it saves
    and loads like any Hugging Face tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[IMAGE_TAG])


def build_tiny_llm(vocab_size: int, seed: int = 0):
    """A random-weight Llama of :data:`TINY_CONFIG` for ``vocab_size`` tokens (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                            **TINY_CONFIG))
    finally:
        torch.random.set_rng_state(state)
