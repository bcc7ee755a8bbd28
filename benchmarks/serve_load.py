"""Load test of ``ps3 serve`` on loopback: a random-weight model (a ``ps3.registry`` bench preset
with a small text tower) served by a ``ps3 serve`` subprocess, driven by a bounded number of
client threads for a bounded time.

Phases (each against the targets of the serving issue):
1. local batched encoding of the images (decode, preprocess, one list call per --max-batch
   images, in this process before the server starts): the reference throughput;
2. --clients concurrent clients sending the same requests (every image new to the server):
   throughput against (1), p50/p99 latency, error counts;
3. a repeat image with a new prompt against a fresh image (the low-res cache);
4. a look-closer turn against a fresh encode returning the same number of tokens;
5. overload: 4 x --max-queue closed-loop clients for --overload-s seconds: status counts, server
   RSS over time, /healthz polled throughout, cache hit rate.

Figures from a shared machine are noisy: the matmul rate measured at the start says how fast
the machine was. Prints a summary and, with --json, writes every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ps3
from ps3.registry import bench_vision_config
from ps3.runtime import load_model, matmul_rate
from ps3.serve import Client, ServeError

CAPTIONS = ["a red boat on the water", "a green rope", "the white sign on the wall", "a person in a blue coat",
            "text on the page", "a small dog near the door"]


def make_model(directory: Path, args) -> None:
    from ps3.train.model_setup import build_caption_tokenizer

    torch.manual_seed(0)
    scales = [int(s) for s in args.scales.split(",")]
    vision = bench_vision_config("cpu", scales, width=args.width, depth=args.depth)
    vision.max_select_num = args.look_budget
    # The 1512 px selection ConvNet costs seconds per image on a busy 2-core CPU; off by default
    # there so that the run sees hundreds of requests (--highres-module puts it back).
    vision.highres_selection_feature = args.highres_module
    tokenizer = build_caption_tokenizer(CAPTIONS, 16)
    text = ps3.PS3TextConfig(output_dim=args.width, prompt_proj_dim=args.width, context_length=16,
                             vocab_size=tokenizer.vocab_size, width=64, heads=4, layers=2, no_causal_mask=True,
                             pool_type="last", proj_bias=True)
    ps3.PS3Model(ps3.PS3Config(vision_config=vision, text_config=text)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ps3.PS3ImageProcessor(image_size=scales[-1]).save_pretrained(directory)


def make_images(n: int, seed: int) -> list[bytes]:
    """JPEGs of varied sizes with smooth structure and noise (photo-like sizes and decode cost)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(600, 1100)), int(rng.integers(700, 1400))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / rng.uniform(20, 90) + c) * np.cos(y / rng.uniform(20, 90)) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def local_batched(directory: Path, images: list[bytes], prompts: list[str], args) -> float:
    """Images per second of local encoding (decode + preprocess + one list call per batch)."""
    loaded = load_model(directory, text=True)

    def run(batch_images, batch_prompts):
        pixels = [loaded.processor(im)["pixel_values"][0] for im in batch_images]
        with torch.no_grad():
            loaded.vision(pixels, prompt=loaded.prompts(batch_prompts), num_token_look_close=args.tokens)

    run(images[:2], prompts[:2])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), args.max_batch):
        run(images[i:i + args.max_batch], prompts[i:i + args.max_batch])
    return len(images) / (time.perf_counter() - start)


class ServerProcess:
    def __init__(self, directory: Path, args):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "ps3.cli", "serve", str(directory), "--port", str(port),
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                   "--max-queue", str(args.max_queue), "--cache-mb", str(args.cache_mb),
                   "--request-timeout-s", str(args.request_timeout_s)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        with Client(self.url, timeout=2) as probe:
            while True:
                try:
                    if probe.health():
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load_phase(url: str, requests: list[tuple[bytes, dict]], clients: int, duration_s: float | None = None):
    """``clients`` threads; each sends its share of ``requests`` once (or cycles through them until
    ``duration_s`` has passed). Returns (seconds, [(latency, status)])."""
    records: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop_at = None if duration_s is None else time.monotonic() + duration_s

    def client(k: int) -> None:
        mine = requests[k::clients]
        with Client(url, timeout=300) as c:
            i = 0
            while i < len(mine) or (stop_at is not None and time.monotonic() < stop_at):
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                data, kwargs = mine[i % len(mine)]
                start = time.perf_counter()
                try:
                    c.encode(data, **kwargs)
                    status = 200
                except ServeError as exc:
                    status = exc.status
                except Exception:  # noqa: BLE001 - a transport failure counts as an error
                    status = -1
                with lock:
                    records.append((time.perf_counter() - start, status))
                if status == 503:
                    time.sleep(0.05)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, records


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def metric(url: str, name: str) -> float:
    with Client(url) as c:
        return sum(float(line.rsplit(" ", 1)[1]) for line in c.metrics().splitlines()
                   if line.startswith(name) and not line.startswith("#"))


