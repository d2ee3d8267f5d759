"""benchmarks/seed_pool.py: a benchmark's seeds in a pool of processes, which a SIGTERM of the parent ends too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

WORKERS = textwrap.dedent("""
    import os
    import time
    from pathlib import Path

    def square(x):
        return x * x, os.getpid()

    def sleep_forever(folder):
        Path(folder, str(os.getpid())).write_text("started")
        time.sleep(120)
""")

MAIN = textwrap.dedent("""
    import sys
    sys.path[:0] = [{benchmarks!r}, {here!r}]
    from seed_pool import run_seeds
    from workers import sleep_forever, square

    if __name__ == "__main__":
        if sys.argv[1] == "square":
            results = run_seeds(square, [1, 2, 3], int(sys.argv[2]), lambda r: str(r[0]))
            print(sorted(r[0] for r in results), len({{r[1] for r in results}} - {{__import__("os").getpid()}}))
        else:
            run_seeds(sleep_forever, [sys.argv[2]] * 2, 2, str)
""")


def _script(tmp_path: Path) -> Path:
    (tmp_path / "workers.py").write_text(WORKERS)
    main = tmp_path / "main.py"
    main.write_text(MAIN.format(benchmarks=str(BENCHMARKS), here=str(tmp_path)))
    return main


@pytest.mark.parametrize(("jobs", "other_processes"), [(1, 0), (2, 2)])
def test_every_task_runs_in_this_process_or_the_pool(tmp_path, jobs, other_processes):
    out = subprocess.run([sys.executable, str(_script(tmp_path)), "square", str(jobs)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    results, pids = out.strip().splitlines()[-1].rsplit(" ", 1)
    assert results == "[1, 4, 9]"
    assert 1 <= int(pids) <= other_processes or int(pids) == other_processes == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_sigterm_of_the_parent_ends_its_workers(tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    parent = subprocess.Popen([sys.executable, str(_script(tmp_path)), "sleep", str(started)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    workers = [int(p.name) for p in started.iterdir()]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers), parent.stderr.read() if parent.poll() else ""
    os.kill(parent.pid, signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
