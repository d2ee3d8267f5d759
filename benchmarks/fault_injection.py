"""Inject the faults docs/design.md section 7 promises to survive, on a tiny random model on CPU, and check
each promise.

    python benchmarks/fault_injection.py [--only NAME ...] [--work DIR] [--list]

Every fault must end in one of two ways:

- **survived**: the run, resumed or started again, reaches a result identical to an uninterrupted
  reference run (the SHA-256 of the exported ``final/model.safetensors`` and the loss of every step in
  ``metrics.jsonl``);
- **clean**: the command exits non-zero with one line that says what happened (checked against the
  expected wording) and no traceback;

and after each one no process of its runs is left (found by the run's output folder on their command
lines) and no DeepSpeed all-reduce buffer of its rendezvous ports stays in ``/dev/shm``. Every launch has a
deadline, so a hang is a failure too. The faults share launches where one does not disturb another: two
phases of concurrent runs (the faults, then the resumes). The last line of the report is

    faults: T tried, S survived (identical result), C clean (one line), F failed

followed by one line per fault. Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the toy model and data of the training tests

LAUNCH_TIMEOUT_S = 420  # any one launch; a hang fails its fault instead of the script
SHM = Path("/dev/shm")
BUFFER_PREFIX = "deepspeed_allreduce_buffer"
STEPS_2, STEPS_1 = 6, 6  # steps of the two-rank and one-rank runs


# ------------------------------------------------------------------------------------------- verdicts


@dataclass
class Outcome:
    """What one fault ended in: the problems found (none: it kept its promise) and whether the promise was an
    identical result (survived) or one clean line (clean). ``skipped`` holds the reason it was not tried."""

    name: str
    identical: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if self.problems:
            return "failed"
        return "survived" if self.identical else "clean"

    def line(self) -> str:
        if self.skipped is not None:
            return f"  {self.name}: skipped ({self.skipped})"
        detail = "; ".join(self.problems or self.notes)
        return f"  {self.name}: {self.verdict}" + (f" ({detail})" if detail else "")

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok


def summary(outcomes: Iterable[Outcome]) -> str:
    """``faults: T tried, S survived (identical result), C clean (one line), F failed`` and one line per fault."""
    outcomes = list(outcomes)
    tried = [o for o in outcomes if o.verdict != "skipped"]
    count = {v: sum(o.verdict == v for o in tried) for v in ("survived", "clean", "failed")}
    head = (f"faults: {len(tried)} tried, {count['survived']} survived (identical result), {count['clean']} clean "
            f"(one line), {count['failed']} failed")
    return "\n".join([head, *(o.line() for o in outcomes)])


# --------------------------------------------------------------------------------------------- launches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One ``dora-engine train`` launch: its process (a session of its own), output folder, log and port."""

    name: str
    out: Path
    log: Path
    port: int
    proc: subprocess.Popen
    code: int | None = None

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int | None:
        """The exit code, or None when it did not end in time (its processes are then killed)."""
        try:
            self.code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_processes(self.out)
            self.proc.kill()
            self.proc.wait()
            self.code = None
        return self.code

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        """Non-empty lines of the output (a progress bar cleared with carriage returns keeps its last part)."""
        return [part for line in self.text().split("\n") if (part := line.split("\r")[-1].strip())]


class Lab:
    """The work folder, the toy, and the launches made so far."""

    def __init__(self, work: Path):
        from training_toy import make_toy

        self.work = work
        self.cache = work / "cache"  # tokenised data of every run but those given a copy
        self.config1 = make_toy(work / "toy1", n_records=8, overrides={"checkpoint.every": 1})  # dpo: reference pass
        self.config2 = make_toy(work / "toy2", n_records=8, overrides={  # simpo: no reference pass
            "checkpoint.every": 1, "loss.name": "simpo", "loss.params": {}})
        self.runs: list[Run] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env["DORA_ENGINE_CACHE"] = str(self.cache)
        return {**env, **extra}

    def train(self, name: str, config: Path, out: Path, *overrides: str, procs: int = 1, resume: bool = False,
              env: dict[str, str] | None = None) -> Run:
        """Start ``dora-engine train`` on ``config`` with ``overrides`` (``key=value``)."""
        port = free_port()
        options = ["--num-procs", str(procs), "--master-port", str(port)] if procs > 1 else []
        options += ["--resume", "auto"] if resume else []
        extra = {} if procs > 1 else {"MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "dora_engine.cli", "train", *options, "--config", str(config),
               f"output_dir={out}", *overrides]
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env={**self.env(**extra), **(env or {})})
        run = Run(name, out, log, port, proc)
        self.runs.append(run)
        return run


