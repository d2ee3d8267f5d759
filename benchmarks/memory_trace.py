"""Where a step's memory goes: the large allocations of one traced stretch of code, and the code that made them.

``AllocationTrace`` runs torch's profiler with memory profiling (CPU and CUDA allocators) between ``start()`` and
``stop()``; ``allocations(min_bytes)`` then lists every allocation of at least ``min_bytes`` in time order, each
with its size, the operators that made it (innermost first, e.g. ``aten::clone ← c10d::_reduce_scatter_base_``)
and the innermost Python frame outside torch (e.g. ``deepspeed/runtime/zero/stage3.py(2418):
get_grad_norm_direct``): which library's code asked for the memory. Frees are not listed: the profiler does not
tie a free to its allocation, so the list says what was allocated, not what was alive at the peak. Memory events
outside any operator are left out too: that is how the profiler reports freeing a block allocated before
``start()``, with a size it does not know.

Trace code that has run once before: torch's profiler (2.13) records the names of Python frames by reference,
and a frame of code freed before ``stop()`` (imports and one-time setup on a first call) fails to decode
(``UnicodeDecodeError``) when the events are read.

    trace = AllocationTrace()
    trace.start(); step(); trace.stop()
    print(format_allocations(trace.allocations(32 << 20)))
"""

from __future__ import annotations

from typing import Any

#: Path components after which a frame's file is shown (the package's own path), e.g. ``…/site-packages/``; the
#: profiler itself names installed packages' files from their package folder already.
ROOTS = ("site-packages/", "dist-packages/")
#: The project's package, shown from its own folder wherever it is installed from.
PROJECT = "dora_engine/"
#: Frames that only wrap the call that allocates (torch's, decorators): the frame shown is the first other one.
WRAPPERS = ("torch/", "typing_extensions.py(", "deepspeed/utils/nvtx.py(", "functools.py(", "contextlib.py(")
#: How many operators of the chain to show.
OPERATORS = 3


class AllocationTrace:
    """The profiler between ``start()`` and ``stop()``, with memory and Python frames recorded."""

    def __init__(self) -> None:
        self._profile: Any = None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, profile_memory=True, with_stack=True)
        self._profile.start()

    def stop(self) -> None:
        self._profile.stop()

    def allocations(self, min_bytes: int) -> list[dict[str, Any]]:
        """Allocations of at least ``min_bytes`` (``MiB``, ``device``, ``operators``, ``made_in``), in time order."""
        found = []
        for event in sorted(self._profile.events(), key=lambda e: e.time_range.start):
            for device, size in (("cpu", event.self_cpu_memory_usage), ("cuda", _device_memory(event))):
                if size >= min_bytes:
                    operators, frame = _origin(event)
                    if operators:
                        found.append({"MiB": size / 2**20, "device": device, "operators": operators,
                                      "made_in": frame})
        return found


def _device_memory(event: Any) -> int:
    # named self_device_memory_usage in newer torch, self_cuda_memory_usage before
    if hasattr(type(event), "self_device_memory_usage"):
        return event.self_device_memory_usage
    return getattr(event, "self_cuda_memory_usage", 0)


def _origin(event: Any) -> tuple[list[str], str]:
    """The operator chain of ``event`` (itself and its operator parents, innermost first) and its innermost
    Python frame outside torch."""
    operators: list[str] = []
    node = event
    while node is not None:
        name = node.name
        if ".py(" in name:
            if not any(w in name.replace("\\", "/") for w in WRAPPERS):
                return operators[:OPERATORS], short_frame(name)
        elif not name.startswith("<built-in") and len(operators) < OPERATORS:
            operators.append(name)
        node = node.cpu_parent
    return operators[:OPERATORS], "–"


def short_frame(name: str) -> str:
    """``/x/site-packages/deepspeed/a.py(12): f`` → ``deepspeed/a.py(12): f``; the project's files from
    ``dora_engine/``; other frames as the profiler names them."""
    path = name.replace("\\", "/")
    if PROJECT in path:
        return path[path.rindex(PROJECT):]
    for root in ROOTS:
        if root in path:
            return path[path.rindex(root) + len(root):]
    return path


def format_allocations(allocations: list[dict[str, Any]]) -> str:
    """A Markdown table of ``AllocationTrace.allocations``."""
    lines = ["| MiB | device | operators | made in |", "| ---: | --- | --- | --- |"]
    for a in allocations:
        lines.append(f"| {a['MiB']:.0f} | {a['device']} | {' ← '.join(a['operators'])} | {a['made_in']} |")
    return "\n".join(lines)
