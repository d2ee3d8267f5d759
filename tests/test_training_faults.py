"""Resume from damaged or planted checkpoints, clean stops on signals, concurrent launches, world-size
changes (docs/design.md sections 6 and 7.4), with real training processes on the toy of
tests/training_toy.py.

Two module-scoped launches serve several tests each: a one-rank run that leaves three checkpoints, and
two concurrent ``dora-engine train --num-procs 2`` runs (the second one stopped by SIGTERM to its
process group).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_toy import make_toy, resume_tag

pytestmark = pytest.mark.multiproc

HERE = Path(__file__).resolve().parent
TAG2, TAG3 = "step_00000002", "step_00000003"
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _train(config: Path, run: Path, *args: str) -> list[str]:
    """``dora-engine train``; options in ``args`` go before the ``key=value`` overrides (argparse wants them so)."""
    options = [a for i, a in enumerate(args) if a.startswith("--") or i and args[i - 1].startswith("--")]
    overrides = [a for a in args if a not in options]
    return [sys.executable, "-m", "dora_engine.cli", "train", *options, "--config", str(config), f"output_dir={run}",
            *overrides]


def _run(cmd: list[str], log: Path, timeout: int = 300) -> int:
    with open(log, "w") as handle:
        return subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env(), timeout=timeout).returncode


def _steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a line being written
            pass
    return out


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in _steps(run)):
            return
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} never came")


def _error_line(log: Path) -> str:
    """The last line of a failed run's output (a progress bar cleared with carriage returns may precede it)."""
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()][-1]


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.Error:
        return
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _processes_of(run: Path) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(run) in part for part in proc.info["cmdline"] or ()):
            pids.append(proc.info["pid"])
    return pids


# ------------------------------------------------------------------------------------------ one rank


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """A one-rank run of 3 steps with a checkpoint after each (step_1..3 kept)."""
    root = tmp_path_factory.mktemp("faults1")
    config = make_toy(root, n_records=8)
    run = root / "run"
    args = ["train.micro_batch_prompts=4", "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.export=false"]
    code = _run(_train(config, run, *args, "train.max_steps=3"), root / "log")
    assert code == 0, (root / "log").read_text()[-3000:]
    return {"root": root, "config": config, "run": run, "args": args}


