#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher (ssh to every node of the hostfile).
#   bash launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...] [--resume auto]
# Run it on the first node of HOSTFILE. Data, model and output_dir paths must be visible on every node
# (shared filesystem), or the checkpoint folders must be per node and complete on each.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${1:?usage: launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...]}
CONFIG=${2:?usage: launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...]}
shift 2

# The rendezvous: the first host of the hostfile, a port free on it.
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}

# Forwarded to every rank by the launcher: DS_ENV_FILE names a file of NAME=value lines.
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA: the network interfaces between nodes (site specific).
export DS_ENV_FILE=${DS_ENV_FILE:-$(mktemp "${TMPDIR:-/tmp}/dora_engine_env.XXXXXX")}
{
  echo "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
  echo "TORCH_NCCL_ASYNC_ERROR_HANDLING=1"
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
  echo "TOKENIZERS_PARALLELISM=false"
  echo "PYTHONPATH=$PWD"
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
  [[ -n "${NCCL_IB_HCA:-}" ]] && echo "NCCL_IB_HCA=$NCCL_IB_HCA"
  true
} > "$DS_ENV_FILE"

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  launch/train.py --config "$CONFIG" "$@"
