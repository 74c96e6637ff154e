"""The ops are registered with torch.library: opcheck passes, and torch.compile traces a model that calls
loreft/direft (fullgraph) and gives the eager outputs and gradients."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from conftest import DEVICE
from helpers import assert_close, make_params


def _args(save, dtype=torch.float32, r=4, d=96):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, d, generator=gen).to(DEVICE, dtype)
    positions = torch.tensor([[0, 3, 3], [4, -1, 1]], device=DEVICE)
    R, W, b = make_params("loreft", r, d, gen)
    return hidden, positions, R, W, b


@pytest.mark.parametrize("save", [0, 1, 2])
def test_opcheck_forward(save):
    hidden, positions, R, W, b = _args(save)
    args = (hidden, positions, R, W, b, None, True, True, "gelu", 0.0, 0, save)
    torch.library.opcheck(torch.ops.reft_kernels.edit_fwd.default, args)


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_opcheck_backward(need_dx, recompute):
    hidden, positions, R, W, b = _args(2)
    out = hidden.clone()
    rows, stats = torch.ops.reft_kernels.edit_fwd(out, positions, R, W, b, None, True, True, "silu", 0.0, 0, 2)
    grad = torch.randn_like(hidden)
    args = (grad, positions, None if recompute else rows, out if recompute else None, stats, R, W,
            True, True, False, "silu", 0.0, 0, need_dx)
    torch.library.opcheck(torch.ops.reft_kernels.edit_bwd.default, args)


class _TinyBlockWithEdit(torch.nn.Module):
    """A residual block whose output is edited, as the hook layer will do inside a model."""

    def __init__(self, d, r, kind):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.lin = torch.nn.Linear(d, d).to(DEVICE)
        self.kind = kind
        self.p0, self.p1, self.p2 = (torch.nn.Parameter(p) for p in make_params(kind, r, d, gen))

    def forward(self, x, positions):
        h = x + torch.tanh(self.lin(x))
        op = rk.loreft if self.kind == "loreft" else rk.direft
        h = op(h, positions, self.p0, self.p1, self.p2, act="relu", backend="triton")
        return (h * h).sum(-1)


@pytest.mark.parametrize("kind", ["loreft", "direft"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler, kind):
    torch._dynamo.reset()
    d, r = 64, 4
    model = _TinyBlockWithEdit(d, r, kind)
    x = torch.randn(2, 6, d, device=DEVICE, requires_grad=True)
    positions = torch.tensor([[0, 5, 5], [2, -1, 3]], device=DEVICE)

    def run(m):
        x.grad = None
        for p in m.parameters():
            p.grad = None
        out = m(x, positions)
        out.sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    eager = run(model)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    got = run(compiled)
    for g, e in zip(got, eager):
        assert_close(g, e, torch.float32, f"{compiler} vs eager", scale=10)


def test_eager_path_bypasses_the_dispatcher_but_bumps_the_version():
    """Eager calls go straight to the implementation (cheaper); the in-place write must still be visible
    to autograd's version counter like the registered op's would be."""
    hidden, positions, R, W, b = _args(0)
    v0 = hidden._version
    rk.loreft(hidden, positions, R, W, b, backend="triton")
    assert hidden._version > v0


def test_opcheck_orthonormalize():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 40, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.reft_kernels.orthonormalize_fwd.default, (A,))
    Q, cinv = torch.ops.reft_kernels.orthonormalize_fwd(A)
    torch.library.opcheck(torch.ops.reft_kernels.orthonormalize_bwd.default, (torch.randn_like(Q), Q, cinv))


@pytest.mark.parametrize("kind", ["loreft", "consreft", "noreft"])
def test_torch_compile_intervention_module(kind):
    """A module (orthonormal R computed by the registered op, the edit by the fused op) compiles with
    fullgraph and gives the eager output and gradients."""
    torch._dynamo.reset()
    d, r = 64, 4
    torch.manual_seed(0)
    kw = {"add_bias": True} if kind == "noreft" else {}
    edit = rk.INTERVENTIONS[kind](d, r, dtype=torch.float32, device=DEVICE, backend="triton", **kw)
    lin = torch.nn.Linear(d, d).to(DEVICE)
    x = torch.randn(2, 6, d, device=DEVICE)
    positions = torch.tensor([[0, 5, 5], [2, -1, 3]], device=DEVICE)

    def step(x):
        h = edit(lin(x), positions)
        return (h * h).sum()

    def run(fn):
        edit.zero_grad()
        out = fn(x)
        out.backward()
        return [out.detach()] + [p.grad.clone() for p in edit.parameters()]

    eager = run(step)
    got = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    for g, e in zip(got, eager):
        assert_close(g, e, torch.float32, "compiled vs eager", scale=10)
