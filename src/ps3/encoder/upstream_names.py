"""The names upstream's PS3 encoder answers to that ours spells otherwise: VILA-HD reads
``s3_scales`` for its dynamic-aspect-ratio rule and sets ``gradient_checkpointing``."""
from __future__ import annotations


class UpstreamEncoderNames:
    """Mixed into the PS3 encoder, which has ``ps3_scales`` and a ``trunk``."""

    @property
    def s3_scales(self) -> list[int]:
        """Upstream's older name for ``ps3_scales``."""
        return self.ps3_scales

    @property
    def s3_image_size(self) -> int:
        """The largest scale (upstream's name)."""
        return self.ps3_scales[-1]

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the trunk recomputes block activations in the backward pass (upstream's name)."""
        return self.trunk.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.trunk.grad_checkpointing = bool(enable)
