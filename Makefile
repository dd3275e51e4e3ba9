# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; pin it so pip never pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint reliability bench academy academy-v0 gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,mlflow,academy,dashboard]"
	touch $@

demo: setup
	$(BIN)/tolaria train

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

test: lint
	$(BIN)/pytest

# docs/reliability.md: what the fault drills (tests/test_drills.py) measure on this machine.
# `make test` runs the same drills and fails when the committed table no longer matches them.
reliability: setup
	TOLARIA_WRITE_RELIABILITY=1 $(BIN)/pytest -m drill

# The academy's day and night from scratch: daytime runs with the learned policy on a
# workload v0 never saw (synthetic rings), then one nightly session: its gates and decision.
academy: setup
	rm -rf runs/academy-demo
	$(BIN)/tolaria academy demo --dir runs/academy-demo

# The base policy v0 shipped in the package: the replay campaign and the scorer trained on it
# (about 6 minutes on 2 cores).  Deterministic: a rebuild gives the committed weights bit for bit.
academy-v0: setup
	rm -rf src/tolaria/academy/v0
	OMP_NUM_THREADS=1 $(BIN)/tolaria academy pretrain --out src/tolaria/academy/v0

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run_all

# Lightning is a benchmark contender only, so `setup` (and with it demo and test) leaves it
# out; the torch pin keeps its dependency on torch from replacing the CPU build.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,mlflow,academy,dashboard,bench]" "$(TORCH_PIN)"
	touch $@

# The CUDA paths (device placement of host and grafts, bf16 autocast, no per-batch host
# sync, pinned memory): a few epochs on the GPU; "skipped: no CUDA" on a machine without one.
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
