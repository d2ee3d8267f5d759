"""Test-suite policy: `gpu` tests skip without CUDA; `slow` tests run only with RUN_SLOW=1; what the launched
runs leave in shared memory is removed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Tokenised data of the tests (and of the runs they launch) go to a folder of this session, not the user's cache.
os.environ["DORA_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="dora-engine-cache-")

SESSION_START = time.time()
SHARED_MEMORY = Path("/dev/shm")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this process's tokenised-data folder. DeepSpeed's CPU all-reduce keeps a buffer per rank in
    /dev/shm (~70 MB each) that a rank killed on purpose (the fault tests) never unlinks: remove those that this
    session's runs created, all finished now, so that repeated test runs do not fill the machine's memory. A
    buffer some live process maps stays. Under pytest-xdist (``make test``) only the controlling process
    removes them, once every worker has finished."""
    shutil.rmtree(os.environ["DORA_ENGINE_CACHE"], ignore_errors=True)
    if hasattr(session.config, "workerinput"):
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.rsplit("/", 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except OSError:
            continue
    for buffer in SHARED_MEMORY.glob("deepspeed_allreduce_buffer_*"):
        try:
            if buffer.stat().st_mtime >= SESSION_START and buffer.name not in mapped:
                buffer.unlink()
        except OSError:
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips as the module docstring says; the files with ``multiproc`` tests (the long ones) first, so that
    pytest-xdist's workers, which take whole files in this order, start the longest work first."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    run_slow = os.environ.get("RUN_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
    launching = {item.path for item in items if "multiproc" in item.keywords}
    items.sort(key=lambda item: item.path not in launching)  # stable: the order within each group stays


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face hub access: what a test loads must be local (use with ``pytest.mark.usefixtures``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
