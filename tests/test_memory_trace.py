"""benchmarks/memory_trace.py and bench_peers' traced step: large allocations and the code that made them."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import load_benchmark

from dora_engine import ops


@pytest.fixture(scope="module")
def memory_trace():
    return load_benchmark("memory_trace")


def test_the_fused_ops_gradient_buffer_is_found_with_its_size_and_maker(memory_trace):
    """nll_linear forms d W (V × H) in its forward: the trace names that allocation, its size and the op's code."""
    V, H = 4096, 128
    hidden = torch.randn(2, 16, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 16))
    ops.nll_linear(hidden, weight, labels, backend="fused").loss.backward()  # warm: see AllocationTrace
    trace = memory_trace.AllocationTrace()
    trace.start()
    ops.nll_linear(hidden, weight, labels, backend="fused").loss.backward()
    trace.stop()
    found = trace.allocations(V * H * 4)
    ours = [a for a in found if a["made_in"].startswith("dora_engine/ops/fused_linear.py")]
    assert ours and all(a["device"] == "cpu" for a in found), found
    assert any(a["MiB"] == pytest.approx(V * H * 4 / 2**20) and a["operators"][0].startswith("aten::") for a in ours)
    assert not trace.allocations(V * H * 4 * 64), "nothing near 64 × d W's size is allocated"
    table = memory_trace.format_allocations(found)
    assert "| MiB | device | operators | made in |" in table and "dora_engine/ops/fused_linear.py(" in table


def test_frames_are_shown_from_their_package(memory_trace):
    assert memory_trace.short_frame(
        "/usr/lib/python3.11/site-packages/deepspeed/runtime/zero/stage3.py(2418): get_grad_norm_direct"
    ) == "deepspeed/runtime/zero/stage3.py(2418): get_grad_norm_direct"
    assert memory_trace.short_frame("/home/u/src/dora_engine/ops/fused_linear.py(193): allocate") == \
        "dora_engine/ops/fused_linear.py(193): allocate"


def test_the_step_clock_traces_only_the_last_step():
    bench = load_benchmark("bench_peers")
    clock = bench.StepClock(steps=2, trace_mib=3.0)
    sizes = (5 << 20, 7 << 20)  # bytes: 1.25 M and 1.75 M floats
    for size in sizes:
        clock.start()
        torch.empty(size // 4).fill_(1.0)
        clock.stop()
    result = clock.result(loss1=0.5, tokens_per_step=8)
    assert len(result["step_times"]) == 2
    assert [round(a["MiB"]) for a in result["allocations"]] == [7]
    assert bench.StepClock(steps=2).result(0.5, 8)["allocations"] is None
