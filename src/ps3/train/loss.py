"""Pre-training losses for PS3 (design §5).

Two parts:

* :func:`siglip_loss` — the SigLIP sigmoid contrastive loss over image/text pairs. On several
  ranks each rank keeps its own images and the text features travel around a ring of
  point-to-point sends, so every image meets every text of the global batch as a negative
  without an all-gather; gradients travel back around the ring to the rank that owns the text.
* :func:`box_selection_loss` — binary cross-entropy between the predicted selection
  probabilities of each high-res scale and the ground-truth box map, for samples with a local
  (boxed) caption only.

:func:`ps3_pretrain_loss` combines them with the recipe's weights.

Normalisation across ranks (why the contrastive loss divides by the *local* batch size):
let ``W`` ranks hold ``b`` samples each, ``N = W·b``. Rank ``r`` returns
``L_r = -Σ_{i on r, all j} logsigmoid(y_ij·z_ij) / b``. Then ``mean_r L_r = L_1proc``, the
one-process loss on the concatenated batch (which divides by ``N``). Each rank's backward
produces the gradient of ``Σ_r L_r`` restricted to the computation it owns (its images, and —
thanks to the ring's backward — every rank's contribution to its texts), so the parameter
gradients summed over ranks are ``∂(Σ_r L_r)/∂θ = W·∂L_1proc/∂θ``; DDP's gradient *average*
divides by ``W`` and gives exactly the one-process gradient. So: use with DDP (or average the
gradients over ranks), and log ``mean_r L_r`` (or any rank's value as an estimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT  # re-exported: the loss's start values

__all__ = [
    "LOGIT_SCALE_INIT",
    "LOGIT_BIAS_INIT",
    "siglip_loss",
    "SigLipLoss",
    "box_selection_loss",
    "PS3PretrainLoss",
    "ps3_pretrain_loss",
]


# --------------------------------------------------------------------------------------------
# Ring exchange
# --------------------------------------------------------------------------------------------


def _peer(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (P2POp's ``peer`` takes global ranks)."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _shift(tensor: Tensor, group: dist.ProcessGroup | None, step: int) -> Tensor:
    """Send ``tensor`` to rank ``r + step`` and return what rank ``r - step`` sent (mod W)."""
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, _peer(group, (rank + step) % world), group),
        dist.P2POp(dist.irecv, received, _peer(group, (rank - step) % world), group),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Pass a tensor one hop around the ring (r → r+1); the gradient goes back (r+1 → r).

    The received block is a function of the *sender's* tensor, so its gradient belongs to the
    sender: backward sends it the opposite way round. All ranks run the same chain of hops, so
    the backward hops are executed in the same (reverse) order everywhere and pair up.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _shift(tensor.contiguous(), group, step=1)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return _shift(grad_output.contiguous(), ctx.group, step=-1), None


def ring_shift(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable one-hop ring exchange: returns rank ``r-1``'s ``tensor`` on rank ``r``.

    Every rank of ``group`` must call it with a tensor of the same shape and dtype.
    """
    return _RingShift.apply(tensor, group)


