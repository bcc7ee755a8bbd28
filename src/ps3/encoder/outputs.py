"""What the PS3 vision encoder returns (:class:`PS3VisionOutput`) and what its low-res pass leaves
for a later call on the same images (:class:`LowResPass`)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

Size = tuple[int, int]


@dataclass
class PS3VisionOutput:
    """What a PS3 vision call returns. Lists run over the high-res scales unless noted.

    last_hidden_state: (B, h_0·w_0 + N_selected, C): low-res tokens then the selected high-res
        tokens (scales ascending, row-major); block outputs, before the trunk's final norm.
    hidden_states: those tokens for each returned layer (the last ``num_hidden_layers_to_return``).
    pooled_output: (B, C), pre-training mode only: pooled high-res look tokens (or low-res ones
        for global-text samples). None in inference, as upstream (the low-res pooled feature is
        ``encode_low_res(...).pooled_output``).
    selection_maps: (B, h_i, w_i) 0/1 maps of the encoded cells in the probabilities' floating
        dtype, as upstream builds them (VILA area-resizes them); None for a low-res-only call.
    selection_probs: (B, h_i, w_i) probabilities used for selection (after gt maps / smoothing).
    bottomup_selection_probs / topdown_selection_probs: pre-training mode only (None in inference,
        as upstream): from the prior prompt / the given prompt (None without a prompt).
    lengths: (B,) tokens of each sample, set by a mixed call (images of different sizes or
        budgets): ``last_hidden_state`` / ``hidden_states`` are then zero-padded to the longest
        sample, and every per-scale map is zero-padded at the bottom/right to the largest grid.
    feature_sizes: in a mixed call, each sample's high-res grids [(h_1, w_1), …], to crop the maps.
    num_looks: in a mixed call, the looks of each sample (0: low-res only, no selection map).

    :meth:`per_sample` splits any output into single-image outputs.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    pooled_output: torch.Tensor | None = None
    selection_maps: list[torch.Tensor] | None = None
    selection_probs: list[torch.Tensor] | None = None
    bottomup_selection_probs: list[torch.Tensor] | None = None
    topdown_selection_probs: list[torch.Tensor] | None = None
    lengths: torch.Tensor | None = None
    feature_sizes: list[list[Size]] | None = None
    num_looks: list[int] | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def per_sample(self) -> list["PS3VisionOutput"]:
        """One output per image, each as a call on that image alone would return it: tokens cut
        to the sample's length, maps cropped to its grids, batch dimension 1."""
        present = [t for t in (self.last_hidden_state, self.pooled_output) if t is not None]
        present += [m[0] for m in (self.selection_probs, self.hidden_states) if m]
        batch = present[0].shape[0]
        lengths = self.lengths.tolist() if self.lengths is not None else None
        out = []
        for b in range(batch):
            n = lengths[b] if lengths is not None else None
            sizes = self.feature_sizes[b] if self.feature_sizes is not None else None

            def crop_maps(maps):
                if maps is None:
                    return None
                return [m[b:b + 1, :sizes[i][0], :sizes[i][1]] if sizes else m[b:b + 1] for i, m in enumerate(maps)]

            values = {f.name: getattr(self, f.name) for f in fields(self)}
            for name in ("selection_maps", "selection_probs", "bottomup_selection_probs", "topdown_selection_probs"):
                values[name] = crop_maps(values[name])
            if self.num_looks is not None and self.num_looks[b] == 0:
                values["selection_maps"] = None
            if self.last_hidden_state is not None:
                values["last_hidden_state"] = self.last_hidden_state[b:b + 1, :n]
            if self.hidden_states is not None:
                values["hidden_states"] = [h[b:b + 1, :n] for h in self.hidden_states]
            if self.pooled_output is not None:
                values["pooled_output"] = self.pooled_output[b:b + 1]
            values.update(lengths=None, feature_sizes=None, num_looks=None)
            out.append(replace(self, **values))
        return out


@dataclass
class LowResPass:
    """Everything the low-res pass yields that does not depend on the prompt (design §3.2–3.4):
    made by :meth:`PS3VisionEncoder.encode_low_res` and given back to ``forward(..., low_res=)`` so
    that a second call on the same images (e.g. with a prompt an LLM derived from the low-res
    tokens) skips the low-res trunk pass and the selection features.

    hidden_states: block outputs of every layer, each (B, h_0·w_0, C).
    kv_cache: per layer the low-res (k, v), each (B, heads, h_0·w_0, C/heads); None when the pass
        was run with ``keep_kv=False`` (enough for low-res-only calls and selection).
    pooled_output: (B, C) low-res pooled feature (final norm + MAP pooling).
    selection_features: (B, S-1, C, h_0, w_0) projected features scored against prompts.
    highres_selection_features: (B, o, 1512/k, 1512/k) from the 1512 px ConvNet, or None.
    image_sizes: (H, W) of each input image, to check the pass is reused on the same images.
    """

    hidden_states: list[torch.Tensor]
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    pooled_output: torch.Tensor
    selection_features: torch.Tensor | None  # None once trimmed by ``for_looks``
    highres_selection_features: torch.Tensor | None
    image_sizes: list[Size]

    @property
    def batch_size(self) -> int:
        return self.pooled_output.shape[0]

    def for_looks(self, keep: int) -> "LowResPass":
        """What encoding looks still needs once cells are selected: the key/value cache, the last
        ``keep`` hidden states and the pooled feature. A call's own pass is trimmed to this before
        its looks run, so the selection features and the other layers (27 × B × 729 × C floats for
        the published trunk) are freed first."""
        return LowResPass(self.hidden_states[-keep:], self.kv_cache, self.pooled_output, None, None,
                          self.image_sizes)


def feature_maps(features: torch.Tensor, selection_maps, low_res_side: int) -> list[torch.Tensor]:
    """Tokens (B, N, C) in output order → one (B, C, h_i, w_i) map per scale (the low-res
    ``low_res_side``² grid first), zero where a cell was not selected (design §3.13)."""
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C), got shape {tuple(features.shape)}")
    B, N, C = features.shape
    maps = [torch.ones(B, low_res_side, low_res_side, dtype=torch.bool, device=features.device)]
    maps += [m.to(features.device).bool() for m in selection_maps]
    flat = torch.cat([m.flatten(1) for m in maps], dim=1)
    expected = flat.sum(1)
    if not torch.equal(expected, torch.full_like(expected, N)):
        raise ValueError(f"features hold {N} tokens per sample but the selection maps mark "
                         f"{expected.tolist()} cells (incl. {low_res_side ** 2} low-res)")
    # Selected cells, in canvas order, receive the tokens in order.
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :N]
    canvas = features.new_zeros(B, flat.shape[1], C)
    canvas.scatter_(1, order.unsqueeze(-1).expand(B, N, C), features)
    out, start = [], 0
    for m in maps:
        h, w = m.shape[-2:]
        out.append(canvas[:, start:start + h * w].reshape(B, h, w, C).permute(0, 3, 1, 2))
        start += h * w
    return out
