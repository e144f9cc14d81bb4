# Two entry points for a fresh machine with Python and pip: `make train` and `make test`.
# Both create .venv, install PyTorch and the package (building the C++/CUDA extension where a
# compiler and nvcc are present), then train or test.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EPOCHS ?= 10
OUT ?= runs/dt-mnist
export MAX_JOBS ?= 2
export NOPROP_REQUIRE_EXTENSION ?= 1

.PHONY: setup test test-fast train bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel ninja "torch>=2.4"
	$(BIN)/python -m pip install --no-build-isolation -e ".[test]"
	touch $@

# The whole test suite (CPU; GPU-only tests skip with a reason).
test: setup
	$(BIN)/python -m pytest

# Everything but the minutes-long learning tests.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# NoProp-DT on MNIST with the paper's hyper-parameters; offline it falls back to scikit-learn's
# bundled digits and says so.
train: setup
	$(BIN)/noprop train --method dt --dataset mnist --epochs $(EPOCHS) --out $(OUT)

# Benchmarks run from this checkout (bench/ is not installed); results go to bench/results.
bench: setup
	$(BIN)/python -m bench.ops --out bench/results
	$(BIN)/noprop bench --out bench/results

# On a fresh GPU machine, with its own Python, torch and triton and no network: installs the package
# without dependencies (building the extension for that GPU), runs the whole test suite, the op,
# end-to-end and sampling benchmarks, each phase with its own timeout, and writes every result into
# one folder, bench/results/gpu-check-<gpu>-<date>/ (packed into $$OUT too when OUT is set). Without
# a CUDA device it prints the plan and exits. GPU_CHECK_ARGS: see python -m bench.gpu_check --help.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info noprop/_C*.so .pytest_cache