def _copy(single: dict, name: str) -> Path:
    run = single["root"] / name
    shutil.copytree(single["run"], run)
    return run


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(single):
    run = _copy(single, "run_truncated")
    optim = run / "checkpoints" / TAG3 / OPTIM_STATES
    size = optim.stat().st_size
    with open(optim, "r+b") as handle:
        handle.truncate(size // 2)
    stale = [run / ".metrics.jsonl.k3j4h5g6.tmp", run / "checkpoints" / TAG2 / ".dora_checkpoint.json.a1b2c3d4.tmp"]
    for path in stale:  # what writes killed before their rename leave
        path.write_text("partial")
    (run / "notes.tmp").write_text("the user's")
    log = single["root"] / "log_truncated"
    code = _run(_train(single["config"], run, *single["args"], "train.max_steps=4", "--resume", "auto"), log)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert (f"skipping checkpoint {run / 'checkpoints' / TAG3}: file {OPTIM_STATES} has {size // 2} bytes, "
            f"the manifest says {size}") in text
    assert f"resumed from {run / 'checkpoints' / TAG2} at step 2" in text
    assert _steps(run) == [1, 2, 3, 4]
    assert not any(p.exists() for p in stale) and (run / "notes.tmp").exists()
    assert "removed 2 temporary file(s) of interrupted writes" in text
    meta = json.loads((run / "checkpoints" / TAG3 / "dora_checkpoint.json").read_text())
    assert meta["files"][OPTIM_STATES]["bytes"] == optim.stat().st_size  # step 3 written afresh


def test_changed_data_content_under_the_same_path_is_refused_or_allowed_by_the_config(single):
    """Shuffled records with inverted scores in the same file: the resume stops with one line naming what
    changed; ``checkpoint.allow_data_change=true`` continues on them with a warning."""
    data = single["root"] / "train.jsonl"
    original = data.read_bytes()
    records = [json.loads(line) for line in original.decode().splitlines()][::-1]
    for record in records:
        for response in record["responses"]:
            response["score"] = -response["score"]
    try:
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        refused = _copy(single, "run_changed_data")
        log = single["root"] / "log_changed_data"
        code = _run(_train(single["config"], refused, *single["args"], "train.max_steps=4", "--resume", "auto"), log)
        assert code != 0 and _steps(refused) == [1, 2, 3], log.read_text()[-3000:]
        line = _error_line(log)
        assert line.startswith(f"dora-engine train: error: data.train content changed since checkpoint {TAG3} "
                               "(SHA-256 of the files, data.train: "), line
        assert line.endswith("restore the data, start a new output_dir, or set checkpoint.allow_data_change=true to "
                             "continue on the changed data"), line

        log = single["root"] / "log_allowed_data"
        code = _run(_train(single["config"], refused, *single["args"], "train.max_steps=4",
                           "checkpoint.allow_data_change=true", "--resume", "auto"), log)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert f"warning: data.train content changed since checkpoint {TAG3} (data.train: " in text
        assert f"resumed from {refused / 'checkpoints' / TAG3} at step 3" in text and _steps(refused) == [1, 2, 3, 4]
    finally:
        data.write_bytes(original)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_complete_one_stays(single):
    """The output folder on a 1000 kB tmpfs (where mounting is allowed), a checkpoint each step: the save
    that finds the disk full ends the run with one line, without the partial tag."""
    mount = single["root"] / "small_disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        run, log = mount / "run", single["root"] / "log_full_disk"
        code = _run(_train(single["config"], run, *single["args"], "checkpoint.keep=5", "train.max_steps=6"), log)
        assert code != 0
        folder = run / "checkpoints"
        last = resume_tag(run)
        failed = f"step_{int(last[5:]) + 1:08d}"
        line = _error_line(log)
        assert line.startswith("dora-engine train: error: No space left on device writing checkpoint "
                               f"{folder / failed} (a checkpoint takes about 0."), line
        assert line.endswith(f"checkpoint {folder / last} stays the one to resume from. Free space there, then "
                             "continue with --resume auto"), line
        assert not (folder / failed).exists() and (folder / last / "dora_checkpoint.json").is_file()
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_planted_payload_runs_nothing_and_names_the_file(single):
    """A checkpoint whose model states unpickle into code, with its manifest forged to match: no code runs."""
    import hashlib

    run = _copy(single, "run_planted")
    marker = single["root"] / "payload-ran"
    tag = run / "checkpoints" / TAG3
    states = torch.load(tag / MODEL_STATES, weights_only=False)
    states["dora_engine"]["note"] = _Payload(marker)
    torch.save(states, tag / MODEL_STATES)
    meta = json.loads((tag / "dora_checkpoint.json").read_text())
    data = (tag / MODEL_STATES).read_bytes()
    meta["files"][MODEL_STATES] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag / "dora_checkpoint.json").write_text(json.dumps(meta))
    log = single["root"] / "log_planted"
    code = _run(_train(single["config"], run, *single["args"], "train.max_steps=4", "--resume", "auto"), log)
    assert code == 2, log.read_text()[-3000:]
    assert _error_line(log) == (
        f"dora-engine train: error: checkpoint {tag}: file {MODEL_STATES} holds GLOBAL io.open, not only tensors "
        "and plain data; it was not loaded"
    )
    assert not marker.exists()
    assert _steps(run) == [1, 2, 3]  # nothing trained, nothing written


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sigint_stops_with_a_checkpoint_and_a_zero_grad_norm_is_warned(single):
    """lr 1e6 drives the gradient norm to exactly 0 within a few steps: a warning; then Ctrl-C stops the run
    after the current step with a checkpoint and exit code 0."""
    root, run = single["root"], single["root"] / "run_sigint"
    log = root / "log_sigint"
    cmd = _train(single["config"], run, "train.micro_batch_prompts=4", "train.lr=1e6", "train.max_steps=100000")
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for_step(run, 5, proc, log)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        _kill_tree(proc.pid)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "the gradient norm has been exactly 0 for 3 steps in a row" in text
    last = max(_steps(run))
    assert f"stopped on SIGINT after step {last}" in text
    assert resume_tag(run) == f"step_{last:08d}"


