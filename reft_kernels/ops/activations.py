"""Activations the fused kernels support, by their transformers ACT2FN names.

The source term of an edit is act(W h + b). The Triton kernels compute act and its derivative in
registers from a compile-time code; the torch reference uses the matching torch function. Names not in
SUPPORTED are run only by the torch backend (through transformers.ACT2FN).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without Triton
    triton = None

# name -> compile-time code used by the kernels. None and "linear"/"identity" mean no activation.
SUPPORTED: dict[str, int] = {
    "identity": 0,
    "linear": 0,
    "relu": 1,
    "gelu": 2,               # exact (erf) GELU, transformers' GELUActivation
    "gelu_new": 3,           # tanh approximation
    "gelu_pytorch_tanh": 3,
    "gelu_fast": 3,          # same function as gelu_new, written differently in transformers
    "silu": 4,
    "swish": 4,
    "tanh": 5,
    "sigmoid": 6,
    "quick_gelu": 7,         # x * sigmoid(1.702 x)
}


def canonical(act: str | None) -> str:
    """The name used everywhere else ("identity" for None)."""
    if act is None:
        return "identity"
    if not isinstance(act, str):
        raise TypeError(f"act must be None or a transformers ACT2FN name (str), got {type(act).__name__}")
    return act


def kernel_code(act: str) -> int:
    """Compile-time activation code for the Triton kernels; ValueError if the kernels lack it."""
    try:
        return SUPPORTED[act]
    except KeyError:
        raise ValueError(
            f"act={act!r} has no fused kernel; supported: {sorted(SUPPORTED)}. "
            "Use backend='torch' for any other transformers ACT2FN name."
        ) from None


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(z, approximate="tanh")


_TORCH: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    0: lambda z: z,
    1: torch.relu,
    2: torch.nn.functional.gelu,
    3: _gelu_tanh,
    4: torch.nn.functional.silu,
    5: torch.tanh,
    6: torch.sigmoid,
    7: lambda z: z * torch.sigmoid(1.702 * z),
}


def torch_fn(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable torch function for act (any ACT2FN name)."""
    code = SUPPORTED.get(act)
    if code is not None:
        return _TORCH[code]
    from transformers.activations import ACT2FN  # slow import, only for the rare names

    if act not in ACT2FN:
        raise ValueError(f"act={act!r} is not a transformers ACT2FN name; known: {sorted(ACT2FN)}")
    return ACT2FN[act]


if triton is not None:
    # Triton kernels may read globals only when they are constexpr. They multiply tensors from the right
    # (`z * C`, never `C * z`): under Triton 3.9's interpreter `C * z` is a tensor that tl.abs and the other
    # math functions refuse ("cannot convert ... to tensor").
    _SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
    _INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
    _INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))

    @triton.jit
    def _tanh(x):
        # Triton's core language has no tanh. exp-based tanh loses relative precision near 0
        # (1 - e^-2a cancels), so small |x| takes the odd Taylor series (error < 1e-8 relative at 0.1).
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        a2 = a * a
        small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        t = tl.where(a < 0.1, small, big)
        return tl.where(x < 0.0, -t, t)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def act_fwd(z, ACT: tl.constexpr):
        """act(z) for the compile-time code ACT (see SUPPORTED), in fp32."""
        if ACT == 0:
            return z
        elif ACT == 1:
            return tl.maximum(z, 0.0)
        elif ACT == 2:
            return 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT_2))
        elif ACT == 3:
            return 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * _SQRT_2_OVER_PI))
        elif ACT == 4:
            return z * _sigmoid(z)
        elif ACT == 5:
            return _tanh(z)
        elif ACT == 6:
            return _sigmoid(z)
        else:
            return z * _sigmoid(1.702 * z)

    @triton.jit
    def act_grad(z, ACT: tl.constexpr):
        """d act(z) / dz, in fp32."""
        if ACT == 0:
            return tl.full(z.shape, 1.0, tl.float32)
        elif ACT == 1:
            return tl.where(z > 0.0, 1.0, 0.0)
        elif ACT == 2:
            return 0.5 * (1.0 + tl.erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        elif ACT == 3:
            inner = (z + 0.044715 * z * z * z) * _SQRT_2_OVER_PI
            t = _tanh(inner)
            return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        elif ACT == 4:
            s = _sigmoid(z)
            return s * (1.0 + z * (1.0 - s))
        elif ACT == 5:
            t = _tanh(z)
            return 1.0 - t * t
        elif ACT == 6:
            s = _sigmoid(z)
            return s * (1.0 - s)
        else:
            s = _sigmoid(1.702 * z)
            return s * (1.0 + 1.702 * z * (1.0 - s))
