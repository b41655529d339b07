# The two Quickstart commands: `make demo` (set up, run the main job) and `make test`
# (set up, lint, type-check, build the guide with warnings as errors, run the test suite).
# Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU wheel this kind of machine's pip finds: an unpinned
# torch (or a range admitting newer releases) pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup port-setup demo test lint docs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $@

# The port extra (jax, flax, keras, onnx, onnxruntime) for bnlab.port's tests.
port-setup: $(VENV)/.port-installed

$(VENV)/.port-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,port]'
	touch $@

demo: setup
	$(BIN)/bnlab demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The guide: docs/ built into site/ with warnings as errors (open site/index.html).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint docs port-setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/bnlab bench

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
