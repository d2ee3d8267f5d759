#!/usr/bin/env bash
# The whole DoRA pipeline on the embedded synthetic mixture-shift data, with a tiny Llama:
#   data synth -> calibrate (h̃) -> SFT -> DoRA alignment -> generations -> SFT vs aligned
# It ends with one table: the SFT model against the aligned one on held-out prompts whose text training never
# saw (mean oracle reward and win rate against the golden responses, paired bootstrap 95% intervals).
# CPU: 2 ranks on DeepSpeed's CPU accelerator (gloo), under 15 minutes on 2 cores. With GPUs: one rank per GPU.
# A fresh machine needs only Python: the project is installed first when it is not importable.
# Usage: bash launch/quickstart.sh [WORK_DIR]   (default runs/quickstart)
# Environment: NPROC (ranks; default: the GPU count, else 2; 1, 2, 4 or 8: the global batch stays the same).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import dora_engine, deepspeed, transformers" 2>/dev/null || ! command -v dora-engine >/dev/null; then
  bash launch/install.sh  # a fresh machine: torch (CPU or CUDA build), then the project
fi

WORK=${1:-runs/quickstart}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# The settings were chosen for global batches of 64 SFT rows and 8 alignment prompts per optimizer step
# (benchmarks/RESULTS.md, "Quickstart"); every rank takes an equal share, so the rank count divides 8.
for n in 8 4 2 1; do
  if (( n <= NPROC )); then
    (( n < NPROC )) && echo "quickstart: using $n of $NPROC ranks (the rank count must divide 8)"
    NPROC=$n
    break
  fi
done
DATA=$WORK/data
START=$(date +%s)
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

step "1/7 synthetic data: 256 training prompts x 4 responses (half with a golden one), 224 held-out prompts"
# Training prompts come from one half of the prompt texts, held-out ones from the other half (--split).
dora-engine data synth --out "$DATA/train.jsonl" --num-prompts 256 --k 4 --golden-fraction 0.5 --split train \
  --seed 0 --tokenizer-dir "$WORK/tokenizer"
dora-engine data synth --out "$DATA/heldout.jsonl" --num-prompts 224 --k 2 --split eval --seed 1000

step "2/7 a tiny random Llama over the synthetic vocabulary (the policy)"
python3 launch/make_tiny_model.py --kind llama --tokenizer "$WORK/tokenizer" --out "$WORK/tiny-llama"

step "3/7 calibration: golden-vs-source classifiers, cross-fitted -> h_tilde"
dora-engine calibrate "$DATA/train.jsonl" --target golden --out "$DATA/train.calibrated.jsonl" \
  --output-dir "$WORK/calibration" --backbone tfidf-pair --folds 5 --device cpu

COMMON=(model.path="$WORK/tiny-llama" data.train="[$DATA/train.jsonl]" output_dir="$WORK/sft"
        train.micro_batch_prompts=$(( 64 / NPROC )))
step "4/7 SFT on every response of the mixture ($NPROC ranks, ZeRO-3)"
dora-engine train --num-procs "$NPROC" --config launch/configs/quickstart_sft.yaml "${COMMON[@]}"

# rrhf needs no reference model; with a loss that does (dpo_pl, ...), `train` computes and caches the
# reference log-probs first (`dora-engine ref-logps` does only that).
ALIGN=(model.path="$WORK/sft/final" data.train="[$DATA/train.calibrated.jsonl]" output_dir="$WORK/align"
       train.micro_batch_prompts=$(( 8 / NPROC )))
step "5/7 DoRA alignment (rrhf) from the SFT model ($NPROC ranks, ZeRO-3)"
dora-engine train --num-procs "$NPROC" --config launch/configs/quickstart_align.yaml "${ALIGN[@]}"

step "6/7 greedy generations of both models on the held-out prompts"
for model in sft align; do
  dora-engine eval generate --model "$WORK/$model/final" --data "$DATA/heldout.jsonl" \
    --output "$WORK/eval/generations_$model.jsonl" --generator "$model" --temperature 0 --max-new-tokens 48 \
    --batch-size 56
done

step "7/7 SFT vs aligned, judged by the oracle reward"
dora-engine eval compare --baseline "sft=$WORK/eval/generations_sft.jsonl" \
  --candidate "aligned=$WORK/eval/generations_align.jsonl" --data "$DATA/heldout.jsonl" --reward oracle \
  --h-tilde-data "$DATA/train.calibrated.jsonl" --output "$WORK/eval/comparison.json"

step "done in $(( $(date +%s) - START )) s"
cat <<SUMMARY
  comparison         $WORK/eval/comparison.md, $WORK/eval/comparison.json
  training curves    $WORK/sft/metrics.png, $WORK/align/metrics.png (metrics.jsonl beside them)
  calibration report $WORK/calibration/report.md (per-source ROC-AUC, h̃ histograms, reliability diagram)
  exported models    $WORK/sft/final, $WORK/align/final   (AutoModelForCausalLM.from_pretrained)
  generations        $WORK/eval/generations_sft.jsonl, $WORK/eval/generations_align.jsonl
SUMMARY
