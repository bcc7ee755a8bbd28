"""PS3 inside a multimodal LLM (optional extra ``ps3[mllm]``; the core never imports this package).

* :class:`PS3Projector`: PS3 tokens → k×k merge per scale → MLP → LLM embeddings.
* :func:`count_llm_tokens`: exactly how many LLM tokens an image becomes, before anything runs.
* :func:`encode_for_llm`: PS3 encoding with block-aligned selection (what the projector keeps),
  the encoder's selection pipeline run with the :class:`BlockCells` rule.
* :class:`TopDownPromptHead`, :class:`TwoPassPS3`: the LLM steers which high-res patches
  are encoded (pass 1: low-res tokens + question through the LLM; pass 2: high-res looks only).

Nothing here imports transformers: the LLM (any Hugging Face causal LM) is driven through its
standard interface, so the ``mllm`` extra only adds transformers for the caller's own model.
"""
from .block_looks import BlockCells, encode_for_llm, encode_low_res
from .projector import PS3Projector, ProjectedImage, merge_grid
from ..encoder.selection import first_n_scales_for_sizes  # VILA-HD's skip-the-largest-scale rule, per image
from .tokens import LLMTokenCount, count_llm_tokens
from .topdown import (IGNORE_INDEX, TopDownPromptHead, TwoPassOutput, TwoPassPS3, selection_target_loss,
                      splice_image_tokens)

__all__ = ["BlockCells", "IGNORE_INDEX", "LLMTokenCount", "PS3Projector", "ProjectedImage", "TopDownPromptHead",
           "TwoPassOutput", "TwoPassPS3", "count_llm_tokens", "encode_for_llm", "encode_low_res",
           "first_n_scales_for_sizes", "merge_grid", "selection_target_loss", "splice_image_tokens"]
