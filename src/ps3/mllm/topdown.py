"""LLM-steered (top-down) selection for any Hugging Face causal LM, in two passes.

Pass 1 encodes the images at low resolution only and runs the LLM over
``[text before the image, low-res image tokens, question]``; the LLM's last hidden state at the
end of the user prompt goes through a :class:`TopDownPromptHead` and becomes PS3's ``prompt``.
Pass 2 encodes only the high-res looks that prompt selects, reusing pass 1's low-res pass (its
tokens and the key/value cache the looks attend to: the low-res trunk runs once per image), and
returns ``inputs_embeds`` + ``attention_mask`` for the LLM's ``forward`` or ``generate``.

The LLM is driven through the standard interface only (``get_input_embeddings()``, ``forward``
with ``inputs_embeds`` and ``output_hidden_states``), so nothing here imports transformers.
Sequences are given as token ids with one image placeholder id per row, right-padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder.outputs import LowResPass, PS3VisionOutput
from ..encoder.selection import check_look_option
from .block_looks import encode_for_llm, encode_low_res, encoder_of
from .projector import PS3Projector
from .tokens import check_budgets, count_llm_tokens, renamed

IGNORE_INDEX = -100  # label of positions the LM loss skips (Hugging Face's convention)


class TopDownPromptHead(nn.Module):
    """LLM hidden state (…, D) → PS3 prompt (…, C): a Linear, or Linear → GELU → Linear when
    ``hidden`` is given."""

    def __init__(self, llm_width: int, vision_width: int, hidden: int | None = None):
        super().__init__()
        if hidden is None:
            self.layers = nn.Linear(llm_width, vision_width)
        else:
            self.layers = nn.Sequential(nn.Linear(llm_width, hidden), nn.GELU(), nn.Linear(hidden, vision_width))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_state)


@dataclass
class Spliced:
    """Text embeddings with image tokens put in place of each row's placeholder."""

    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L') long
    labels: torch.Tensor | None  # (B, L') with IGNORE_INDEX on image tokens and padding
    new_position: torch.Tensor  # (B, L) where each input token landed (pads: L')


def splice_image_tokens(text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_position: torch.Tensor,
                        image_embeds: torch.Tensor, image_lengths: torch.Tensor, labels: torch.Tensor | None = None,
                        padding_side: str = "right") -> Spliced:
    """Replace the placeholder at ``image_position`` (B,) of every row by that row's
    ``image_lengths[b]`` image tokens, with one scatter (no per-row loop). Rows come out padded
    on ``padding_side`` ("left" for ``generate``) to L' = L + N − 1."""
    B, L, D = text_embeds.shape
    N = image_embeds.shape[1]
    out_len = L + N - 1
    device = text_embeds.device
    real = attention_mask.bool()
    j = torch.arange(L, device=device).unsqueeze(0)
    p, n = image_position.unsqueeze(1), image_lengths.unsqueeze(1)
    text_pos = torch.where(j < p, j, j + n - 1)
    img_pos = p + torch.arange(N, device=device).unsqueeze(0)
    if padding_side == "left":
        shift = out_len - (real.sum(1, keepdim=True) + n - 1)
        text_pos, img_pos = text_pos + shift, img_pos + shift
    elif padding_side != "right":
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    # Pads, the placeholder itself and image padding go to a spare last column, dropped below.
    text_pos = torch.where(real & (j != p), text_pos, out_len)
    img_pos = torch.where(torch.arange(N, device=device).unsqueeze(0) < n, img_pos, out_len)
    index = torch.cat([text_pos, img_pos], dim=1)
    values = torch.cat([text_embeds, image_embeds.to(text_embeds.dtype)], dim=1)
    embeds = values.new_zeros(B, out_len + 1, D).scatter(1, index.unsqueeze(-1).expand(-1, -1, D), values)
    mask = torch.zeros(B, out_len + 1, dtype=torch.long, device=device).scatter(1, index, 1)
    new_labels = None
    if labels is not None:
        label_values = torch.cat([labels, torch.full((B, N), IGNORE_INDEX, dtype=labels.dtype, device=device)], 1)
        new_labels = torch.full((B, out_len + 1), IGNORE_INDEX, dtype=labels.dtype, device=device)
        new_labels = new_labels.scatter(1, index, label_values)[:, :out_len]
    return Spliced(embeds[:, :out_len], mask[:, :out_len], new_labels, text_pos)


