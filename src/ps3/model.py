"""The joint PS3 model: vision tower, text tower and the SigLIP logit scale/bias (design §1, §4).

Its state dict is exactly the published repo layout (``vision_model.*``, ``text_model.*``,
``logit_scale``, ``logit_bias``), so ``save_pretrained`` writes a repo that every tower loads from.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import PS3Config
from .hub import PretrainedMixin
from .registry import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT
from .text import PS3TextOutput, PS3TextTransformer
from .encoder.batching import image_sizes
from .encoder.vision import PS3VisionEncoder, PS3VisionOutput, delegate_to_encoder


class PS3Model(PretrainedMixin, nn.Module):
    config_class = PS3Config

    # Training settings (timm/open_clip style): parameter-name parts never weight-decayed, and the
    # module prefixes of the selection machinery.
    _NO_WEIGHT_DECAY_PARTS = ("pos_embed", "positional_embedding", "token_embedding", "pos_emb_residual", "latent",
                              "prior_prompt", "logit_scale", "logit_bias")
    _SELECTION_PREFIXES = ("vision_model.selection_feature_proj.", "vision_model.prior_prompt",
                           "vision_model.highres_selection_feature_module.", "vision_model.prompt_proj_for_highres.",
                           "text_model.prompt_proj.")

    def __init__(self, config: PS3Config):
        super().__init__()
        if not isinstance(config, PS3Config):
            raise TypeError(f"config must be a PS3Config, got {type(config).__name__}")
        self.config = config
        self.vision_model = PS3VisionEncoder(config.vision_config)
        self.text_model = PS3TextTransformer(config.text_config)
        vision_width = config.vision_config.hidden_size
        if config.text_config.prompt_proj_dim != vision_width:
            raise ValueError(f"text_config.prompt_proj_dim ({config.text_config.prompt_proj_dim}) must equal the "
                             f"vision width ({vision_width}): the prompt steers the vision tower's selection")
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.logit_bias = nn.Parameter(torch.tensor(LOGIT_BIAS_INIT))

    @classmethod
    def _optional_tensors(cls) -> dict[str, torch.Tensor]:
        # Released repos carry the SigLIP logit scale/bias; files exported without them still load.
        return {"logit_scale": torch.tensor(LOGIT_SCALE_INIT), "logit_bias": torch.tensor(LOGIT_BIAS_INIT)}

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

    # ----------------------------------------------------------------------------------------
    # Training settings

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters weight decay should leave alone: the position and token
        embedding tables, the pooling latent, the prior prompt and the logit scale/bias (an
        optimizer also exempts every parameter of fewer than two dimensions)."""
        return {name for name, _ in self.named_parameters() if any(p in name for p in self._NO_WEIGHT_DECAY_PARTS)}

    def selection_parameter_names(self) -> list[str]:
        """Names of the parameters that compute selection probabilities (the selection feature
        projections, the prior prompt, the high-res selection ConvNet and the prompt projections)."""
        return [name for name, _ in self.named_parameters() if name.startswith(self._SELECTION_PREFIXES)]

    def lock_all_but_selection(self) -> None:
        """Freeze every parameter but the selection modules' (train the selection alone)."""
        trainable = set(self.selection_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the vision trunk's blocks in the backward pass instead of storing their
        activations (less memory, about a third more compute)."""
        self.vision_model.trunk.set_grad_checkpointing(enable)
