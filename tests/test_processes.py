"""The pieces that keep a run's processes and leftovers in order without a training launch (docs/design.md
section 7.7): the output folder's lock, ranks dying with the processes above them, the front's record of
how a rank ended, DeepSpeed's shared-memory buffers and a build lock left by a killed build."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dora_engine import cli
from dora_engine.training import shared_memory
from dora_engine.training.lifeline import FRONT_ENV
from dora_engine.training.output_lock import LOCK_NAME, OutputDirInUse, output_lock
from dora_engine.training.run_state import STATE_ENV, RankWatch, record_exit, record_start, zombie_signal

HERE = Path(__file__).resolve().parent


def _gone(pid: int, timeout: float) -> bool:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------- output lock


def test_a_second_run_on_a_locked_output_dir_is_refused_with_the_holders_pid(tmp_path, capsys):
    from training_toy import make_toy

    config = make_toy(tmp_path / "toy", n_records=8)
    out = tmp_path / "out"
    with output_lock(out):
        assert (out / LOCK_NAME).read_text().split()[1] == str(os.getpid())
        with pytest.raises(OutputDirInUse, match=f"output_dir {out} is in use by pid {os.getpid()} on "):
            with output_lock(out):
                pass
        assert cli.main(["train", "--config", str(config), f"output_dir={out}"]) == 1
        err = capsys.readouterr().err
        assert f"dora-engine train: error: output_dir {out} is in use by pid {os.getpid()}" in err
        assert "Traceback" not in err
    assert not out.exists()  # created for the lock, left empty: removed again
    with output_lock(out):  # released with its holder
        pass


def test_the_lock_dies_with_its_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = f"from dora_engine.training.output_lock import output_lock as l; c = l({str(out)!r}); c.__enter__(); " \
           "print('held', flush=True); import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid} "):
            with output_lock(out):
                pass
        holder.kill()
        holder.wait()
        with output_lock(out):
            pass
        assert out.is_dir()  # it existed before: kept
    finally:
        holder.kill()


# ------------------------------------------------------------------------------------------ lifeline


def _chain(tmp_path: Path, front: int | None) -> tuple[subprocess.Popen, int]:
    """A parent process whose child is a 'rank' (die_with_parent, watch_front) that sleeps; returns the
    parent and the rank's pid."""
    rank = ("from dora_engine.training.lifeline import die_with_parent, watch_front; die_with_parent(); "
            "watch_front(); import time; time.sleep(60)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {rank!r}]); "
              "print(p.pid, flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if front is not None:
        env[FRONT_ENV] = str(front)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    return proc, int(proc.stdout.readline())


def test_a_rank_dies_with_its_launcher(tmp_path):
    launcher, rank = _chain(tmp_path, None)
    try:
        time.sleep(1.0)  # the rank has asked for the signal
        assert not _gone(rank, 0.1)
        launcher.kill()
        launcher.wait()
        assert _gone(rank, 10), "the rank outlived its parent"
    finally:
        launcher.kill()
        os.kill(rank, signal.SIGKILL) if not _gone(rank, 0) else None


def test_a_rank_dies_with_its_front(tmp_path):
    front = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launcher, rank = _chain(tmp_path, front.pid)
    try:
        time.sleep(1.0)
        assert not _gone(rank, 0.1)
        front.kill()
        front.wait()
        assert _gone(rank, 10), "the rank outlived the front"
        assert launcher.poll() is None  # only the rank watches the front
    finally:
        front.kill()
        launcher.kill()
        os.kill(rank, signal.SIGKILL) if not _gone(rank, 0) else None


# ------------------------------------------------------------------------------------------ run state


def test_the_front_names_the_rank_that_was_killed_and_its_signal(tmp_path):
    environ = {STATE_ENV: str(tmp_path), "RANK": "0", "LOCAL_RANK": "0"}
    clean = record_start(environ)
    record_exit(clean, 1, environ)  # failed after its peer died: it is not the one to blame
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "rank-1.json").write_text(json.dumps({"rank": 1, "local_rank": 1, "pid": victim.pid,
                                                      "exit_code": None}))
    watch = RankWatch(tmp_path)
    watch.poll()
    assert watch.deaths == [] and [r.rank for r in watch.unfinished()] == [1]
    victim.kill()
    deadline = time.time() + 10
    while zombie_signal(victim.pid) is None and time.time() < deadline:  # not reaped: a zombie
        time.sleep(0.05)
    assert zombie_signal(victim.pid) == signal.SIGKILL
    watch.poll()
    victim.wait()
    assert [d.describe() for d in watch.deaths] == [f"rank 1 (local rank 1, pid {victim.pid}) was killed by SIGKILL"]
    assert watch.started[0].exit_code == 1 and watch.unfinished() == []


# --------------------------------------------------------------------------------------- shared memory


