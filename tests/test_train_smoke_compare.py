"""benchmarks/train_smoke.py's verdict: which per-step figures count as matching the CPU oracle (the runs
themselves need minutes; `python benchmarks/train_smoke.py --device cpu --work DIR` does them)."""

from __future__ import annotations

import pytest
from benchmark_script import load_benchmark


@pytest.fixture(scope="module")
def smoke():
    return load_benchmark("train_smoke")


def _rows(loss, chosen, rejected):
    return {1: {"loss": loss, "logps/chosen": chosen, "logps/rejected": rejected}}


def test_bf16_rounding_passes_and_one_lost_step_fails(smoke):
    rtol, atol = smoke.TOLERANCE["bf16"]
    oracle = _rows(2.15, -149.45, -177.5)
    assert smoke.mismatches("v", _rows(2.16, -150.9, -176.0), oracle, [1], rtol, atol) == []
    # a run whose optimizer step was lost sits a step's change (10-15 in the log-probs) away
    found = smoke.mismatches("v", _rows(2.15, -137.0, -177.5), oracle, [1], rtol, atol)
    assert len(found) == 1 and found[0].startswith("v step 1 logps/chosen: -137 vs oracle -149.45")


def test_missing_figures_are_mismatches(smoke):
    oracle = _rows(2.15, -149.45, -177.5)
    found = smoke.mismatches("v", {}, oracle, [1], *smoke.TOLERANCE["fp32"])
    assert [line.split(":")[0] for line in found] == ["v step 1 loss", "v step 1 logps/chosen",
                                                      "v step 1 logps/rejected"]
    assert smoke.mismatches("v", _rows(float("nan"), -149.45, -177.5), oracle, [1], *smoke.TOLERANCE["fp32"])
