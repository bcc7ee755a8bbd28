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

from ps3.bench import PRESETS, build_model, matmul_rate, timeit, trunk_flops


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
    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype) if args.dtype else (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    arch = dict(PRESETS[args.preset])
    W, D = arch["width"], arch["depth"]
    mlp = int(W * 3.7362)
    rate = matmul_rate(dev, dt, 2048 if dev.type == "cpu" else 8192)
    model = build_model([378, 756, 1512], **arch, device=dev, dtype=dt)
    vm = model.vision_model
    vm.use_cuda_graphs = args.cuda_graphs
    x = torch.randn(1, 3, 1512, 1512, device=dev, dtype=dt)
    r = args.repeats
    res: dict[str, float] = {"matmul_gflops": rate / 1e9}

    def call(**kw):
        with torch.no_grad():
            return model(x, num_hidden_layers_to_return=1, **kw)

    plan = vm.plan(1512, 1512, 1, "all")
    look_tokens = [sum(b[0] for b in look) for look in plan.budgets]
    res["looks"] = len(look_tokens)
    res["one_look_call_s"] = timeit(lambda: call(num_look_close=1), dev, r)
    res["all_batched_call_s"] = timeit(lambda: call(num_look_close="all", max_tokens_per_pass=sum(look_tokens)), dev, r)
    res["all_sequential_call_s"] = timeit(lambda: call(num_look_close="all", max_tokens_per_pass=max(look_tokens)),
                                          dev, r)
    with torch.no_grad():
        res["low_res_s"] = timeit(lambda: vm.forward_low_res(x), dev, r)
        hidden, kv, _ = vm.forward_low_res(x)
        res["selection_probs_s"] = timeit(lambda: vm.selection_probs(x, hidden), dev, r)
        looks = [torch.randn(1, t, W, device=dev, dtype=dt) for t in look_tokens]
        res["trunk_sequential_s"] = timeit(lambda: [vm._blocks(t, kv_cache=kv) for t in looks], dev, r)
        full = [t for t in looks if t.shape[1] == look_tokens[0]]
        batch = torch.cat(full)
        rest = [t for t in looks if t.shape[1] != look_tokens[0]]
        res["trunk_batched_s"] = timeit(
            lambda: (vm._blocks(batch, kv_cache=kv), [vm._blocks(t, kv_cache=kv) for t in rest]),
            dev, r)
    ctx = vm.low_res_token_num
    flops = sum(trunk_flops(t, t + ctx, W, D, mlp) for t in look_tokens)
    res["trunk_gflop"] = flops / 1e9
    res["trunk_sequential_matmul_fraction"] = flops / res["trunk_sequential_s"] / rate
    res["trunk_batched_matmul_fraction"] = flops / res["trunk_batched_s"] / rate
    res["outside_trunk_s"] = res["all_sequential_call_s"] - res["trunk_sequential_s"]
    print(json.dumps(res, indent=2))
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            looks_arg = "all" if args.profile_looks == "all" else int(args.profile_looks)
            call(num_look_close=looks_arg, max_tokens_per_pass=max(look_tokens))
            if dev.type == "cuda":
                torch.cuda.synchronize()
        for key in (["cuda_time_total"] if dev.type == "cuda" else []) + ["self_cpu_time_total"]:
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