def processes_of(out: Path) -> list[int]:
    """Pids of the processes whose command line names the output folder ``out`` (every process of a run)."""
    import psutil

    mark, pids = f"output_dir={out}", []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and mark in (proc.info["cmdline"] or ()):
            pids.append(proc.info["pid"])
    return pids


def kill_processes(out: Path) -> None:
    for pid in processes_of(out):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def process(out: Path, *marks: str) -> int | None:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if f"output_dir={out}" in line and all(m in line for m in marks):
            return proc.info["pid"]
    return None


def buffers_of(port: int) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"{BUFFER_PREFIX}_{os.getuid()}_*_{port}_*"))


def check_nothing_left(outcome: Outcome, runs: Iterable[Run], wait_s: float = 20) -> None:
    """No process of ``runs`` alive (given ``wait_s`` to go), no all-reduce buffer of their ports in /dev/shm."""
    runs = list(runs)
    deadline = time.monotonic() + wait_s
    while any(processes_of(r.out) for r in runs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for run in runs:
        left = processes_of(run.out)
        outcome.check(not left, f"{run.name}: processes left behind: {left}")
        kill_processes(run.out)
        buffers = buffers_of(run.port)
        outcome.check(not buffers, f"{run.name}: buffers left in {SHM}: {buffers}")


# ------------------------------------------------------------------------------------------ observations


def metrics(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def result(out: Path) -> tuple[str | None, list[tuple[int, float]]]:
    """The SHA-256 of the exported weights (None when there are none) and (step, loss) of every step."""
    weights = out / "final" / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return sha, [(row["step"], row["loss"]) for row in metrics(out)]


def check_identical(outcome: Outcome, run: Run, reference: Run) -> None:
    """``run`` ended with 0 and reached the reference run's weights and losses."""
    if not outcome.check(run.code == 0, f"{run.name}: exit code {run.code}: {tail(run)}"):
        return
    sha, losses = result(run.out)
    ref_sha, ref_losses = result(reference.out)
    outcome.check(ref_sha is not None, f"reference {reference.name} exported no weights (exit {reference.code})")
    outcome.check(losses == ref_losses, f"{run.name}: losses {losses} differ from the reference's {ref_losses}")
    outcome.check(sha == ref_sha, f"{run.name}: final weights differ from the reference's (SHA-256)")
    outcome.identical = True
    resumed = [line for line in run.lines() if "resumed from " in line]
    if resumed:
        outcome.notes.append(f"resumed at step {resumed[-1].rsplit(' at step ', 1)[-1].split()[0]}, identical")


def check_one_line(outcome: Outcome, run: Run, starts: str, contains: Iterable[str] = (), code: int | None = None,
                   peers_may_trace: bool = False) -> None:
    """``run`` failed (exit ``code`` when given, else non-zero) and its last line starts with ``starts``,
    contains ``contains``, and no traceback came before it. With ``peers_may_trace`` (a rank was killed and the
    run is resumed to an identical result as well) the surviving ranks' tracebacks before that line are noted
    instead: docs/design.md section 7.7 promises the line after the ranks' output."""
    if run.code is None:
        outcome.problems.append(f"{run.name}: no exit within {LAUNCH_TIMEOUT_S} s")
        return
    outcome.check(run.code != 0 if code is None else run.code == code, f"{run.name}: exit code {run.code}")
    traced = sorted({line.split(":", 1)[0] for line in run.lines() if "Traceback (most recent call last)" in line})
    if traced and peers_may_trace:
        outcome.notes.append(f"note: a traceback of {', '.join(traced)} precedes the line")
    else:
        outcome.check(not traced, f"{run.name}: a traceback in its output")
    last = (run.lines() or [""])[-1]
    ok = last.startswith(starts) and all(part in last for part in contains)
    if outcome.check(ok, f"{run.name}: last line {last!r}"):
        outcome.notes.append(f"exit {run.code}: {shorten(last)}")


def check_said(outcome: Outcome, runs: Run | list[Run], *parts: str) -> None:
    """One of ``runs`` printed a line holding every string of ``parts``."""
    runs = runs if isinstance(runs, list) else [runs]
    said = [line for run in runs for line in run.lines() if all(p in line for p in parts)]
    if outcome.check(bool(said), f"{', '.join(r.name for r in runs)}: no line with {parts}"):
        outcome.notes.append(shorten(said[0]))


def tail(run: Run) -> str:
    return " | ".join(run.lines()[-3:])[-400:]


def shorten(text: str, width: int = 150) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def wait_until(predicate: Callable[[], bool], runs: Iterable[Run], timeout: float = LAUNCH_TIMEOUT_S,
               poll: float = 0.1) -> bool:
    """Poll ``predicate`` until true; False when it timed out or one of ``runs`` ended first."""
    runs = list(runs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if any(r.proc.poll() is not None for r in runs):
            return predicate()
        time.sleep(poll)
    return False


def has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("step_*/dora_checkpoint.json"))


def saving(out: Path) -> bool:
    """A checkpoint tag is being written: its folder exists, its manifest not yet."""
    try:
        entries = list(os.scandir(out / "checkpoints"))
    except FileNotFoundError:
        return False
    return any(e.name.startswith("step_") and not os.path.exists(os.path.join(e.path, "dora_checkpoint.json"))
               for e in entries)


# ------------------------------------------------------------------------------------------------ damage


def garble_in_place(path: Path) -> None:
    """Rewrite bytes in the second half of ``path`` with others, keeping its size."""
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 2, len(blob) - 8, 7):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


def garble_values(path: Path) -> None:
    """Change the values a ``ref_logps-*.pt`` file stores, keeping its size (tensor bytes are stored as is)."""
    import torch

    ref = torch.load(path, weights_only=True)["ref_logps"]
    blob, stored = path.read_bytes(), ref.numpy().tobytes()
    at = blob.index(stored)
    path.write_bytes(blob[:at] + (ref + 1.0).numpy().tobytes() + blob[at + len(stored):])


def arrow_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("tokenised/tokens-*/data/*.arrow"))


