"""Worker for the multi-process SigLIP ring-loss test (launched by torchrun, gloo on CPU).

Usage: ``torchrun --standalone --nproc_per_node W tests/_dist_loss_worker.py OUT_DIR``.

Every rank builds the same global batch and tower from a fixed seed, takes its contiguous
slice of the batch, computes the ring loss, backpropagates through a DDP-wrapped tower (DDP
averages the gradients over ranks) and saves its loss, feature gradients and parameter
gradients to ``OUT_DIR/rank{r}.pt``. The test compares them with a one-process run on the
whole batch; :func:`build_problem` is shared with it so both start from the same numbers.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks
IN_DIM = 5
FEAT_DIM = 4
SEED = 1234


class Tower(nn.Module):
    """Two linear "towers" plus the SigLIP logit parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IN_DIM, FEAT_DIM)
        self.text = nn.Linear(IN_DIM, FEAT_DIM)
        # Not the recipe's init (scale 10, bias -10): with that, negative pairs contribute
        # ~e^-10 each and a broken exchange of negatives would hide under the tolerance.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(4.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-1.5))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images), self.text(texts)


def build_problem() -> tuple[Tower, torch.Tensor, torch.Tensor]:
    """The tower and the global (images, texts) inputs, float64, identical on every call."""
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator, dtype=torch.float64)
    texts = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator, dtype=torch.float64)
    torch.manual_seed(SEED)
    tower = Tower().double()
    return tower, images, texts


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ps3.train.loss import siglip_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        tower, images, texts = build_problem()
        local = GLOBAL_BATCH // world
        rows = slice(rank * local, (rank + 1) * local)
        model = DistributedDataParallel(tower)

        image_features, text_features = model(images[rows], texts[rows])
        image_features.retain_grad()
        text_features.retain_grad()
        loss = siglip_loss(
            image_features,
            text_features,
            model.module.logit_scale,
            model.module.logit_bias,
            distributed=True,
        )
        loss.backward()
        torch.save(
            {
                "rank": rank,
                "world": world,
                "loss": loss.detach(),
                "image_features_grad": image_features.grad,
                "text_features_grad": text_features.grad,
                "param_grads": {n: p.grad for n, p in model.module.named_parameters()},
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Tear down together: a rank that leaves while its peer's ring traffic is in flight can
        # abort gloo's I/O thread in the peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: _dist_loss_worker.py OUT_DIR")
    main(sys.argv[1])
