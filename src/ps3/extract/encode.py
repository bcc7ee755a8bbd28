"""The model side of ``ps3 extract``: a batch of resized uint8 images → the tensors of each image.

A batch is one model call: a (B, 3, H, W) tensor, or a list of images of different sizes (a
``keep_aspect`` processor) for the model's ragged call, whose output is split per image.

Per sample, written as ``KEY.safetensors`` by :mod:`ps3.extract.output` (design §3: tokens are
the low-res ones, then the selected high-res cells of each scale in ascending order, row-major):

* ``hidden_states`` (k, T, C): the last ``k`` layers' tokens (``--layers k``), the model dtype;
* ``pooled_output`` (C,): the low-res pooled feature;
* ``tokens_per_scale`` int64: tokens at the low-res scale, then selected cells per high-res
  scale (they sum to T; only the first with ``--looks 0``);
* ``selection_maps.{i}`` uint8 (h_i, w_i) for each high-res scale i (absent for a low-res-only
  call, ``--looks 0``);
* ``feature_maps.{i}`` (C, h_i, w_i) per scale, low-res first, unselected cells zero
  (``--feature-maps`` only).
"""
from __future__ import annotations

from typing import Any

import torch
from ..encoder.outputs import PS3VisionOutput

__all__ = ["FeatureEncoder"]


class FeatureEncoder:
    """Loads the vision tower (and the text tower when prompts are used) once; :meth:`encode`
    turns a batch message of :mod:`ps3.extract.dataset` into per-image tensors."""

    def __init__(self, model: str, *, device: torch.device, dtype: str, selection: dict[str, Any], layers: int,
                 feature_maps: bool, image_size: int | None, use_prompts: bool) -> None:
        from ..runtime import UserError, load_model, user_input

        with user_input("model"):
            loaded = load_model(model, device=device, dtype=dtype, text=use_prompts)
        self.model, self.text, self.tokenizer = loaded.vision, loaded.text, loaded.tokenizer
        self.processor, self.device, self.dtype = loaded.processor, device, loaded.dtype
        depth = self.model.vision_model.layers
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= depth:
            raise UserError(f"layers must be an int from 1 to {depth} (the model's depth), got {layers!r}")
        largest = self.model.config.ps3_scales[-1]
        with user_input("--looks/--tokens"):  # check the selection now, not at the first batch
            self.model.count_tokens(largest, largest, **selection)
        self.image_size = image_size  # None: the processor's own
        self.mean = torch.tensor(self.processor.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.processor.std, device=device).view(1, 3, 1, 1)
        self.selection, self.layers, self.feature_maps = selection, layers, feature_maps

    def _prompts(self, texts: list[str | None]) -> torch.Tensor | None:
        """One prompt vector per image; images without a prompt get the model's prior prompt,
        which makes their selection exactly the bottom-up one, so they can share the batch."""
        if all(t is None for t in texts):
            return None
        unique = sorted({t for t in texts if t is not None})
        vectors = self.text(self.tokenizer(unique).to(self.device)).prompt
        prior = self.model.vision_model.prior_prompt.to(vectors.dtype)
        rows = [prior if t is None else vectors[unique.index(t)] for t in texts]
        return torch.stack(rows)

    def _normalised(self, pixels: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """uint8 images → normalised model input on the device: (x/255 − mean)/std, the processor's
        operations in its order, then the model's dtype. A list (images of different sizes) stays
        a list, for the model's ragged call."""
        if isinstance(pixels, list):
            return [self._normalised(p[None])[0] for p in pixels]
        x = pixels.to(self.device, non_blocking=True).float().div_(255)
        return x.sub_(self.mean).div_(self.std).to(self.dtype)

    def _feature_maps(self, out: PS3VisionOutput) -> list[list[torch.Tensor]]:
        """Per sample, one (C, h_i, w_i) map per scale (a mixed call is split first: its tokens are
        padded)."""
        singles = [out] if out.lengths is None else out.per_sample()
        maps = [self.model.vision_model.format_features_into_feature_maps(s.last_hidden_state, s.selection_maps)
                for s in singles]
        return [[m[i].cpu() for m in group] for group in maps for i in range(group[0].shape[0])]

    @torch.inference_mode()
    def encode(self, batch: dict[str, Any], texts: list[str | None]) -> list[tuple[str, dict[str, torch.Tensor], int]]:
        """(key, tensors on the host, token count) per image of ``batch``; ``texts``: each image's
        prompt or None."""
        out, pooled = self.model.encode_looks_with_pooled(
            self._normalised(batch["pixels"]), prompt=self._prompts(texts), num_hidden_layers_to_return=self.layers,
            **self.selection)
        feature_maps = self._feature_maps(out) if self.feature_maps and out.selection_maps else None
        # One copy of each batched tensor to the host (a few syncs per batch), then per-sample views.
        host = PS3VisionOutput(
            hidden_states=tuple(h.cpu() for h in out.hidden_states[-self.layers:]),
            pooled_output=pooled.cpu(),
            selection_maps=[m.to(torch.uint8).cpu() for m in out.selection_maps] if out.selection_maps else None,
            lengths=None if out.lengths is None else out.lengths.cpu(), feature_sizes=out.feature_sizes,
            num_looks=out.num_looks)
        results = []
        for i, (key, single) in enumerate(zip(batch["keys"], host.per_sample())):
            hidden = torch.cat(single.hidden_states)  # (k, T, C)
            maps = [m[0] for m in single.selection_maps or []]
            selected = [int(m.sum()) for m in maps]
            tensors = {"hidden_states": hidden,
                       "tokens_per_scale": torch.tensor([hidden.shape[1] - sum(selected), *selected])}
            if single.pooled_output is not None:
                tensors["pooled_output"] = single.pooled_output[0]
            tensors.update({f"selection_maps.{s}": m for s, m in enumerate(maps)})
            tensors.update({f"feature_maps.{s}": f for s, f in enumerate(feature_maps[i] if feature_maps else [])})
            tensors = {name: t.contiguous() for name, t in tensors.items()}
            results.append((key, tensors, int(hidden.shape[1])))
        return results
