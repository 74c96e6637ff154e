"""Setup for the tests that run against the real pyreft (0.1.0 on pyvene 0.1.8).

Run them in an environment that has pyreft, e.g.
    PYTHONPATH=.:tests /tmp/venv445/bin/python -m pytest tests_pyreft -q

pyreft imports `datasets` at import time, which none of these tests use: a stub module stands in when it
is missing (reft_kernels.bench.providers.stub_datasets, which the benchmarks use too). tests/ goes on sys.path for its tiny models
(tests/hf_models.py).
"""
import os
import sys

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        # the Triton kernels run on CPU tensors under the interpreter, which must be on before reft_kernels
        # decorates them (as tests/conftest.py does)
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
# the backend is chosen per test; a developer's REFT_KERNELS_BACKEND must not leak in
os.environ.pop("REFT_KERNELS_BACKEND", None)


from reft_kernels.bench.providers import stub_datasets  # noqa: E402 (after TRITON_INTERPRET is set)

stub_datasets()
# pyvene prints a line per save ("Directory ... created") and warns about nnsight: harmless


@pytest.fixture(scope="session")
def pyreft():
    """The real pyreft module (these tests exist to compare against it: an import failure is an error)."""
    import pyreft as module

    return module


@pytest.fixture(scope="session")
def pyvene():
    import pyvene as module

    return module
