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

.PHONY: setup test test-fast train bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info noprop/_C*.so .pytest_cache
