"""What selection scores (design §3.3–3.7): the 1512 px ConvNet's fine features, the cosine score
of every low-res cell against a prompt, and the per-scale probability maps built from it
(nearest upsampling, ground-truth maps, smoothing).

The scores are computed on the low-res grid, which every image shares (it is always the square
s_0), so they run batched over any mix of image sizes; only the per-scale maps depend on an
image's grid sizes and are built once per group of images that share them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import OPS, chooser, shape_class
from .vit import Mlp

Size = tuple[int, int]

# The high-res selection module always sees the image at this size, whatever the scales (design §3.4).
HIGHRES_SELECTION_SIZE = 1512
# The stem's formulations are timed on this fraction of the image's patch rows (13 of 54 at
# 1512 px, kernel 28): smaller bands measured mostly per-call overhead on a busy machine.
_STEM_PROBE_FRACTION = 4


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv → LayerNorm → MLP (4×) → layer scale (stored as ``weight``) → residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + y * self.weight.view(1, -1, 1, 1)


class HighresSelectionFeatures(nn.Module):
    """A shallow ConvNet on the 1512 px image: fine detail the low-res ViT tokens cannot see."""

    def __init__(self, hidden: int, out: int, depth: int, kernel: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, hidden, kernel_size=kernel, stride=kernel), LayerNorm2d(hidden, eps=1e-6))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden) for _ in range(depth)])
        self.out_proj = nn.Conv2d(hidden, out, kernel_size=1)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The patchify conv and its LayerNorm: (n, 3, H, W) → (n, hidden, H/k, W/k), as the conv
        or as one matmul over the gathered patches (the stride equals the kernel), whichever
        measures faster here (``ps3.encoder.kernels`` op ``conv_stem``, timed on a band of patch rows;
        ``PS3_CONV_STEM`` forces one). Untimed default: the conv in float32 and the matmul in
        bf16/fp16 (oneDNN's bf16 conv measured ~5x slower than the matmul on a Zen 4)."""
        default = "conv" if x.dtype in (torch.float32, torch.float64) else "matmul"
        if x.device.type != "cpu":
            return self.stem(x) if default == "conv" else self._stem_matmul(x)
        k = self.stem[0].kernel_size[0]
        band = x[:, :, :max(2, x.shape[-2] // k // _STEM_PROBE_FRACTION) * k]
        H, W = x.shape[-2:]

        def probe(fn):
            with torch.no_grad():
                return fn(band)

        return chooser().run(
            OPS["conv_stem"], f"cpu {str(x.dtype)[6:]} {shape_class(H, W)} k {k}", x.device,
            {"conv": lambda: self.stem(x), "matmul": lambda: self._stem_matmul(x)}, default,
            flops=2.0 * band[:, :, :, :W // k * k].numel() * self.stem[0].out_channels,
            probes={"conv": lambda: probe(self.stem), "matmul": lambda: probe(self._stem_matmul)})

    def _stem_matmul(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.stem
        k = conv.kernel_size[0]
        n, c, H, W = x.shape
        h, w = H // k, W // k
        patches = x[:, :, :h * k, :w * k].reshape(n, c, h, k, w, k).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, -1)
        y = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (n, h, w, hidden)
        return nn.LayerNorm.forward(norm, y).permute(0, 3, 1, 2)  # channels-last NCHW, as the blocks read it

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, 1512, 1512) → (n, o, 1512/k, 1512/k), written into ``out`` when given (a row of a
        batch's features). The 1×1 output conv runs as a matmul, which in inference on one image
        writes straight into ``out`` (no copy) with the same kernel, hence the same values."""
        y = self.blocks(self._stem(x))
        n, c, h, w = y.shape
        weight, bias = self.out_proj.weight.view(-1, c), self.out_proj.bias.view(-1, 1)
        if (out is not None and n == 1 and not torch.is_grad_enabled() and out.is_contiguous()
                and not torch.is_autocast_enabled(y.device.type) and out.dtype == y.dtype == weight.dtype):
            return torch.mm(weight, y[0].flatten(1), out=out[0].view(-1, h * w)).add_(bias).view(out.shape)
        result = torch.matmul(weight, y.flatten(2))  # one image: the same mm as above
        result = result.add_(bias.to(result.dtype)).view(n, -1, h, w)
        return result if out is None else out.copy_(result)


def bicubic_resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Plain (not antialiased) bicubic resize in the input's dtype, as the encoder resizes its
    inputs to each scale (the strategies' ``resize_antialiased_fp32`` is antialiased, in float32). A
    no-op at the same size: bicubic weights at zero offset are exactly (0, 1, 0, 0). For
    bf16/fp16 the kernel accumulates in float32 and rounds once, so it matches resizing a float32
    copy to one rounding without making that copy (171 MB for a 3780 px image)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def bicubic_resize_all(images: torch.Tensor | Sequence[torch.Tensor], size: Size) -> torch.Tensor:
    """A (B, 3, H, W) batch or a list of (3, H_i, W_i) images, each resized to ``size``, stacked."""
    if isinstance(images, torch.Tensor):
        return bicubic_resize(images, size)
    if len(images) == 1:
        return bicubic_resize(images[0].unsqueeze(0), size)
    return torch.cat([bicubic_resize(image.unsqueeze(0), size) for image in images])


def highres_features(module: HighresSelectionFeatures | None,
                     pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | None:
    """G: the 1512 px ConvNet's features (B, o, h, w) of a batch or a list of images (None
    without the module). A list runs image by image (each is resized on its own anyway), so the
    ConvNet's 1512 px activations (~50 MB an image at width 512) do not grow with the batch; each
    result is written straight into its row, with no list of results to copy."""
    if module is None:
        return None
    square = (HIGHRES_SELECTION_SIZE, HIGHRES_SELECTION_SIZE)
    if isinstance(pixel_values, torch.Tensor):
        return module(bicubic_resize_all(pixel_values, square))
    first = module(bicubic_resize_all(pixel_values[:1], square))
    if len(pixel_values) == 1:
        return first
    features = first.new_empty(len(pixel_values), *first.shape[1:])
    features[:1] = first
    for i in range(1, len(pixel_values)):
        module(bicubic_resize_all(pixel_values[i:i + 1], square), out=features[i:i + 1])
    return features


def first_slot_probs(feats: torch.Tensor, highres: torch.Tensor | None, prompt: torch.Tensor,
                     prompt_proj_for_highres: nn.Module | None) -> torch.Tensor:
    """Selection probability of every low-res cell for ``prompt`` (B, C), or for each of K prompts
    (B, K, C): (B, 1 or K, h_0, w_0).

    Cosine of the cell features against the prompt, averaged with the max-pooled cosine of the
    fine features against the projected prompt; then sigmoid(clamp(5·logit)). Every scale reads
    the first high-res slot (as the published models were trained).
    """
    # Only the first slot is ever read, so only its scores are computed: each a matmul over
    # channels divided by the cells' norms, with no normalised copy of any feature map.
    queries = prompt.unsqueeze(1) if prompt.dim() == 2 else prompt
    B, K = queries.shape[:2]
    _, S, C, h, w = feats.shape
    cells = feats[:, 0].permute(0, 2, 3, 1).reshape(B, h * w, C)  # a view in the encoder's layout
    logits = _cosine(cells, queries, channel_dim=2).view(B, K, h, w)
    if highres is not None:
        q = prompt_proj_for_highres(queries).view(B, K, S, -1)[:, :, 0]
        fh, fw = highres.shape[-2:]
        fine = _cosine(highres.flatten(2).transpose(1, 2), q, channel_dim=1).view(B, K, fh, fw)
        logits = (logits + F.adaptive_max_pool2d(fine, logits.shape[-2:])) / 2
    return torch.sigmoid((logits * 5.0).clamp(-10, 10))


def prior_and_prompt_probs(feats: torch.Tensor, highres: torch.Tensor | None, prior_prompt: torch.Tensor,
                           prompt: torch.Tensor | None, prompt_proj_for_highres: nn.Module | None):
    """(bottom-up probs from the learned prior prompt (C,), top-down probs from ``prompt`` (B, C)
    or None), each (B, 1, h_0, w_0): both prompts scored in one pass over the features."""
    prior = prior_prompt.expand(feats.shape[0], -1)
    if prompt is None:
        return first_slot_probs(feats, highres, prior, prompt_proj_for_highres), None
    both = first_slot_probs(feats, highres, torch.stack([prior, prompt.to(prior.dtype)], 1), prompt_proj_for_highres)
    return both[:, :1], both[:, 1:]


def _cosine(cells: torch.Tensor, queries: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Cosine of every cell (B, N, C) against each of its sample's queries (B, K, C): (B, K, N).
    ``channel_dim``: the dimension of ``cells``' storage that holds C, 2 if (B, N, C) in memory,
    1 if (B, C, N) (reducing along the storage's own layout keeps the norms a streaming pass)."""
    unit = F.normalize(queries, dim=-1).to(cells.dtype)
    dots = torch.bmm(unit, cells.transpose(1, 2))
    stored = cells if channel_dim == 2 else cells.transpose(1, 2)
    return dots / torch.linalg.vector_norm(stored, dim=channel_dim).clamp_min(1e-12).unsqueeze(1)


def upsample_probs(first: torch.Tensor, sizes: Sequence[Size], dtype: torch.dtype) -> list[torch.Tensor]:
    """(n, 1, h_0, w_0) → one (n, h_i, w_i) map per high-res scale (nearest)."""
    first = first.float()
    return [F.interpolate(first, size=size, mode="nearest").squeeze(1).to(dtype) for size in sizes]


def gt_at_scales(gt_selection_maps: torch.Tensor, sizes: Sequence[Size]) -> list[torch.Tensor]:
    """Ground-truth maps (n, H, W) at every high-res scale: area to scale 1, then nearest.

    Resized values go back to the caller's dtype (as upstream does): an integer map keeps only
    the cells it fully covers at scale 1, a float map keeps partial ones too.
    """
    dtype = gt_selection_maps.dtype
    gt = F.interpolate(gt_selection_maps.unsqueeze(1).float(), size=sizes[0], mode="area").to(dtype)
    return [F.interpolate(gt.float(), size=size, mode="nearest").squeeze(1).to(dtype) for size in sizes]


def apply_gt_and_smoothing(probs: list[torch.Tensor], gt_selection_maps: torch.Tensor | None,
                           sizes: Sequence[Size], smooth: bool) -> list[torch.Tensor]:
    """Cells marked in the gt maps get probability 1; smoothing averages over a 6×6 grid."""
    if gt_selection_maps is not None:
        gt = gt_at_scales(gt_selection_maps, sizes)
        probs = [torch.where(g > 0, torch.ones_like(p), p) for g, p in zip(gt, probs)]
    if smooth:
        probs = [F.interpolate(F.interpolate(p.unsqueeze(1), size=(6, 6), mode="area"), size=p.shape[-2:],
                               mode="nearest").squeeze(1) for p in probs]
    return probs


def gt_area_at_cells(gt_selection_maps: torch.Tensor, sizes: Sequence[Size]) -> torch.Tensor:
    """Area-resized gt value of every high-res cell in canvas order (scales ascending, row-major):
    (n, Σ h_i·w_i), in the gt maps' dtype (pooling over gt cells only, design §3.14)."""
    return torch.cat([F.interpolate(gt_selection_maps.unsqueeze(1).float(), size=s, mode="area")
                      .to(gt_selection_maps.dtype).flatten(1) for s in sizes], dim=1)
