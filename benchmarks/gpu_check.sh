#!/usr/bin/env bash
# GPU check of the fused op on a lent machine (no network; torch with CUDA, nvcc and ninja installed).
#
#   OUT=/path/to/results benchmarks/gpu_check.sh
#
# Installs nothing: the package runs from this checkout (PYTHONPATH). Steps, each logged to $OUT/<step>.log
# and timed in $OUT/summary.txt, most important first:
#   build_and_report     just-in-time build + `dora-engine report` (CUDA self-check)
#   pytest_gpu           the GPU tests (`pytest -m gpu`, JUnit XML)
#   sanitizer_memcheck   compute-sanitizer memcheck over benchmarks/kernel_smoke.py: a small case of every
#   sanitizer_racecheck  kernel (row passes in every dtype, strided, split rows; stage kernels; rescale_),
#                        then racecheck (shared-memory hazards, the class of bug a CPU run cannot show)
#   bench_target         the H100/H200 target point (bf16, V=128256, T=1024, N=8): fused vs reference, and
#                        the row passes' bandwidth as % of the HBM bound (H200 4.8 TB/s, H100 3.35 TB/s;
#                        forward = one read, backward = one read + one write); its table goes to summary.txt
#   bench_linear_gpu     the fused-linear targets (bench_linear.py --preset gpu, best of 2)
#   bench_linear_liger   Liger-Kernel's setting (--preset liger, best of 2; its chunked loss when
#                        liger_kernel imports)
#   bench_grid           as much of the full CUDA grid as GRID_BUDGET_S allows (optional: skipped, not
#                        failed, when the total budget is spent)
# The whole script stays within TOTAL_BUDGET_S (default 450 s, under 8 minutes): each step gets at most the
# time left, and a step that no longer fits is reported as skipped. Exit code 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
export PATH="$PATH:/usr/local/cuda/bin"
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-450}"
GRID_BUDGET_S="${GRID_BUDGET_S:-30}"
deadline=$(($(date +%s) + TOTAL_BUDGET_S))

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$OUT/torch_probe.log"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); this check needs a GPU" \
        | tee "$OUT/summary.txt" >&2
    exit 2
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

status=0
run_step() {  # [optional=1] run_step NAME TIMEOUT_S COMMAND...: at most TIMEOUT_S, never past the deadline
    local name=$1 limit=$2 start rc left
    shift 2
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        if [ "${optional:-0}" != 1 ]; then status=1; fi
        echo "$name: SKIPPED (total budget of $TOTAL_BUDGET_S s spent)" | tee -a "$OUT/summary.txt"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    start=$(date +%s)
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then status=1; fi
    echo "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $(($(date +%s) - start)) s" \
        | tee -a "$OUT/summary.txt"
}

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo missing)
if [ "$sanitizer" = missing ]; then  # the steps then fail, saying why
    sanitizer=(sh -c 'echo "compute-sanitizer not found (CUDA toolkit bin/ not on PATH)" >&2; exit 127' sh)
else
    sanitizer=("$sanitizer" --error-exitcode 1)
fi

run_step build_and_report 180 python3 -m dora_engine.cli report --verbose
run_step pytest_gpu 120 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml" tests
run_step sanitizer_memcheck 75 "${sanitizer[@]}" --tool memcheck python3 benchmarks/kernel_smoke.py
run_step sanitizer_racecheck 75 "${sanitizer[@]}" --tool racecheck python3 benchmarks/kernel_smoke.py
run_step bench_target 60 python3 benchmarks/bench_op.py --device cuda --dtypes bf16 --vocab 128256 --seq 1024 \
    --rows 8 --out "$OUT/bench_target"
if [ -f "$OUT/bench_target/results.md" ]; then cat "$OUT/bench_target/results.md" >>"$OUT/summary.txt"; fi
run_step bench_linear_gpu 100 python3 benchmarks/bench_linear.py --preset gpu --repeats 2 \
    --out "$OUT/bench_linear_gpu.json"
liger_methods=single_pass,recompute,logits_fused,gemms3
if python3 -c "import liger_kernel" 2>/dev/null; then liger_methods="$liger_methods,liger_simpo"; fi
run_step bench_linear_liger 100 python3 benchmarks/bench_linear.py --preset liger --loss simpo --strategy erm \
    --repeats 2 --methods "$liger_methods" --out "$OUT/bench_linear_liger.json"
optional=1 run_step bench_grid $((GRID_BUDGET_S + 45)) python3 benchmarks/bench_op.py --device cuda \
    --time-budget "$GRID_BUDGET_S" --out "$OUT/bench_grid"
echo "total: $((TOTAL_BUDGET_S - (deadline - $(date +%s)))) s of $TOTAL_BUDGET_S s" | tee -a "$OUT/summary.txt"
exit "$status"
