"""The ``deepspeed`` runner command of ``dora-engine train --num-procs N`` (no launch: the command only)."""

from __future__ import annotations

import argparse
import sys

import pytest

from dora_engine.errors import UserValueError
from dora_engine.training.commands import device_arguments, launcher_command


def test_visible_gpus_are_kept_by_index():
    # --num_gpus would make the runner drop CUDA_VISIBLE_DEVICES and use GPUs 0 and 1.
    assert device_arguments(2, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["--include", "localhost:2,3"]
    assert device_arguments(2, {"CUDA_VISIBLE_DEVICES": " 5, 1 ,7"}) == ["--include", "localhost:5,1"]
    assert device_arguments(1, {"CUDA_VISIBLE_DEVICES": "6"}) == ["--include", "localhost:6"]


def test_no_visible_list_counts_processes():
    assert device_arguments(3, {}) == ["--num_gpus", "3"]
    assert device_arguments(2, {"CUDA_VISIBLE_DEVICES": ""}) == ["--num_gpus", "2"]  # CPU ranks


def test_more_processes_than_visible_gpus_is_refused():
    with pytest.raises(UserValueError, match=r"--num-procs 3 exceeds the 2 GPU\(s\) in CUDA_VISIBLE_DEVICES='2,3'"):
        device_arguments(3, {"CUDA_VISIBLE_DEVICES": "2,3"})


def test_uuids_are_refused_with_a_reason():
    with pytest.raises(UserValueError, match="selects GPUs by index"):
        device_arguments(1, {"CUDA_VISIBLE_DEVICES": "GPU-8f6c1e2a-0000-0000-0000-000000000000"})


def test_launcher_command_uses_the_device_selection():
    args = argparse.Namespace(num_procs=2, master_port=29601, config="c.yaml", resume="auto",
                              overrides=["train.lr=1e-6"])
    cmd = launcher_command("train", args, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--include", "localhost:2,3",
                   "--master_port", "29601", "--module", "dora_engine.training", "--task", "train",
                   "--config", "c.yaml", "--resume", "auto", "train.lr=1e-6"]
    assert "--num_gpus" not in cmd  # the runner refuses --num_gpus together with --include


def test_runner_accepts_the_include_form():
    """The runner's own parser turns the --include string into the visible indices (sorted, as it schedules)."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    include = device_arguments(2, {"CUDA_VISIBLE_DEVICES": "2,3"})[1]
    pool = {"localhost": list(range(4))}
    assert dict(runner.parse_resource_filter(pool, include_str=include)) == {"localhost": [2, 3]}
