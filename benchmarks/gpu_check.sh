#!/usr/bin/env bash
# The GPU check: run from the repository root on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh            # or PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. the CUDA tests (eager vs CPU, no host waits in a forward, CUDA graphs, S2 on CUDA, CPU-only
#    paths that must stay no-ops on a GPU machine);
# 2. `ps3 bench --preset so400m --device cuda --json` (the PS3-4K-SigLIP2-sized trunk, bf16);
# 3. benchmarks/memory_4k.py (peak GPU memory of one look and "all" at 4K, with and without CUDA graphs).
# Uses the machine's own torch; sets PYTHONPATH=src when the package is not installed. Each step
# has a time limit so the whole check stays under 8 minutes on one H100-class GPU. Logs and the
# bench's JSON go to $OUT_DIR (default gpu_check_out/). Exit status: 0 when every step passed, 1
# when one failed, 2 when there is no CUDA device (nothing is run then).
set -u -o pipefail

PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT_DIR:-gpu_check_out}"
cd "$(dirname "$0")/.." || exit 1

if [ ! -f src/ps3/__init__.py ]; then
    echo "gpu_check: run this from a ps3 checkout (src/ps3 not found)" >&2
    exit 1
fi
if ! "$PYTHON" -c "import ps3" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>&1):" \
         "this check needs an NVIDIA GPU and a CUDA build of torch; nothing was run" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/device.txt"
import torch
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

failed=0
step() {  # step NAME SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    if timeout "$limit" "$@" > >(tee "$OUT_DIR/$name.log") 2>&1; then
        echo "== $name: passed in $((SECONDS - start)) s"
    else
        echo "== $name: FAILED (exit $?) after $((SECONDS - start)) s; log in $OUT_DIR/$name.log"
        failed=1
    fi
}

step cuda_tests 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_vision.py tests/test_s2.py \
    tests/test_runtime.py -k "cuda or gpu"
step bench_so400m 180 bash -c "\"$PYTHON\" -m ps3.cli bench --preset so400m --device cuda --json > \"$OUT_DIR/bench_so400m.json\""
step memory_4k 120 "$PYTHON" benchmarks/memory_4k.py --device cuda --dtype bfloat16

if [ "$failed" -eq 0 ]; then
    echo "gpu_check: every step passed (logs in $OUT_DIR/)"
else
    echo "gpu_check: some step failed (logs in $OUT_DIR/)"
fi
exit "$failed"