@dataclass
class TwoPassOutput:
    """inputs_embeds / attention_mask (/ labels) for the LLM; the PS3 prompt the LLM produced;
    ``vision``: pass 2's PS3 output (``topdown_selection_probs`` carry the prompt head's gradient);
    ``image_lengths``: LLM tokens of each image; ``low_res``: pass 1's low-res pass (reuse it to
    look closer at the same images)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    prompt: torch.Tensor
    vision: PS3VisionOutput
    image_lengths: torch.Tensor
    low_res: LowResPass | None = None


class TwoPassPS3(nn.Module):
    """PS3 + projector + top-down prompt head around a Hugging Face causal LM.

    ``image_token_id``: the placeholder id marking where the image goes in ``input_ids``.
    ``max_select_num_each_scale`` (cells per high-res scale per look, checked against the model's
    scales here), ``num_look_close``, ``k``: as in :func:`ps3.mllm.count_llm_tokens` (``budgets``
    / ``num_looks``: their deprecated names). ``feature_layer``: which returned PS3 layer feeds
    the projector. The LLM's first pass runs without gradients (``pass1_grad=True`` to keep them).
    """

    def __init__(self, vision_model: nn.Module, llm: nn.Module, *, image_token_id: int, k: int = 2,
                 max_select_num_each_scale: Sequence[int] | None = None, num_look_close: int | str | None = None,
                 feature_layer: int = -1, prompt_head_hidden: int | None = None, scale_embeddings: bool = False,
                 pass1_grad: bool = False, budgets: Sequence[int] | None = None, num_looks: int | str | None = None):
        super().__init__()
        self.vision_model = vision_model
        self.llm = llm
        encoder = encoder_of(vision_model)
        cells = renamed("budgets", "max_select_num_each_scale", budgets, max_select_num_each_scale,
                        encoder.max_select_num_each_scale)
        self.max_select_num_each_scale = check_budgets(cells, len(encoder.ps3_scales) - 1, encoder.ps3_scales)
        self.num_look_close = renamed("num_looks", "num_look_close", num_looks, num_look_close, 1)
        check_look_option("num_look_close", self.num_look_close)
        llm_width = llm.get_input_embeddings().embedding_dim
        self.projector = PS3Projector.for_vision_model(encoder, llm_width, k=k, scale_embeddings=scale_embeddings)
        self.prompt_head = TopDownPromptHead(llm_width, encoder.width, prompt_head_hidden)
        # The new modules start where the LLM lives and in its precision (e.g. a bf16 LLM on a GPU).
        weight = llm.get_input_embeddings().weight
        self.projector.to(device=weight.device, dtype=weight.dtype)
        self.prompt_head.to(device=weight.device, dtype=weight.dtype)
        self.image_token_id = int(image_token_id)
        self.k, self.feature_layer, self.pass1_grad = k, feature_layer, pass1_grad

    @classmethod
    def from_pretrained(cls, run, *, device=None, trainable: bool = False) -> "TwoPassPS3":
        """Load a run directory of ``ps3 mllm train`` (see :mod:`ps3.mllm.saving`), with its
        ``tokenizer``, ``processor`` and ``settings`` attached."""
        from .saving import load_run

        return load_run(run, device=device, trainable=trainable)

    def save_pretrained(self, run, **kwargs: Any) -> None:
        """Write a run directory :meth:`from_pretrained` loads (see :func:`ps3.mllm.saving.save_pretrained`)."""
        from .saving import save_pretrained

        save_pretrained(self, run, **kwargs)

    def count_llm_tokens(self, height: int, width: int, only_select_first_n_scale: int | None = None) -> int:
        """LLM tokens one image of this size becomes with this helper's settings."""
        return count_llm_tokens(self.vision_model, height, width, k=self.k, num_look_close=self.num_look_close,
                                max_select_num_each_scale=self.max_select_num_each_scale,
                                only_select_first_n_scale=only_select_first_n_scale).total

    def _image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = input_ids == self.image_token_id
        if not torch.equal(found.sum(1), torch.ones_like(found[:, 0], dtype=torch.long)):
            raise ValueError(f"input_ids must hold exactly one image placeholder (id {self.image_token_id}) per row")
        return found.long().argmax(1)

    def prompt_end_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             prompt_end: torch.Tensor | int | None) -> torch.Tensor:
        """Index (B,) in ``input_ids`` of the last token of the user prompt: given positions, the
        last occurrence of a marker token id (an int), or by default each row's last real token."""
        if prompt_end is None:
            return attention_mask.long().sum(1) - 1
        if isinstance(prompt_end, torch.Tensor):
            return prompt_end.to(input_ids.device).long().view(-1)
        if isinstance(prompt_end, int) and not isinstance(prompt_end, bool):
            at = torch.where(input_ids == prompt_end, torch.arange(input_ids.shape[1], device=input_ids.device), -1)
            return at.max(1).values
        raise TypeError("prompt_end must be None, a (B,) tensor of positions or a marker token id (int)")

    def top_down_prompt(self, pixel_values, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_end=None, low_res: LowResPass | None = None) -> tuple[torch.Tensor, LowResPass]:
        """Pass 1: low-res encode, LLM over [text, low-res tokens, question] → PS3 prompt (B, C)."""
        low_res = low_res if low_res is not None else encode_low_res(self.vision_model, pixel_values)
        image = self.projector(low_res.hidden_states[self.feature_layer], [])
        ends = self.prompt_end_positions(input_ids, attention_mask, prompt_end)
        text = self.llm.get_input_embeddings()(input_ids)
        seq = splice_image_tokens(text, attention_mask, self._image_positions(input_ids), image.embeds, image.lengths)
        end_new = seq.new_position.gather(1, ends.unsqueeze(1)).squeeze(1)
        keep = int(input_ids.shape[1] + image.embeds.shape[1] - 1)  # upper bound: no device read needed
        with torch.set_grad_enabled(self.pass1_grad and torch.is_grad_enabled()):
            states = self.llm(inputs_embeds=seq.inputs_embeds[:, :keep], attention_mask=seq.attention_mask[:, :keep],
                              output_hidden_states=True, use_cache=False).hidden_states[-1]
        last = states.gather(1, end_new.view(-1, 1, 1).expand(-1, 1, states.shape[-1])).squeeze(1)
        return self.prompt_head(last.to(next(self.prompt_head.parameters()).dtype)), low_res

    def forward(self, pixel_values, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None, prompt_end=None, only_select_first_n_scale=None,
                padding_side: str = "right", gt_selection_maps: torch.Tensor | None = None,
                low_res: LowResPass | None = None, old_selection_maps=None) -> TwoPassOutput:
        """Both passes: returns what the LLM's ``forward`` (with ``labels``) or ``generate``
        (``padding_side="left"``) takes. ``pixel_values``: a (B, 3, H, W) tensor or a list of
        (3, H_i, W_i) images of any sizes; ``only_select_first_n_scale``: an int or one per image.
        Look closer (a later turn on the same image): pass the earlier ``out.vision``'s low-res pass
        as ``low_res`` and the cells encoded so far as ``old_selection_maps``; only new blocks are
        encoded and only their tokens reach the LLM."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt, low_res = self.top_down_prompt(pixel_values, input_ids, attention_mask, prompt_end, low_res)
        prompt_in_vision_dtype = prompt.to(low_res.selection_features.dtype)
        vision = encode_for_llm(self.vision_model, pixel_values, prompt=prompt_in_vision_dtype, low_res=low_res,
                                k=self.k, max_select_num_each_scale=self.max_select_num_each_scale,
                                num_look_close=self.num_look_close,
                                only_select_first_n_scale=only_select_first_n_scale,
                                gt_selection_maps=gt_selection_maps, old_selection_maps=old_selection_maps)
        image = self.projector(vision, feature_layer=self.feature_layer)
        text = self.llm.get_input_embeddings()(input_ids)
        seq = splice_image_tokens(text, attention_mask, self._image_positions(input_ids), image.embeds, image.lengths,
                                  labels, padding_side)
        return TwoPassOutput(seq.inputs_embeds, seq.attention_mask, seq.labels, prompt, vision, image.lengths,
                             low_res)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 *, prompt_end=None, only_select_first_n_scale=None, low_res: LowResPass | None = None,
                 old_selection_maps=None, **generate_kwargs: Any) -> torch.Tensor:
        """Two-pass encode, then ``llm.generate`` on the embeddings (new token ids only)."""
        out = self(pixel_values, input_ids, attention_mask, prompt_end=prompt_end,
                   only_select_first_n_scale=only_select_first_n_scale, padding_side="left", low_res=low_res,
                   old_selection_maps=old_selection_maps)
        return self.llm.generate(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask, **generate_kwargs)


def selection_target_loss(selection_probs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of selection probabilities against a (B, H, W) target map (e.g. the
    box of the object the question names), each scale's target area-resized to its grid; the
    prompt head learns from it (the top-k selection itself passes no gradient)."""
    losses = []
    for probs in selection_probs:
        goal = F.interpolate(target.unsqueeze(1).float(), size=probs.shape[-2:], mode="area").squeeze(1)
        losses.append(F.binary_cross_entropy(probs.float().clamp(1e-6, 1 - 1e-6), (goal > 0.5).float()))
    return torch.stack(losses).mean()
