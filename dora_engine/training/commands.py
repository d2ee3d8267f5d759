"""``dora-engine train`` and ``dora-engine ref-logps`` (docs/design.md section 6).

Both run in this process (a world of one) or, with ``--num-procs N``, re-launch themselves under the
``deepspeed`` launcher: ``deepspeed --num_gpus N --master_port P --module dora_engine.training ...``,
which is what ``deepspeed launch/train.py --config C.yaml`` does for multi-GPU and multi-node runs.
When ``CUDA_VISIBLE_DEVICES`` lists GPUs, the ranks run on the first N of them (``--include
localhost:<ids>`` instead of ``--num_gpus N``: the launcher drops ``CUDA_VISIBLE_DEVICES`` and would
otherwise take GPUs 0..N-1 of the machine).

With ``--num-procs N`` this process stays in front: the rendezvous port is ``--master-port``, else
``$MASTER_PORT``, else a free one, so that runs on one machine do not collide. The launcher and its ranks
run in a session of their own, and a SIGTERM or SIGINT sent to this process (or its process group, as a
scheduler or Ctrl-C does) is forwarded to the ranks as SIGTERM: they finish the current step, save a
checkpoint and exit, and this process exits with their status (0 on a clean stop). A second SIGINT stops
the ranks at once (exit code 130; the last complete checkpoint stays).

The front holds the output folder's lock for the whole run (``output_lock``); the ranks die with it and
with DeepSpeed's launcher (``lifeline``), and record their start and exit (``run_state``), so that when a
rank or the launcher is killed the front exits with 1 and one line saying which process died, how, and
how to resume (docs/design.md section 7.7).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dora_engine.errors import DEBUG_ENV, UserError, UserValueError, report_user_error

TASKS = ("train", "ref-logps")
LAUNCHER_MODULE = "deepspeed.launcher.launch"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (keys: launch/README.md)")
    parser.add_argument("--resume", default=None, metavar="auto|TAG",
                        help="continue from the newest intact checkpoint (auto) or a tag; same as checkpoint.resume")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-6")


def register(subparsers: argparse._SubParsersAction) -> None:
    for task, help_text in (
        ("train", "phase 2: SFT or DoRA alignment on DeepSpeed ZeRO-3"),
        ("ref-logps", "precompute the reference log-probs cache of a training config"),
    ):
        parser = subparsers.add_parser(task, help=help_text, description=help_text)
        add_run_arguments(parser)
        parser.add_argument("--num-procs", type=int, default=1,
                            help="processes on this machine (GPUs, or CPU ranks without one); >1 runs `deepspeed`")
        parser.add_argument("--master-port", type=int, default=None, metavar="PORT",
                            help="rendezvous port of a --num-procs run (default: $MASTER_PORT, else a free port)")
        parser.set_defaults(func=lambda args, task=task: dispatch(task, args))


def dispatch(task: str, args: argparse.Namespace) -> int:
    if args.num_procs < 1:
        raise UserValueError(f"--num-procs must be ≥ 1, got {args.num_procs}")
    if args.num_procs > 1 and "RANK" not in os.environ:
        from dora_engine.training.config import load_config

        cfg = load_config(args.config, list(args.overrides))  # a bad config is one line here, not one per rank
        from dora_engine.training.output_lock import OutputDirInUse

        try:
            with run_lock(task, cfg.output_dir):
                return launch_local(task, args)
        except OutputDirInUse as err:
            return report_user_error(task, err)
    return run_task(task, args.config, list(args.overrides), args.resume)


def master_port(flag: int | None) -> int:
    """The rendezvous port: ``--master-port``, else ``$MASTER_PORT``, else a port that is free now."""
    if flag is not None:
        value, source = flag, "--master-port"
    elif os.environ.get("MASTER_PORT"):
        value, source = os.environ["MASTER_PORT"], "MASTER_PORT"
    else:
        from dora_engine.training.process_group import free_port

        return free_port()
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise UserValueError(f"{source} must be a port number in 1..65535, got {value!r}")
    return port


def run_lock(task: str, output_dir: str) -> contextlib.AbstractContextManager[None]:
    """The output folder's lock of a ``train`` run, taken by the front of a launch or, without one, rank 0."""
    from dora_engine.training.output_lock import held_by_ancestor, output_lock

    if task != "train" or os.environ.get("RANK", "0") != "0" or held_by_ancestor():
        return contextlib.nullcontext()
    return output_lock(output_dir)


