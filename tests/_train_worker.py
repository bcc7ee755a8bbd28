"""Worker for the two-process training test (launched by torchrun, gloo on CPU).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/_train_worker.py OUT_DIR [ddp|fsdp]``.

Every rank builds the same micro PS3 model from a fixed seed and the same fixed global batch
(:func:`build_problem`, shared with the test), takes its contiguous half, and runs one real
training step (:class:`ps3.train.loop.PretrainStep`: DDP- or FSDP2-wrapped forward, SigLIP ring loss, box
losses, backward, clipping, AdamW). It saves its loss, gradients and updated parameters (as a
checkpoint gathers them) to ``OUT_DIR/rank{r}.pt``; the test compares them with one process
stepping on the whole batch. Under FSDP it also reloads them into a fresh sharded model and
optimizer, as a resumed run does, and saves what that holds.
"""
from __future__ import annotations

import sys

import torch

GLOBAL_BATCH = 4
IMAGE_SIZE = 64
SEED = 7

MICRO_CONFIG = {
    "vision_config": {
        "model_name": "vit_micro_test_patch8",
        "vit": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 32,
                "global_pool": "map", "class_token": False},
        "hidden_size": 32, "pool": "map", "ps3_scales": [32, 64], "select_based_on_layer": [0, 1],
        "max_select_num": 48, "highres_selection_feature": False,
    },
    "text_config": {
        "width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": None, "output_dim": 32,
        "prompt_proj_dim": 32, "mlp_ratio": 2.0, "pool_type": "last", "no_causal_mask": True, "proj_bias": True,
        "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6},
        "tokenizer_kwargs": {"clean": "canonicalize"},
    },
}
PREPROCESSOR = {"image_size": IMAGE_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                "resize_mode": "squash"}
VOCAB = 20


def build_problem():
    """(PS3Model, global batch dict), identical on every call and every rank."""
    from ps3 import PS3Config, PS3Model
    from ps3.train.model_setup import initialise

    config = PS3Config(**MICRO_CONFIG)
    config.text_config.vocab_size = VOCAB
    torch.manual_seed(SEED)
    model = PS3Model(config)
    initialise(model, "random")
    # Not the recipe's init (scale 10, bias -10): with it, negatives contribute ~e^-10 each and a
    # broken exchange of negatives between ranks would hide under the tolerance.
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
        model.logit_bias.fill_(-1.0)
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randn(GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    ids = torch.randint(2, VOCAB, (GLOBAL_BATCH, 8), generator=generator)
    # Samples 0 and 2 have global captions (whole-image maps), 1 and 3 local boxes: each rank's
    # half then holds the same number of local-caption samples, as the box loss averages per rank.
    gt = torch.ones(GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE)
    gt[1] = 0.0
    gt[1, 20:60, 10:33] = 1.0
    gt[3] = 0.0
    gt[3, 40:63, 41:60] = 1.0
    is_global = torch.tensor([[True], [False], [True], [False]])
    batch = {"pixel_values": pixels, "text_ids": ids, "gt_selection_maps": gt, "is_global_text": is_global}
    return model, batch


def make_step(model, module, distributed: bool, fsdp: bool = False):
    from ps3.train.loop import PretrainStep
    from ps3.train.optim import build_optimizer, build_scheduler

    # AdamW's first step moves every weight by ~lr·sign(grad); eps 1e-4 keeps gradients that are
    # zero up to rounding (e.g. attention key biases, which softmax ignores) from moving by ±lr.
    optimizer = build_optimizer(model, lr=1e-3, wd=0.1, betas=(0.9, 0.95), eps=1e-4, selection_lr=3e-3)
    scheduler = build_scheduler(optimizer, warmup=2, total=10)
    return PretrainStep(module, model, optimizer, scheduler, device=torch.device("cpu"), grad_clip=1.0,
                        bottomup_weight=1.0, topdown_weight=2.0, distributed=distributed, fsdp=fsdp)


def main(out_dir: str, mode: str) -> None:
    import torch.distributed as dist

    from ps3.train.distributed import DistInfo, full_state_dicts, load_full_state_dicts, wrap
    from ps3.train.model_setup import PS3PretrainModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    fsdp = mode == "fsdp"
    model, batch = build_problem()
    local = GLOBAL_BATCH // world
    part = {k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}
    module = wrap(PS3PretrainModule(model), info, fsdp=fsdp)
    step = make_step(model, module, distributed=True, fsdp=fsdp)
    loss = step(part)
    # What a checkpoint would hold: full (gathered) tensors even when sharded.
    params, optim = full_state_dicts(module, model, step.optimizer, fsdp)
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if fsdp and hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = grad.detach().clone()
    reloaded = None
    if fsdp:  # a resumed run: a fresh sharded model and optimizer loaded from those state dicts
        fresh, _ = build_problem()
        fresh_module = wrap(PS3PretrainModule(fresh), info, fsdp=True)
        fresh_step = make_step(fresh, fresh_module, distributed=True, fsdp=True)
        shared = [{"model": params, "optimizer": optim}]
        dist.broadcast_object_list(shared, src=0)  # every rank reads the checkpoint file
        load_full_state_dicts(fresh_module, fresh, fresh_step.optimizer, shared[0], True)
        reloaded, _ = full_state_dicts(fresh_module, fresh, fresh_step.optimizer, True)
    torch.save({"loss": loss.total, "grads": grads, "params": params, "reloaded": reloaded},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # tear down together (see _dist_loss_worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
