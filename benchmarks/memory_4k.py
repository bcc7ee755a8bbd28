"""Memory and latency of a PS3-4K-SigLIP2-sized encoder (random weights) on one 3780 px image.

python benchmarks/memory_4k.py [--device cuda] [--dtype bfloat16]
Prints, for one look and for "all", the peak GPU memory beyond the weights with every layer's
hidden states returned and with only the last layer (num_hidden_layers_to_return=1); the same two
calls with the trunk replayed from CUDA graphs (peak includes the graphs' memory pool); and S2 at
378/756/1512 px on the same trunk (its last layer's features).
"""
import argparse

import torch

import ps3
from ps3.bench import build_model
from ps3.registry import SCALES_1P5K, SCALES_4K
from ps3.runtime import measure, parse_device, parse_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    if device.type != "cuda":
        raise SystemExit("this benchmark reads the CUDA allocator's statistics: run it with --device cuda")
    model = build_model(SCALES_4K, "so400m", device=device, dtype=dtype)
    weights = torch.cuda.memory_allocated(device)
    x = torch.randn(1, 3, SCALES_4K[-1], SCALES_4K[-1], device=device, dtype=dtype)
    print(f"weights: {weights / 2**30:.2f} GiB ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"input {x.numel() * x.element_size() / 2**20:.0f} MiB")
    for looks in (1, "all"):
        for layers in (None, 1):
            with torch.no_grad():
                model(x, num_look_close=looks, num_hidden_layers_to_return=layers)  # warm-up
                with measure(device) as cost:
                    out = model(x, num_look_close=looks, num_hidden_layers_to_return=layers)
            print(f"num_look_close={looks!s:>3} layers kept={len(out.hidden_states):>2}: tokens "
                  f"{out.last_hidden_state.shape[1]:>6}, {cost.seconds * 1000:8.1f} ms, peak beyond weights+input "
                  f"{cost.extra_bytes / 2**30:6.2f} GiB")
            del out
    vm = model.vision_model

    def report(label, fn):
        with torch.no_grad():
            # The peak covers the warm-up too: with graphs that is the capture, whose memory pool
            # stays allocated afterwards.
            with measure(device) as warm:
                fn()
            with measure(device) as cost:
                fn()
        peak = max(warm.peak_bytes, cost.peak_bytes) - warm.start_bytes
        print(f"{label}: {cost.seconds * 1000:8.1f} ms, peak beyond weights+input {peak / 2**30:6.2f} GiB")

    vm.use_cuda_graphs = True
    for looks in (1, "all"):
        report(f"num_look_close={looks!s:>3} layers kept= 1, CUDA graphs",
               lambda: model(x, num_look_close=looks, num_hidden_layers_to_return=1))
    vm.release_cuda_graphs()
    torch.cuda.empty_cache()
    trunk = vm.trunk
    x1512 = torch.randn(1, 3, SCALES_1P5K[-1], SCALES_1P5K[-1], device=device, dtype=dtype)
    report("S2 378/756/1512 px (21 pieces of 378 px), last layer",
           lambda: ps3.s2.multiscale_forward(lambda im: trunk.forward_blocks(trunk.embed(im))[0], x1512,
                                             img_sizes=list(SCALES_1P5K), max_split_size=SCALES_1P5K[0]))


if __name__ == "__main__":
    main()
