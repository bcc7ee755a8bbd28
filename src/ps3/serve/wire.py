"""The response body both sides share: a safetensors file holding ``last_hidden_state`` (1, N, C)
and ``selection_maps.{i}`` (1, h_i, w_i) (after a look-closer turn also ``new_selection_maps.{i}``,
the cells that turn encoded), with string metadata ``tokens``, ``model``, ``dtype``,
``image_size`` (JSON [height, width] of the uploaded image) and, for a session, ``session``."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .. import PS3VisionOutput


@dataclass
class ServedOutput(PS3VisionOutput):
    """A :class:`ps3.PS3VisionOutput` as the server returned it, plus what the response says
    about it. ``selection_maps``: the cells encoded so far (after a look-closer turn: in every
    turn of the session); ``new_selection_maps``: the cells whose tokens ``last_hidden_state``
    holds after the low-res ones (the same as ``selection_maps`` for ``encode``)."""

    new_selection_maps: list[torch.Tensor] | None = None
    session: str | None = None
    tokens: int | None = None
    model: str | None = None
    dtype: str | None = None
    image_size: tuple[int, int] | None = None


def _maps(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor] | None:
    maps, i = [], 0
    while f"{prefix}.{i}" in tensors:
        maps.append(tensors[f"{prefix}.{i}"])
        i += 1
    return maps or None


def dump_output(last_hidden_state: torch.Tensor, selection_maps: list[torch.Tensor],
                new_selection_maps: list[torch.Tensor] | None, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {"last_hidden_state": last_hidden_state.contiguous()}
    dtype = last_hidden_state.dtype
    for i, m in enumerate(selection_maps):
        tensors[f"selection_maps.{i}"] = m.to(dtype).contiguous()
    for i, m in enumerate(new_selection_maps or []):
        tensors[f"new_selection_maps.{i}"] = m.to(dtype).contiguous()
    return save(tensors, metadata=metadata)


def load_output(body: bytes) -> ServedOutput:
    from safetensors.torch import load

    tensors = load(body)
    header_len = int.from_bytes(body[:8], "little")
    meta = json.loads(body[8:8 + header_len]).get("__metadata__", {})
    maps = _maps(tensors, "selection_maps")
    new = _maps(tensors, "new_selection_maps")
    size = json.loads(meta["image_size"]) if "image_size" in meta else None
    return ServedOutput(last_hidden_state=tensors["last_hidden_state"], hidden_states=[tensors["last_hidden_state"]],
                        selection_maps=maps, new_selection_maps=new if new is not None else maps,
                        session=meta.get("session"), tokens=int(meta["tokens"]) if "tokens" in meta else None,
                        model=meta.get("model"), dtype=meta.get("dtype"),
                        image_size=tuple(size) if size else None)
