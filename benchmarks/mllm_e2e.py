"""PS3 in an MLLM, end to end, at the tiny PS3 fixture's sizes with ``--llm tiny``: the figures the
``ps3 mllm`` targets are stated in.

* SFT throughput: samples/s of the step loop (steps 6..N, after warm-up; no checkpoint inside),
  computing the low-res pass every step and with ``--cache-low-res`` (``_cached``).
* Memory: resident set size after step 10 and after step 50 (flat: within 10 %), both runs.
* Chat: seconds per answer of a loaded run (first turn, then a look-closer turn), and the wall
  time of a whole ``ps3 mllm chat RUN IMAGE QUESTION`` process (imports and loading included).
* Look closer: a follow-up turn's encoder work (pass 1 on the cached low-res pass + one new look
  with ``old_selection_maps``) against a fresh two-look encode of the same image (low-res pass,
  pass 1, two looks: the same total high-res tokens), medians of repeats.

Prints one JSON line, with the machine's float32 matmul rate measured in the same run.

    PYTHONPATH=src python benchmarks/mllm_e2e.py [--steps 50] [--batch 8] [--out /tmp/mllm_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "ps3_tiny" / "model"


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def sft_run(data: Path, out: Path, steps: int, batch: int, cache: bool = False) -> dict:
    from ps3.mllm.train_setup import MLLMTrainParams
    from ps3.mllm.trainer import train

    stamps, rss = {}, {}

    def on_step(step: int) -> None:
        stamps[step] = time.perf_counter()
        if step in (10, steps):
            rss[step] = rss_mib()

    params = MLLMTrainParams(data=str(data), images=str(data.parent), out=str(out), vision=str(FIXTURE), llm="tiny",
                             stage="sft", steps=steps, batch=batch, budgets=[16, 64], save_every=10 ** 6,
                             log_every=10 ** 6, quiet=True, lr=3e-3, cache_low_res=cache)
    train(params, on_step=on_step)
    first = 5
    rate = (steps - first) * batch / (stamps[steps] - stamps[first])
    tag = "_cached" if cache else ""
    return {f"sft_samples_per_s{tag}": round(rate, 1), f"rss_mib_step10{tag}": round(rss[10], 1),
            f"rss_mib_step{steps}{tag}": round(rss[steps], 1), f"rss_ratio{tag}": round(rss[steps] / rss[10], 3)}


def chat_figures(run: Path, image: Path) -> dict:
    from ps3.mllm import TwoPassPS3
    from ps3.mllm.chat import ChatSession

    helper = TwoPassPS3.from_pretrained(run)
    ChatSession(helper, image).ask("warm up?")
    session = ChatSession(helper, image)
    first = session.ask("what shape is the red object?")
    closer = session.ask("and what colour is it?")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ps3.cli", "mllm", "chat", str(run), str(image), "what shape?"],
                          capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    return {"chat_first_answer_s": round(first.seconds, 3), "chat_look_closer_answer_s": round(closer.seconds, 3),
            "chat_process_wall_s": round(wall, 2), "chat_output": proc.stdout.strip().splitlines()[-1].strip()}


def look_closer_cost(run: Path, image: Path, repeats: int) -> dict:
    from ps3.mllm import TwoPassPS3, encode_for_llm
    from ps3.mllm.collate import load_pixels
    from ps3.mllm.conversations import Conversation
    from ps3.mllm.saving import look_options
    from ps3.runtime import timeit

    helper = TwoPassPS3.from_pretrained(run)
    pixels = load_pixels(Conversation("", image, None, []), helper.processor).unsqueeze(0)
    tok = helper.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *tok("USER: ", add_special_tokens=False)["input_ids"], helper.image_token_id,
                         *tok("what shape?\nASSISTANT:", add_special_tokens=False)["input_ids"]]])
    mask = torch.ones_like(ids)
    options = {key: value for key, value in look_options(helper).items() if key != "num_look_close"}
    with torch.no_grad():
        prompt, low = helper.top_down_prompt(pixels, ids, mask)
        first = encode_for_llm(helper.vision_model, pixels, prompt=prompt, low_res=low, num_look_close=1, **options)

        def closer():
            p, _ = helper.top_down_prompt(pixels, ids, mask, low_res=low)
            return encode_for_llm(helper.vision_model, pixels, prompt=p, low_res=low, num_look_close=1,
                                  old_selection_maps=first.selection_maps, **options)

        def fresh():
            p, fresh_low = helper.top_down_prompt(pixels, ids, mask)
            return encode_for_llm(helper.vision_model, pixels, prompt=p, low_res=fresh_low, num_look_close=2, **options)

        device = torch.device("cpu")
        t_closer, t_fresh = timeit(closer, device, repeats), timeit(fresh, device, repeats)
        tokens = (sum(int(m.sum()) for m in first.selection_maps) + sum(int(m.sum()) for m in closer().selection_maps),
                  sum(int(m.sum()) for m in fresh().selection_maps))
    return {"look_closer_s": round(t_closer, 4), "fresh_two_look_s": round(t_fresh, 4),
            "look_closer_ratio": round(t_closer / t_fresh, 3), "high_res_cells_closer_vs_fresh": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="/tmp/ps3_mllm_bench")
    args = parser.parse_args(argv)
    from transformers.utils import logging

    from ps3.mllm.toy_data import write_toy_data
    from ps3.runtime import matmul_rate

    logging.disable_progress_bar()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = write_toy_data(out / "data", args.records, size=224)
    report = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "matmul_gflops_fp32": round(matmul_rate(torch.device("cpu")) / 1e9, 1)}
    report.update(sft_run(data, out / "run", args.steps, args.batch))
    report.update(sft_run(data, out / "run_cached", args.steps, args.batch, cache=True))
    image = out / "data" / "images" / "scene000001.png"
    report.update(chat_figures(out / "run", image))
    report.update(look_closer_cost(out / "run", image, args.repeats))
    report["matmul_gflops_fp32_after"] = round(matmul_rate(torch.device("cpu")) / 1e9, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
