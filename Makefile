PYTHON ?= python3
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

.PHONY: install test lint pytest

# Installs the package with its test tools (torch must already be present: see README).
install:
	$(PYTHON) -m pip install -q -e ".[dev]"

lint:
	$(PYTHON) -m ruff check .

pytest:
	$(PYTHON) -m pytest

test: install lint pytest
