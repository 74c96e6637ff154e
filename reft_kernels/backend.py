"""Which implementation runs an op: the fused Triton kernels, the fused C++ CPU kernels, or the
plain-PyTorch reference.

- backend="triton": the fused Triton kernels. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was
  set before reft_kernels was imported (the Triton interpreter: slow, for tests).
- backend="cpp": the fused C++ kernels of csrc/ (reft_kernels.extension): CPU tensors, fp32/fp16/bf16.
  Ops without a C++ kernel (the orthonormalization of R: r x d, tiny) run the torch reference under it.
  On CUDA tensors: the forward without gradients or dropout, a CUDA kernel launched from C++ (the host
  path, csrc/edit_cuda.cu; built on first use); reft_edit refuses other CUDA calls under it.
- backend="torch": the reference written with PyTorch ops (any device, any dtype torch supports, any
  transformers activation). It is also the "naive PyTorch" baseline of the benchmarks.
- backend=None: the environment variable REFT_KERNELS_BACKEND ("triton", "cpp" or "torch") if set, else
  triton for CUDA tensors, cpp for CPU tensors when the extension loads (it is built on first use), and
  torch otherwise. An explicit backend argument wins over the variable. With REFT_KERNELS_CUDA_HOST=1,
  reft_edit also sends eager CUDA calls without gradients or dropout to the host path (opt-in until
  measured on a GPU).
"""
from __future__ import annotations

import os

import torch

from . import extension

BACKEND_ENV = "REFT_KERNELS_BACKEND"
BACKENDS = ("triton", "cpp", "torch")

try:
    import triton  # noqa: F401  (availability probe)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, which happens when reft_kernels.ops is
# imported; reading it once here matches what the kernels will do.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpp_available() -> bool:
    """True when the C++ CPU kernels are loaded (building them on the first call; see extension.py)."""
    return extension.available()


def resolve(backend: str | None, hidden: torch.Tensor, has_cpp: bool = True) -> str:
    """The backend that will run an op on `hidden`; ValueError when the request cannot be served.

    has_cpp: whether the op has a C++ kernel; if not, "cpp" resolves to "torch"."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={backend!r}; expected one of {BACKENDS}")
    if backend is None:
        if hidden.is_cuda and HAS_TRITON:
            backend = "triton"
        elif hidden.is_cpu and has_cpp and cpp_available():
            return "cpp"  # (every CPU call comes here: nothing left to check)
        else:
            backend = "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton', 'cpp' or 'torch', got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not hidden.is_cuda and not (hidden.device.type == "cpu" and INTERPRET):
            raise ValueError(
                f"backend='triton' runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 set before "
                f"importing reft_kernels; hidden is on {hidden.device}. Use backend='cpp' or 'torch' here."
            )
    if backend == "cpp":
        if not has_cpp:
            return "torch"
        if hidden.is_cuda:
            if not extension.cuda_available():
                raise ValueError(f"backend='cpp' on CUDA tensors needs the CUDA host path, which is unavailable "
                                 f"({extension.load_cuda()[1]}); use backend='triton'")
            return backend
        if not hidden.is_cpu:
            raise ValueError(f"backend='cpp' runs CPU tensors, and CUDA tensors through the CUDA host path; hidden "
                             f"is on {hidden.device}. Use backend='triton' or 'torch' here.")
        if not cpp_available():
            raise ValueError(f"backend='cpp' needs the C++ extension, which is unavailable ({extension.load()[1]}); "
                             "use backend='torch'")
    return backend
