#!/usr/bin/env bash
# Installs dora-engine into the current Python: torch first when it is missing (the CUDA build where an
# NVIDIA GPU is visible, else the CPU build: a plain `pip install torch` would pull the multi-GB CUDA
# build onto a CPU machine), then the project itself (editable).
# Usage: bash launch/install.sh [--torch-only] [EXTRAS]   e.g. bash launch/install.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "installing torch (CUDA build: an NVIDIA GPU is visible)"
    "$PYTHON" -m pip install -q torch
  else
    echo "installing torch $TORCH_CPU_VERSION (CPU build: no GPU visible)"
    "$PYTHON" -m pip install -q "torch==$TORCH_CPU_VERSION"
  fi
fi
[[ "${1:-}" == "--torch-only" ]] && exit 0
EXTRAS=${1:-}
echo "installing dora-engine${EXTRAS:+ [$EXTRAS]}"
"$PYTHON" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
