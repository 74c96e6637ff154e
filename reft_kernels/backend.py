"""Which implementation runs an op: the fused Triton kernels or the plain-PyTorch reference.

- backend="triton": the fused kernels. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set
  before reft_kernels was imported (the Triton interpreter: slow, for tests).
- backend="torch": the reference written with PyTorch ops (any device, any dtype torch supports, any
  transformers activation). It is also the "naive PyTorch" baseline of the benchmarks.
- backend=None: the environment variable REFT_KERNELS_BACKEND ("triton" or "torch") if set, else
  triton for CUDA tensors and torch otherwise. An explicit backend argument wins over the variable.
"""
from __future__ import annotations

import os

import torch

BACKEND_ENV = "REFT_KERNELS_BACKEND"
BACKENDS = ("triton", "torch")

try:
    import triton  # noqa: F401  (availability probe)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, which happens when reft_kernels.ops is
# imported; reading it once here matches what the kernels will do.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str | None, hidden: torch.Tensor) -> str:
    """The backend that will run an op on `hidden`; ValueError when the request cannot be served."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r}; expected one of {BACKENDS}")
    if backend is None:
        backend = "triton" if hidden.is_cuda and HAS_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not hidden.is_cuda and not (hidden.device.type == "cpu" and INTERPRET):
            raise ValueError(
                f"backend='triton' runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 set before "
                f"importing reft_kernels; hidden is on {hidden.device}. Use backend='torch' here."
            )
    return backend