# ------------------------------------------------------------------------------------- two launches


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    """Two `dora-engine train --num-procs 2` runs at once on this machine, neither given a port: A runs
    until SIGTERM to its process group (what a scheduler sends), B runs 2 steps to the end."""
    root = tmp_path_factory.mktemp("faults2")
    config = make_toy(root, n_records=8)
    common = ["--num-procs", "2", "checkpoint.export=false", "loss.name=simpo", "loss.params={}"]  # no reference pass
    logs = {name: root / f"log_{name}" for name in "AB"}
    runs = {name: root / f"run_{name}" for name in "AB"}
    procs = {}
    try:
        for name, steps in (("A", 100000), ("B", 2)):
            with open(logs[name], "w") as handle:
                procs[name] = subprocess.Popen(
                    _train(config, runs[name], *common, f"train.max_steps={steps}",
                           f"data.ref_cache_dir={root / f'ref_{name}'}"),
                    stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
                )
        codes = {"B": procs["B"].wait(timeout=400)}
        _wait_for_step(runs["A"], 1, procs["A"], logs["A"])
        os.killpg(procs["A"].pid, signal.SIGTERM)
        codes["A"] = procs["A"].wait(timeout=240)
        left = _processes_of(runs["A"])
    finally:
        for proc in procs.values():
            _kill_tree(proc.pid)
    return {"root": root, "config": config, "runs": runs, "logs": logs, "codes": codes, "left": left}


def _port(log: Path) -> int:
    text = log.read_text()
    return int(text.split("--master_port=", 1)[1].split()[0])


def test_two_concurrent_launches_pick_their_own_ports_and_both_finish(launches):
    logs, codes = launches["logs"], launches["codes"]
    assert codes["B"] == 0, logs["B"].read_text()[-3000:]
    assert _steps(launches["runs"]["B"]) == [1, 2]
    assert _port(logs["A"]) != _port(logs["B"])
    assert "EADDRINUSE" not in logs["A"].read_text() + logs["B"].read_text()


def test_sigterm_to_the_process_group_waits_for_the_ranks_checkpoint_and_exits_0(launches):
    log, run = launches["logs"]["A"], launches["runs"]["A"]
    text = log.read_text()
    assert launches["codes"]["A"] == 0, text[-3000:]
    last = max(_steps(run))
    assert f"stopped on SIGTERM after step {last}" in text
    tag = run / "checkpoints" / f"step_{last:08d}"
    assert resume_tag(run) == tag.name
    meta = json.loads((tag / "dora_checkpoint.json").read_text())
    assert meta["world_size"] == 2 and len(meta["files"]) == 4
    assert launches["left"] == []  # the front process returned only after every rank had exited


def test_resuming_a_two_rank_checkpoint_on_one_rank_says_what_to_do(launches):
    run, root = launches["runs"]["A"], launches["root"]
    log = root / "log_world"
    code = _run(_train(launches["config"], run, "checkpoint.export=false", "loss.name=simpo", "loss.params={}",
                       f"data.ref_cache_dir={root / 'ref_A'}", "--resume", "auto"), log)
    assert code == 1, log.read_text()[-3000:]
    tag = resume_tag(run)
    assert _error_line(log) == (
        f"dora-engine train: error: checkpoint {run / 'checkpoints' / tag} was written by 2 rank(s) and this run has "
        "1; ZeRO-3 keeps one optimizer shard per rank, so resume it with 2 rank(s) (dora-engine train --num-procs 2, "
        "or deepspeed --num_gpus 2)"
    )


# ------------------------------------------------------------------------------- processes killed outright


def _process(run: Path, *marks: str) -> int:
    """The pid of the one process of ``run`` whose command line holds every string of ``marks``."""
    import psutil

    found = [proc.info["pid"] for proc in psutil.process_iter(["pid", "cmdline"])
             if proc.info["cmdline"] and str(run) in " ".join(proc.info["cmdline"])
             and all(m in " ".join(proc.info["cmdline"]) for m in marks)]
    assert len(found) == 1, (marks, found)
    return found[0]


