#!/usr/bin/env bash
# First contact with a GPU machine: does the project build, pass its GPU tests, run clean under
# compute-sanitizer, train, and how fast is the op? Made for a bare machine without network (torch with
# CUDA, nvcc, ninja, transformers, peft, triton; no deepspeed), runnable by hand on any GPU box.
#
#   benchmarks/gpu_check.sh prepare-wheels [DIR]   # on a machine WITH the package index: the wheels the
#                                                  # GPU machine lacks (benchmarks/gpu_wheels.txt) -> DIR
#   OUT=/path/to/results benchmarks/gpu_check.sh   # on the GPU machine, the wheels in $WHEELS
#
# prepare-wheels downloads binary wheels for the GPU machine's Python and platform (PYVER, default 3.12;
# manylinux x86_64) with `pip download --no-deps --only-binary=:all:`, and builds deepspeed (an sdist) into a
# pure wheel with `DS_BUILD_OPS=0 pip wheel --no-deps` (needs torch where it runs). About 5 MB in all. DIR
# defaults to $WHEELS, else wheels/ in the checkout (ignored by git; the device tool carries it when named
# in `carry`).
#
# The check installs, with `pip install --no-index --no-deps --target $WORK/site`, each wheel of
# benchmarks/gpu_wheels.txt whose module does not import (nothing else; the project runs from this checkout
# through PYTHONPATH), then runs, each step logged to $OUT/logs/<step>.log and its verdict appended to
# $OUT/summary.txt as it ends ($OUT/logs.tar.gz is refreshed after every step, so a run cut off still
# reports what it did):
#   install              the missing wheels (above)
#   build_and_report     just-in-time build of the op + `dora-engine report --verbose` (CUDA self-check)
#   pytest_gpu           `pytest -m gpu` (CUDA vs CPU op vs reference, opcheck on CUDA; JUnit XML)
#   sanitizer_memcheck   compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1: memcheck cannot see
#                        out-of-bounds accesses inside torch's caching pool) and racecheck over
#   sanitizer_racecheck  benchmarks/kernel_smoke.py (every kernel of the op on small inputs)
#   train_smoke          benchmarks/train_smoke.py --device cuda: a tiny Llama, `dora-engine train` 3 steps,
#                        bf16, ZeRO-3, loss_path fused_linear and logits x backend auto and fused, cached
#                        reference log-probs, checkpoint + resume 1 step, every loss within bf16 tolerance
#                        of the CPU fp32 run of the same config
#   bench_target         the H100/H200 target point (bf16, V=128256, T=1024, N=8): fused vs reference, and
#                        the row passes' bandwidth as a share of the HBM bound (its table goes to summary.txt)
#   bench_linear_gpu     the fused-linear targets (bench_linear.py --preset gpu, best of 2)
#   bench_linear_liger   Liger-Kernel's setting (--preset liger), with Liger's chunked loss beside ours
#                        when liger_kernel imports (its wheel is optional in gpu_wheels.txt)
#   bench_linear_liger_dpo  the same point with DPO: ours (single_pass) beside Liger's fused-linear DPO
#                        (optional; only when liger_kernel imports)
#   bench_grid           as much of the full CUDA grid as GRID_BUDGET_S allows (optional)
# The whole check stays within TOTAL_BUDGET_S (default 470 s, under 8 minutes): each step gets at most the
# time left, and one that no longer fits is reported as skipped. Exit code 0 only if every step passed;
# 2 when torch sees no CUDA device (nothing else is run).
# Environment: OUT (required), WHEELS, WORK (scratch: the op's build, the installed wheels, the training
# runs; default build/gpu_check), PYTHON (default python3), TOTAL_BUDGET_S, GRID_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$PWD/wheels}
WHEEL_LIST=benchmarks/gpu_wheels.txt

prepare_wheels() {  # prepare_wheels DIR: the wheels of $WHEEL_LIST for the GPU machine
    local dir=$1 pyver=${PYVER:-3.12} spec module flag binary=() rc=0
    mkdir -p "$dir"
    while read -r spec module flag; do
        case "$spec" in ""|\#*) continue ;; deepspeed==*) continue ;; esac
        binary+=("$spec")
    done <"$WHEEL_LIST"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$dir" "${binary[@]}" || rc=1
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$dir" \
        "$(grep -o '^deepspeed==[^ ]*' "$WHEEL_LIST")" || rc=1
    du -sh "$dir"
    return "$rc"
}

