# routelog: every target sets up what it needs; only python3 and make are assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
VENV_MIN ?= .venv-min
MIN_BIN  := $(VENV_MIN)/bin
MIN_STAMP := $(VENV_MIN)/.installed
# torch is a test-only dependency (real .pt files in tests); never a runtime one.
TORCH  ?= torch==2.13.0
# extras the test suite installs: each optional world (torch, cloud, dask, ...) is tested.
TEST_EXTRAS := dev,torch,transformers,dask,plot,tensorboard,wandb,cloud
# test-min proves the runtime floors: the test tools and torch, without the optional worlds
# (whose own floors can exceed the core's); their tests skip there and run in `make test`.
MIN_EXTRAS := dev,torch

.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-9s %s\n", $$1, $$2}'

# routelog alone (what a user installs): enough for the demo, no test tools, no torch.
# The install compiles the C kernels (routelog/_native.c) in place: a change to them reinstalls.
NATIVE := setup.py routelog/_native.c
$(RUNTIME): pyproject.toml $(NATIVE)
	@cc="$${CC:-cc}"; command -v "$${cc%% *}" >/dev/null 2>&1 || { echo "routelog compiles its C kernels when \
	installed: install a C compiler and Python's headers (Debian: apt-get install gcc python3-dev)"; \
	exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(RUNTIME)

# routelog with the test extras and torch (real .pt files in tests).
$(STAMP): $(RUNTIME)
	$(BIN)/python -m pip install --quiet '$(TORCH)'  # first: the extras must not pull another torch
	$(BIN)/python -m pip install --quiet -e '.[$(TEST_EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install routelog with its dev tools

demo: $(RUNTIME)  ## analyze the bundled collapsing sample run (installs routelog only)
	$(BIN)/routelog analyze sample_logs/collapse --top-k 2

# The lowest declared version of every runtime dependency, installed exactly: the constraints
# are derived from pyproject.toml, so the floors and this test cannot drift apart.
$(MIN_STAMP): pyproject.toml scripts/min_requirements.py $(NATIVE)
	@test -x $(MIN_BIN)/python || $(PYTHON) -m venv $(VENV_MIN)
	$(MIN_BIN)/python -m pip install --quiet --upgrade pip
	$(MIN_BIN)/python scripts/min_requirements.py > $(VENV_MIN)/constraints.txt
	$(MIN_BIN)/python -m pip install --quiet -c $(VENV_MIN)/constraints.txt '$(TORCH)'
	$(MIN_BIN)/python -m pip install --quiet -c $(VENV_MIN)/constraints.txt -e '.[$(MIN_EXTRAS)]'
	$(MIN_BIN)/python scripts/min_requirements.py --verify
	@touch $(MIN_STAMP)

test-min: $(MIN_STAMP)  ## the pytest suite on the lowest declared dependency versions (.venv-min)
	$(MIN_BIN)/python scripts/min_requirements.py --verify
	$(MIN_BIN)/python -m pytest

lint: $(STAMP)  ## ruff and mypy (checks only)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)  ## fix formatting and autofixable lint
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

browser:  ## install headless Chromium (Debian's package) for the HTML report tests
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
		>/dev/null; } || echo "chromium could not be installed: the browser tests skip (fail on CI)"

test: lint browser  ## ruff, mypy strict, then the whole pytest suite and the docstrings' examples
	$(BIN)/python -m pytest tests routelog --doctest-modules

readme: $(STAMP)  ## rewrite the README's console examples from what routelog prints now
	ROUTELOG_UPDATE_SNAPSHOTS=1 $(BIN)/python -m pytest -q tests/test_readme.py

fuzz: $(STAMP)  ## long property-based fuzzing of the readers (ROUTELOG_FUZZ=long, thousands of inputs each)
	ROUTELOG_FUZZ=long $(BIN)/python -m pytest tests/test_fuzz.py tests/ingest/test_pt_fuzz.py -p no:cacheprovider

corpus: $(STAMP)  ## regenerate the hostile-input corpus under tests/corpus/ (deterministic)
	$(BIN)/python tests/corpus/make_corpus.py

samples: $(STAMP)  ## regenerate sample_logs/ and routelog/samples/ (deterministic)
	$(BIN)/python scripts/make_samples.py sample_logs

# bench (i)'s S3 server, MiniStack, in an environment of its own (it pins its own botocore);
# the test suite's server, moto, serves objects more slowly than routelog reads them from disk.
S3_VENV ?= .venv-s3
MINISTACK ?= ministack==1.5.33
S3_STAMP := $(S3_VENV)/.installed
$(S3_STAMP):
	@test -x $(S3_VENV)/bin/python || $(PYTHON) -m venv $(S3_VENV)
	$(S3_VENV)/bin/python -m pip install --quiet '$(MINISTACK)'
	@touch $(S3_STAMP)

bench: $(STAMP) $(S3_STAMP)  ## run the performance benchmark (writes bench/results.json; BENCH_ARGS=--quick)
	$(BIN)/python bench/run.py --s3-python $(S3_VENV)/bin/python $(BENCH_ARGS)

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) $(VENV_MIN) $(S3_VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install demo lint fmt browser test test-min readme fuzz corpus samples bench clean
