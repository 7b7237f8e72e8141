# routelog: every target sets up what it needs; only python3 and make are assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is a test-only dependency (real .pt files in tests); never a runtime one.
TORCH  ?= torch==2.13.0
# extras the test suite installs: each optional world (torch, cloud, dask, ...) is tested.
TEST_EXTRAS := dev,dask,cloud

.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(TEST_EXTRAS)]'
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install routelog with its dev tools

demo: $(STAMP)  ## analyze the bundled collapsing sample run
	$(BIN)/routelog analyze sample_logs/collapse --top-k 2

lint: $(STAMP)  ## ruff and mypy (checks only)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)  ## fix formatting and autofixable lint
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint  ## ruff, mypy strict, then the whole pytest suite
	$(BIN)/python -m pytest

samples: $(STAMP)  ## regenerate sample_logs/ (deterministic)
	$(BIN)/python scripts/make_samples.py sample_logs

bench: $(STAMP)  ## run the performance benchmark (writes bench/results.json; BENCH_ARGS=--quick)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install demo lint fmt test samples bench clean
