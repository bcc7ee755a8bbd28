"""The joint PS3 model: vision tower, text tower and the SigLIP logit scale/bias (SPEC §1, §4).

Its state dict is exactly the published repo layout (``vision_model.*``, ``text_model.*``,
``logit_scale``, ``logit_bias``), so ``save_pretrained`` writes a repo that every tower loads from.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PS3Config
from .hub import PretrainedMixin
from .text import PS3TextOutput, PS3TextTransformer
from .batching import image_sizes
from .vision import PS3VisionEncoder, PS3VisionOutput, delegate_to_encoder


class PS3Model(PretrainedMixin, nn.Module):
    config_class = PS3Config

    def __init__(self, config: PS3Config):
        super().__init__()
        if not isinstance(config, PS3Config):
            raise TypeError(f"config must be a PS3Config, got {type(config).__name__}")
        self.config = config
        self.vision_model = PS3VisionEncoder(config.vision_config)
        self.text_model = PS3TextTransformer(config.text_config)
        vision_width = config.vision_config.hidden_size
        if config.text_config.prompt_proj_dim != vision_width:
            raise ValueError(f"text_config.prompt_proj_dim ({config.text_config.prompt_proj_dim}) must equal the vision "
                             f"width ({vision_width}): the prompt steers the vision tower's selection")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    @classmethod
    def _optional_tensors(cls) -> dict[str, torch.Tensor]:
        # Released repos carry the SigLIP logit scale/bias; files exported without them still load.
        return {"logit_scale": torch.tensor(math.log(10.0)), "logit_bias": torch.tensor(-10.0)}

    def encode_text(self, token_ids: torch.Tensor) -> PS3TextOutput:
        """Token ids (B, context_length) → pooled text feature and the selection prompt."""
        return self.text_model(token_ids)

    # The vision call of :class:`ps3.PS3VisionModel`: same arguments, one signature (the encoder's).
    encode_image = delegate_to_encoder("forward", "encode_image")

    def forward(self, pixel_values, token_ids: torch.Tensor, **vision_kwargs) -> PS3VisionOutput:
        """Encode texts, then the images (a tensor or a list) with the texts' prompts steering the selection."""
        text = self.encode_text(token_ids)
        images = len(image_sizes(pixel_values))
        if text.prompt.shape[0] != images:
            raise ValueError(f"got {images} images but {text.prompt.shape[0]} texts: "
                             "top-down selection needs one text per image")
        return self.encode_image(pixel_values, prompt=text.prompt, **vision_kwargs)
