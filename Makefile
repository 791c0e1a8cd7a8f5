# Every target sets itself up from nothing: a fresh machine needs only python3.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RESULTS_DIR ?= bench/results
PYTEST_ARGS ?=

.PHONY: test bench bench-full lint demo gpu-check gpu-install gpu-test gpu-bench gpu-tune compile-check clean

# CPU setup: the local CPU wheel of torch first (an unpinned torch would pull the CUDA build),
# then triton 3.9 (its interpreter runs the kernels on CPU), then the package with its extras. The package
# builds csrc/ (the C++ CPU kernels) against this torch, so without build isolation; an edit there rebuilds.
$(VENV)/.installed: setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "triton==3.9.*"
	$(PIP) install -q "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check kernels sae bench tests
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m pytest -q bench --benchmark-disable -p no:cacheprovider

lint: $(VENV)/.installed
	$(PY) -m ruff check kernels sae bench tests
	$(PY) -m ruff format --check kernels sae bench tests

# Train a TopK SAE on synthetic activations with known features (CPU, about a minute); prints feature
# recovery, L0, FVU and dead %.
demo: $(VENV)/.installed
	$(PY) -m sae train --synthetic-d 32 --synthetic-features 128 --synthetic-l0 5 --k 5 --batch-size 256 \
		--steps 3000 --log-every 300 --checkpoint-every 1000 --out-dir runs/demo

bench: $(VENV)/.installed
	$(PY) -m bench --quick --results-dir $(RESULTS_DIR)

bench-full: $(VENV)/.installed
	$(PY) -m bench --full --results-dir $(RESULTS_DIR)

# Time budgets (seconds) of the GPU targets. Each of gpu-test, gpu-bench and gpu-tune fits one 10-minute call
# on an H100 with gpu-install (~1 min): it starts no new test, case or config once its budget is spent, records
# what it skipped, and writes its JSON as it goes, so a call cut short still leaves results (bench/NOTES.md,
# "GPU targets: budget").
GPU_TEST_BUDGET_S ?= 380
GPU_TEST_TIMEOUT_S ?= 120
GPU_BENCH_BUDGET_S ?= 460
GPU_TUNE_BUDGET_S ?= 460

# On the GPU machine (no network; torch, triton, numpy, pytest preinstalled): install offline against
# those packages, run the compiled suite (gpu tests included), then the benchmark; logs and JSON go
# under $(RESULTS_DIR). gpu-test and gpu-bench are the two halves, for runs with a time limit per call.
gpu-check: gpu-test gpu-bench

gpu-install:
	mkdir -p $(RESULTS_DIR)
	python3 -m pip install -q --no-deps --no-build-isolation -e .

# Kernel compilation dominates a cold GPU run: with pytest-xdist (preinstalled there) 8 workers compile at once.
# pytest-timeout (preinstalled too) ends a test after GPU_TEST_TIMEOUT_S; bench.testrun skips the tests that
# would start after GPU_TEST_BUDGET_S and writes gpu-tests.json every 2 s.
gpu-test: gpu-install
	set -o pipefail; python3 -m pytest -q -m "gpu or not gpu" $$(python3 -c "import xdist" 2>/dev/null && printf -- '-n 8') \
		$$(python3 -c "import pytest_timeout" 2>/dev/null && printf -- '--timeout=$(GPU_TEST_TIMEOUT_S)') \
		-p bench.testrun --run-budget-s $(GPU_TEST_BUDGET_S) --run-json $(RESULTS_DIR)/gpu-tests.json \
		tests 2>&1 | tee $(RESULTS_DIR)/gpu-tests.log

gpu-bench: gpu-install
	set -o pipefail; python3 -m bench --quick --device cuda --budget-s $(GPU_BENCH_BUDGET_S) \
		--results-dir $(RESULTS_DIR) 2>&1 | tee $(RESULTS_DIR)/gpu-bench.log

# Tile sweep of the fused encoders at the reference shape (GPU only); JSON under $(RESULTS_DIR), after each config.
gpu-tune: gpu-install
	python3 -m bench.tune --op topk_encode,threshold_encode --budget-s $(GPU_TUNE_BUDGET_S) \
		--results-dir $(RESULTS_DIR)

# Compile every Triton kernel for sm_90 with the GPU machine's triton 3.6, on this CPU machine.
compile-check: .venv-t36/.installed
	PYTHONPATH=. .venv-t36/bin/python tests/compile_check.py

.venv-t36/.installed:
	$(PYTHON) -m venv .venv-t36
	.venv-t36/bin/pip install -q torch==2.13.0 "triton==3.6.0" "numpy<2.4"
	touch $@

clean:
	rm -rf $(VENV) .venv-t36 *.egg-info .pytest_cache .ruff_cache build kernels/_C*.so