def _launchers(runner: Any) -> list[Any]:
    """DeepSpeed's per-node launcher processes under the runner ``runner``."""
    import psutil

    found = []
    try:
        for proc in runner.children(recursive=True):
            try:
                if LAUNCHER_MODULE in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return found


def _ranks(runner: Any) -> list[Any]:
    """The rank processes under the ``deepspeed`` runner ``runner`` (children of its per-node launchers)."""
    import psutil

    ranks = []
    for launcher in _launchers(runner):
        with contextlib.suppress(psutil.Error):
            ranks += launcher.children()
    return ranks


def _kill_tree(launcher: Any) -> None:
    import psutil

    try:
        procs = [*launcher.children(recursive=True), launcher]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def device_arguments(num_procs: int, environ: Mapping[str, str]) -> list[str]:
    """The ``deepspeed`` runner's device selection for ``num_procs`` ranks on this machine.

    ``CUDA_VISIBLE_DEVICES`` set to GPU indices: ``--include localhost:<the first num_procs of them>``
    (the runner removes the variable from the ranks' environment and, given ``--num_gpus``, would use
    GPUs ``0..num_procs-1`` of the machine instead). Unset or empty (CPU ranks, or every GPU):
    ``--num_gpus num_procs``.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return ["--num_gpus", str(num_procs)]
    ids = [item.strip() for item in visible.split(",")]
    if not all(item.isdigit() for item in ids):
        raise UserValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: the deepspeed launcher selects GPUs by index; "
                             "list GPU indices (e.g. 2,3), not UUIDs or MIG names")
    if num_procs > len(ids):
        raise UserValueError(f"--num-procs {num_procs} exceeds the {len(ids)} GPU(s) in "
                             f"CUDA_VISIBLE_DEVICES={visible!r}")
    return ["--include", "localhost:" + ",".join(ids[:num_procs])]


def launcher_command(task: str, args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    """The ``deepspeed`` runner command that starts ``task`` on ``args.num_procs`` ranks of this machine."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *device_arguments(args.num_procs, environ),
           "--master_port", str(master_port(args.master_port)), "--module", "dora_engine.training",
           "--task", task, "--config", args.config]
    if args.resume:
        cmd += ["--resume", args.resume]
    return cmd + list(args.overrides)


def resume_command(task: str, args: argparse.Namespace) -> str:
    """The command that continues this launch from its last complete checkpoint."""
    return shlex.join(["dora-engine", task, "--config", args.config, "--num-procs", str(args.num_procs),
                       "--resume", "auto", *args.overrides])


# A rank's own failure counts as the cause when it came this long before the first death: its peers then
# died later at the launcher's hands (SIGKILL 30 s after SIGTERM), whereas the peers of a killed rank fail
# within moments of its death.
FAILED_BEFORE_DEATH_S = 1.0


def failure_line(task: str, args: argparse.Namespace, watch: Any, code: int, launcher_pids: list[int]) -> str | None:
    """What a launch that ended with ``code`` did wrong, in one line; None when every rank exited with 0, or
    when a rank failed on its own (it said why; DeepSpeed's launcher then stops the others, killing those
    that hang in a collective, which are not the cause)."""
    started = watch.started
    failed = [r.exited_at or 0.0 for r in started.values() if r.exit_code not in (None, 0)]
    if failed and (not watch.deaths or min(failed) < watch.deaths[0].noticed_at - FAILED_BEFORE_DEATH_S):
        return None
    if code == 0 and (len(started) < args.num_procs or any(r.exit_code != 0 for r in started.values())):
        # DeepSpeed's runner exits 0 when its launcher was killed by a signal; the ranks died with it
        pids = ", ".join(str(p) for p in launcher_pids) or "unknown pid"
        what = f"DeepSpeed's launcher (pid {pids}) was killed before its ranks finished; the ranks were stopped"
    elif watch.deaths:
        first = watch.deaths[0]
        if first.signum is None and len(watch.deaths) == 1 and 128 < code < 256:
            first.signum = 256 - code  # the launcher exits with a killed rank's negative status, modulo 256
        what = f"{first.describe()}; the other ranks were stopped"
    else:
        return None
    resume = f"; resume with: {resume_command(task, args)}" if task == "train" else ""
    return f"dora-engine: {what}{resume}"


