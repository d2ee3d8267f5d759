"""launch/multinode.sh in its no-ssh mode, the way SLURM and Kubernetes jobs start: two "nodes" of one rank
each on this machine (two launcher processes, a hostfile of two host lines, ``--no_ssh``) train exactly as
one node with two ranks (the same per-step losses and gradient norms, bit for bit)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_toy import make_toy

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                              "MASTER_ADDR", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    """A TCP port the system reports free (another process could still take it before the launch does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Both launches at once (different ports): two nodes through launch/multinode.sh with NODE_RANK 0 and 1,
    and one node of two ranks through the deepspeed launcher."""
    root = tmp_path_factory.mktemp("multinode")
    # simpo: no reference model, so no reference pass before the first step
    config = make_toy(root, n_records=8, overrides={"train.max_steps": STEPS, "checkpoint.export": False,
                                                     "loss.name": "simpo", "loss.params": {}})
    hostfile = root / "hostfile"
    hostfile.write_text("# two nodes of one slot, both this machine\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    port = one_port = _free_port()
    while one_port == port:
        one_port = _free_port()
    launcher = f"{sys.executable} -m deepspeed.launcher.runner"
    commands = {
        f"node{rank}": (
            ["bash", str(ROOT / "launch" / "multinode.sh"), str(hostfile), str(config), f"output_dir={root / 'nodes'}"],
            _env(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DEEPSPEED=launcher),
        )
        for rank in (0, 1)
    }
    commands["one"] = (
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(one_port),
         str(ROOT / "launch" / "train.py"), "--config", str(config), f"output_dir={root / 'one'}"],
        _env(),
    )
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, (cmd, env) in commands.items():
            log = stack.enter_context(open(root / f"log_{name}", "w"))
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                           start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            # a failed launch leaves its peer waiting for the rendezvous: stop at the first failure
            while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs.values()):
                    break
                time.sleep(0.5)
            codes = {name: p.poll() for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher and the ranks it started
                    p.wait()
    for name, code in codes.items():
        log = (root / f"log_{name}").read_text()[-4000:]
        assert code == 0, f"{name}: exit {code} (None: stopped, still running)\n{log}"
    return {"root": root, "nodes": root / "nodes", "one": root / "one"}


def test_two_nodes_without_ssh_equal_one_node_of_two_ranks(runs) -> None:
    nodes, one = _metrics(runs["nodes"]), _metrics(runs["one"])
    assert [step for step, *_ in one] == list(range(1, STEPS + 1))
    assert nodes == one  # losses and gradient norms, exactly


def test_each_node_ran_its_own_launcher_with_one_rank(runs) -> None:
    for rank in (0, 1):
        log = (runs["root"] / f"log_node{rank}").read_text()
        assert f"--node_rank={rank}" in log and "--master_addr=127.0.0.1" in log
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log
