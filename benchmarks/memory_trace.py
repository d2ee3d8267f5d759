"""Where a step's memory goes: the operators of one traced stretch of code that allocate the most, and the code
that called them.

``AllocationTrace`` runs torch's profiler with memory profiling (CPU and CUDA allocators) between ``start()`` and
``stop()`` (or as a context manager); ``allocations(min_bytes)`` then lists, in time order, every operator whose
own memory (the profiler's *self* memory: what the operator allocated minus what it freed, its child operators'
apart) is at least ``min_bytes``, each with that size, its operator chain (innermost first, e.g.
``aten::empty_strided ← aten::clone ← c10d::_reduce_scatter_base_``) and the innermost Python frame outside torch
and decorators (e.g. ``deepspeed/runtime/zero/stage3.py(2418): get_grad_norm_direct``): which library's code
asked for the memory. A temporary an operator frees before it returns does not show, and frees are not tied to
allocations: the list says what the operators kept when they returned, not what was alive at the peak. Memory
the profiler records under a Python frame alone, outside any operator (seen under a waiting thread's frame), is
left out: nothing names the code that allocated it.

Trace code that has run once before: torch's profiler (2.13) records the names of Python frames by reference,
and a frame of code freed before ``stop()`` (imports and one-time setup on a first call) fails to decode
(``UnicodeDecodeError``) when the events are read.

    with AllocationTrace() as trace:
        step()
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

    def __enter__(self) -> AllocationTrace:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start recording (CPU operators, and CUDA's where a GPU is visible)."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, profile_memory=True, with_stack=True)
        self._profile.start()

    def stop(self) -> None:
        """Stop recording; the events are read by ``allocations``."""
        self._profile.stop()

    def allocations(self, min_bytes: int) -> list[dict[str, Any]]:
        """Operators whose own memory is at least ``min_bytes`` > 0 (``MiB``, ``device``, ``operators``,
        ``made_in``), in time order."""
        if min_bytes <= 0:
            raise ValueError(f"min_bytes must be > 0, got {min_bytes}")
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
    """The event's own GPU memory (``self_device_memory_usage``; ``self_cuda_memory_usage`` in older torch)."""
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
                return operators, short_frame(name)
        elif not name.startswith("<built-in") and len(operators) < OPERATORS:
            operators.append(name)
        node = node.cpu_parent
    return operators, "–"


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
