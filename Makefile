# Two commands matter: `make demo` (set up, then run the embedded default job) and
# `make test` (set up, then run the test suite). Both work on a fresh machine with Python.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch 2.13.0 is on local disk on CPU machines; on a CUDA machine the same
# pin gets the CUDA build. An environment that already has torch keeps it.
TORCH_SPEC ?= torch==2.13.0
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,serve,sweep,tune,tensorboard,edge]"
	touch $@

# Fashion-MNIST from Debian (the demo's default data; tests use it too).
data:
	@test -d $(FASHION) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; }

# Debian's chromium + its driver, for the lens page's browser test (CI installs them; on a
# machine without them that one test skips).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi; }

demo: setup data
	$(BIN)/splitcem demo

# everything: unit tests, doctests and the end-to-end runs marked slow
test: setup data
	$(BIN)/python -m pytest -q

# the fast lane (under a minute on 2 cores): leaves out the tests marked slow
test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .cache/test-data runs
