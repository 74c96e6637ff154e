"""Dropout with pyreft's semantics: on the whole output row at edited positions, only when training;
the fused kernels regenerate the mask in the backward from a seed instead of storing it."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from conftest import DEVICE
from helpers import assert_close, make_params
from test_fused_edit import BACKENDS, KINDS, run_op, run_reference

P_DROP = 0.3


def _setup(kind, seed=0, B=2, T=9, d=512, r=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE)
    positions = torch.tensor([[0, 4, 4, 8], [-1, 2, 3, 7]])[:B]
    params = make_params(kind, r, d, gen)
    grad_dir = torch.randn(B, T, d, generator=gen).to(DEVICE)
    return hidden, positions, params, grad_dir


def _keep_mask_from_output(out, positions, d):
    """[B, P, d] keep-mask per owning slot, read off the output (random data is never exactly 0)."""
    B, P = positions.shape
    keep = torch.ones(B, P, d, dtype=torch.float64)
    for i in range(B):
        seen = set()
        for j in range(P):
            t = int(positions[i, j])
            if t < 0 or t in seen:
                continue
            seen.add(t)
            keep[i, j] = (out[i, t] != 0).double().cpu()
    return keep


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_unless_training(backend, kind):
    hidden, positions, params, grad_dir = _setup(kind)
    plain = run_op(kind, backend, hidden, positions, params, grad_dir)
    evaluated = run_op(kind, backend, hidden, positions, params, grad_dir, dropout=P_DROP, training=False)
    for a, b in zip(plain, evaluated):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_forward_and_gradients(backend, kind):
    hidden, positions, params, grad_dir = _setup(kind)
    torch.manual_seed(123)
    got = run_op(kind, backend, hidden, positions, params, grad_dir, dropout=P_DROP, training=True)
    out = got[0]
    keep = _keep_mask_from_output(out, positions, hidden.shape[-1])
    edited_rows = 6
    kept = keep.sum().item() - (keep.numel() - edited_rows * hidden.shape[-1])
    frac_dropped = 1 - kept / (edited_rows * hidden.shape[-1])
    assert abs(frac_dropped - P_DROP) < 0.03, f"dropped fraction {frac_dropped:.3f}, expected {P_DROP}"
    want = run_reference(kind, hidden, positions, params, grad_dir, keep=keep, p=P_DROP)
    names = ["output", "grad hidden", "grad param 0", "grad param 1", "grad param 2"]
    for g, w, name in zip(got, want, names):
        assert_close(g, w, torch.float32, f"dropout {name}")
    # rows nobody edits: untouched forward and gradient
    assert torch.equal(out[0, 1], hidden[0, 1]) and torch.equal(got[1][0, 1], grad_dir[0, 1])


def test_dropout_seed_follows_torch_manual_seed():
    hidden, positions, params, _ = _setup("loreft")
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(rk.loreft(hidden.clone(), positions, *params, dropout=P_DROP, training=True, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_is_ignored_by_recompute():
    """Dropped elements cannot be rebuilt from the output, so recompute falls back to saved rows."""
    hidden, positions, params, grad_dir = _setup("loreft")
    torch.manual_seed(5)
    a = run_op("loreft", "triton", hidden, positions, params, grad_dir, dropout=P_DROP, training=True, recompute=True)
    torch.manual_seed(5)
    b = run_op("loreft", "triton", hidden, positions, params, grad_dir, dropout=P_DROP, training=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
