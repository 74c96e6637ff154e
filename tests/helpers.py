"""Shared test helpers: tolerances by dtype (the one place they live), random inputs, and an
independent float64 reference that walks the rows one at a time."""
from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from conftest import DEVICE

# Relative error ||actual - expected|| / ||expected|| allowed per hidden dtype, for the forward output
# and for every gradient. fp32 runs the fused kernels in exact fp32 (ieee dots); 16-bit hidden states
# are rounded on output and their dots run in tf32, so the bound is a few units of their rounding.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = GPU_DTYPES if DEVICE == "cuda" else CPU_DTYPES


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, what: str, scale: float = 1.0):
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype] * scale, f"{what}: relative error {err:.3g} > {TOLERANCE[dtype] * scale:.3g} ({dtype})"


def orthonormal_rows(r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=gen))
    return q.t().contiguous()


def make_params(kind: str, r: int, d: int, gen: torch.Generator, dtype=torch.float32, device=DEVICE):
    """Random (never zero) parameters of a LoReFT or DiReFT edit, in the order loreft/direft take them."""
    scale = d**-0.5
    if kind == "loreft":
        R = orthonormal_rows(r, d, gen)
        W = torch.randn(r, d, dtype=torch.float64, generator=gen) * scale
        b = torch.randn(r, dtype=torch.float64, generator=gen)
        params = (R, W, b)
    else:
        W1 = torch.randn(r, d, dtype=torch.float64, generator=gen) * scale
        b = torch.randn(r, dtype=torch.float64, generator=gen)
        W2 = torch.randn(r, d, dtype=torch.float64, generator=gen) * scale
        params = (W1, b, W2)
    return tuple(p.to(device=device, dtype=dtype) for p in params)


def reference_edit(kind, hidden, positions, params, act=None, keep=None, p=0.0):
    """LoReFT (params R, W, b) or DiReFT (W1, b, W2) through reference_family."""
    if kind == "loreft":
        R, W, b = params
        return reference_family("loreft", hidden, positions, R, W, b, act=act, keep=keep, p=p)
    W1, b, W2 = params
    return reference_family("direft", hidden, positions, W2, W1, b, act=act, keep=keep, p=p)


# The six intervention types as (lift is orthonormal R, source is act(Wh + b), subtract L h (+ b2)).
FAMILY = {
    "loreft": (True, True, True),
    "noreft": (False, True, True),
    "consreft": (True, False, True),
    "lobireft": (True, False, False),
    "direft": (False, True, False),
    "orthodireft": (True, True, False),
}


def reference_family(kind, hidden, positions, lift, weight, bias, proj_bias=None, act=None, keep=None, p=0.0):
    """float64 row by row, out of place: the intervention formula of `kind` (FAMILY) written directly.
    lift is R or W2 [r, d]; weight W [r, d] (None without a linear source); bias b; proj_bias b2.
    keep: optional [B, P, d] dropout keep-mask (1 kept, 0 dropped) indexed by the owning slot.
    Differentiable through torch autograd."""
    _, source_linear, subtract = FAMILY[kind]
    f = (lambda z: z) if act in (None, "identity") else ACT2FN[act]
    out = hidden.clone()
    B, T, _ = hidden.shape
    for i in range(B):
        seen = set()
        for j in range(positions.shape[1]):
            t = int(positions[i, j])
            if t < 0 or t >= T or t in seen:
                continue
            seen.add(t)
            u = hidden[i, t]
            s = f(weight @ u + bias) if source_linear else bias
            if subtract:
                s = s - (lift @ u + (proj_bias if proj_bias is not None else 0.0))
            y = u + lift.t() @ s
            if keep is not None:
                y = y * keep[i, j] / (1.0 - p)
            out[i, t] = y
    return out
