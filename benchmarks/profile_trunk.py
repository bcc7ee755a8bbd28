"""Profile the trunk on one look's tokens (with the low-res KV cache): where the time goes.

python benchmarks/profile_trunk.py [--device cuda] [--preset so400m] [--width W --depth D]
Prints the achieved FLOP rate and the top operators from torch.profiler.
"""
import argparse

import torch

from ps3.bench import LOOK_TOKENS, PRESETS, build_model, trunk_flops
from ps3.registry import SCALES_1P5K
from ps3.runtime import parse_device, parse_dtype, synchronize, timeit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--preset", default="so400m", choices=sorted(PRESETS))
    parser.add_argument("--width", type=int, help="override the preset's width")
    parser.add_argument("--depth", type=int, help="override the preset's depth")
    parser.add_argument("--tokens", type=int, default=LOOK_TOKENS)
    args = parser.parse_args()
    dev = parse_device(args.device)
    dt = parse_dtype(args.dtype, dev)
    model = build_model(SCALES_1P5K, args.preset, width=args.width, depth=args.depth, device=dev, dtype=dt)
    vm = model.vision_model
    arch = vm.trunk.arch
    size = SCALES_1P5K[-1]
    with torch.no_grad():
        _, kv, _ = vm.forward_low_res(torch.randn(1, 3, size, size, device=dev, dtype=dt))
        tokens = torch.randn(1, args.tokens, arch.embed_dim, device=dev, dtype=dt)
        seconds = timeit(lambda: vm.trunk.forward_blocks(tokens, kv_cache=kv), dev, 5)
        flops = trunk_flops(args.tokens, args.tokens + vm.low_res_token_num, arch)
        print(f"trunk (width {arch.embed_dim}, depth {arch.depth}): {seconds * 1000:.2f} ms, "
              f"{flops / seconds / 1e12:.2f} TFLOP/s")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            vm.trunk.forward_blocks(tokens, kv_cache=kv)
            synchronize(dev)
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
