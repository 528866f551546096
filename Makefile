# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use (CPU torch pinned in requirements-dev.txt) and reuses it afterwards.
#   make test            ruff + the whole suite, Triton installed for its CPU-interpreter tests (CI)
#   make test-no-triton  the same without installing Triton (about 1 GB): its tests are skipped
#   make docs            the documentation site (mkdocs build --strict: any warning fails)
#   make dist            sdist and wheel in dist/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.gumbelkit-demo
TEST_LITE_STAMP := $(VENV)/.gumbelkit-test-lite
TEST_STAMP := $(VENV)/.gumbelkit-test
DOCS_STAMP := $(VENV)/.gumbelkit-docs
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-no-triton lint docs dist bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(TEST_LITE_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[demo,test]'
	touch $@

$(TEST_STAMP): $(TEST_LITE_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[demo,test,triton]'
	touch $@

$(DOCS_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

setup: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/gumbelkit demo $(DEMO_ARGS)

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-no-triton: $(TEST_LITE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

dist: $(TEST_LITE_STAMP)
	rm -rf dist
	$(BIN)/python -m build

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/bench_core.py --write-docs
	$(BIN)/python benchmarks/bench_estimators.py --write-docs
	$(BIN)/python benchmarks/sampling_bench.py --write-docs
	$(BIN)/python benchmarks/bench_fused.py
	$(BIN)/python benchmarks/bench_overhead.py

lint: $(TEST_LITE_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site dist build
