"""The PS3 vision encoder, one module per concept. Read them in this order:

1. ``vit``                -- the ViT trunk: blocks, attention with a cached low-res prefix and key
                             masks, patch embedding of chosen cells, position tables.
2. ``precision``          -- which dtype and attention formulation a call computes in.
3. ``selection_features`` -- what selection scores: the 1512 px ConvNet, prompt cosine scores,
                             probability maps, the encoder's plain bicubic resize.
4. ``selection``          -- sizes per scale, budgets, look plans, top-k, token counts.
5. ``batching``           -- mixed batches: image checks, grouping images by size, per-group maps.
6. ``outputs``            -- ``PS3VisionOutput``, ``LowResPass``, feature maps.
7. ``request``            -- ``EncodeRequest``: one call's arguments, validated once.
8. ``looks``              -- ``LookParts`` and packing looks' cells into few masked trunk passes.
9. ``selection_pipeline`` -- the one selection pipeline (plan, low-res pass, score, pick, merge)
                             with a pluggable cell rule (``TopKCells``; ``ps3.mllm`` adds blocks).
10. ``vision``            -- ``PS3VisionModel``: the encoder's parts and entry points, upstream's
                             ``forward`` and attribute names.

``cuda_graphs`` (optional replay of the trunk on a GPU) is a small helper of ``vision``. The public
names are re-exported from ``ps3``.
"""
from .outputs import LowResPass, PS3VisionOutput
from .request import EncodeRequest
from .selection import TokenCount, first_n_scales_for_sizes
from .selection_pipeline import CellRule, TopKCells
from .vision import PS3VisionEncoder, PS3VisionModel

__all__ = ["CellRule", "EncodeRequest", "LowResPass", "PS3VisionOutput", "TokenCount", "TopKCells",
           "first_n_scales_for_sizes", "PS3VisionEncoder", "PS3VisionModel"]
