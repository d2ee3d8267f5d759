PYTHON ?= python3
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

.PHONY: install test lint pytest cuda-compile config-docs

# Installs the package with its test tools (torch must already be present: see README).
install:
	$(PYTHON) -m pip install -q -e ".[dev]"

lint:
	$(PYTHON) -m ruff check .

# Two workers, each taking whole test files (so a file's module fixtures run once): most of the suite's time is
# spent waiting on launched processes (ranks, launchers, imports), which two workers overlap on two cores.
# PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2
pytest:
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Rewrites launch/README.md's tables of config keys from the fields' help in dora_engine/training/config.py
# and dora_engine/iterate/config.py.
config-docs:
	$(PYTHON) -m dora_engine.training.config_docs
	$(PYTHON) -m dora_engine.iterate.config_docs

# Compiles every CUDA kernel file alone (no torch headers) for sm_80 and sm_90; skipped without nvcc.
CUDA_GENCODE = -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
cuda-compile:
ifneq ($(NVCC),)
	@mkdir -p build/cuda
	@for f in csrc/cuda/*.cu; do \
		echo "nvcc $$f"; \
		$(NVCC) -std=c++17 -O3 -Icsrc/include $(CUDA_GENCODE) -c $$f -o build/cuda/$$(basename $$f .cu).o || exit 1; \
	done
else
	@echo "nvcc not found: CUDA compile check skipped"
endif

test: install lint cuda-compile pytest
