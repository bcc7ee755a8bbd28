"""The model side of ``ps3 extract``: a batch of resized uint8 images → one safetensors blob each.

Per sample the blob holds (design §3: tokens are the low-res ones, then the selected high-res
cells of each scale in ascending order, row-major):

* ``hidden_states`` (k, T, C): the last ``k`` layers' tokens (``--layers k``), the model dtype;
* ``pooled_output`` (C,): the low-res pooled feature;
* ``tokens_per_scale`` int64 (S,): tokens at the low-res scale, then selected cells per
  high-res scale (they sum to T);
* ``selection_maps.{i}`` uint8 (h_i, w_i) for each high-res scale i (absent for a low-res-only
  call, ``--looks 0``);
* ``feature_maps.{i}`` (C, h_i, w_i) per scale, low-res first, unselected cells zero
  (``--feature-maps`` only).
"""
from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save

__all__ = ["FeatureEncoder"]


class FeatureEncoder:
    """Loads the vision tower (and the text tower when prompts are used) once; :meth:`encode`
    turns a batch message of :mod:`ps3.extract.dataset` into ``(key, blob, tokens)`` triples."""

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

    @torch.inference_mode()
    def encode(self, batch: dict[str, Any], texts: list[str | None]) -> list[tuple[str, bytes, int]]:
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        x = pixels.float().div_(255).sub_(self.mean).div_(self.std).to(self.dtype)
        out = self.model(x, prompt=self._prompts(texts), num_hidden_layers_to_return=self.layers,
                         **self.selection)
        # One copy of the whole batch to the host (one sync), then per-sample views.
        hidden = torch.stack(out.hidden_states[-self.layers:], dim=1).cpu()  # (B, k, T, C)
        pooled = out.pooled_output.cpu()
        maps = [m.to(torch.uint8).cpu() for m in out.selection_maps or []]
        low_res = self.model.vision_model.low_res_token_num
        counts = torch.tensor([[low_res] * len(batch["keys"])] + [m.flatten(1).sum(1).tolist() for m in maps],
                              dtype=torch.int64).T  # (B, S)
        feature_maps = []
        if self.feature_maps and out.selection_maps:
            feature_maps = [f.cpu() for f in
                            self.model.vision_model.format_features_into_feature_maps(out.last_hidden_state,
                                                                                      out.selection_maps)]
        results = []
        for i, key in enumerate(batch["keys"]):
            tensors = {"hidden_states": hidden[i].contiguous(), "pooled_output": pooled[i].contiguous(),
                       "tokens_per_scale": counts[i].contiguous()}
            tensors.update({f"selection_maps.{s}": m[i].contiguous() for s, m in enumerate(maps)})
            tensors.update({f"feature_maps.{s}": f[i].contiguous() for s, f in enumerate(feature_maps)})
            results.append((key, save(tensors, metadata={"key": key}), int(hidden.shape[2])))
        return results
