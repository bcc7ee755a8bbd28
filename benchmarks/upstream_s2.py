"""Side by side with upstream S2-Wrapper: ours against both branches' newest code, call by call.

Each call runs a small random backbone (patch 8, one prefix token or a plain conv map) through
``ps3.s2.multiscale_forward`` and through upstream's ``s2wrapper.forward`` of the ``master`` and
``dev_any_shape`` checkouts, wherever that branch accepts the call, and prints the output shapes
and whether the values agree. Ours must match every branch that accepts a call, except where the
two branches disagree with each other (a square size that is not a multiple of max_split_size,
without split_mode): there ours follows master.

    /tmp/upstream/venv/bin/python benchmarks/upstream_s2.py --master /tmp/upstream/s2 --any-shape /tmp/upstream/s2_any

(``../shared/tools/setup_upstream_env.sh`` builds that Python and both checkouts.) Exits 1 on a
mismatch: a different shape, or values further apart than float32 rounding of the same operations
(TOL below).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# Same resizes and backbone on the same data, but stitched in another order: float32 rounding only.
TOL = 1e-5


def load_s2wrapper(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path / "s2wrapper" / "__init__.py",
                                                  submodule_search_locations=[str(path / "s2wrapper")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class TokensWithPrefix(torch.nn.Module):
    """Patch-8 'ViT': a conv embedding, tokens row-major, their mean prepended as a class token."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 6, 8, stride=8)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


class ConvMap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 4, stride=4)

    def forward(self, x):
        return F.gelu(self.conv(x))


def calls():
    """(name, input shape, kwargs, backbone kind). Square multiples are valid on both branches."""
    yield "llava_s2 336/672/1008", (2, 3, 64, 64), dict(img_sizes=[16, 32, 48], max_split_size=16), "vit"
    yield "scales 1,2", (2, 3, 32, 32), dict(scales=[1, 2]), "vit"
    yield "scales 1,2 output -1", (1, 3, 32, 32), dict(scales=[1, 2], resize_output_to_idx=-1), "vit"
    yield "split_forward", (2, 3, 32, 32), dict(scales=[1, 2, 3], split_forward=True), "vit"
    yield "bchw map", (2, 3, 32, 32), dict(scales=[1, 2], output_shape="bchw"), "conv"
    yield "square, not multiple", (1, 3, 48, 48), dict(img_sizes=[24, 40], max_split_size=16), "vit"
    yield "square, 2 pieces of 16", (1, 3, 32, 32), dict(img_sizes=[16, 32], max_split_size=16), "vit"
    yield "square, 2 pieces of 24", (1, 3, 48, 48), dict(img_sizes=[16, 48], max_split_size=32), "vit"
    yield "same, split_mode=resize", (1, 3, 48, 48), dict(img_sizes=[16, 48], max_split_size=32,
                                                          split_mode="resize"), "vit"
    yield "any-shape resize", (1, 3, 24, 40), dict(img_sizes=[(24, 40), (48, 80)], max_split_size=16), "vit"
    yield "any-shape pad", (1, 3, 24, 40), dict(img_sizes=[(24, 40), (48, 80)], max_split_size=16,
                                                split_mode="pad"), "vit"
    yield "any-shape scales", (2, 3, 16, 32), dict(scales=[1, 2], max_split_size=16), "vit"


def run(fn, model, x, kwargs, kind):
    kw = dict(kwargs)
    if kind == "vit":
        kw["num_prefix_token"] = 1
    try:
        with torch.no_grad():
            return fn(model, x, **kw)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        return e


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=TOL, rtol=TOL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", type=Path, required=True, help="a checkout of branch master")
    parser.add_argument("--any-shape", type=Path, required=True, help="a checkout of branch dev_any_shape")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ps3.s2 import multiscale_forward
    branches = {}
    for label, path in (("master", args.master), ("dev_any_shape", args.any_shape)):
        commit = subprocess.run(["git", "-C", str(path), "log", "--oneline", "-1"], capture_output=True,
                                text=True).stdout.strip()
        print(f"{label}: {commit}")
        branches[label] = load_s2wrapper(path, f"s2wrapper_{label}").forward
    torch.manual_seed(0)
    backbones = {"vit": TokensWithPrefix(), "conv": ConvMap()}
    failures = 0
    for name, shape, kwargs, kind in calls():
        x = torch.randn(shape)
        ours = run(multiscale_forward, backbones[kind], x, kwargs, kind)
        row = [f"{name:24} ours {tuple(ours.shape)}"]
        results = {label: run(fn, backbones[kind], x, kwargs, kind) for label, fn in branches.items()}
        accepted = {k: v for k, v in results.items() if not isinstance(v, Exception)}
        # Where both branches accept a call but disagree with each other (a square size that is not
        # a multiple of max_split_size), ours follows master, the package `pip install` gives.
        must_match = set(accepted)
        if len(accepted) == 2 and not same_values(*accepted.values()):
            must_match = {"master"}
            row.append("branches disagree, ours follows master")
        for label, theirs in results.items():
            if isinstance(theirs, Exception):
                row.append(f"{label}: refuses ({type(theirs).__name__})")
                continue
            same = same_values(theirs, ours)
            row.append(f"{label}: {tuple(theirs.shape)} {'same' if same else 'differs'}")
            failures += label in must_match and not same
        print(" | ".join(row))
    print("every call matches upstream" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
