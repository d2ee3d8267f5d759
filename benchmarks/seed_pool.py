"""A benchmark's seeds, ``jobs`` at a time in spawned processes, with a progress bar.

Shared by ``bench_quality.py`` and ``bench_iterate.py``. A SIGTERM (or Ctrl-C) of the parent ends the workers
with it: by default a SIGTERM kills the parent at once, without the pool's cleanup, and its workers would
train on with nobody to report to. Here it raises ``SystemExit`` in the parent, whose pool terminates them.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While inside, a SIGTERM raises ``SystemExit(143)`` (so that ``with`` blocks clean up) instead of killing
    the process; the previous handler is restored after."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_seeds(
    worker: Callable[[Task], Result], tasks: Sequence[Task], jobs: int, describe: Callable[[Result], str]
) -> list[Result]:
    """``worker`` on every task, in this process when ``jobs`` is 1, else in a pool of ``min(jobs, tasks)``
    spawned processes (``worker`` must be importable: a module-level function); results in completion
    order. ``describe(result)`` labels the progress bar's last finished seed."""
    from tqdm.auto import tqdm

    results: list[Result] = []
    with sigterm_exits(), tqdm(total=len(tasks), desc="seeds", unit="seed") as bar:
        def collect(outcomes: Iterator[Result]) -> None:
            for result in outcomes:
                results.append(result)
                bar.update(1)
                bar.set_postfix(last=describe(result))

        if jobs == 1:
            collect(map(worker, tasks))
        else:
            with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
                collect(pool.imap_unordered(worker, tasks))
    return results
