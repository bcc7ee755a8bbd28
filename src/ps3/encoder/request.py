"""One encoder call's arguments, checked once: :class:`EncodeRequest`.

The public entry points (``forward``, ``encode_looks``, ``encode_looks_with_pooled``,
``encode_pooled``, ``ps3.mllm.encode_for_llm``) build one request from their keyword arguments
before anything runs; every later step (grouping, planning, selection, encoding looks) reads its
fields by name. A bad argument fails here, with a message naming it, not halfway through a call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .batching import ImageGroup, check_images, group_images, image_sizes, per_sample
from .outputs import LowResPass
from .selection import check_look_option


@dataclass(frozen=True)
class EncodeRequest:
    """What one call asks the encoder for (the public arguments, validated).

    ``groups``: the images grouped by what their selection arithmetic depends on
    (``ps3.encoder.batching``); one group holding the caller's tensors for a uniform batch.
    ``pretraining``: the pooled mode (one look, pooled), as ``forward(output_hidden_states=False)``.
    """

    pixel_values: Any  # a (B, 3, H, W) tensor or a list of (3, H_i, W_i) tensors
    groups: tuple[ImageGroup, ...]
    num_look_close: Any = None
    num_token_look_close: Any = None
    only_select_first_n_scale: Any = None
    prompt: torch.Tensor | None = None
    gt_selection_maps: Any = None
    smooth_selection_prob: bool = False
    num_hidden_layers_to_return: int | None = None
    max_tokens_per_pass: int | None = None
    low_res: LowResPass | None = None
    old_selection_maps: Sequence[torch.Tensor] | None = None
    pretraining: bool = False
    is_global_text: torch.Tensor | None = None
    pool_gt_token_only: bool = False

    @property
    def batch_size(self) -> int:
        return len(image_sizes(self.pixel_values))

    @property
    def uniform_tensor(self) -> bool:
        """Whether the images came as one (B, 3, H, W) tensor (a list always gives a mixed output)."""
        return isinstance(self.pixel_values, torch.Tensor)

    @classmethod
    def build(cls, pixel_values, *, width: int, check_finite: bool = False, **options) -> "EncodeRequest":
        """Validate the arguments of a call (``width``: the trunk's C, which a prompt must have)
        and group its images. ``options``: the other fields, by name."""
        check_images(pixel_values)
        batch = len(image_sizes(pixel_values))
        _check_tensors(batch, width, options.get("prompt"), options.get("is_global_text"))
        _check_positive("num_hidden_layers_to_return", options.get("num_hidden_layers_to_return"))
        _check_positive("max_tokens_per_pass", options.get("max_tokens_per_pass"))
        for name in ("num_look_close", "num_token_look_close"):
            for value in per_sample(name, options.get(name), batch):
                check_look_option(name, value)
        if options.get("pool_gt_token_only") and options.get("gt_selection_maps") is None:
            raise ValueError("pool_gt_token_only=True needs gt_selection_maps")
        if options.get("pretraining") and options.get("old_selection_maps") is not None:
            raise ValueError("old_selection_maps is for encoding looks (encode_looks / output_hidden_states=True), "
                             "not for pre-training pooling")
        if check_finite:
            images = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
            for name, t in [("pixel_values", image) for image in images] + [("prompt", options.get("prompt"))]:
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"{name} contains NaN or Inf")
        groups = group_images(pixel_values, options.get("num_look_close"), options.get("num_token_look_close"),
                              options.get("only_select_first_n_scale"), options.get("gt_selection_maps"))
        return cls(pixel_values, tuple(groups), **options)


def _check_tensors(batch: int, width: int, prompt, is_global_text) -> None:
    if prompt is not None:
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != batch:
            raise ValueError(f"prompt must be a (B={batch}, {width}) tensor, got "
                             f"{tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}")
        if prompt.shape[1] != width:
            raise ValueError(f"prompt has width {prompt.shape[1]} but the vision tower expects {width}: "
                             "use the prompt of a text tower trained with this vision tower")
    if is_global_text is not None:
        if not isinstance(is_global_text, torch.Tensor) or is_global_text.numel() != batch:
            raise ValueError(f"is_global_text must be a (B={batch}, 1) bool tensor")


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
