"""The PS3 vision encoder, one module per concept. Read them in this order:

1. ``vit``                -- the ViT trunk: blocks, attention with a cached low-res prefix and key masks,
                             patch embedding of chosen cells, position tables.
2. ``precision``          -- which dtype and attention formulation a call computes in.
3. ``selection_features`` -- what selection scores: the 1512 px ConvNet, prompt cosine scores, probability maps.
4. ``selection``          -- sizes per scale, budgets, look plans, top-k, token counts.
5. ``batching``           -- input checks and mixed batches: grouping images by size, splitting outputs.
6. ``looks``              -- tokenising the chosen cells and packing looks into few masked trunk passes.
7. ``outputs``            -- ``PS3VisionOutput``, ``LowResPass``, feature maps.
8. ``vision``             -- ``PS3VisionModel``: the low-res pass, selection, the two modes and upstream's ``forward``.

``cuda_graphs`` (optional replay of the trunk on a GPU) is a small helper of ``vision``. The public names are re-exported from ``ps3``.
"""
from .outputs import LowResPass, PS3VisionOutput
from .selection import TokenCount, first_n_scales_for_sizes
from .vision import PS3VisionEncoder, PS3VisionModel

__all__ = ["LowResPass", "PS3VisionOutput", "TokenCount", "first_n_scales_for_sizes", "PS3VisionEncoder",
           "PS3VisionModel"]