def launch_local(task: str, args: argparse.Namespace) -> int:
    """Run ``task`` on ``--num-procs`` ranks under the ``deepspeed`` launcher and stay in front (module
    docstring): forward SIGTERM / SIGINT to the ranks, wait for them, exit with their status, or with 1
    and one line when a rank or the launcher was killed."""
    import psutil

    from dora_engine.training.lifeline import FRONT_ENV
    from dora_engine.training.output_lock import HOLDER_ENV
    from dora_engine.training.run_state import STATE_ENV, RankWatch

    state = Path(tempfile.mkdtemp(prefix="dora-engine-run-"))
    watch = RankWatch(state)
    front = str(os.getpid())
    env = {**os.environ, STATE_ENV: str(state), FRONT_ENV: front, HOLDER_ENV: front}
    proc = subprocess.Popen(launcher_command(task, args, os.environ), start_new_session=True, env=env)
    launcher = psutil.Process(proc.pid)
    launcher_pids: list[int] = []
    received: list[int] = []  # filled by the handler; acted on by the loop (printing in a handler may re-enter)
    signalled: set[int] = set()
    handled = 0

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            watch.poll()
            try:
                code = proc.wait(timeout=0.05)  # often: a dead rank's status is seen before it is reaped
                break
            except subprocess.TimeoutExpired:
                pass
            launcher_pids = launcher_pids or [p.pid for p in _launchers(launcher)]
            for signum in received[handled:]:
                handled += 1
                signalled.clear()  # tell every rank again
                if signum == signal.SIGINT and received[:handled].count(signal.SIGINT) > 1:
                    print("dora-engine: interrupted again; stopping the ranks now, without a checkpoint",
                          file=sys.stderr, flush=True)
                    _kill_tree(launcher)
                else:
                    print(f"dora-engine: {signal.Signals(signum).name} received; the ranks finish the current step "
                          "and save a checkpoint", file=sys.stderr, flush=True)
            if received:  # ranks that started after the signal are told too
                for rank in _ranks(launcher):
                    if rank.pid not in signalled:
                        try:
                            rank.send_signal(signal.SIGTERM)
                        except psutil.Error:
                            continue
                        signalled.add(rank.pid)
        if received.count(signal.SIGINT) > 1:
            return 130
        watch.poll()
        line = failure_line(task, args, watch, code, launcher_pids)
        if line:  # on a line of its own: a killed rank may have left its progress bar unfinished
            print(f"\n{line}", file=sys.stderr, flush=True)
            return 1
        return code if code >= 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # this process is leaving for another reason (an exception): take the ranks along
            _kill_tree(launcher)
            time.sleep(0.1)
        shutil.rmtree(state, ignore_errors=True)


def run_task(task: str, config: str, overrides: list[str], resume: str | None) -> int:
    """Load the config and run ``task`` in this process (one rank of a launch, or a world of one).

    Bad input is one line ``dora-engine TASK: error: ...`` and exit code 2; a run that cannot continue
    (``TrainingError``, an output folder another run holds) exits with 1.
    """
    from dora_engine.training.config import load_config
    from dora_engine.training.engine import Trainer
    from dora_engine.training.process_group import close_distributed
    from dora_engine.training.ref_logps import precompute_reference
    from dora_engine.training.signals import StopSignals

    try:
        with contextlib.ExitStack() as held:
            with StopSignals().installed() as stop:
                cfg = load_config(config, overrides + ([f"checkpoint.resume={resume}"] if resume else []))
                held.enter_context(run_lock(task, cfg.output_dir))
                if task == "ref-logps":
                    precompute_reference(cfg)
                    code = 0
                else:
                    code = Trainer.from_config(cfg, stop=stop).run()
            close_distributed()
        return code
    except UserError as err:
        return report_user_error(task, err)


def launch_main(argv: list[str] | None = None) -> int:
    """Entry of each rank under the ``deepspeed`` launcher (it adds ``--local_rank``): the rank dies with
    its launcher and its front, and records its start and exit for the front (module docstring)."""
    parser = argparse.ArgumentParser(prog="launch/train.py", description="one rank of a dora-engine run")
    parser.add_argument("--task", choices=TASKS, default="train")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    from dora_engine.training.lifeline import die_with_parent, watch_front
    from dora_engine.training.process_group import lost_peer
    from dora_engine.training.run_state import record_exit, record_start

    die_with_parent()
    watch_front()
    record = record_start()
    try:
        code = run_task(args.task, args.config, list(args.overrides), args.resume)
    except BaseException as err:
        record_exit(record, 1)
        if not lost_peer(err) or os.environ.get(DEBUG_ENV) == "1":
            raise
        # Another rank is gone: the front names it and says how to resume; a traceback here says nothing more.
        message = str(err).strip().splitlines()[0][:200]
        print(f"dora-engine {args.task}: rank {record.rank}: stopped, another rank is gone ({message})",
              file=sys.stderr, flush=True)
        return 1
    record_exit(record, code)
    return code
