"""Mixed batches: one ragged call vs a per-image loop vs one call per first-n-scale group.

python benchmarks/ragged.py                                 # CPU: random-weight 1.5K model, width 384, depth 2
python benchmarks/ragged.py --width 768 --depth 4 --device cuda

Eight images of eight sizes (4:1 and 1:4 among them), each with its own token budget and its own
``only_select_first_n_scale`` (given by hand: VILA-HD's rule, ``ps3.first_n_scales_for_sizes``,
never skips a scale on a 1.5K model, and the point is a mix of first-n groups), encoded
three ways in one run: one ragged call; one call per image; one call per first-n value (the
grouping VILA-HD's ``encode_images_ps3`` does). Prints time (median of ``--repeats`` rounds, the
three ways taking turns in alternating order, each call after a warm-up call), the peak memory
of each way (measured in a fresh process on a CPU: peak resident set beyond the model and the
images; on a GPU: the allocator's peak beyond them), and the ragged call's padding: tokens
computed by the trunk's look passes over tokens returned (measured; and, from the look plans
alone, for the same images with token budgets only, where looks of many lengths share masked
passes). One JSON line.
Weights are random (no download): timing does not depend on them.
"""
import argparse
import gc
import json
import multiprocessing
import statistics

import torch

from ps3.bench import build_model, timeit
from ps3.encoder.looks import plan_passes
from ps3.runtime import measure

SCALES = [378, 756, 1512]
WAYS = ("ragged", "loop", "grouped")
# (height, width, num_token_look_close, only_select_first_n_scale) of the eight images.
IMAGES = [(1512, 1512, 2560, 2), (378, 1512, 800, 2), (1512, 378, 1600, 2), (1000, 1400, 2000, 2),
          (600, 800, 400, 1), (2000, 1200, 1200, 2), (500, 900, 640, 1), (1200, 1000, 3000, 2)]


def make_inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, h, w, generator=g) * 2 - 1).to(device, dtype) for h, w, _, _ in IMAGES]
    budgets = [t for _, _, t, _ in IMAGES]
    first_n = [f for _, _, _, f in IMAGES]
    return images, budgets, first_n


def encode(model, way: str, images, budgets, first_n):
    kw = dict(num_hidden_layers_to_return=1)
    with torch.no_grad():
        if way == "ragged":
            return [model(images, num_token_look_close=budgets, only_select_first_n_scale=first_n, **kw)]
        if way == "loop":
            return [model(image[None], num_token_look_close=b, only_select_first_n_scale=f, **kw)
                    for image, b, f in zip(images, budgets, first_n)]
        outs = []
        for m in sorted(set(first_n)):
            pick = [i for i, f in enumerate(first_n) if f == m]
            outs.append(model([images[i] for i in pick], num_token_look_close=[budgets[i] for i in pick],
                              only_select_first_n_scale=m, **kw))
        return outs


def _build(width: int, depth: int, device, dtype):
    return build_model(SCALES, "cpu", width=width, depth=depth, device=device, dtype=dtype)


def _peak_child(way: str, width: int, depth: int, device: str, dtype: str, queue) -> None:
    dev, dt = torch.device(device), getattr(torch, dtype)
    model = _build(width, depth, dev, dt)
    inputs = make_inputs(dev, dt)
    gc.collect()
    with measure(dev) as cost:  # CPU: peak resident set beyond what the model and images hold
        encode(model, way, *inputs)
    queue.put(cost.extra_bytes)


def peak_memory(way: str, model, inputs, args) -> int:
    if args.device.startswith("cuda"):
        with measure(torch.device(args.device)) as cost:
            encode(model, way, *inputs)
        return cost.extra_bytes
    # A fresh process per way, so no way's peak hides another's.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    dtype = str(model.vision_model.trunk.pos_embed.dtype).replace("torch.", "")
    proc = ctx.Process(target=_peak_child, args=(way, args.width, args.depth, args.device, dtype, queue))
    proc.start()
    peak = queue.get(timeout=3600)
    proc.join()
    return int(peak)


def padding(model, inputs) -> tuple[int, int]:
    """(tokens through the trunk's look passes, high-res tokens returned) of the ragged call."""
    trunk = model.vision_model.trunk
    computed = []
    original = trunk.forward_blocks

    def counting(x, kv_cache=None, **kw):
        if kv_cache is not None:
            computed.append(x.shape[0] * x.shape[1])
        return original(x, kv_cache=kv_cache, **kw)

    trunk.forward_blocks = counting
    try:
        out = encode(model, "ragged", *inputs)[0]
    finally:
        del trunk.forward_blocks
    returned = int(out.lengths.sum()) - len(inputs[0]) * model.vision_model.low_res_token_num
    return sum(computed), returned


def planned_padding(model, budgets) -> float:
    """Tokens computed over tokens returned for a ragged call with token budgets only, from the look
    plans (the rows a call packs) without running the model."""
    vm = model.vision_model
    rows = [n for (h, w, _, _), t in zip(IMAGES, budgets)
            for n in (look[0] for look in vm.plan(h, w, 1, num_token_look_close=t).tokens_per_look())]
    passes = plan_passes(rows, len(IMAGES), 1)
    return sum(max(rows[i] for i in p) * len(p) for p in passes) / sum(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype) if args.dtype else (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    model = _build(args.width, args.depth, dev, dt)
    inputs = make_inputs(dev, dt)

    # The ragged call returns what the loop returns (a check that the timed calls do the same work).
    ragged = encode(model, "ragged", *inputs)[0].per_sample()
    for one, ref in zip(ragged, [o for o in encode(model, "loop", *inputs)]):
        err = (one.last_hidden_state.float() - ref.last_hidden_state.float()).abs().max()
        assert err <= 1e-3 * ref.last_hidden_state.float().abs().max(), float(err)

    res = {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "width": args.width, "depth": args.depth,
           "images": [[h, w] for h, w, _, _ in IMAGES], "num_token_look_close": inputs[1],
           "only_select_first_n_scale": inputs[2]}
    # Round-robin, so that a shared machine's slow spells fall on every way alike; every other
    # round in reverse, so that no way always follows the same one (whose freed memory it inherits).
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_ in range(args.repeats):
        for way in (WAYS if round_ % 2 == 0 else WAYS[::-1]):
            times[way].append(timeit(lambda: encode(model, way, *inputs), dev, 1))
    for way in WAYS:
        res[f"{way}_s"] = round(statistics.median(times[way]), 4)
    for way in WAYS:
        res[f"{way}_peak_mb"] = round(peak_memory(way, model, inputs, args) / 2**20, 1)
    computed, returned = padding(model, inputs)
    res.update(look_tokens_computed=computed, look_tokens_returned=returned,
               padding_ratio=round(computed / returned, 4),
               padding_ratio_token_budgets_only=round(planned_padding(model, inputs[1]), 4),
               ragged_vs_loop_time=round(res["ragged_s"] / res["loop_s"], 3),
               grouped_vs_loop_time=round(res["grouped_s"] / res["loop_s"], 3))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
