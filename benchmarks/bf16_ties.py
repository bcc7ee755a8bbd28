"""bf16 selections, ours vs upstream's code on the same weights and images: how often they
differ, and whether they differ only where probabilities tie at the top-k boundary.

    PYTHONPATH=src python benchmarks/bf16_ties.py --upstream /tmp/upstream/PS3 \
        --upstream-python /tmp/upstream/venv/bin/python

Every high-res scale reads the first scale's probabilities upsampled by nearest neighbour, so a
low-res cell's probability fills a block of cells at each scale and the top-k boundary usually
cuts through such a block: many cells hold exactly the boundary value. bf16 has 8 significant
bits, so distinct cells tie far more often than in float32. Which tied cells ``torch.topk`` takes
is the kernel's business (it differs between CPU and CUDA). Ours takes torch.topk's choice by
default, as upstream does, or the lowest canvas index first on every device and dtype with
``PS3_TIE_RULE=lowest_index`` (``ps3.encoder.selection.tie_rule``); the report also compares that
rule with torch.topk's choice on upstream's own probabilities.

One random-weight 4K model (``ps3.bench.build_model``, ``--width``/``--depth`` of the trunk) is
saved once and loaded in bf16 by ours and by upstream's ``PS3VisionModel.from_pretrained`` (each
in its own process; upstream under a Python with its pins). Each encodes the same images (crops of
``--image`` and smooth random images, 3780 px) with one look. For every image and scale the
report says: whether the two selections are equal; if not, whether every disagreeing cell holds
upstream's boundary probability (an exact tie) or lies one bf16 step from it (a near-tie: the
two implementations compute the probabilities in a different order, so a cell's bf16 probability
may differ by one rounding); and, on upstream's own probabilities,
whether our tie rule and ``torch.topk`` differ only inside the tie. Exits 1 if any selection
differs beyond a tie or a near-tie.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZE = 3780


def _images(n: int, image: Path | None) -> torch.Tensor:
    """(n, 3, SIZE, SIZE) in [-1, 1]: crops of ``image`` where given, then smooth random images."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    out = []
    if image is not None and image.exists():
        from PIL import Image
        import numpy as np

        photo = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        photo = photo.permute(2, 0, 1)[None]
        H, W = photo.shape[-2:]
        for i in range(min(n // 2, 4)):
            s = min(H, W) * (1 - 0.15 * i)
            top, left = int((H - s) * (i % 2) / 2), int((W - s) * ((i + 1) % 2) / 2)
            crop = photo[..., top:top + int(s), left:left + int(s)]
            out.append(F.interpolate(crop, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(-1, 1))
    while len(out) < n:
        coarse = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
        out.append(F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(-1, 1))
    return torch.cat(out)


def child(args) -> None:
    """Encode the saved images with one implementation in bf16; save maps and probabilities."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bf16 import _load
    from safetensors.torch import save_file

    model, call = _load(args.child, args.model_dir, args.upstream, torch.bfloat16, 2)
    images = torch.load(args.images_file)
    tensors = {}
    with torch.no_grad():
        for i, x in enumerate(images):
            out = call(x[None].bfloat16(), 1)
            for s, (m, p) in enumerate(zip(out.selection_maps, out.selection_probs)):
                tensors[f"{i}.maps.{s}"] = m.detach().float().contiguous()
                tensors[f"{i}.probs.{s}"] = p.detach().float().contiguous()
    save_file(tensors, args.out)


def _topk_map(probs: torch.Tensor, k: int) -> torch.Tensor:
    flat = probs.flatten(1)
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=1).indices, True).view_as(probs)


def compare(ours: dict, theirs: dict, n_images: int) -> tuple[list[dict], bool]:
    """One row per (image, scale); the flag: every difference is a tie or a near-tie."""
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.encoder.selection import top_cells

    rows, ok = [], True
    for i in range(n_images):
        s = 0
        while f"{i}.maps.{s}" in theirs:
            a, b = ours[f"{i}.maps.{s}"].bool(), theirs[f"{i}.maps.{s}"].bool()
            p_ours, p = ours[f"{i}.probs.{s}"], theirs[f"{i}.probs.{s}"]
            k = int(b.sum())
            flat = p.flatten()
            boundary = flat.topk(k).values[-1]
            at = int((flat == boundary).sum())
            above = int((flat > boundary).sum())
            diff = (a ^ b).flatten()
            moved = int(diff.sum()) // 2
            exact = bool((flat[diff] == boundary).all())
            ulp = 2.0 ** (math.floor(math.log2(float(boundary))) - 7)  # bf16 spacing at the boundary
            near = bool(((flat[diff] - boundary).abs() <= ulp).all())
            # On upstream's own probabilities: our rule against torch.topk's choice.
            rule = top_cells(p.flatten(1).bfloat16(), [k], "lowest_index").view_as(b)
            rule_diff = (rule ^ _topk_map(p.bfloat16(), k)).flatten()
            rule_in_tie = bool((flat[rule_diff] == boundary).all())
            row = dict(image=i, scale=s, cells=flat.numel(), k=k, boundary=float(boundary),
                       tied_at_boundary=at, needed_from_tie=k - above, equal=bool(torch.equal(a, b)),
                       cells_moved=moved, only_exact_ties=exact, only_near_ties=near,
                       probs_max_abs_diff=float((p_ours - p).abs().max()), rule_vs_topk_moved=int(rule_diff.sum()) // 2,
                       rule_vs_topk_only_in_tie=rule_in_tie, same_count=int(a.sum()) == k)
            ok &= row["same_count"] and (row["equal"] or near) and rule_in_tie
            rows.append(row)
            s += 1
    return rows, ok


def parent(args) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from safetensors.torch import load_file

    from ps3.bench import build_model
    from ps3.registry import SCALES_4K

    log = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(SCALES_4K, args.preset, width=args.width, depth=args.depth).save_pretrained(tmp / "model")
        torch.save(_images(args.images, args.image), tmp / "images.pt")
        out = {}
        for impl in ("ours", "upstream"):
            python = args.upstream_python if impl == "upstream" else sys.executable
            cmd = [python, __file__, "--child", impl, "--model-dir", str(tmp / "model"), "--images-file",
                   str(tmp / "images.pt"), "--out", str(tmp / f"{impl}.safetensors"), "--upstream", str(args.upstream)]
            env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                log(f"{impl}: FAILED\n{proc.stderr[-3000:]}")
                return 2
            out[impl] = load_file(tmp / f"{impl}.safetensors")
    rows, ok = compare(out["ours"], out["upstream"], args.images)
    log(f"bf16, one look, {args.images} images, random weights ({args.preset}, width {args.width}, depth {args.depth})")
    log("image scale   k  boundary  tied/needed  equal  moved  exact-tie near-tie  |p_ours-p_up|max  "
        "rule-vs-topk moved (in tie)")
    for r in rows:
        log(f"{r['image']:5} {r['scale']:5} {r['k']:4} {r['boundary']:9.5f} "
            f"{r['tied_at_boundary']:6}/{r['needed_from_tie']:<5}"
            f" {str(r['equal']):6} {r['cells_moved']:5}  {str(r['only_exact_ties']):9} {str(r['only_near_ties']):8}"
            f" {r['probs_max_abs_diff']:16.2e}  {r['rule_vs_topk_moved']:5} ({r['rule_vs_topk_only_in_tie']})")
    differ = [r for r in rows if not r["equal"]]
    ties = [r for r in rows if r["tied_at_boundary"] > r["needed_from_tie"]]
    log(f"selections equal in {len(rows) - len(differ)} of {len(rows)} (image, scale) pairs; the boundary was a tie "
        f"(more cells at the boundary value than needed) in {len(ties)}; of the {len(differ)} that differ, "
        f"{sum(r['only_exact_ties'] for r in differ)} only at exact ties of upstream's probabilities, "
        f"{sum(r['only_near_ties'] for r in differ)} only at cells within one bf16 step of the boundary")
    log(f"on upstream's own probabilities, our tie rule vs torch.topk: differ in "
        f"{sum(r['rule_vs_topk_moved'] > 0 for r in rows)} pairs, always inside the tie: "
        f"{all(r['rule_vs_topk_only_in_tie'] for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, help="an NVlabs/PS3 checkout")
    parser.add_argument("--upstream-python", default=sys.executable, help="a Python with upstream's pins")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--image", type=Path, default=ROOT / "docs" / "dock.jpg", help="a photo to crop (optional)")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--child", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--images-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if args.upstream is None:
        parser.error("--upstream is required (an NVlabs/PS3 checkout)")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