def _ring_world_size(distributed: bool | None, group: dist.ProcessGroup | None) -> int:
    """World size the loss runs over: 1 for a local loss."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return dist.get_world_size(group) if initialised else 1
    if not distributed:
        return 1
    if not initialised:
        raise ValueError(
            "distributed=True needs torch.distributed to be initialised "
            "(call torch.distributed.init_process_group first), or pass distributed=False"
        )
    return dist.get_world_size(group)


# --------------------------------------------------------------------------------------------
# SigLIP loss
# --------------------------------------------------------------------------------------------


def _pair_loss_sum(
    image: Tensor, text: Tensor, scale: Tensor | float, bias: Tensor | float, positives: bool
) -> Tensor:
    """Σ over the (B_img, B_txt) pairs of −logsigmoid(label · logit).

    ``positives``: labels +1 on the diagonal and −1 elsewhere (the rank's own texts);
    otherwise every pair is a negative (another rank's texts).
    """
    logits = scale * (image @ text.t()) + bias
    if positives:
        labels = 2.0 * torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) - 1.0
        return -F.logsigmoid(labels * logits).sum()
    return -F.logsigmoid(-logits).sum()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    distributed: bool | None = None,
    group: dist.ProcessGroup | None = None,
    normalize: bool = True,
) -> Tensor:
    """SigLIP sigmoid loss for matched (B, D) image and text features of this rank.

    ``logits = exp(logit_scale) · img @ txtᵀ + logit_bias``; labels +1 for the matching pair
    (row i, column i), −1 otherwise; returns ``−Σ logsigmoid(labels · logits) / B_local``.

    Args:
        image_features, text_features: (B, D); row i of each forms a positive pair.
        logit_scale: the *log* of the scale (the stored parameter, init ``log 10``); it is
            exponentiated here.
        logit_bias: the bias (init −10).
        distributed: ``None`` (default) uses the ring whenever torch.distributed is initialised
            and ``group`` has more than one rank; ``False`` forces a local loss; ``True``
            requires an initialised process group. In the ring every rank of ``group`` must
            call this with the same B and D.
        group: process group of the ring (default: the world).
        normalize: L2-normalise both feature sets here (default). Harmless for features that
            are already unit-norm (value and gradient are unchanged); pass ``False`` to use the
            features as they are.

    Across W ranks, each rank's value covers its own images against all W·B texts and is
    divided by its local B; with DDP's gradient averaging the gradients equal those of the
    one-process loss on the concatenated batch (see the module docstring).
    """
    if not isinstance(image_features, Tensor) or image_features.dim() != 2:
        raise ValueError("image_features must be a (B, D) tensor")
    if not isinstance(text_features, Tensor) or text_features.shape != image_features.shape:
        raise ValueError(
            "text_features must be a (B, D) tensor with the same shape as image_features, "
            f"got {tuple(getattr(text_features, 'shape', ()))} vs {tuple(image_features.shape)}"
        )
    batch = image_features.shape[0]
    if batch == 0:
        raise ValueError("image_features/text_features must hold at least one pair")

    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)

    loss = _pair_loss_sum(image_features, text_features, scale, logit_bias, positives=True)
    world = _ring_world_size(distributed, group)
    # W−1 hops: after hop k this rank holds the texts of rank r−k; each block is negatives only.
    # Chaining the hops (hop k+1 sends what hop k received) keeps one text block in flight.
    travelling = text_features
    for _ in range(world - 1):
        travelling = ring_shift(travelling, group)
        loss = loss + _pair_loss_sum(image_features, travelling, scale, logit_bias, positives=False)
    return loss / batch


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss`; the logit scale/bias stay with the model.

    ``SigLipLoss(distributed=None, group=None, normalize=True)(img, txt, logit_scale, logit_bias)``.
    """

    def __init__(
        self,
        distributed: bool | None = None,
        group: dist.ProcessGroup | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.distributed = distributed
        self.group = group
        self.normalize = normalize

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
    ) -> Tensor:
        return siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            distributed=self.distributed,
            group=self.group,
            normalize=self.normalize,
        )


# --------------------------------------------------------------------------------------------
# Box supervision of the selection
# --------------------------------------------------------------------------------------------


def _local_caption_weights(is_global_text: Tensor | None, batch: int, like: Tensor) -> Tensor:
    """(B,) float weights: 1 for samples with a local caption, 0 for global-caption ones."""
    if is_global_text is None:
        return torch.ones(batch, dtype=torch.float32, device=like.device)
    if not isinstance(is_global_text, Tensor):
        is_global_text = torch.as_tensor(is_global_text)
    if is_global_text.numel() != batch or is_global_text.dim() > 2:
        raise ValueError(
            f"is_global_text must be a (B,) or (B, 1) bool tensor with B={batch}, "
            f"got shape {tuple(is_global_text.shape)}"
        )
    return (~is_global_text.reshape(batch).to(device=like.device, dtype=torch.bool)).float()


def box_selection_loss(
    selection_probs: Sequence[Tensor],
    gt_selection_maps: Tensor,
    is_global_text: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Binary cross-entropy of the selection probabilities against the box maps.

    For each high-res scale i: the gt map (B, H, W) is area-resized to the prob map's size
    (h_i, w_i) and binarised (> 0 → 1, so a cell touched by the box at all counts as inside);
    the BCE is averaged over the cells of the samples with a local caption. The result is the
    mean over scales. Samples whose caption is global (``is_global_text`` True) do not
    contribute; when none has a local caption the result is 0, still attached to the graph.

    Args:
        selection_probs: one (B, h_i, w_i) probability map per high-res scale.
        gt_selection_maps: (B, H, W), nonzero inside the box.
        is_global_text: (B,) or (B, 1) bool; ``None`` means every sample has a local caption.
        eps: probabilities are clamped into [eps, 1 − eps] so the log stays finite.

    Computed in float32 with autocast off (``F.binary_cross_entropy`` is refused under CUDA
    autocast, and the log needs the precision). No host synchronisation: the sample mask is a
    weight, not an index.
    """
    if isinstance(selection_probs, Tensor) or len(selection_probs) == 0:
        raise ValueError(
            "selection_probs must be a non-empty list of (B, h_i, w_i) tensors, one per high-res scale"
        )
    if not isinstance(gt_selection_maps, Tensor) or gt_selection_maps.dim() != 3:
        raise ValueError("gt_selection_maps must be a (B, H, W) tensor")
    batch = gt_selection_maps.shape[0]
    for i, probs in enumerate(selection_probs):
        if not isinstance(probs, Tensor) or probs.dim() != 3 or probs.shape[0] != batch:
            raise ValueError(
                f"selection_probs[{i}] must be a (B, h, w) tensor with B={batch} "
                f"(the batch of gt_selection_maps), got {tuple(getattr(probs, 'shape', ()))}"
            )

    first = selection_probs[0]
    weights = _local_caption_weights(is_global_text, batch, first)
    # Dividing by max(count, 1) gives the mean over local samples, and 0 when there are none
    # (the sum of zero-weighted terms keeps the graph, so backward still works).
    count = weights.sum().clamp(min=1.0)
    gt = gt_selection_maps.to(device=first.device, dtype=torch.float32).unsqueeze(1)

    with torch.autocast(device_type=first.device.type, enabled=False):
        per_scale = []
        for probs in selection_probs:
            target = (F.interpolate(gt, size=probs.shape[-2:], mode="area").squeeze(1) > 0).float()
            p = probs.float().clamp(eps, 1.0 - eps)
            bce = F.binary_cross_entropy(p, target, reduction="none").mean(dim=(1, 2))
            per_scale.append((bce * weights).sum() / count)
        return torch.stack(per_scale).mean()


# --------------------------------------------------------------------------------------------
# Combined loss
# --------------------------------------------------------------------------------------------


@dataclass
class PS3PretrainLoss:
    """The pre-training loss and its parts (0-dim tensors).

    ``total = contrastive + bottomup_weight · bottomup + topdown_weight · topdown``; a box term
    whose probabilities were not given is 0.
    """

    total: Tensor
    contrastive: Tensor
    bottomup: Tensor
    topdown: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {
            "total": self.total,
            "contrastive": self.contrastive,
            "bottomup": self.bottomup,
            "topdown": self.topdown,
        }


def ps3_pretrain_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    bottomup_probs: Sequence[Tensor] | None,
    topdown_probs: Sequence[Tensor] | None,
    gt_selection_maps: Tensor | None,
    is_global_text: Tensor | None,
    bottomup_weight: float = 1.0,
    topdown_weight: float = 1.0,
    *,
    distributed: bool | None = None,
    group: dist.ProcessGroup | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> PS3PretrainLoss:
    """SigLIP loss + box supervision of the bottom-up and top-down selection (design §5).

    ``bottomup_probs`` / ``topdown_probs``: lists of (B, h_i, w_i) maps, one per high-res scale,
    or ``None`` (that term is then 0). When either is given, ``gt_selection_maps`` (B, H, W) is
    required. See :func:`siglip_loss` for the contrastive arguments and :func:`box_selection_loss`
    for the box terms (local-caption samples only, averaged over scales).
    """
    contrastive = siglip_loss(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        distributed=distributed,
        group=group,
        normalize=normalize,
    )
    zero = contrastive.new_zeros(())

    def box_term(probs: Sequence[Tensor] | None, name: str) -> Tensor:
        if probs is None:
            return zero
        if gt_selection_maps is None:
            raise ValueError(
                f"{name} was given but gt_selection_maps is None: pass the (B, H, W) box maps, "
                f"or pass {name}=None to skip that term"
            )
        return box_selection_loss(probs, gt_selection_maps, is_global_text, eps=eps)

    bottomup = box_term(bottomup_probs, "bottomup_probs")
    topdown = box_term(topdown_probs, "topdown_probs")
    total = contrastive + bottomup_weight * bottomup + topdown_weight * topdown
    return PS3PretrainLoss(total=total, contrastive=contrastive, bottomup=bottomup, topdown=topdown)
