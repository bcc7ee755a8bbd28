"""``python -m ps3.train``: the same flags as ``ps3 train`` (works under ``torchrun -m`` too)."""
import sys

from .commands import main_train

if __name__ == "__main__":
    sys.exit(main_train())
