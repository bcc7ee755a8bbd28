"""Where the time of a PS3 encode goes, stage by stage (random weights, no download).

python benchmarks/stages.py                                   # CPU preset: width 768, depth 4, fp32
python benchmarks/stages.py --preset so400m --device cuda     # PS3-4K-SigLIP2-sized trunk, bf16
python benchmarks/stages.py --preset so400m --device cuda --cuda-graphs --profile --profile-looks 1

For one 1512 px image and a 1.5K model it times, in one run: the whole call (one look; "all" with
looks batched and one look per pass), the low-res pass, the selection probabilities, and the
trunk alone on the looks' tokens (batched and one look per pass, with their share of the
machine's matmul rate), and what is left outside the trunk. ``ps3 bench`` turns the same figures
into the bound on what batching can give (``speedup_all_batched_upper_bound``).
"""
import argparse
import json

import torch

from ps3.bench import PRESETS, build_model, trunk_flops
from ps3.encoder.cuda_graphs import GraphedBlocks
from ps3.encoder.request import EncodeRequest
from ps3.encoder.selection_pipeline import score_groups
from ps3.registry import SCALES_1P5K
from ps3.runtime import matmul_rate, parse_device, parse_dtype, synchronize, timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the trunk from CUDA graphs")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of 'all'")
    parser.add_argument("--profile-looks", default="all", help="what the profiled call encodes: 'all' or a look count")
    args = parser.parse_args()
    dev = parse_device(args.device)
    dt = parse_dtype(args.dtype, dev)
    if args.cuda_graphs and dev.type != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda")
    rate = matmul_rate(dev, dt)
    model = build_model(SCALES_1P5K, args.preset, device=dev, dtype=dt)
    vm = model.vision_model
    arch = vm.trunk.arch
    vm.use_cuda_graphs = args.cuda_graphs
    # The trunk's blocks as the encoder runs them: replayed from CUDA graphs, or eager.
    blocks = GraphedBlocks(vm.trunk) if args.cuda_graphs else vm.trunk.forward_blocks
    size = SCALES_1P5K[-1]
    x = torch.randn(1, 3, size, size, device=dev, dtype=dt)
    r = args.repeats
    res: dict[str, float] = {"matmul_gflops": rate / 1e9}

    def call(**kw):
        with torch.no_grad():
            return model(x, num_hidden_layers_to_return=1, **kw)

    plan = vm.plan(size, size, 1, "all")
    look_tokens = [sum(b[0] for b in look) for look in plan.budgets]
    res["looks"] = len(look_tokens)
    res["one_look_call_s"] = timeit(lambda: call(num_look_close=1), dev, r)
    res["all_batched_call_s"] = timeit(lambda: call(num_look_close="all", max_tokens_per_pass=sum(look_tokens)), dev, r)
    res["all_sequential_call_s"] = timeit(lambda: call(num_look_close="all", max_tokens_per_pass=max(look_tokens)),
                                          dev, r)
    with torch.no_grad():
        res["low_res_s"] = timeit(lambda: vm.forward_low_res(x), dev, r)
        hidden, kv, _ = vm.forward_low_res(x)
        groups = EncodeRequest.build(x, width=vm.width, num_look_close="all").groups
        # The selection features and the pipeline's scoring step (probability maps per scale).
        res["selection_probs_s"] = timeit(lambda: score_groups(vm, *vm.selection_features(x, hidden), groups), dev, r)
        looks = [torch.randn(1, t, arch.embed_dim, device=dev, dtype=dt) for t in look_tokens]
        res["trunk_sequential_s"] = timeit(lambda: [blocks(t, kv_cache=kv) for t in looks], dev, r)
        full = [t for t in looks if t.shape[1] == look_tokens[0]]
        batch = torch.cat(full)
        rest = [t for t in looks if t.shape[1] != look_tokens[0]]
        res["trunk_batched_s"] = timeit(lambda: (blocks(batch, kv_cache=kv), [blocks(t, kv_cache=kv) for t in rest]),
                                        dev, r)
    ctx = vm.low_res_token_num
    flops = sum(trunk_flops(t, t + ctx, arch) for t in look_tokens)
    res["trunk_gflop"] = flops / 1e9
    res["trunk_sequential_matmul_fraction"] = flops / res["trunk_sequential_s"] / rate
    res["trunk_batched_matmul_fraction"] = flops / res["trunk_batched_s"] / rate
    res["outside_trunk_s"] = res["all_sequential_call_s"] - res["trunk_sequential_s"]
    print(json.dumps(res, indent=2))
    if args.profile:
        looks_arg = "all" if args.profile_looks == "all" else int(args.profile_looks)
        profile(lambda: call(num_look_close=looks_arg, max_tokens_per_pass=max(look_tokens)), dev)


def profile(fn, dev: torch.device) -> None:
    """torch.profiler's top operators of one call of ``fn``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(dev)
    for key in (["cuda_time_total"] if dev.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
