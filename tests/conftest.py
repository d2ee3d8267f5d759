"""Test-suite policy: `gpu` tests skip without CUDA; `slow` tests run only with RUN_SLOW=1."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Tokenised data of the tests (and of the runs they launch) go to a folder of this session, not the user's cache.
os.environ["DORA_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="dora-engine-cache-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    run_slow = os.environ.get("RUN_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
