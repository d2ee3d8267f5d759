"""``dora-engine train`` and ``dora-engine ref-logps`` (DESIGN.md section 6).

Both run in this process (a world of one) or, with ``--num-procs N``, re-launch themselves under the
``deepspeed`` launcher: ``deepspeed --num_gpus N --module dora_engine.training ...``, which is what
``deepspeed launch/train.py --config C.yaml`` does for multi-GPU and multi-node runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

TASKS = ("train", "ref-logps")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (keys: launch/README.md)")
    parser.add_argument("--resume", default=None, metavar="auto|TAG",
                        help="continue from the latest checkpoint (auto) or a given tag; same as checkpoint.resume")
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
        parser.set_defaults(func=lambda args, task=task: dispatch(task, args))


def dispatch(task: str, args: argparse.Namespace) -> int:
    if args.num_procs > 1 and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_procs), "--module",
               "dora_engine.training", "--task", task, "--config", args.config]
        if args.resume:
            cmd += ["--resume", args.resume]
        return subprocess.call(cmd + list(args.overrides))
    return run_task(task, args.config, list(args.overrides), args.resume)


def run_task(task: str, config: str, overrides: list[str], resume: str | None) -> int:
    """Load the config and run ``task`` in this process (one rank of a launch, or a world of one)."""
    from dora_engine.data.schema import RecordError
    from dora_engine.training.config import ConfigError, load_config
    from dora_engine.training.engine import Trainer, TrainingError, precompute_reference

    try:
        cfg = load_config(config, overrides + ([f"checkpoint.resume={resume}"] if resume else []))
        if task == "ref-logps":
            precompute_reference(cfg)
            return 0
        return Trainer(cfg).run()
    except (ConfigError, RecordError, TrainingError) as err:
        print(f"dora-engine {task}: error: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, ConfigError | RecordError) else 1


def launch_main(argv: list[str] | None = None) -> int:
    """Entry of each rank under the ``deepspeed`` launcher (it adds ``--local_rank``)."""
    parser = argparse.ArgumentParser(prog="launch/train.py", description="one rank of a dora-engine run")
    parser.add_argument("--task", choices=TASKS, default="train")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return run_task(args.task, args.config, list(args.overrides), args.resume)
