"""Host reads of tensor values per optimizer step of ``Trainer.train_step``, by the line that makes them.

A host read (``item``, ``tolist``, ``bool``/``float``/``int``/``index``, ``numpy`` of a tensor) waits for the
device on a GPU, so the trainer should make as few as possible per optimizer step (docs/design.md section 5.5).
Counted on the CPU with a ``TorchFunctionMode``, which sees every such call (on a CPU tensor it
is no synchronisation; the count says where one would be on a GPU). The run is the training toy of the test
suite (align, dpo under dora, two micro-steps per optimizer step, one process).

    PYTHONPATH=$PWD python benchmarks/host_reads.py [--steps 3] [--accum 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}
TORCH_DIR = os.path.dirname(torch.__file__)


class HostReads(TorchFunctionMode):
    """Counts host reads by the first calling line outside torch."""

    def __init__(self) -> None:
        super().__init__()
        self.by_line: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
                frame = frame.f_back
            where = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
            self.by_line[where.split("site-packages/")[-1].replace(f"{ROOT}/", "")] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps counted (after one warm-up step)")
    parser.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from training_toy import make_toy

    from dora_engine.training.config import load_config
    from dora_engine.training.engine import Trainer
    from dora_engine.training.process_group import close_distributed

    with tempfile.TemporaryDirectory() as tmp:
        config = make_toy(Path(tmp), overrides={"train.grad_accum_steps": args.accum,
                                                "train.max_steps": args.steps + 1})
        trainer = Trainer.from_config(load_config(str(config)), progress=False)
        try:
            trainer.train_step(0)
            with HostReads() as reads:
                for step in range(1, args.steps + 1):
                    trainer.train_step(step)
        finally:
            trainer.close()
            close_distributed()
    ours = sum(n for line, n in reads.by_line.items() if line.startswith("dora_engine/"))
    print(f"host reads per optimizer step ({args.accum} micro-steps): dora_engine {ours / args.steps:g}, "
          f"all {sum(reads.by_line.values()) / args.steps:g}")
    for line, n in reads.by_line.most_common():
        print(f"  {n / args.steps:6g}  {line}")


if __name__ == "__main__":
    main()