def changed_records(path: Path) -> bytes:
    """The records of ``path`` reversed with their scores negated: same path, other content."""
    records = [json.loads(line) for line in path.read_text().splitlines()][::-1]
    for record in records:
        for response in record["responses"]:
            response["score"] = -response["score"]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def shm_op_build_dir() -> Path | None:
    """The build folder of DeepSpeed's shared-memory op when it has been built on this machine."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    return folder if (folder / "deepspeed_shm_comm.so").exists() else None


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1000k"):
    """A tmpfs of ``size`` at ``path``; yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted and subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------------------------- faults

FAULTS = ("kill-rank", "kill-launcher", "kill-front", "locked-output-dir", "kill-during-checkpoint", "changed-data",
          "garbled-tokenised-cache", "garbled-ref-cache", "truncated-tokenised-cache", "stale-build-lock",
          "stale-shm-buffer", "full-disk")


def inject(work: Path, only: set[str]) -> list[Outcome]:
    """Run the faults of ``only`` (with the reference runs they need) and return their outcomes."""
    lab = Lab(work)
    outcomes = {name: Outcome(name) for name in FAULTS if name in only}
    want = outcomes.__contains__
    one_rank = want("kill-during-checkpoint") or want("changed-data") or any(
        want(n) for n in ("garbled-tokenised-cache", "garbled-ref-cache", "truncated-tokenised-cache",
                          "stale-build-lock", "stale-shm-buffer"))
    kills = [n for n in ("kill-rank", "kill-launcher", "kill-front") if want(n)]
    if want("locked-output-dir") and "kill-launcher" not in kills:
        kills.append("kill-launcher")  # the second run goes to the launcher victim's folder
    try:
        _phase_one(lab, outcomes, kills, one_rank)
        _phase_two(lab, outcomes, kills, one_rank)
    finally:
        for run in lab.runs:
            if run.proc.poll() is None:
                kill_processes(run.out)
                run.proc.kill()
    return list(outcomes.values())


