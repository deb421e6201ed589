# Fresh machine: `make demo` or `make test` sets everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so pip does not fetch a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m idefics demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The GPU suite (tests/test_gpu.py: the public API on CUDA against the CPU), with the machine's own python and the
# packages it has (torch, triton, transformers, pytest): no virtual environment, no network. Triton compiles the
# fused kernels instead of interpreting them.
test-gpu:
	TRITON_INTERPRET=0 PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m pytest -m gpu --durations=15 tests/test_gpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info
