"""What a training run tells its user: offload confirmed at the start, the progress bar's loss is the
step's own, the end-of-run summary names the TensorBoard folder, and the understood library
FutureWarnings stay quiet. One short single-rank run through `dora-engine train` (a subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from training_toy import make_toy

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]

# TensorBoard is an optional extra: a stand-in SummaryWriter (the module the trainer imports) records
# the scalars, so the run goes through the trainer's TensorBoard path whether or not it is installed.
RUN = """
import os, sys, types
stub = types.ModuleType("torch.utils.tensorboard")
class SummaryWriter:
    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.handle = open(os.path.join(log_dir, "scalars.tsv"), "a")
    def add_scalar(self, key, value, step):
        self.handle.write(f"{step}\\t{key}\\t{value}\\n")
    def close(self):
        self.handle.close()
stub.SummaryWriter = SummaryWriter
sys.modules["torch.utils.tensorboard"] = stub
from dora_engine.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_offload_progress_tensorboard_and_quiet_warnings(tmp_path):
    config = make_toy(tmp_path, n_records=8)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "--config", str(config), f"output_dir={run}", "train.max_steps=3",
         "train.micro_batch_prompts=4", f"deepspeed={ROOT / 'launch' / 'zero3_offload.json'}", "lora.enabled=true",
         "lora.r=4", "logging.tensorboard=auto", "checkpoint.export=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "[dora-engine] ZeRO-3 offload active: optimizer state to cpu, parameters to cpu" in log
    # every drawing of the bar at step k shows step k's loss
    losses = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()}
    shown = re.findall(r"align:[^\r\n]*?\b(\d+)/3 \[[^\]]*loss=([-\d.]+)\]", log)
    # tqdm may skip drawing a step on a loaded machine (mininterval); the last step is always drawn
    assert 3 in {int(step) for step, _ in shown} and len(shown) >= 2, shown
    for step, loss in shown:
        assert loss == f"{losses[int(step)]:.4f}", (step, loss, losses)
    assert f"TensorBoard logs in {run / 'tensorboard'}" in log
    assert "\t".join(["3", "loss"]) in (run / "tensorboard" / "scalars.tsv").read_text()
    assert "FutureWarning" not in log, [line for line in log.splitlines() if "Warning" in line]