def test_stale_buffers_are_those_no_process_maps(tmp_path, monkeypatch):
    uid = os.getuid()
    old, young, mapped = (tmp_path / f"{shared_memory.PREFIX}_{uid}_127.0.0.1_{p}_0" for p in (1, 2, 3))
    foreign = tmp_path / f"{shared_memory.PREFIX}_{uid + 1}_127.0.0.1_4_0"
    for path in (old, young, mapped, foreign):
        path.write_bytes(b"\0" * 4096)
    past = time.time() - 2 * shared_memory.STALE_AGE_S
    for path in (old, mapped, foreign):
        os.utime(path, (past, past))
    monkeypatch.setattr(shared_memory, "_mapped_names", lambda: {mapped.name})
    assert shared_memory.stale_buffers(tmp_path) == [old]
    line = shared_memory.remove_stale_buffers(tmp_path)
    assert line == f"removed 1 shared-memory buffer(s) of DeepSpeed (0 MB) in {tmp_path} left by runs that were killed"
    assert not old.exists() and young.exists() and mapped.exists() and foreign.exists()


def test_mapped_names_see_a_mapping_of_this_process():
    path = shared_memory.SHARED_MEMORY / f"dora_engine_test_{os.getpid()}"
    try:
        path.write_bytes(b"\0" * 4096)
    except OSError:
        pytest.skip("no /dev/shm")
    try:
        with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
            assert path.name in shared_memory._mapped_names()
    finally:
        path.unlink()


def test_buffer_name_follows_the_rendezvous():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    assert shared_memory.buffer_name(1, env) == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29512_1"


# ------------------------------------------------------------------------------------------ build lock


def test_a_lock_left_by_a_killed_build_of_deepspeeds_shm_op_is_removed(tmp_path):
    """Without the build lock, torch waits for a leftover ``lock`` forever: the subprocess times out."""
    from torch.utils.cpp_extension import _get_build_directory

    cached = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if not (cached / "deepspeed_shm_comm.so").exists():
        pytest.skip("DeepSpeed's shm op has not been built on this machine yet")
    shutil.copytree(cached, tmp_path / "deepspeed_shm_comm")
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.write_text("")
    code = ("from dora_engine.training.deepspeed_ops import SHM_COMM_BUILDER, load_deepspeed_op; "
            "print(load_deepspeed_op(SHM_COMM_BUILDER))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
    assert f"removed {lock}, left by a build that was killed" in done.stderr
    assert not lock.exists()


def test_a_rank_that_failed_on_its_own_is_not_reported_as_a_peer_killed():
    """A rank exits 3 on its own (its traceback says why); 30 s later the launcher kills the peer that hung in
    a collective: the front adds no line blaming the peer. A rank killed first, whose peer then fails within
    moments, is the one named."""
    import argparse

    from dora_engine.training.commands import failure_line
    from dora_engine.training.run_state import Death, RankRecord

    args = argparse.Namespace(num_procs=2, config="c.yaml", overrides=[])
    now = time.time()

    def watch(exit_at: float, noticed_at: float) -> argparse.Namespace:
        failed = RankRecord(0, 0, 100, exit_code=3, exited_at=exit_at)
        killed = RankRecord(1, 1, 101)
        return argparse.Namespace(started={0: failed, 1: killed},
                                  deaths=[Death(killed, signal.SIGKILL, noticed_at=noticed_at)])

    assert failure_line("train", args, watch(now - 31.0, now), 3, [99]) is None
    line = failure_line("train", args, watch(now - 0.02, now), 137, [99])
    assert line is not None and line.startswith("dora-engine: rank 1 (local rank 1, pid 101) was killed by SIGKILL")


def test_a_rank_whose_peer_is_gone_stops_in_one_line(tmp_path, monkeypatch, capsys):
    """A collective that fails because another rank is gone ends this rank with one line and exit 1 (the
    front names the rank that went); any other error keeps its traceback."""
    from dora_engine.training import commands, lifeline
    from dora_engine.training.process_group import lost_peer

    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(lifeline, "die_with_parent", lambda: None)
    monkeypatch.setattr(lifeline, "watch_front", lambda: None)
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: "
                        "Connection reset by peer\nmore detail")
    assert lost_peer(gone) and not lost_peer(RuntimeError("size mismatch")) and not lost_peer(ValueError("x"))

    def fails(error):
        def run_task(*args):
            raise error
        return run_task

    monkeypatch.setattr(commands, "run_task", fails(gone))
    assert commands.launch_main(["--config", "c.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["dora-engine train: rank 1: stopped, another rank is gone ([../third_party/gloo/gloo/"
                                "transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: Connection reset by peer)"]
    assert json.loads((tmp_path / "rank-1.json").read_text())["exit_code"] == 1
    monkeypatch.setattr(commands, "run_task", fails(RuntimeError("size mismatch")))
    with pytest.raises(RuntimeError, match="size mismatch"):
        commands.launch_main(["--config", "c.yaml"])


def test_a_process_trains_again_after_closing_its_group():
    """A process that closes its group and makes a new one (a benchmark's seeds in one worker, a pipeline's
    rounds) gets the new world group from DeepSpeed, not the destroyed one it cached: ZeRO-3's optimizer
    asks for the rank in it first ("Group ... is not registered" otherwise)."""
    script = """
from datetime import timedelta
import torch.distributed as dist
from deepspeed.utils import groups
from dora_engine.training.process_group import close_distributed, init_distributed

for attempt in range(2):
    init_distributed(timedelta(minutes=1))
    assert dist.get_rank(group=groups._get_data_parallel_group()) == 0
    close_distributed()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
