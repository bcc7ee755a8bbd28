"""Any batch in one call: a (B, 3, H, W) tensor or a list of (3, H_i, W_i) images, with per-sample
``num_look_close`` / ``num_token_look_close`` / ``only_select_first_n_scale`` / gt maps.

Images are grouped by what their selection arithmetic depends on (image size, look counts, gt
map size): a group is a batch in the old sense, selected with batched top-k. All groups share
the one low-res pass (every image is resized to the square s_0 first), and their looks go
through the trunk together (``ps3.encoder.looks``). A uniform batch is one group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

Size = tuple[int, int]


@dataclass
class ImageGroup:
    """Images of a call that share size, look counts and gt-map size."""

    samples: list[int]  # positions in the call's batch
    index: torch.Tensor  # the same, as a long tensor on the images' device
    pixels: torch.Tensor  # (n, 3, H, W)
    num_look_close: Any
    num_token_look_close: Any
    only_select_first_n_scale: list[int] | None
    gt_selection_maps: torch.Tensor | None  # (n, h, w) or None

    @property
    def size(self) -> Size:
        return tuple(self.pixels.shape[-2:])


def image_sizes(pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[Size]:
    if isinstance(pixel_values, torch.Tensor):
        return [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
    return [tuple(image.shape[-2:]) for image in pixel_values]


def check_images(pixel_values) -> None:
    """A (B, 3, H, W) float tensor, or a non-empty list of (3, H_i, W_i) float tensors, none empty."""
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values:
            raise ValueError("pixel_values is an empty list: pass at least one (3, H, W) image")
        for i, image in enumerate(pixel_values):
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"pixel_values[{i}] must be a (3, H, W) tensor, got {got}")
        devices = {(image.device, image.dtype) for image in pixel_values}
        if len(devices) > 1:
            raise ValueError(f"pixel_values mixes devices/dtypes {sorted(map(str, devices))}: pass one of each")
        images = list(pixel_values)
    elif isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W) or be a list of (3, H, W) images, got "
                             f"{tuple(pixel_values.shape)}")
        images = [pixel_values]
    else:
        raise TypeError(f"pixel_values must be a torch.Tensor (B, 3, H, W) or a list of (3, H, W) tensors, got "
                        f"{type(pixel_values).__name__}; use PS3ImageProcessor to turn images into pixel values")
    if not images[0].is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor (normalised pixels), got {images[0].dtype}")
    for image in images:
        if image.numel() == 0:
            raise ValueError(f"pixel_values of shape {tuple(image.shape)} is empty: every image needs at least "
                             "one pixel")


def per_sample(name: str, value, batch: int) -> list:
    """One value per image: a scalar (or None) means the same for all; a list/tuple/1-D tensor must
    have one entry per image, and may not mix None with values."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return [value] * batch
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} entries for a batch of {batch}: pass one per image, "
                         "or a single value for all")
    given = {v is None for v in value}
    if len(given) > 1:
        raise ValueError(f"{name} mixes None with values ({list(value)}): give every image a value")
    for v in value:
        if isinstance(v, (list, tuple, dict, torch.Tensor)):
            raise ValueError(f"{name} entries must be ints (or 'all'), got {v!r} in {list(value)}")
    return list(value)


def per_sample_gt(gt_selection_maps, batch: int) -> list[torch.Tensor | None]:
    """gt maps as one (h, w) tensor or None per image (from a (B, h, w) tensor or a list)."""
    if gt_selection_maps is None:
        return [None] * batch
    if isinstance(gt_selection_maps, torch.Tensor):
        if gt_selection_maps.dim() != 3 or gt_selection_maps.shape[0] != batch:
            raise ValueError(f"gt_selection_maps must be a (B={batch}, H, W) tensor of 0/1 (or a list of (H, W) "
                             f"maps), got {tuple(gt_selection_maps.shape)}")
        return list(gt_selection_maps)
    if isinstance(gt_selection_maps, (list, tuple)):
        if len(gt_selection_maps) != batch:
            raise ValueError(f"gt_selection_maps has {len(gt_selection_maps)} entries for a batch of {batch}")
        for i, g in enumerate(gt_selection_maps):
            if g is not None and (not isinstance(g, torch.Tensor) or g.dim() != 2):
                raise ValueError(f"gt_selection_maps[{i}] must be an (H, W) tensor of 0/1 or None")
        return list(gt_selection_maps)
    raise ValueError(f"gt_selection_maps must be a (B={batch}, H, W) tensor of 0/1 or a list of (H, W) maps, "
                     f"got {type(gt_selection_maps).__name__}")


