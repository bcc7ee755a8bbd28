"""C-RADIO trunks (design §1.6): what ``radio: true`` changes in a PS3 vision tower.

PS3's C-RADIOv2 checkpoints put a ViT-L/16 trunk (width 1024) from C-RADIOv2 under the same
selection machinery as the SigLIP ones. Three things differ, all in the trunk:

* the position table is larger than any scale (4096 px, a 256 × 256 grid) and a grid of h × w
  tokens takes its top-left h × w cells as they are (cropped, never interpolated);
* there is no final norm (unless the config says ``final_norm: true``);
* the pooled feature goes through an adapter MLP (``trunk.siglip_proj``, 1024 → 1520 → 1152 with
  three inner blocks in the published models) before a MAP pool of the adapter's width with 16
  heads and MLP ratio 3.7362 (the SigLIP so400m pool, which is why the adapter ends at 1152).

The hidden states a call returns, the selection features, the prior prompt and the top-down
prompt all stay in the trunk's width; only the pooled feature (and so the contrastive embedding
and the text tower's ``output_dim``) has the adapter's width.

Config keys (upstream's names): ``radio``, ``radio_adapter_mlp_version`` (``v1`` or ``v2``),
``radio_adapter_mlp_input_dim`` (= the trunk width), ``radio_adapter_mlp_hidden_dim``,
``radio_adapter_mlp_output_dim``, ``radio_adapter_mlp_num_inner``, ``img_size`` (the position
table's pixel size), ``final_norm``, ``class_token`` (must be false or null).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import ViTArch

#: The MAP pool after the adapter: upstream fixes its heads and MLP ratio to the SigLIP so400m pool's.
RADIO_POOL_HEADS: int = 16
RADIO_POOL_MLP_RATIO: float = 3.7362
RADIO_POOL_NORM_EPS: float = 1e-6
ADAPTER_VERSIONS = ("v1", "v2")


class AdapterMLPv1(nn.Module):
    """fc1 → LayerNorm → ReLU → num_inner × (Linear → LayerNorm → ReLU) → fc2
    (keys ``fc1``, ``norm``, ``inner.{3i}``, ``inner.{3i+1}``, ``fc2``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_inner: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        for _ in range(num_inner):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU()]
        self.inner = nn.Sequential(*layers) if layers else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner(self.relu(self.norm(self.fc1(x)))))


def _norm_gelu_linear(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.GELU(), nn.Linear(width, out))


class AdapterMLPv2(nn.Module):
    """fc1 → num_inner residual blocks (LayerNorm → GELU → Linear) → final (LayerNorm → GELU →
    Linear) (keys ``fc1``, ``blocks.{i}.0``/``.2``, ``final.0``/``.2``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_inner: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList([_norm_gelu_linear(hidden_dim, hidden_dim) for _ in range(num_inner)])
        self.final = _norm_gelu_linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


@dataclass(frozen=True)
class RadioSpec:
    """The RADIO parts of a vision config, checked."""

    version: str
    input_dim: int
    hidden_dim: int
    output_dim: int
    num_inner: int
    final_norm: bool

    @classmethod
    def from_config(cls, config: Any, trunk_width: int) -> RadioSpec | None:
        """None unless ``config.radio``; a ValueError naming the key for a bad or missing value."""
        if not getattr(config, "radio", False):
            return None
        version = getattr(config, "radio_adapter_mlp_version", None)
        if version not in ADAPTER_VERSIONS:
            raise ValueError(f"radio=True needs radio_adapter_mlp_version 'v1' or 'v2' in the vision config, "
                             f"got {version!r}")
        dims = {}
        for key in ("input_dim", "hidden_dim", "output_dim", "num_inner"):
            value = getattr(config, f"radio_adapter_mlp_{key}", None)
            low = 0 if key == "num_inner" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"radio=True needs radio_adapter_mlp_{key} as an integer >= {low} in the vision "
                                 f"config, got {value!r}")
            dims[key] = value
        if dims["input_dim"] != trunk_width:
            raise ValueError(f"radio_adapter_mlp_input_dim {dims['input_dim']} must equal the trunk width "
                             f"{trunk_width} (hidden_size): the adapter reads the trunk's tokens")
        if dims["output_dim"] % RADIO_POOL_HEADS:
            raise ValueError(f"radio_adapter_mlp_output_dim {dims['output_dim']} must be a multiple of "
                             f"{RADIO_POOL_HEADS}: the pool after the adapter has {RADIO_POOL_HEADS} heads")
        if getattr(config, "class_token", None):
            raise ValueError("class_token=True is not supported: PS3 trunks have no prefix tokens; pass false or null")
        return cls(version, final_norm=bool(getattr(config, "final_norm", False)), **dims)

    def adapter(self) -> nn.Module:
        cls = AdapterMLPv1 if self.version == "v1" else AdapterMLPv2
        return cls(self.input_dim, self.hidden_dim, self.output_dim, self.num_inner)

    def pool_arch(self, trunk: ViTArch) -> ViTArch:
        """The MAP pool's shape: the adapter's width, upstream's fixed heads, MLP ratio, exact GELU."""
        return dataclasses.replace(trunk, embed_dim=self.output_dim, num_heads=RADIO_POOL_HEADS,
                                   mlp_ratio=RADIO_POOL_MLP_RATIO, gelu_approximate="none",
                                   norm_eps=RADIO_POOL_NORM_EPS, global_pool="map")
