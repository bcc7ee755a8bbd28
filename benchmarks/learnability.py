"""Learnability benchmark: does pre-training teach the top-down selection to find what a caption
describes? It is the demo pipeline (``ps3.demo``) run fresh, with a 10-minute training limit:
synthetic data (2000 training scenes, seed 0; 200 evaluation scenes, seed 1), ``tiny-synthetic``
trained from random weights on the CPU, exported, and evaluated on the first high-res scale:
precision of the top-k top-down cells (k = cells the captioned box covers), bottom-up, chance.
Exits non-zero unless top-down precision >= 0.6 and >= 0.1 above bottom-up and chance.

    python benchmarks/learnability.py [--run-dir runs/learnability] [--steps N --lr X ...]
"""
import sys

from ps3.demo import main

if __name__ == "__main__":
    sys.exit(main(["--run-dir", "runs/learnability", "--fresh", "--time-limit", "600", *sys.argv[1:]]))
