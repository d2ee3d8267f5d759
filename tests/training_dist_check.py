"""One rank of the multi-rank training checks (run by tests/test_training_dist.py).

``python tests/training_dist_check.py OUT CONFIG [key=value ...]`` under ``deepspeed --num_gpus N`` or
alone (a world of one). It trains with the config and writes to OUT (rank 0):
  grads.pt    the full gradients of step 1, gathered before the optimizer step (runs that start at step 0);
  params.pt   a checksum (Σ|θ|) of the trained parameters after each optimizer step;
  logps.pt    the trained model's summed log-probs on the first training examples (for the export check).
With ``NAN_FROM_STEP=s`` in the environment the loss is NaN from optimizer step s on (fault injection).
The metrics land in the config's output_dir as usual. Exits with the trainer's exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from dora_engine.errors import TrainingError
    from dora_engine.training.config import load_config
    from dora_engine.training.data import collate
    from dora_engine.training.engine import Trainer
    from dora_engine.training.model import StepOutput

    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_dir, config, overrides = Path(argv[0]), argv[1], argv[2:]
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer.from_config(load_config(config, overrides), progress=False)
    engine, module = trainer.engine, trainer.engine.module
    grads: dict[str, torch.Tensor] = {}
    checksums: list[float] = []
    real_step, real_forward = engine.step, module.forward
    nan_from = int(os.environ.get("NAN_FROM_STEP", 0))
    trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def step_with_capture() -> None:
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and engine.global_steps == 0:  # step 1: gradients complete, update not yet applied
            grads.update({n: safe_get_full_grad(p).clone() for n, p in trained})
        real_step()
        if boundary:
            total = sum(float(safe_get_full_fp32_param(p).abs().sum()) for _, p in trained)
            checksums.append(total)

    def forward_with_faults(*args, **kwargs) -> StepOutput:
        out = real_forward(*args, **kwargs)
        if nan_from and module.training and len(checksums) + 1 >= nan_from:
            nan = float("nan")
            out = out._replace(loss=out.loss * nan, value=out.value * nan)
        return out

    engine.step, module.forward = step_with_capture, forward_with_faults
    try:
        code = trainer.run()
    except TrainingError as err:
        print(f"TrainingError: {err}", flush=True)
        code = 1
    if trainer.dist.main:
        if grads:
            torch.save(grads, out_dir / "grads.pt")
        torch.save(checksums, out_dir / "params.pt")
    # The rows' log-probs after a completed run (a stopped run's are not compared: its resumed run writes
    # them). A forward after a SIGTERM stop once hung in CI: one rank in a ZeRO-3 all-gather of this forward,
    # the other already in the barrier below.
    if code == 0 and trainer.stop_signal is None:
        batch = collate(trainer.train_data, list(range(4)), pad_id=trainer.pad_id, ref_logps=trainer.ref_train)
        engine.eval()
        with torch.no_grad():
            S = engine(**{k: v.to(engine.device) for k, v in batch.items()}).seq_logps
        if trainer.dist.main:
            torch.save({"seq_logps": S.cpu(), **batch}, out_dir / "logps.pt")
    dist.barrier()
    return code


if __name__ == "__main__":
    sys.exit(main())
