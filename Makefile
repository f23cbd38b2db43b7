# One-command set-up: `make run` serves the embedded default, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, the CPU build from PyTorch's CPU index: PyPI's Linux `torch` is the multi-GB CUDA
# build. A GPU box picks a CUDA build instead, e.g.
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu128 install
# (Where that index is out of reach but a local CPU wheel is on pip's find-links, pip takes that.)
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX) --retries 1
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install
	MALLOC_ARENA_MAX=2 $(BIN)/maml-serve serve --host $(HOST) --port $(PORT) --console-key

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_adapt.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
