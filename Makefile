# The two commands (README): `make bench` sets up and runs the main job, `make test` sets up and runs the tests.
# Both create .venv on first use. torch is installed before the package, pinned: an open-ended torch
# requirement can pull a multi-GB CUDA build where a CPU build is wanted (and the machines here carry
# torch 2.13.0's CPU wheel on disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Triton 3.6 is what the GPU machines run; CI tests the same version under its interpreter.
TRITON ?= triton==3.6.0

.PHONY: setup test bench clean

$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.ready

test: $(VENV)/.ready
	$(PY) -m pytest

bench: $(VENV)/.ready
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
