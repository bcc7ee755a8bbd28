"""Memory and latency of a PS3-4K-SigLIP2-sized encoder (random weights) on one 3780 px image.

python benchmarks/memory_4k.py [--device cuda] [--dtype bfloat16]
Prints, for one look and for "all", the peak GPU memory beyond the weights with every layer's
hidden states returned and with only the last layer (num_hidden_layers_to_return=1).
"""
import argparse
import time

import torch

import ps3

SO400M_4K = dict(model_name="vit_so400m_patch14_siglip_378", hidden_size=1152, pool="map",
                 ps3_scales=[378, 756, 1512, 3780], select_based_on_layer=[0, 9, 18, 26], max_select_num=2560)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type != "cuda":
        raise SystemExit("this benchmark reads the CUDA allocator's statistics: run it with --device cuda")
    model = ps3.PS3VisionModel(ps3.PS3VisionConfig(**SO400M_4K)).to(device, dtype).eval()
    weights = torch.cuda.memory_allocated(device)
    x = torch.randn(1, 3, 3780, 3780, device=device, dtype=dtype)
    print(f"weights: {weights / 2**30:.2f} GiB ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"input {x.numel() * x.element_size() / 2**20:.0f} MiB")
    for looks in (1, "all"):
        for layers in (None, 1):
            with torch.no_grad():
                model(x, num_look_close=looks, num_hidden_layers_to_return=layers)  # warm-up
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                out = model(x, num_look_close=looks, num_hidden_layers_to_return=layers)
                torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) - base
            kept = len(out.hidden_states)
            print(f"num_look_close={looks!s:>3} layers kept={kept:>2}: tokens {out.last_hidden_state.shape[1]:>6}, "
                  f"{seconds * 1000:8.1f} ms, peak beyond weights+input {peak / 2**30:6.2f} GiB")
            del out


if __name__ == "__main__":
    main()