def _phase_one(lab: Lab, outcomes: dict[str, Outcome], kills: list[str], one_rank: bool) -> None:
    """Reference runs and the victims of the kills, concurrently; each victim is killed once it has a checkpoint
    (during a checkpoint write for the one-rank victim). A second run is started on the launcher victim's
    folder while it holds it."""
    w, state = lab.work, {}
    lab.ref2 = lab.train("reference-2rank", lab.config2, w / "ref2", f"train.max_steps={STEPS_2}", procs=2) if kills \
        else None
    lab.victims = {n: lab.train(n, lab.config2, w / n, f"train.max_steps={STEPS_2}", procs=2) for n in kills}
    if one_rank:
        lab.ref1 = lab.train("reference-1rank", lab.config1, w / "ref1", f"train.max_steps={STEPS_1}")
        victim_data = w / "toy1" / "train_victim.jsonl"  # its own copy: changed-data edits it
        shutil.copy(w / "toy1" / "train.jsonl", victim_data)
        lab.ckpt_victim = lab.train("kill-during-checkpoint", lab.config1, w / "ckpt", f"train.max_steps={STEPS_1}",
                                    f"data.train=[{victim_data}]")
        lab.victim_data = victim_data

    second = None
    pending = dict(lab.victims)
    if one_rank:
        pending["kill-during-checkpoint"] = lab.ckpt_victim
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for name, run in list(pending.items()):
            if run.proc.poll() is not None:
                del pending[name]
                if name in outcomes:
                    outcomes[name].problems.append(f"the run ended (exit {run.proc.returncode}) before the fault: "
                                                   f"{tail(run)}")
                continue
            if name == "kill-during-checkpoint":  # a later save, so that a complete checkpoint is there to resume
                if has_checkpoint(run.out) and saving(run.out):
                    os.kill(run.proc.pid, signal.SIGKILL)
                    state[name] = True
                    del pending[name]
                continue
            if name == "kill-launcher" and "locked-output-dir" in outcomes:
                if second is None:  # while the victim holds its folder, a second run on it
                    if (run.out / ".dora_engine.lock").exists():
                        second = lab.train("second-run", lab.config2, run.out, f"train.max_steps={STEPS_2}")
                    continue
                if second.proc.poll() is None:
                    continue
            if has_checkpoint(run.out):
                target = victim_pid(name, run)
                if target is not None:
                    os.kill(target, signal.SIGKILL)
                    state[name], state[f"{name}-pid"] = True, target
                    del pending[name]
        time.sleep(0.002 if "kill-during-checkpoint" in pending else 0.1)
    for name in pending:
        if name in outcomes:
            outcomes[name].problems.append("the moment to inject the fault never came")
    for run in lab.runs:
        run.wait()

    if second is not None:
        second.wait(60)
        holder = lab.victims["kill-launcher"].proc.pid
        check_one_line(outcomes["locked-output-dir"], second, "dora-engine train: error: output_dir ",
                       [f"is in use by pid {holder} on {os.uname().nodename}"], code=1)
        check_nothing_left(outcomes["locked-output-dir"], [second])
    elif "locked-output-dir" in outcomes:
        outcomes["locked-output-dir"].problems.append("the launcher victim never took its lock")
    for name in ("kill-rank", "kill-launcher", "kill-front"):
        if name not in outcomes or not state.get(name):
            continue
        run, outcome = lab.victims[name], outcomes[name]
        if name == "kill-rank":
            check_one_line(outcome, run, f"dora-engine: rank 1 (local rank 1, pid {state['kill-rank-pid']}) was killed "
                           "by SIGKILL", ["--resume auto"], code=1, peers_may_trace=True)
        elif name == "kill-launcher":
            check_one_line(outcome, run, "dora-engine: DeepSpeed's launcher (pid ",
                           ["was killed before its ranks finished", "--resume auto"], code=1, peers_may_trace=True)
        else:
            outcome.check(run.code == -signal.SIGKILL, f"front exit code {run.code}")
        check_nothing_left(outcome, [run])
        if name == "kill-front":
            from dora_engine.training.output_lock import OutputDirInUse, output_lock

            try:
                with output_lock(run.out):
                    pass
            except OutputDirInUse as err:
                outcome.problems.append(f"the lock was not released: {err}")
    if one_rank and "kill-during-checkpoint" in outcomes and state.get("kill-during-checkpoint"):
        outcome, run = outcomes["kill-during-checkpoint"], lab.ckpt_victim
        outcome.check(saving(run.out), "the kill landed after the checkpoint was complete")
        outcome.notes.append("killed while writing a checkpoint")
        check_nothing_left(outcome, [run])
    for ref in (lab.ref2, getattr(lab, "ref1", None)):
        if ref is not None and ref.code != 0:
            for outcome in outcomes.values():
                outcome.problems.append(f"reference {ref.name} failed (exit {ref.code}): {tail(ref)}")


