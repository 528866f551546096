# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use (CPU torch pinned in requirements-dev.txt) and reuses it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.gumbelkit-demo
TEST_STAMP := $(VENV)/.gumbelkit-test
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[demo,test,triton]'
	touch $@

setup: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/gumbelkit demo $(DEMO_ARGS)

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/bench_core.py --write-docs
	$(BIN)/python benchmarks/bench_estimators.py --write-docs
	$(BIN)/python benchmarks/sampling_bench.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
