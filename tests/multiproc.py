"""Run a function on several spawned processes joined in one gloo process group (no TCP port to race for)."""

from __future__ import annotations

import io
import os
import queue as queue_module
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn: Callable[..., Any], rank: int, world: int, store: str, args: tuple, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # Bytes, not tensors: torch's queues hand tensors over as shared-memory handles, which break when
        # the sending process exits before the parent has received them.
        buffer = io.BytesIO()
        torch.save(fn(rank, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``[fn(rank, *args) for rank in range(world)]``, each in its own process of a gloo group.

    ``fn`` must be a module-level function (it is pickled by name). A rank's exception fails the test with
    that rank's traceback; a rank that dies without answering fails it with its exit code.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world, store, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(answers) < world:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [p for r, p in enumerate(procs) if r not in answers and p.exitcode not in (None, 0)]
                    if dead:
                        pytest.fail(f"a rank died without answering (exit code {dead[0].exitcode})")
                    if time.monotonic() > deadline:
                        pytest.fail(f"ranks did not answer within {timeout:.0f} s")
                    continue
                if not ok:
                    pytest.fail(f"rank {rank} failed:\n{value}")
                answers[rank] = torch.load(io.BytesIO(value), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [answers[r] for r in range(world)]
