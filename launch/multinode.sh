#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher, in one of two modes (launch/README.md, "Several nodes"):
#
#   ssh:     bash launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...] [--resume auto]
#            Run once, on the first node of HOSTFILE: the launcher starts every node over passwordless ssh.
#   no-ssh:  NODE_RANK=R bash launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...] [--resume auto]
#            Run on every node (srun, a Kubernetes pod per node, ...), R = this node's line in HOSTFILE
#            (0-based, comment lines not counted); each node starts its own launcher (deepspeed --no_ssh).
#
# Environment: MASTER_ADDR (the rendezvous host, default the first host of HOSTFILE; every node must reach
# it), MASTER_PORT (default 29500, the same on every node), NODE_RANK (selects the no-ssh mode),
# DEEPSPEED (the launcher command, default `deepspeed`; GPUs other than 0..slots-1 of each node are chosen
# there, e.g. DEEPSPEED="deepspeed --include node1:2,3", since the launcher ignores CUDA_VISIBLE_DEVICES),
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA (the network interfaces between nodes, site specific), NCCL_DEBUG,
# OMP_NUM_THREADS.
# Data, model and output_dir paths must be visible on every node (shared filesystem), or the checkpoint
# folders must be per node and complete on each.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: [NODE_RANK=R] launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...]"
HOSTFILE=${1:?$usage}
CONFIG=${2:?$usage}
shift 2

# The rendezvous: the first host of the hostfile, a port free on it.
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a LAUNCHER <<< "${DEEPSPEED:-deepspeed}"

# What every rank gets in its environment (NAME=value lines).
rank_env() {
  echo "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
  echo "TORCH_NCCL_ASYNC_ERROR_HANDLING=1"
  echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
  echo "TOKENIZERS_PARALLELISM=false"
  echo "PYTHONPATH=$PWD"
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
  [[ -n "${NCCL_IB_HCA:-}" ]] && echo "NCCL_IB_HCA=$NCCL_IB_HCA"
  true
}

if [[ -n "${NODE_RANK:-}" ]]; then
  # no-ssh: this node's launcher starts this node's ranks, which inherit this environment.
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || { echo "multinode.sh: NODE_RANK must be a node index, got '$NODE_RANK'" >&2; exit 2; }
  while IFS= read -r line; do export "${line?}"; done < <(rank_env)
  exec "${LAUNCHER[@]}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py --config "$CONFIG" "$@"
fi

# ssh: the launcher forwards DS_ENV_FILE (a file of NAME=value lines) to the ranks of every node.
export DS_ENV_FILE=${DS_ENV_FILE:-$(mktemp "${TMPDIR:-/tmp}/dora_engine_env.XXXXXX")}
rank_env > "$DS_ENV_FILE"
exec "${LAUNCHER[@]}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  launch/train.py --config "$CONFIG" "$@"
