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
    with memory_trace.AllocationTrace() as trace:
        ops.nll_linear(hidden, weight, labels, backend="fused").loss.backward()
    found = trace.allocations(V * H * 4)
    ours = [a for a in found if a["made_in"].startswith("dora_engine/ops/fused_linear.py")]
    assert ours, found
    assert any(a["MiB"] == pytest.approx(V * H * 4 / 2**20) and a["operators"][0].startswith("aten::") for a in ours)
    assert not trace.allocations(V * H * 4 * 64), "nothing near 64 × d W's size is allocated"
    table = memory_trace.format_allocations(found)
    assert "| MiB | device | operators | made in |" in table and "dora_engine/ops/fused_linear.py(" in table


class _Event:
    """What ``AllocationTrace.allocations`` reads of a profiler event."""

    def __init__(self, name, parent=None, start=0, cpu_bytes=0):
        self.name, self.cpu_parent, self.self_cpu_memory_usage = name, parent, cpu_bytes
        self.self_device_memory_usage = 0
        self.time_range = type("Range", (), {"start": start})()


def test_operators_are_named_with_the_first_frame_past_torch_and_decorators(memory_trace):
    """An operator's allocation is named by its chain and the first frame that is not torch's or a decorator's;
    memory under a Python frame alone is left out, and so is anything under the threshold."""
    caller = _Event("/home/u/dora_engine/ops/fused_linear.py(193): allocate")
    wrapper = _Event("deepspeed/utils/nvtx.py(30): wrapped_fn", _Event("deepspeed/runtime/zero/stage3.py(9): step"))
    events = [
        _Event("aten::empty", _Event("aten::zeros", _Event("<built-in method zeros>", caller)), 2, 8 << 20),
        _Event("aten::cat", _Event("torch/_utils.py(588): _flatten_dense_tensors", wrapper), 1, 6 << 20),
        _Event("threading.py(331): wait", None, 0, 900 << 20),  # memory outside any operator
        _Event("aten::mul", caller, 3, 1 << 20),  # under the threshold
    ]
    trace = memory_trace.AllocationTrace()
    trace._profile = type("Profile", (), {"events": lambda self: events})()
    assert trace.allocations(2 << 20) == [
        {"MiB": 6.0, "device": "cpu", "operators": ["aten::cat"],
         "made_in": "deepspeed/runtime/zero/stage3.py(9): step"},
        {"MiB": 8.0, "device": "cpu", "operators": ["aten::empty", "aten::zeros"],
         "made_in": "dora_engine/ops/fused_linear.py(193): allocate"},
    ]
    with pytest.raises(ValueError, match="min_bytes must be > 0"):
        trace.allocations(0)


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


def test_the_trace_text_has_every_variant_and_says_which_were_skipped():
    bench = load_benchmark("bench_peers")
    allocation = {"MiB": 250.4, "device": "cpu", "operators": ["aten::empty", "aten::zeros"],
                  "made_in": "dora_engine/ops/fused_linear.py(193): allocate"}
    result = {"setup": {"work": "", "vocab": 512}, "trace_mib": 32.0, "traced_step": 2, "machine": "m",
              "variants": {"trl_liger_dpo": {"skipped": "liger_kernel is not installed"},
                           "ours_dpo_erm": {"base_mib": 100.0, "step_peak_mib": 400.0, "peak_mib": 410.0,
                                            "allocations": [allocation]}}}
    text = bench.trace_text(result)
    assert "operators allocating at least 32 MiB in step 2" in text
    assert "trl_liger_dpo: skipped: liger_kernel is not installed" in text
    assert "ours_dpo_erm: base 100 MiB, step peak 400 MiB, peak 410 MiB" in text
    assert "| 250 | cpu | aten::empty ← aten::zeros | dora_engine/ops/fused_linear.py(193): allocate |" in text
