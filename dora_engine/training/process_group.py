"""The process group of a run: where this process sits among the ranks, and joining and leaving the
group (docs/design.md section 6).

``dora-engine train`` alone is a world of one; under the ``deepspeed`` launcher (``--num-procs N``,
``deepspeed launch/train.py``) the launcher's environment names the rank, the local rank and the world.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.training.deepspeed_ops import SHM_COMM_BUILDER, forget_deepspeed_groups, load_deepspeed_op
from dora_engine.training.library_warnings import silence_understood_warnings
from dora_engine.training.shared_memory import release_own_buffer, remove_stale_buffers


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: its global and node-local rank, the ranks on its node and in the world,
    and its device. Files on a node are shared among its ranks by ``local_rank``."""

    rank: int = 0
    local_rank: int = 0
    local_size: int = 1
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[str]) -> list[str]:
        """This rank's share of ``items`` among the ranks of its node (item i goes to local rank i mod local_size)."""
        return [x for i, x in enumerate(items) if i % self.local_size == self.local_rank]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: timedelta) -> Ranks:
    """Join the process group the ``deepspeed`` launcher describes, or make a one-process group.

    ``timeout`` (``train.dist_timeout_minutes``) is how long a collective waits for the other ranks before
    the run fails: rank 0 alone writes the export while the others wait at a barrier, and the ranks hash
    a checkpoint's files before they meet again, which for a large model takes longer than DeepSpeed's
    default of 10 minutes.

    On CPU the names of DeepSpeed's shared-memory all-reduce buffers are removed as soon as every rank
    has mapped them, so that no run leaves them in ``/dev/shm`` (``dora_engine.training.shared_memory``)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python` / `dora-engine train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    silence_understood_warnings()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the process group, so NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        if not torch.cuda.is_available():
            _prepare_shared_memory_all_reduce(local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        if not torch.cuda.is_available():
            if dist.get_world_size() > 1:
                dist.barrier()  # every rank has mapped every rank's buffer
            release_own_buffer(dist.get_rank())
    local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return Ranks(dist.get_rank(), local_rank, local_size, dist.get_world_size(), device)


def _prepare_shared_memory_all_reduce(local_rank: int) -> None:
    """Before DeepSpeed's CPU process group starts: remove the all-reduce buffers killed runs left (local
    rank 0), and build DeepSpeed's shared-memory op under the build lock (section 7.7)."""
    if local_rank == 0:
        removed = remove_stale_buffers()
        if removed:
            print(f"[dora-engine] {removed}", flush=True)
    load_deepspeed_op(SHM_COMM_BUILDER)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (collective: every rank calls it); ``[obj]`` without a process
    group. A group of one gathers too, so that one process exercises what several do."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close_distributed() -> None:
    """Leave the process group at the end of a finished task. A group left to the interpreter's exit
    handlers can abort a rank that has already done its work ("terminate called without an active
    exception" from gloo's threads), which fails the whole launch."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        forget_deepspeed_groups()  # else the next engine of this process gets the destroyed group


# What a collective says when the rank at the other end is gone (gloo's sockets; NCCL's abort), rather than
# a fault of the rank that sees it.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank is gone (killed, or failed on its own):
    the front of a launch names that rank (docs/design.md section 7.7), so this rank need not add a traceback."""
    return isinstance(err, RuntimeError) and any(text in str(err) for text in PEER_LOST)