def _left_after(run: Path, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while _processes_of(run) and time.time() < deadline:
        time.sleep(0.2)
    return _processes_of(run)


def _buffers_of(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    """Three `dora-engine train --num-procs 2` runs at once, each killed with SIGKILL after its first step:
    'rank' loses its rank 1, 'launcher' DeepSpeed's per-node launcher, 'front' the dora-engine process. While
    'launcher' trains, a second run on its output folder is started."""
    root = tmp_path_factory.mktemp("killed")
    config = make_toy(root, n_records=8)
    names = ("rank", "launcher", "front")
    runs = {name: root / f"run_{name}" for name in names}
    logs = {name: root / f"log_{name}" for name in names}
    common = ["--num-procs", "2", "checkpoint.export=false", "loss.name=simpo", "loss.params={}",
              "train.max_steps=100000", "checkpoint.every=1"]
    procs, out = {}, {"root": root, "config": config, "runs": runs, "logs": logs, "codes": {}, "left": {}}
    try:
        for name in names:
            with open(logs[name], "w") as handle:
                procs[name] = subprocess.Popen(
                    _train(config, runs[name], *common, f"data.ref_cache_dir={root / f'ref_{name}'}"),
                    stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
                )
        for name in names:
            _wait_for_step(runs[name], 1, procs[name], logs[name], timeout=400)
        out["ports"] = {name: _port(logs[name]) for name in names}
        out["buffers"] = {name: _buffers_of(port) for name, port in out["ports"].items()}
        second = root / "log_second"
        out["second_code"] = _run(_train(config, runs["launcher"], *common), second, timeout=120)
        out["front_pid"] = procs["launcher"].pid
        out["victim"] = _process(runs["rank"], "dora_engine.training", "--local_rank=1")
        os.kill(out["victim"], signal.SIGKILL)
        os.kill(_process(runs["launcher"], "deepspeed.launcher.launch"), signal.SIGKILL)
        os.kill(procs["front"].pid, signal.SIGKILL)
        for name in names:
            out["codes"][name] = procs[name].wait(timeout=120)
        for name in names:
            out["left"][name] = _left_after(runs[name], 20)
    finally:
        for name, proc in procs.items():
            _kill_tree(proc.pid)
            for pid in _processes_of(runs[name]):
                _kill_tree(pid)
    return out


def test_a_killed_rank_is_named_with_its_signal_and_how_to_resume(killed):
    log, run = killed["logs"]["rank"], killed["runs"]["rank"]
    assert killed["codes"]["rank"] == 1, log.read_text()[-3000:]
    last = [line for line in log.read_text().splitlines() if line.strip()][-1]
    assert last == (
        f"dora-engine: rank 1 (local rank 1, pid {killed['victim']}) was killed by SIGKILL; the other ranks were "
        f"stopped; resume with: dora-engine train --config {killed['config']} --num-procs 2 --resume auto "
        f"output_dir={run} checkpoint.export=false loss.name=simpo 'loss.params={{}}' train.max_steps=100000 "
        f"checkpoint.every=1 data.ref_cache_dir={killed['root'] / 'ref_rank'}"
    )
    assert killed["left"]["rank"] == []


def test_a_killed_launcher_fails_the_run_and_takes_its_ranks(killed):
    log = killed["logs"]["launcher"]
    assert killed["codes"]["launcher"] == 1, log.read_text()[-3000:]
    last = [line for line in log.read_text().splitlines() if line.strip()][-1]
    assert last.startswith("dora-engine: DeepSpeed's launcher (pid ") and "was killed before its ranks finished" in last
    assert "--resume auto" in last
    assert killed["left"]["launcher"] == []


def test_a_second_run_on_the_same_output_dir_is_refused_with_the_holders_pid(killed):
    text = (killed["root"] / "log_second").read_text()
    assert killed["second_code"] == 1, text[-3000:]
    assert _error_line(killed["root"] / "log_second") == (
        f"dora-engine train: error: output_dir {killed['runs']['launcher']} is in use by pid {killed['front_pid']} "
        f"on {os.uname().nodename} (lock {killed['runs']['launcher'] / '.dora_engine.lock'}); wait for that run to "
        "end or stop it, or choose another output_dir"
    )


def test_a_killed_front_takes_the_launcher_and_ranks_along_and_frees_the_folder(killed):
    from dora_engine.training.output_lock import output_lock

    assert killed["codes"]["front"] == -signal.SIGKILL
    assert killed["left"]["front"] == []
    for run in killed["runs"].values():
        with output_lock(run):  # every lock was released
            pass


def test_no_run_keeps_its_all_reduce_buffers_in_shared_memory(killed):
    """The names are removed once every rank has mapped them: none while the runs trained, none after."""
    assert killed["buffers"] == {name: [] for name in killed["runs"]}
    assert [_buffers_of(port) for port in killed["ports"].values()] == [[], [], []]
