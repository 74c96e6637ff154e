"""Test setup. On a machine without CUDA the Triton kernels run under the Triton interpreter, which
must be switched on before reft_kernels decorates them, hence before anything imports reft_kernels."""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the backend is chosen per test; a developer's REFT_KERNELS_BACKEND must not leak in
os.environ.pop("REFT_KERNELS_BACKEND", None)

DEVICE = "cuda" if _HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