# shellcheck disable=SC2317  # run by the install step through `bash -c`
install_wheels() {  # the wheels of $WHEEL_LIST whose module does not import, into $SITE
    local spec module flag name version file matches files=() rc=0
    while read -r spec module flag; do
        case "$spec" in ""|\#*) continue ;; esac
        if "$PY" -c "import $module" 2>/dev/null; then
            echo "present: $module"
            continue
        fi
        name=${spec%%==*}
        version=${spec#*==}
        matches=("$WHEELS/${name//-/_}-$version-"*.whl)
        file=${matches[0]}
        if [ ! -f "$file" ]; then
            if [ "$flag" = optional ]; then
                echo "skipped (optional, no wheel in $WHEELS): $spec"
            else
                echo "MISSING: $spec does not import and has no wheel in $WHEELS (benchmarks/gpu_check.sh prepare-wheels)"
                rc=1
            fi
            continue
        fi
        echo "install: $file"
        files+=("$file")
    done <"$WHEEL_LIST"
    if [ "${#files[@]}" -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${files[@]}" || rc=1
    fi
    return "$rc"
}

if [ "${1:-}" = prepare-wheels ]; then
    prepare_wheels "${2:-$WHEELS}"
    exit $?
fi

: "${OUT:?set OUT to the folder that receives the results}"
LOGS=$OUT/logs
SUMMARY=$OUT/summary.txt
WORK=${WORK:-$PWD/build/gpu_check}
SITE=$WORK/site
mkdir -p "$LOGS" "$SITE"
: >"$SUMMARY"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
export PATH="$PATH:/usr/local/cuda/bin"
export PYTHONUNBUFFERED=1
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-470}"
GRID_BUDGET_S="${GRID_BUDGET_S:-30}"
deadline=$(($(date +%s) + TOTAL_BUDGET_S))

say() { echo "$*" | tee -a "$SUMMARY"; }
pack() {  # the logs as one file (what a tool that returns few files brings back), refreshed after each step
    tar -czf "$OUT/logs.tar.gz.part" -C "$OUT" logs 2>/dev/null && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$LOGS/torch_probe.log"; then
    say "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); this check needs a GPU"
    pack
    exit 2
fi
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true
say "gpu_check $(date -u +%FT%TZ): $("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, \
CUDA {torch.version.cuda}')" 2>&1); budget $TOTAL_BUDGET_S s"

status=0
run_step() {  # [optional=1] run_step NAME TIMEOUT_S COMMAND...: at most TIMEOUT_S, never past the deadline
    local name=$1 limit=$2 start rc left
    shift 2
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        if [ "${optional:-0}" != 1 ]; then status=1; fi
        say "$name: SKIPPED (total budget of $TOTAL_BUDGET_S s spent)"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    start=$(date +%s)
    echo "== $name (at most $limit s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then status=1; fi
    say "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", time box"))") \
in $(($(date +%s) - start)) s"
    pack
}

sanitizer_bin=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo missing)
if [ "$sanitizer_bin" = missing ]; then  # the steps then fail, saying why
    sanitizer=(sh -c 'echo "compute-sanitizer not found (CUDA toolkit bin/ not on PATH)" >&2; exit 127' sh)
else
    sanitizer=("$sanitizer_bin" --error-exitcode 1)
fi

export -f install_wheels
export PY WHEELS WHEEL_LIST SITE
run_step install 60 bash -c install_wheels
grep -E "^(install|MISSING|skipped)" "$LOGS/install.log" | sed 's/^/  /' >>"$SUMMARY"
run_step build_and_report 180 "$PY" -m dora_engine.cli report --verbose
run_step pytest_gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$LOGS/pytest_gpu.xml" tests
run_step sanitizer_memcheck 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${sanitizer[@]}" --tool memcheck \
    "$PY" benchmarks/kernel_smoke.py
run_step sanitizer_racecheck 75 "${sanitizer[@]}" --tool racecheck "$PY" benchmarks/kernel_smoke.py
rm -rf "$WORK/train_smoke"
run_step train_smoke 150 "$PY" benchmarks/train_smoke.py --device cuda --work "$WORK/train_smoke" \
    --summary "$LOGS/train_smoke.json"
grep -E "^  (ok|FAIL) " "$LOGS/train_smoke.log" >>"$SUMMARY"
cp -r "$WORK/train_smoke/logs" "$LOGS/train_smoke" 2>/dev/null && pack
run_step bench_target 60 "$PY" benchmarks/bench_op.py --device cuda --dtypes bf16 --vocab 128256 --seq 1024 \
    --rows 8 --out "$LOGS/bench_target"
if [ -f "$LOGS/bench_target/results.md" ]; then cat "$LOGS/bench_target/results.md" >>"$SUMMARY"; fi
run_step bench_linear_gpu 100 "$PY" benchmarks/bench_linear.py --preset gpu --repeats 2 \
    --out "$LOGS/bench_linear_gpu.json"
liger_methods=single_pass,recompute,logits_fused,gemms3
if "$PY" -c "import liger_kernel" 2>/dev/null; then liger_methods="$liger_methods,liger_simpo"; fi
run_step bench_linear_liger 100 "$PY" benchmarks/bench_linear.py --preset liger --loss simpo --strategy erm \
    --repeats 2 --methods "$liger_methods" --out "$LOGS/bench_linear_liger.json"
if "$PY" -c "import liger_kernel" 2>/dev/null; then
    optional=1 run_step bench_linear_liger_dpo 80 "$PY" benchmarks/bench_linear.py --preset liger_dpo --repeats 2 \
        --methods single_pass,liger_dpo --out "$LOGS/bench_linear_liger_dpo.json"
fi
optional=1 run_step bench_grid $((GRID_BUDGET_S + 45)) "$PY" benchmarks/bench_op.py --device cuda \
    --time-budget "$GRID_BUDGET_S" --out "$LOGS/bench_grid"
say "total: $((TOTAL_BUDGET_S - (deadline - $(date +%s)))) s of $TOTAL_BUDGET_S s; $([ "$status" -eq 0 ] && echo \
"every step passed" || echo "some steps FAILED or were skipped")"
pack
exit "$status"