def victim_pid(fault: str, run: Run) -> int | None:
    """The process a kill fault kills: rank 1, DeepSpeed's per-node launcher, or the front."""
    if fault == "kill-rank":
        return process(run.out, "dora_engine.training", "--local_rank=1")
    if fault == "kill-launcher":
        return process(run.out, "deepspeed.launcher.launch")
    return run.proc.pid


def _phase_two(lab: Lab, outcomes: dict[str, Outcome], kills: list[str], one_rank: bool) -> None:
    """The resumes of the killed runs, the damaged caches, the full disk and the stale leftovers, concurrently;
    the changed-data refusal runs before the resume of its victim."""
    w, want = lab.work, outcomes.__contains__
    planted: dict[str, Path] = {}
    first = len(lab.runs)
    if want("stale-shm-buffer"):  # before this phase's launches: any of them may find it first
        planted["buffer"] = SHM / f"{BUFFER_PREFIX}_{os.getuid()}_127.0.0.1_{free_port()}_0"
        planted["buffer"].write_bytes(b"\0" * 4096)
        past = time.time() - 300
        os.utime(planted["buffer"], (past, past))

    def later() -> list[Run]:
        return lab.runs[first:]

    resumes = {n: lab.train(f"{n}-resume", lab.config2, w / n, f"train.max_steps={STEPS_2}",
                            procs=2, resume=True) for n in kills if want(n) and not outcomes[n].problems}
    fresh: dict[str, Run] = {}
    if one_rank and lab.ref1.code == 0:
        if want("garbled-tokenised-cache") or want("garbled-ref-cache"):
            cache = w / "cache-garbled"
            shutil.copytree(lab.cache, cache)
            shutil.copytree(w / "toy1" / "ref_cache", w / "ref-garbled")
            if want("garbled-tokenised-cache"):
                for arrow in arrow_files(cache):
                    garble_in_place(arrow)
            if want("garbled-ref-cache"):
                for file in (w / "ref-garbled").glob("ref_logps-*.pt"):
                    garble_values(file)
            fresh["garbled"] = lab.train("garbled-caches", lab.config1, w / "garbled", f"train.max_steps={STEPS_1}",
                                         f"data.ref_cache_dir={w / 'ref-garbled'}",
                                         env={"DORA_ENGINE_CACHE": str(cache)})
        if want("truncated-tokenised-cache") or want("stale-build-lock") or want("stale-shm-buffer"):
            cache, env = w / "cache-truncated", {}
            shutil.copytree(lab.cache, cache)
            env["DORA_ENGINE_CACHE"] = str(cache)
            if want("truncated-tokenised-cache"):
                for arrow in arrow_files(cache):
                    os.truncate(arrow, arrow.stat().st_size // 2)
            if want("stale-build-lock"):
                built = shm_op_build_dir()
                if built is None:
                    outcomes["stale-build-lock"].skipped = "DeepSpeed's shm op was never built here"
                else:
                    extensions = w / "torch_extensions"
                    shutil.copytree(built, extensions / built.name)
                    planted["lock"] = extensions / built.name / "lock"
                    planted["lock"].write_text("")
                    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
            fresh["leftovers"] = lab.train("leftovers", lab.config1, w / "leftovers", f"train.max_steps={STEPS_1}",
                                           env=env)
    full_disk = None
    with small_disk(w / "small_disk") as mounted:
        if want("full-disk"):
            if not mounted:
                outcomes["full-disk"].skipped = "mounting a tmpfs is not allowed here"
            else:
                full_disk = lab.train("full-disk", lab.config1, w / "small_disk" / "run", "train.max_steps=6",
                                      "checkpoint.keep=5", "loss.name=simpo", "loss.params={}")
        if one_rank and (want("changed-data") or want("kill-during-checkpoint")) and lab.ckpt_victim.code is not None:
            _changed_data_then_resume(lab, outcomes)
        for run in [*resumes.values(), *fresh.values(), *([full_disk] if full_disk else [])]:
            run.wait()
        if full_disk is not None:
            outcome = outcomes["full-disk"]
            check_one_line(outcome, full_disk, "dora-engine train: error: No space left on device writing checkpoint ",
                           ["stays the one to resume from", "--resume auto"])
            partial = [p for p in (full_disk.out / "checkpoints").glob("step_*")
                       if not (p / "dora_checkpoint.json").exists()]
            outcome.check(not partial, f"partial checkpoints left: {partial}")
            check_nothing_left(outcome, [full_disk])

    for name, run in resumes.items():
        check_identical(outcomes[name], run, lab.ref2)
        check_nothing_left(outcomes[name], [run])
    if "garbled" in fresh:
        run = fresh["garbled"]
        for name, parts in (("garbled-tokenised-cache", ("warning: tokenised data in", "tokenising again")),
                            ("garbled-ref-cache", ("warning: reference log-probs cache", "computing it again"))):
            if want(name):
                check_said(outcomes[name], run, *parts)
                check_identical(outcomes[name], run, lab.ref1)
                check_nothing_left(outcomes[name], [run])
    if "leftovers" in fresh:
        run = fresh["leftovers"]
        checks = {"truncated-tokenised-cache": ("warning: tokenised data in", "tokenising again"),
                  "stale-build-lock": (f"removed {planted.get('lock')}, left by a build that was killed",),
                  "stale-shm-buffer": ("removed ", "shared-memory buffer(s) of DeepSpeed",
                                       "left by runs that were killed")}
        for name, parts in checks.items():
            if want(name) and outcomes[name].skipped is None:
                # any run started after the buffer was planted may be the one to remove it
                check_said(outcomes[name], [run] if name != "stale-shm-buffer" else later(), *parts)
                check_identical(outcomes[name], run, lab.ref1)
                check_nothing_left(outcomes[name], [run])
        if "lock" in planted:
            outcomes["stale-build-lock"].check(not planted["lock"].exists(), "the stale lock is still there")
        if "buffer" in planted:
            outcomes["stale-shm-buffer"].check(not planted["buffer"].exists(), "the stale buffer is still there")
    if "buffer" in planted:
        with contextlib.suppress(FileNotFoundError):
            planted["buffer"].unlink()


def _changed_data_then_resume(lab: Lab, outcomes: dict[str, Outcome]) -> None:
    """The killed one-rank victim: a resume on changed data content is refused; with the data restored the
    resume reaches the reference's result."""
    victim = lab.ckpt_victim
    if "changed-data" in outcomes:
        outcome = outcomes["changed-data"]
        if not has_checkpoint(victim.out):
            outcome.problems.append("the victim left no checkpoint to resume")
        else:
            original = lab.victim_data.read_bytes()
            steps = [row["step"] for row in metrics(victim.out)]
            lab.victim_data.write_bytes(changed_records(lab.victim_data))
            try:
                refused = lab.train("changed-data", lab.config1, victim.out, f"train.max_steps={STEPS_1}",
                                    f"data.train=[{lab.victim_data}]", resume=True)
                refused.wait()
            finally:
                lab.victim_data.write_bytes(original)
            check_one_line(outcome, refused, "dora-engine train: error: data.train content changed since checkpoint ",
                           ["checkpoint.allow_data_change=true"])
            outcome.check([row["step"] for row in metrics(victim.out)] == steps, "the refused resume trained")
            check_nothing_left(outcome, [refused])
    if "kill-during-checkpoint" in outcomes and not outcomes["kill-during-checkpoint"].problems:
        outcome = outcomes["kill-during-checkpoint"]
        resumed = lab.train("kill-during-checkpoint-resume", lab.config1, victim.out, f"train.max_steps={STEPS_1}",
                            f"data.train=[{lab.victim_data}]", resume=True)
        resumed.wait()
        check_identical(outcome, resumed, lab.ref1)
        check_nothing_left(outcome, [resumed])


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=FAULTS, metavar="NAME", help=f"faults to run: {', '.join(FAULTS)}")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(FAULTS))
        return 0
    random.seed(0)
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="dora-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        outcomes = inject(work.resolve(), set(args.only or FAULTS))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(outcomes))
    print(f"({time.monotonic() - started:.0f} s)")
    return 1 if any(o.verdict == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
