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
# The Hugging Face integration is also tested against transformers 4.45.1 (layers return tuples there;
# 5.x returns tensors) in a second environment, which also holds the real pyreft 0.1.0 / pyvene 0.1.8
# (pyreft pins transformers 4.45.1) for the interop tests in tests_pyreft/.
COMPAT_VENV ?= .venv-hf445
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TRANSFORMERS ?= transformers==4.45.1

.PHONY: setup test bench clean

$(VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

$(COMPAT_VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q "$(TORCH)"
	$(COMPAT_PY) -c "import triton" 2>/dev/null || $(COMPAT_PY) -m pip install -q "$(TRITON)"
	$(COMPAT_PY) -m pip install -q "$(COMPAT_TRANSFORMERS)" -e ".[test]"
	# the real pyreft for tests_pyreft/, without its notebook-and-plotting requirements (pyvene imports
	# matplotlib; pyreft's `datasets` import is stubbed in tests_pyreft/conftest.py)
	$(COMPAT_PY) -m pip install -q --no-deps "pyreft==0.1.0" "pyvene==0.1.8"
	$(COMPAT_PY) -m pip install -q matplotlib
	touch $@

setup: $(VENV)/.ready $(COMPAT_VENV)/.ready

# Everything under the newest transformers, then the Hugging Face integration tests under 4.45.1 and the
# tests against the real pyreft.
test: $(VENV)/.ready $(COMPAT_VENV)/.ready
	$(PY) -m pytest
	$(COMPAT_PY) -m pytest -q tests/test_hf_*.py
	$(COMPAT_PY) -m pytest -q tests_pyreft

bench: $(VENV)/.ready
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