def repeat_and_look_closer(url: str, images: list[bytes], args) -> dict:
    fresh, repeat, turn, fresh_same = [], [], [], []
    with Client(url, timeout=300) as c:
        for k, data in enumerate(images[: len(images) // 2]):
            t0 = time.perf_counter()
            first = c.encode(data, prompt=CAPTIONS[0], num_token_look_close=args.tokens, session=True)
            t1 = time.perf_counter()
            c.encode(data, prompt=CAPTIONS[1], num_token_look_close=args.tokens)
            t2 = time.perf_counter()
            try:
                c.look_closer(first, num_token_look_close=args.tokens, prompt=CAPTIONS[2])
                t3 = time.perf_counter()
                turn.append(t3 - t2)
            except ServeError as exc:
                print(f"look_closer: {exc}", file=sys.stderr)
            other = images[len(images) // 2 + k]
            t4 = time.perf_counter()
            c.encode(other, prompt=CAPTIONS[2], num_token_look_close=args.tokens)
            fresh_same.append(time.perf_counter() - t4)
            fresh.append(t1 - t0)
            repeat.append(t2 - t1)
    out = {"fresh_s": statistics.median(fresh), "repeat_new_prompt_s": statistics.median(repeat),
           "fresh_same_tokens_s": statistics.median(fresh_same)}
    out["repeat_ratio"] = out["repeat_new_prompt_s"] / out["fresh_s"]
    if turn:
        out["look_closer_s"] = statistics.median(turn)
        out["look_closer_ratio"] = out["look_closer_s"] / out["fresh_same_tokens_s"]
    return out


def overload(server: ServerProcess, images: list[bytes], args) -> dict:
    samples, health = [], []
    done = threading.Event()

    def watch() -> None:
        start = time.monotonic()
        with Client(server.url, timeout=10) as c:
            while not done.is_set():
                t = time.monotonic() - start
                samples.append((t, server.rss_mb()))
                try:
                    health.append(c.health())
                except Exception:  # noqa: BLE001 - a failed probe counts as unhealthy
                    health.append(False)
                done.wait(args.overload_s / 60)

    hits0 = metric(server.url, "ps3_serve_cache_hits_total")
    misses0 = metric(server.url, "ps3_serve_cache_misses_total")
    requests = [(images[i % len(images)], {"prompt": CAPTIONS[i % len(CAPTIONS)], "num_token_look_close": args.tokens})
                for i in range(4 * args.max_queue * 4)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    seconds, records = load_phase(server.url, requests, 4 * args.max_queue, duration_s=args.overload_s)
    done.set()
    watcher.join()
    hits = metric(server.url, "ps3_serve_cache_hits_total") - hits0
    misses = metric(server.url, "ps3_serve_cache_misses_total") - misses0
    warm = [rss for t, rss in samples if t >= args.overload_s / 6]
    third = max(1, len(warm) // 3)
    statuses = {str(s): sum(1 for _, x in records if x == s) for s in sorted({x for _, x in records})}
    return {"clients": 4 * args.max_queue, "seconds": seconds, "statuses": statuses,
            "rss_mb_start": samples[0][1], "rss_mb_after_warmup": warm[0] if warm else None,
            "rss_mb_max_after_warmup": max(warm) if warm else None, "rss_mb_end": samples[-1][1],
            "rss_growth_after_warmup": (max(warm) / warm[0] - 1) if warm else None,
            "rss_mb_min_after_warmup": min(warm) if warm else None,
            # The trend, not the peaks of single batches: median RSS of the last third of the
            # run after warm-up against the first third.
            "rss_trend": (statistics.median(warm[-third:]) / statistics.median(warm[:third]) - 1) if warm else None,
            "rss_samples": samples, "healthz_ok": sum(health), "healthz_probes": len(health),
            "cache_hit_rate": hits / max(hits + misses, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="378,756,1512", help="PS3 scales of the random-weight model")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--look-budget", type=int, default=512, help="max_select_num of the model")
    p.add_argument("--highres-module", action="store_true", help="keep the 1512 px selection ConvNet")
    p.add_argument("--tokens", type=int, default=256, help="num_token_look_close of every request")
    p.add_argument("--request-timeout-s", type=float, default=600, help="the server's --request-timeout-s")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests of the throughput phase (distinct images)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--cache-mb", type=float, default=512)
    p.add_argument("--overload-s", type=float, default=60)
    p.add_argument("--json", help="write every figure to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rate = matmul_rate(torch.device("cpu"))
    print(f"machine: float32 matmul {rate / 1e9:.1f} GFLOP/s, {os.cpu_count()} CPUs (shared: figures are noisy)")
    report = {"matmul_gflops": rate / 1e9, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        make_model(directory, args)
        images = make_images(args.requests, seed=1)
        extra = make_images(8, seed=2)
        prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(images))]
        report["local_images_per_s"] = local_batched(directory, images, prompts, args)
        server = ServerProcess(directory, args)
        try:
            load_phase(server.url, [(im, {"num_token_look_close": args.tokens}) for im in extra[:2]], 2)  # warm-up
            requests = [(im, {"prompt": p, "num_token_look_close": args.tokens}) for im, p in zip(images, prompts)]
            seconds, records = load_phase(server.url, requests, args.clients)
            ok = [lat for lat, s in records if s == 200]
            report["served"] = {"images_per_s": len(ok) / seconds, "p50_s": percentile(ok, 50),
                                "p99_s": percentile(ok, 99), "errors": len(records) - len(ok),
                                "batches": metric(server.url, "ps3_serve_batch_size_count")}
            report["served"]["throughput_ratio"] = report["served"]["images_per_s"] / report["local_images_per_s"]
            report["served"]["p99_over_p50"] = report["served"]["p99_s"] / report["served"]["p50_s"]
            report["latency"] = repeat_and_look_closer(server.url, extra[2:], args)
            if args.overload_s > 0:
                report["overload"] = overload(server, images[:16], args)
        finally:
            server.stop()
    summarise(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def summarise(r: dict) -> None:
    s, lat = r["served"], r["latency"]
    print(f"local batched: {r['local_images_per_s']:.2f} images/s")
    print(f"served, {r['args']['clients']} clients: {s['images_per_s']:.2f} images/s = "
          f"{s['throughput_ratio']:.2f}x local "
          f"(target >= 0.9); p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s = {s['p99_over_p50']:.2f}x p50 "
          f"(target <= 3); errors {s['errors']}")
    print(f"repeat image, new prompt: {lat['repeat_new_prompt_s']:.3f} s vs fresh {lat['fresh_s']:.3f} s = "
          f"{lat['repeat_ratio']:.2f}x (target <= 0.6)")
    if "look_closer_ratio" in lat:
        print(f"look-closer turn: {lat['look_closer_s']:.3f} s vs fresh encode of the same tokens "
              f"{lat['fresh_same_tokens_s']:.3f} s = {lat['look_closer_ratio']:.2f}x (target <= 0.6)")
    if "overload" in r:
        o = r["overload"]
        print(f"overload, {o['clients']} clients for {o['seconds']:.0f} s: statuses {o['statuses']}; RSS "
              f"{o['rss_mb_after_warmup']:.0f} MB after warm-up, then {o['rss_mb_min_after_warmup']:.0f}.."
              f"{o['rss_mb_max_after_warmup']:.0f} MB (max +{100 * o['rss_growth_after_warmup']:.1f} %; median of the "
              f"last third vs the first {100 * o['rss_trend']:+.1f} %; target <= 10 %); /healthz {o['healthz_ok']}/"
              f"{o['healthz_probes']} ok; cache hit rate {o['cache_hit_rate']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