def group_images(pixel_values, num_look_close, num_token_look_close, only_select_first_n_scale,
                 gt_selection_maps) -> list[ImageGroup]:
    """Split a call into groups (see the module docstring); a uniform batch is one group that holds
    the caller's tensors as they are."""
    sizes = image_sizes(pixel_values)
    batch = len(sizes)
    looks = per_sample("num_look_close", num_look_close, batch)
    tokens = per_sample("num_token_look_close", num_token_look_close, batch)
    if isinstance(only_select_first_n_scale, bool):
        raise TypeError("only_select_first_n_scale must be an int or a sequence of ints, not a bool")
    first_n = per_sample("only_select_first_n_scale", only_select_first_n_scale, batch)
    gts = per_sample_gt(gt_selection_maps, batch)
    keys: dict[tuple, list[int]] = {}
    for b in range(batch):
        gt = gts[b]
        gt_key = None if gt is None else (tuple(gt.shape), gt.dtype)
        keys.setdefault((sizes[b], looks[b], tokens[b], gt_key), []).append(b)
    device = pixel_values.device if isinstance(pixel_values, torch.Tensor) else pixel_values[0].device
    groups = []
    for (size, look, token, gt_key), samples in keys.items():
        if len(keys) == 1 and isinstance(pixel_values, torch.Tensor):
            pixels, gt = pixel_values, gt_selection_maps
        else:
            # A lone image is a view, not a copy (a mixed call is often all lone images).
            pixels = pixel_values[samples[0]].unsqueeze(0) if len(samples) == 1 else \
                torch.stack([pixel_values[b] for b in samples])
            gt = torch.stack([gts[b] for b in samples]) if gt_key is not None else None
        first = None if first_n[0] is None else [first_n[b] for b in samples]
        index = torch.tensor(samples).to(device, non_blocking=True)
        groups.append(ImageGroup(samples, index, pixels, look, token, first, gt))
    return groups


def old_maps_of_group(old_selection_maps: Sequence[torch.Tensor] | None, group: ImageGroup,
                      sizes: Sequence[Size], batch: int) -> list[torch.Tensor] | None:
    """The group's part of ``old_selection_maps`` (cells encoded before a look-closer call) as bool
    (n, h_i, w_i) maps on its grids; maps larger than a grid (a mixed call's padded output) are read
    at their top-left, where that image's grid sits."""
    if old_selection_maps is None:
        return None
    if isinstance(old_selection_maps, torch.Tensor) or not isinstance(old_selection_maps, (list, tuple)):
        raise TypeError("old_selection_maps must be a list with one (B, h_i, w_i) map per high-res scale "
                        f"(an earlier call's selection_maps), got {type(old_selection_maps).__name__}")
    if len(old_selection_maps) != len(sizes):
        raise ValueError(f"old_selection_maps needs one map per high-res scale ({len(sizes)}), "
                         f"got {len(old_selection_maps)}")
    out = []
    for i, (m, (h, w)) in enumerate(zip(old_selection_maps, sizes)):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != batch or m.shape[1] < h or m.shape[2] < w:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"old_selection_maps[{i}] must be a (B={batch}, >={h}, >={w}) tensor of 0/1, got {shape}")
        part = m if group.samples == list(range(batch)) else m.index_select(0, group.index.to(m.device))
        out.append(part[:, :h, :w].to(group.pixels.device) > 0)
    return out


def encoded_counts(old_maps: Sequence[torch.Tensor] | None) -> list[list[int]] | None:
    """Cells per sample and scale already encoded (read on the host once per call: how many cells
    a look-closer call plans over depends on them)."""
    if old_maps is None:
        return None
    return torch.stack([m.flatten(1).sum(1) for m in old_maps], 1).tolist()


def merge_group_maps(groups: Sequence[ImageGroup], maps: Sequence[Sequence[torch.Tensor]] | None,
                     batch: int) -> list[torch.Tensor] | None:
    """Per-group lists of per-scale (n, h, w) maps → per-scale (B, h_max, w_max) maps, each image's
    grid at the top-left, zeros elsewhere. One group covering the batch in order is returned as is."""
    if maps is None or any(m is None for m in maps):
        return None
    if len(groups) == 1 and groups[0].samples == list(range(batch)):
        return list(maps[0])
    out = []
    for scale in range(len(maps[0])):
        parts = [m[scale] for m in maps]
        h = max(p.shape[-2] for p in parts)
        w = max(p.shape[-1] for p in parts)
        merged = parts[0].new_zeros(batch, h, w)
        for group, part in zip(groups, parts):
            merged[group.index, :part.shape[-2], :part.shape[-1]] = part
        out.append(merged)
    return out

