"""benchmarks/fault_injection.py: its verdicts and summary line, and (slow, RUN_SLOW=1) the whole script, which
injects every fault of docs/design.md section 7 into tiny CPU runs (a few minutes on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_script import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_injection.py"


@pytest.fixture(scope="module")
def faults():
    return load_benchmark("fault_injection")


def test_a_fault_is_survived_clean_failed_or_skipped(faults):
    survived = faults.Outcome("kill-rank", identical=True, notes=["exit 1: rank 1 was killed"])
    clean = faults.Outcome("locked-output-dir")
    assert clean.check(True, "not shown")
    failed = faults.Outcome("full-disk", identical=True)
    assert not failed.check(False, "partial checkpoints left")
    skipped = faults.Outcome("stale-build-lock", skipped="never built")
    assert [o.verdict for o in (survived, clean, failed, skipped)] == ["survived", "clean", "failed", "skipped"]
    assert faults.summary([survived, clean, failed, skipped]).splitlines() == [
        "faults: 3 tried, 1 survived (identical result), 1 clean (one line), 1 failed",
        "  kill-rank: survived (exit 1: rank 1 was killed)",
        "  locked-output-dir: clean",
        "  full-disk: failed (partial checkpoints left)",
        "  stale-build-lock: skipped (never built)",
    ]


def test_a_checkpoint_is_being_saved_until_its_manifest_exists(faults, tmp_path):
    assert not faults.saving(tmp_path)
    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    assert faults.saving(tmp_path) and not faults.has_checkpoint(tmp_path)
    (tag / "dora_checkpoint.json").write_text("{}")
    assert not faults.saving(tmp_path) and faults.has_checkpoint(tmp_path)


def test_changed_records_keep_the_path_and_change_the_content(faults, tmp_path):
    from training_toy import make_records, write_jsonl

    path = write_jsonl(tmp_path / "d.jsonl", make_records(3))
    changed = faults.changed_records(path)
    assert changed != path.read_bytes() and len(changed.splitlines()) == 3


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_fault_is_survived_or_one_clean_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    head = next(line for line in done.stdout.splitlines() if line.startswith("faults: "))
    assert head.endswith(" 0 failed"), report
