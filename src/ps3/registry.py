"""Every architecture and published configuration, stated once (design §1).

* :data:`VIT_REGISTRY` — the ViT backbones by timm name, and :func:`arch_from_config`, which
  resolves a vision config's ``model_name`` / ``vit`` dict to a :class:`ViTArch`.
* :data:`PUBLISHED` — the released PS3 checkpoints (scales, backbone, budget, text vocabulary and
  tokenizer) and :func:`published_configs`, the ``config.json`` / ``preprocessor_config.json``
  contents such a checkpoint has.
* :data:`TRAINING_CONFIGS` / :func:`training_config` — the named configs ``ps3 train --model``
  accepts: the published ones plus ``tiny-synthetic`` and ``tiny-synthetic-128``.
* :data:`BENCH_PRESETS` / :func:`bench_vision_config` — trunk sizes for ``ps3 bench`` and
  ``benchmarks/``: a random-weight :class:`ps3.PS3VisionConfig` from a preset.
* :data:`LOGIT_SCALE_INIT`, :data:`LOGIT_BIAS_INIT` — SigLIP's logit scale/bias start values.

This module imports nothing from the towers or from ``ps3.train``: every other module looks up here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .config import PS3VisionConfig

# --------------------------------------------------------------------------------------------
# ViT backbones (design §1.5)

#: MLP ratio of the SigLIP so400m shape: hidden = int(1152 × 3.7362) = 4304.
SO400M_MLP_RATIO: float = 3.7362


@dataclass(frozen=True)
class ViTArch:
    """Architecture of a ViT trunk (what a timm model name or a ``vit`` config dict says)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    pos_grid: int  # the position table is pos_grid × pos_grid
    gelu_approximate: str = "none"  # "tanh" for the so400m patch16 SigLIP models
    global_pool: str = "map"
    norm_eps: float = 1e-6

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def _so400m(patch: int, img: int, gelu: str = "none") -> ViTArch:
    return ViTArch(patch, 1152, 27, 16, SO400M_MLP_RATIO, img // patch, gelu_approximate=gelu)


def _base16(img: int) -> ViTArch:
    return ViTArch(16, 768, 12, 12, 4.0, img // 16)


#: timm names of the backbones PS3 checkpoints are built on.
VIT_REGISTRY: dict[str, ViTArch] = {
    "vit_so400m_patch14_siglip_378": _so400m(14, 378),
    "vit_so400m_patch14_siglip_384": _so400m(14, 384),
    **{f"vit_so400m_patch16_siglip_{s}": _so400m(16, s, "tanh") for s in (256, 384, 512)},
    **{f"vit_base_patch16_siglip_{s}": _base16(s) for s in (224, 256, 384, 512)},
    # The C-RADIOv2 trunk (timm's name; the PS3 configs set img_size 4096, a 256 x 256 table).
    "vit_large_patch16_224": ViTArch(16, 1024, 24, 16, 4.0, 224 // 16),
}


def arch_from_config(model_name: str, vit: dict[str, Any] | None, img_size: int | None = None) -> ViTArch:
    """Resolve the trunk architecture: an explicit ``vit`` dict wins, else the registry.
    ``img_size`` (the vision config's key of that name, which upstream passes on to timm) sets
    the position table to img_size // patch cells a side."""
    arch = _arch(model_name, vit)
    if img_size is None:
        return arch
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < arch.patch_size:
        raise ValueError(f"vision config img_size must be an integer >= the patch size {arch.patch_size} "
                         f"(or null), got {img_size!r}")
    return dataclasses.replace(arch, pos_grid=img_size // arch.patch_size)


def _arch(model_name: str, vit: dict[str, Any] | None) -> ViTArch:
    if vit is not None:
        if not isinstance(vit, dict):
            raise TypeError(f"vision config 'vit' must be a dict describing the backbone, got {type(vit).__name__}")
        required = ("patch_size", "embed_dim", "depth", "num_heads")
        missing = [k for k in required if k not in vit]
        if missing:
            raise ValueError(f"vision config 'vit' dict lacks {missing}; it needs {list(required)} "
                             "plus optional mlp_ratio, img_size, global_pool, act")
        if vit.get("class_token"):
            raise ValueError("vision config 'vit': class_token=True is not supported "
                             "(PS3 trunks have no prefix tokens)")
        patch = int(vit["patch_size"])
        img = int(vit.get("img_size") or 224)
        act = str(vit.get("act", vit.get("act_layer", "gelu")))
        return ViTArch(patch, int(vit["embed_dim"]), int(vit["depth"]), int(vit["num_heads"]),
                       float(vit.get("mlp_ratio", 4.0)), img // patch,
                       gelu_approximate="tanh" if "tanh" in act else "none",
                       global_pool=str(vit.get("global_pool", "map")))
    if model_name not in VIT_REGISTRY:
        raise ValueError(f"unknown backbone model_name {model_name!r}: use one of {sorted(VIT_REGISTRY)} "
                         "or describe it with a 'vit' dict in the vision config")
    return VIT_REGISTRY[model_name]


# --------------------------------------------------------------------------------------------
# SigLIP logit scale / bias

#: Start value of the stored (log-space) logit scale: exp(log 10) = 10.
LOGIT_SCALE_INIT: float = math.log(10.0)
#: Start value of the logit bias.
LOGIT_BIAS_INIT: float = -10.0


# --------------------------------------------------------------------------------------------
# Published checkpoints (design §1 table)

SCALES_4K: tuple[int, ...] = (378, 756, 1512, 3780)
SCALES_1P5K: tuple[int, ...] = (378, 756, 1512)
# The C-RADIOv2 models are patch 16: their scales are multiples of 16 (and of the 384 low-res view).
SCALES_4K_RADIO: tuple[int, ...] = (384, 768, 1536, 3840)
SCALES_1P5K_RADIO: tuple[int, ...] = (384, 768, 1536)
SIGLIP_MEAN_STD: tuple[float, ...] = (0.5, 0.5, 0.5)
CLIP_MEAN: tuple[float, ...] = (0.48145467042922974, 0.45782750844955444, 0.40821072459220886)
CLIP_STD: tuple[float, ...] = (0.2686295509338379, 0.2613025903701782, 0.27577710151672363)


@dataclass(frozen=True)
class RadioAdapter:
    """A C-RADIO trunk's extras (``ps3.encoder.radio``): adapter MLP and position table size."""

    version: str = "v2"
    hidden_dim: int = 1520
    output_dim: int = 1152
    num_inner: int = 3
    img_size: int = 4096


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One released PS3 configuration. ``hub_ids``: the repos that hold it (vision-only and
    ``PS3_Lang`` repos share one configuration). ``radio``: set for the C-RADIO trunks."""

    name: str
    hub_ids: tuple[str, ...]
    backbone: str
    ps3_scales: tuple[int, ...]
    max_select_num: int
    vocab_size: int
    tokenizer: str
    select_based_on_layer: tuple[int, ...] = (0, 9, 18, 26)
    mean: tuple[float, ...] = SIGLIP_MEAN_STD
    std: tuple[float, ...] = SIGLIP_MEAN_STD
    radio: RadioAdapter | None = None


_SIGLIP2 = dict(backbone="vit_so400m_patch14_siglip_378", vocab_size=256000, tokenizer="timm/ViT-SO400M-14-SigLIP2-378")
_SIGLIP = dict(backbone="vit_so400m_patch14_siglip_384", vocab_size=32000, tokenizer="timm/ViT-SO400M-14-SigLIP-384")
# upstream's train/src/open_clip/model_configs/PS3-{4K,1.5K}-C-RADIO-v2-L.json
_RADIO = dict(backbone="vit_large_patch16_224", vocab_size=32000, tokenizer="timm/ViT-B-16-SigLIP",
              select_based_on_layer=(0, 7, 14, 23), mean=CLIP_MEAN, std=CLIP_STD, radio=RadioAdapter())

PUBLISHED: dict[str, PublishedCheckpoint] = {c.name: c for c in (
    PublishedCheckpoint("PS3-4K-SigLIP2", ("nvidia/PS3-4K-SigLIP2", "nvidia/PS3_Lang-4K-SigLIP2"),
                        ps3_scales=SCALES_4K, max_select_num=2560, **_SIGLIP2),
    PublishedCheckpoint("PS3-1.5K-SigLIP2", ("nvidia/PS3-1.5K-SigLIP2", "nvidia/PS3_Lang-1.5K-SigLIP2"),
                        ps3_scales=SCALES_1P5K, max_select_num=2560, **_SIGLIP2),
    PublishedCheckpoint("PS3-4K-SigLIP", ("nvidia/PS3-4K-SigLIP",), ps3_scales=SCALES_4K, max_select_num=2560,
                        **_SIGLIP),
    PublishedCheckpoint("PS3-1.5K-SigLIP", ("nvidia/PS3-1.5K-SigLIP",), ps3_scales=SCALES_1P5K, max_select_num=2560,
                        **_SIGLIP),
    PublishedCheckpoint("PS3-4K-C-RADIOv2", ("nvidia/PS3-4K-C-RADIOv2",), ps3_scales=SCALES_4K_RADIO,
                        max_select_num=2560, **_RADIO),
    PublishedCheckpoint("PS3-1.5K-C-RADIOv2", ("nvidia/PS3-1.5K-C-RADIOv2",), ps3_scales=SCALES_1P5K_RADIO,
                        max_select_num=2560, **_RADIO),
)}


def preprocessor_dict(image_size: int | Sequence[int], mean: Sequence[float] = SIGLIP_MEAN_STD,
                      std: Sequence[float] = SIGLIP_MEAN_STD) -> dict[str, Any]:
    """``preprocessor_config.json`` contents of a checkpoint trained on squashed images."""
    return {"image_size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize_mode": "squash"}


def _published_vision(c: PublishedCheckpoint) -> dict[str, Any]:
    width = VIT_REGISTRY[c.backbone].embed_dim
    vision = {
        "model_name": c.backbone, "hidden_size": width, "pool": "map", "ps3": True, "ps3_scales": list(c.ps3_scales),
        "select_based_on_layer": list(c.select_based_on_layer), "min_select_num": 1,
        "max_select_num": c.max_select_num, "separate_pos_emb": True, "highres_selection_feature": True,
        "highres_selection_module_hidden_dim": 512, "highres_selection_module_out_dim": 512,
        "highres_selection_module_depth": 3, "highres_selection_module_kernel_size": 28,
    }
    if c.radio is not None:
        r = c.radio
        vision.update({
            "img_size": r.img_size, "drop": 0.0, "class_token": False, "final_norm": False, "radio": True,
            "radio_adapter_mlp_version": r.version, "radio_adapter_mlp_input_dim": width,
            "radio_adapter_mlp_hidden_dim": r.hidden_dim, "radio_adapter_mlp_output_dim": r.output_dim,
            "radio_adapter_mlp_num_inner": r.num_inner})
    return vision


def _published_text(c: PublishedCheckpoint) -> dict[str, Any]:
    # The SigLIP so400m text tower in every published model. Its pooled output meets the image's
    # pooled feature (a C-RADIO adapter's output width); its prompt steers the trunk (trunk width).
    text_width = VIT_REGISTRY["vit_so400m_patch14_siglip_378"].embed_dim
    trunk_width = VIT_REGISTRY[c.backbone].embed_dim
    return {
        "context_length": 64, "vocab_size": c.vocab_size, "hf_tokenizer_name": c.tokenizer,
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": text_width, "heads": 16, "layers": 27,
        "mlp_ratio": SO400M_MLP_RATIO, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"},
        "output_dim": c.radio.output_dim if c.radio is not None else trunk_width,
        "prompt_proj_dim": trunk_width,
    }


def published_configs(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(joint ``config.json`` dict, ``preprocessor_config.json`` dict) of a published checkpoint,
    by configuration name (``PS3-4K-SigLIP2``) or hub id (``nvidia/PS3_Lang-4K-SigLIP2``)."""
    found = PUBLISHED.get(name) or next((c for c in PUBLISHED.values() if name in c.hub_ids), None)
    if found is None:
        raise ValueError(f"unknown published PS3 checkpoint {name!r}: use one of {sorted(PUBLISHED)}")
    joint = {"architectures": ["PS3Model"], "vision_config": _published_vision(found),
             "text_config": _published_text(found)}
    return joint, preprocessor_dict(found.ps3_scales[-1], found.mean, found.std)


# --------------------------------------------------------------------------------------------
# Named training configs


def _tiny_synthetic() -> tuple[dict[str, Any], dict[str, Any]]:
    vision = {
        "model_name": "vit_tiny_synthetic_patch8",
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "img_size": 64,
                "global_pool": "map", "class_token": False},
        "hidden_size": 128, "pool": "map", "ps3": True, "ps3_scales": [64, 128, 256],
        "select_based_on_layer": [0, 1, 2, 3], "min_select_num": 1,
        "max_select_num": 160,  # budgets 32 (128 px) and 128 (256 px)
        "separate_pos_emb": True,
        # The high-res selection ConvNet always looks at a fixed 1512 px image (design §3.4): on a
        # CPU that costs more than the whole rest of this model, so the tiny config selects from
        # the low-res ViT features alone.
        "highres_selection_feature": False,
    }
    text = {
        "width": 128, "heads": 4, "layers": 2, "context_length": 16, "vocab_size": None,  # the tokenizer's
        "output_dim": 128, "prompt_proj_dim": 128, "mlp_ratio": 4.0, "pool_type": "last", "no_causal_mask": True,
        "proj_bias": True, "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6},
        "hf_tokenizer_name": None, "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    return {"vision_config": vision, "text_config": text}, preprocessor_dict(256)


def _tiny_synthetic_128() -> tuple[dict[str, Any], dict[str, Any]]:
    """``tiny-synthetic`` on 128 px scenes with one high-res scale: the same 16×16 grid at the
    first high-res scale (where learnability is measured) at about a third of the compute per
    sample (96 trunk tokens instead of 224, a quarter of the pixels to decode). The demo's model."""
    joint, _ = _tiny_synthetic()
    joint["vision_config"].update(model_name="vit_tiny_synthetic_128_patch8", ps3_scales=[64, 128],
                                  max_select_num=32)
    return joint, preprocessor_dict(128)


#: Config name → builder of (joint config dict, preprocessor dict). ``tiny-synthetic`` has no
#: tokenizer (``vocab_size`` None: the trainer builds one from the captions).
TRAINING_CONFIGS: dict[str, Callable[[], tuple[dict[str, Any], dict[str, Any]]]] = {
    "tiny-synthetic": _tiny_synthetic,
    "tiny-synthetic-128": _tiny_synthetic_128,
    **{name: (lambda name=name: published_configs(name)) for name in PUBLISHED},
}


def training_config(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(joint config dict, preprocessor dict) of a named training config (fresh copies)."""
    if name not in TRAINING_CONFIGS:
        raise ValueError(f"unknown training config {name!r}: use one of {list(TRAINING_CONFIGS)}")
    return TRAINING_CONFIGS[name]()


# --------------------------------------------------------------------------------------------
# Benchmark presets


@dataclass(frozen=True)
class BenchPreset:
    """A trunk size for timing. ``backbone``: a registry name (the published trunk), or None for a
    patch-14, so400m-shaped trunk of the given width and depth described by a ``vit`` dict.
    ``radio``: the trunk is a C-RADIO one (adapter, cropped position table) at the published
    C-RADIOv2 geometry (patch 16, scales ``scales_4k`` / ``scales_1p5k``)."""

    width: int
    depth: int
    heads: int
    backbone: str | None = None
    description: str = ""
    scales_4k: tuple[int, ...] = SCALES_4K
    scales_1p5k: tuple[int, ...] = SCALES_1P5K
    radio: RadioAdapter | None = None


BENCH_PRESETS: dict[str, BenchPreset] = {
    "cpu": BenchPreset(768, 4, 12, description="a CPU-sized trunk with the published geometry "
                       "(patch 14, scales, budgets, selection module)"),
    "so400m": BenchPreset(1152, 27, 16, backbone="vit_so400m_patch14_siglip_378",
                          description="the PS3-4K-SigLIP2 trunk (for a GPU)"),
    "c-radio": BenchPreset(1024, 24, 16, backbone="vit_large_patch16_224", scales_4k=SCALES_4K_RADIO,
                           scales_1p5k=SCALES_1P5K_RADIO, radio=RadioAdapter(),
                           description="the PS3-4K-C-RADIOv2 trunk: ViT-L/16, adapter MLP, scales 384-3840 "
                           "(for a GPU)"),
}


def preset_scales(preset: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(1.5K scales, 4K scales) of a bench preset's geometry."""
    p = _preset(preset)
    return p.scales_1p5k, p.scales_4k


def _preset(preset: str) -> BenchPreset:
    if preset not in BENCH_PRESETS:
        raise ValueError(f"unknown bench preset {preset!r}: use one of {sorted(BENCH_PRESETS)}")
    return BENCH_PRESETS[preset]


def bench_vision_config(preset: str = "cpu", ps3_scales: Sequence[int] | None = None, *, width: int | None = None,
                        depth: int | None = None) -> PS3VisionConfig:
    """A :class:`ps3.PS3VisionConfig` for random-weight timing: the preset's trunk (``width`` /
    ``depth`` override it; heads then = width // 64), PS3-4K-SigLIP2's selection geometry (budget
    2560, selection layers spread over the depth) at ``ps3_scales`` (default: the preset's 4K
    scales). A C-RADIO preset keeps its adapter and position table whatever the width (the
    adapter reads the trunk's width)."""
    p = _preset(preset)
    ps3_scales = p.scales_4k if ps3_scales is None else ps3_scales
    w, d = width or p.width, depth or p.depth
    heads = p.heads if w == p.width else w // 64
    layers = sorted({0, d // 3, 2 * d // 3, d - 1})  # [0, 9, 18, 26] at the published depth 27
    common = dict(hidden_size=w, pool="map", ps3_scales=list(ps3_scales), max_select_num=2560,
                  select_based_on_layer=layers)
    if p.radio is not None:
        r = p.radio
        common.update(img_size=max(r.img_size, max(ps3_scales)), class_token=False, final_norm=False, radio=True,
                      radio_adapter_mlp_version=r.version, radio_adapter_mlp_input_dim=w,
                      radio_adapter_mlp_hidden_dim=r.hidden_dim, radio_adapter_mlp_output_dim=r.output_dim,
                      radio_adapter_mlp_num_inner=r.num_inner)
    if p.backbone is not None and (w, d, heads) == (p.width, p.depth, p.heads):
        return PS3VisionConfig(model_name=p.backbone, **common)
    base = VIT_REGISTRY[p.backbone] if p.backbone is not None and p.radio is not None else None
    vit = dict(patch_size=base.patch_size if base else 14, embed_dim=w, depth=d, num_heads=heads,
               mlp_ratio=base.mlp_ratio if base else SO400M_MLP_RATIO, class_token=False, global_pool="map",
               img_size=378 if base is None else base.pos_grid * base.patch_size)
    return PS3VisionConfig(model_name=f"bench_vit_w{w}_d{d}", vit=vit, **common)
