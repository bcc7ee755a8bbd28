"""Memory and latency of a PS3-4K-SigLIP2-sized encoder (random weights) on one 3780 px image.

python benchmarks/memory_4k.py [--device cuda] [--dtype bfloat16]
Prints, for one look and for "all", the peak GPU memory beyond the weights with every layer's
hidden states returned and with only the last layer (num_hidden_layers_to_return=1); the same two
calls with the trunk replayed from CUDA graphs (peak includes the graphs' memory pool); and S2 at
378/756/1512 px on the same trunk (its last layer's features).
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
    vm = model.vision_model

    def measure(label, fn):
        with torch.no_grad():
            # The peak covers the warm-up too: with graphs that is the capture, whose memory pool
            # stays allocated afterwards.
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - base
        print(f"{label}: {seconds * 1000:8.1f} ms, peak beyond weights+input {peak / 2**30:6.2f} GiB")

    vm.use_cuda_graphs = True
    for looks in (1, "all"):
        measure(f"num_look_close={looks!s:>3} layers kept= 1, CUDA graphs",
                lambda: model(x, num_look_close=looks, num_hidden_layers_to_return=1))
    vm.use_cuda_graphs = False
    vm._graphed_blocks = None
    torch.cuda.empty_cache()
    trunk = vm.trunk
    x1512 = torch.randn(1, 3, 1512, 1512, device=device, dtype=dtype)
    measure("S2 378/756/1512 px (21 pieces of 378 px), last layer",
            lambda: ps3.s2.multiscale_forward(lambda im: trunk.forward_blocks(trunk.embed(im))[0], x1512,
                                              img_sizes=[378, 756, 1512], max_split_size=378))


if __name__ == "__main__":
    main()
