#!/usr/bin/env bash
# GPU check of the fused op on a lent machine (no network; torch with CUDA, nvcc and ninja installed).
#
#   OUT=/path/to/results benchmarks/gpu_check.sh
#
# Installs nothing: the package runs from this checkout (PYTHONPATH). Steps, each logged to $OUT/<step>.log
# and timed in $OUT/summary.txt: just-in-time build + `dora-engine report` (CUDA self-check), the GPU tests
# (`pytest -m gpu`, JUnit XML), the H100/H200 target point (bf16, V=128256, T=1024, N=8), as much of the
# full CUDA grid as fits in the time budget, then the fused-linear targets (bench_linear.py --preset gpu, and
# --preset liger, which adds Liger-Kernel's chunked loss when liger_kernel is importable). About 6 minutes in
# all. Exit code 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
export PATH="$PATH:/usr/local/cuda/bin"
GRID_BUDGET_S="${GRID_BUDGET_S:-60}"

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$OUT/torch_probe.log"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); this check needs a GPU" \
        | tee "$OUT/summary.txt" >&2
    exit 2
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

status=0
run_step() {  # run_step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then status=1; fi
    echo "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $(($(date +%s) - start)) s" \
        | tee -a "$OUT/summary.txt"
}

run_step build_and_report 240 python3 -m dora_engine.cli report --verbose
run_step pytest_gpu 150 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml" tests
run_step bench_target 120 python3 benchmarks/bench_op.py --device cuda --dtypes bf16 --vocab 128256 --seq 1024 \
    --rows 8 --out "$OUT/bench_target"
run_step bench_grid $((GRID_BUDGET_S + 120)) python3 benchmarks/bench_op.py --device cuda \
    --time-budget "$GRID_BUDGET_S" --out "$OUT/bench_grid"
run_step bench_linear_gpu 150 python3 benchmarks/bench_linear.py --preset gpu --out "$OUT/bench_linear_gpu.json"
liger_methods=single_pass,recompute,logits_fused
if python3 -c "import liger_kernel" 2>/dev/null; then liger_methods="$liger_methods,liger_simpo"; fi
run_step bench_linear_liger 150 python3 benchmarks/bench_linear.py --preset liger --loss simpo --strategy erm \
    --methods "$liger_methods" --out "$OUT/bench_linear_liger.json"
exit "$status"
