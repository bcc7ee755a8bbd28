"""``ps3 bench`` end to end on a narrow trunk: every figure it reports is measured and consistent."""
import json
import math

import pytest


# oneDNN capped at AVX2 is a CPU without bf16 units on any x86 machine: its bf16 products run at
# ~1/60 of float32 and the encoder falls back to float32, whatever this machine has.
@pytest.mark.slow
@pytest.mark.parametrize("onednn_isa", [None, "AVX2"], ids=["this-cpu", "no-bf16-units"])
def test_bench_json_reports_every_figure(onednn_isa, run_cli):
    # In bf16 (the float32 path is the same code): also the CPU's units and both matmul rates.
    env = {"PS3_KERNEL_CACHE": "off", **({"ONEDNN_MAX_CPU_ISA": onednn_isa} if onednn_isa else {})}
    proc = run_cli("bench", "--width", "64", "--depth", "1", "--repeats", "1", "--skip-full-vit", "--json", "--dtype",
                   "bfloat16", env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for key in ("ratio_4k_vs_1p5k_one_look", "speedup_all_batched_vs_sequential", "trunk_matmul_fraction",
                "mem_ratio_4k_vs_1p5k_one_look", "speedup_all_batched_upper_bound", "matmul_gflops", "s2_1512_s"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert res["width"] == 64 and res["depth"] == 1 and res["dtype"] == "bfloat16"
    assert res["matmul_gflops_float32"] > 0 and res["matmul_gflops_bfloat16"] > 0
    assert res["cpu"]["aten_capability"]
    assert res["computes_in"] == ("bfloat16" if res["cpu"]["native_bf16"] else "float32")
    assert "matmul rates measured together" in proc.stderr
    # Every figure is against the rate of the dtype the encoder computes in (the best of two readings).
    assert res["matmul_gflops"] >= res[f"matmul_gflops_{res['computes_in']}"]
    assert math.isclose(res["ratio_4k_vs_1p5k_one_look"], res["one_look_4k_s"] / res["one_look_1p5k_s"])
    assert math.isclose(res["speedup_all_batched_vs_sequential"],
                        res["all_1p5k_sequential_s"] / res["all_1p5k_batched_s"])
    assert res["mem_one_look_1p5k_mb"] > 0 and res["mem_one_look_4k_mb"] > 0
    # The trunk floor is its work at the matmul rate: the measured trunk cannot be far below it.
    assert res["all_1p5k_trunk_floor_s"] < 3 * res["all_1p5k_sequential_trunk_s"]
    # The bounded default leaves the full-image ViT to --full.
    assert res["full"] is False and "full_vit_1512_s" not in res
    # The kernels chosen, with their candidates' times, within the process's timing budget.
    assert "kernels chosen" in proc.stderr and 0 <= res["kernel_timing_s"] <= 1.0 + res["kernel_timing_overrun_s"]
    ops = {c["op"] for c in res["kernels"]}
    assert "conv_stem" in ops and ("attention" in ops) == (res["computes_in"] == "bfloat16")
    for c in res["kernels"]:
        assert c["winner"] in c["seconds"] or not c["source"].startswith("measured"), c


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--device", "nonsense"], "--device: device must be cpu, cuda"),
])
@pytest.mark.slow
def test_bench_user_mistakes_give_one_line(args, message, run_cli):
    proc = run_cli("bench", *args)
    assert proc.returncode == 2 and message in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ps3 bench: error: ")
