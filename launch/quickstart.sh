#!/usr/bin/env bash
# The whole DoRA pipeline on the embedded synthetic mixture-shift data, with a tiny Llama:
#   data synth -> calibrate (h̃) -> SFT -> reference log-probs -> DoRA alignment -> win rates (oracle judge)
# CPU only: 2 ranks on DeepSpeed's CPU accelerator (gloo), under 15 minutes on 2 cores.
# With GPUs: one rank per GPU. Usage: bash launch/quickstart.sh [WORK_DIR]   (default runs/quickstart)
# Environment: NPROC (ranks; default: the GPU count, else 2), PROMPTS (training prompts, default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import dora_engine, deepspeed, transformers" 2>/dev/null || ! command -v dora-engine >/dev/null; then
  bash launch/install.sh  # a fresh machine: torch (CPU or CUDA build), then the project
fi

WORK=${1:-runs/quickstart}
PROMPTS=${PROMPTS:-256}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c "import torch; print(torch.cuda.device_count() or 2)")
fi
DATA=$WORK/data
START=$(date +%s)
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

step "1/7 synthetic mixture-shift data: $PROMPTS prompts x 4 responses (1 golden + 3 shifted sources)"
dora-engine data synth --out "$DATA/train.jsonl" --num-prompts "$PROMPTS" --k 4 --seed 0 --tokenizer-dir "$WORK/tokenizer"
dora-engine data synth --out "$DATA/heldout.jsonl" --num-prompts 48 --k 2 --seed 1000

step "2/7 tiny Llama (the policy) and tiny BERT (the calibration classifier) over the synthetic vocabulary"
python3 launch/make_tiny_model.py --kind llama --tokenizer "$WORK/tokenizer" --out "$WORK/tiny-llama"
python3 launch/make_tiny_model.py --kind bert --hidden 32 --layers 1 --heads 2 --tokenizer "$WORK/tokenizer" \
  --out "$WORK/tiny-bert"

step "3/7 calibration: golden-vs-source classifiers -> h_tilde"
dora-engine calibrate "$DATA/train.jsonl" --target golden --out "$DATA/train.calibrated.jsonl" \
  --output-dir "$WORK/calibration" --backbone "$WORK/tiny-bert" --encoder finetune --folds 2 --epochs 3 \
  --lr 2e-3 --batch-size 32 --max-length 192 --device cpu

COMMON=(model.path="$WORK/tiny-llama" data.train="[$DATA/train.jsonl]" output_dir="$WORK/sft")
step "4/7 SFT on the golden responses ($NPROC ranks, ZeRO-3)"
dora-engine train --num-procs "$NPROC" --config launch/configs/quickstart_sft.yaml "${COMMON[@]}"

ALIGN=(model.path="$WORK/sft/final" data.train="[$DATA/train.calibrated.jsonl]" output_dir="$WORK/align")
step "5/7 reference log-probs of the SFT model (cached)"
dora-engine ref-logps --num-procs "$NPROC" --config launch/configs/quickstart_align.yaml "${ALIGN[@]}"

step "6/7 DoRA alignment: dpo_pl under robust.strategy dora ($NPROC ranks, ZeRO-3)"
dora-engine train --num-procs "$NPROC" --config launch/configs/quickstart_align.yaml "${ALIGN[@]}"

step "7/7 evaluation: greedy generations judged by the oracle reward against the golden responses"
for model in sft align; do
  dora-engine eval generate --model "$WORK/$model/final" --data "$DATA/heldout.jsonl" \
    --output "$WORK/eval/generations_$model.jsonl" --generator "$model" --temperature 0 --max-new-tokens 48 --batch-size 48
  dora-engine eval winrate --generations "$WORK/eval/generations_$model.jsonl" --data "$DATA/heldout.jsonl" \
    --target-source golden --judge oracle --output "$WORK/eval/winrate_$model.json"
done

step "done in $(( $(date +%s) - START )) s"
cat <<SUMMARY
  training metrics   $WORK/sft/metrics.jsonl, $WORK/align/metrics.jsonl (TensorBoard in */tensorboard when installed)
  training curves    $WORK/sft/metrics.png, $WORK/align/metrics.png
  calibration report $WORK/calibration/
  exported models    $WORK/sft/final, $WORK/align/final   (AutoModelForCausalLM.from_pretrained)
  win rates          $WORK/eval/winrate_sft.json, $WORK/eval/winrate_align.json
SUMMARY
