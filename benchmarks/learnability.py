"""Learnability benchmark: does pre-training teach the top-down selection to find what a caption
describes? The demo pipeline (``ps3.demo``) with a fixed, stricter recipe, run fresh with a
10-minute training limit: synthetic data (2000 training scenes of 256 px, seed 0; 200 evaluation
scenes, seed 1), ``tiny-synthetic`` (three scales, 256 px) trained from random weights on the
CPU for 600 steps (no early stop), exported, and evaluated on the first high-res scale:
precision of the top-k top-down cells (k = cells the captioned box covers), bottom-up, chance.
Exits non-zero unless top-down precision >= 0.6 and >= 0.1 above bottom-up and chance.

    python benchmarks/learnability.py [--run-dir runs/learnability] [--steps N --lr X ...]
"""
import sys

from ps3.demo import main

RECIPE = ["--model", "tiny-synthetic", "--image-size", "256", "--max-steps", "600", "--check-every", "0"]

if __name__ == "__main__":
    sys.exit(main(["--run-dir", "runs/learnability", "--fresh", "--time-limit", "600", *RECIPE, *sys.argv[1:]]))
