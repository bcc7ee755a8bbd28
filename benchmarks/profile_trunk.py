"""Profile the trunk on one look's tokens (with the low-res KV cache): where the time goes.

python benchmarks/profile_trunk.py [--device cuda] [--width 1152 --depth 27]
Prints the achieved FLOP rate and the top operators from torch.profiler.
"""
import argparse

import torch

from ps3.bench import build_model, timeit, trunk_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--depth", type=int, default=27)
    parser.add_argument("--tokens", type=int, default=2560)
    args = parser.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model([378, 756, 1512], args.width, args.depth, args.width // 64, dev, dt)
    vm = model.vision_model
    with torch.no_grad():
        _, kv, _ = vm.forward_low_res(torch.randn(1, 3, 1512, 1512, device=dev, dtype=dt))
        tokens = torch.randn(1, args.tokens, args.width, device=dev, dtype=dt)
        seconds = timeit(lambda: vm.trunk.forward_blocks(tokens, kv_cache=kv), dev, 5)
        flops = trunk_flops(args.tokens, args.tokens + vm.low_res_token_num, args.width, args.depth,
                            int(args.width * 3.7362))
        print(f"trunk: {seconds * 1000:.2f} ms, {flops / seconds / 1e12:.1f} TFLOP/s")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            vm.trunk.forward_blocks(tokens, kv_cache=kv)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
