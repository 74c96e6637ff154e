"""Every registered op validates its own inputs (issue 18, finding 2): the C++ ops reft_kernels_cpp::edit_fwd /
edit_bwd / edit, the Triton ops reft_kernels::edit_fwd / edit_bwd / orthonormalize_fwd / orthonormalize_bwd.
Each bad argument is a TypeError or ValueError naming it (the public functions' wording), never a read past
a buffer (a proj_bias shorter than r was one). Also: parameters that share memory with hidden (finding 3)
and a view of a leaf that requires grad (finding 5)."""
from __future__ import annotations

import math

import pytest
import torch

import reft_kernels as rk
from reft_kernels.ops import fused_edit as fe

B, T, D, R, P = 2, 5, 12, 3, 2
N = B * P
RP = fe.r_pad(R)

needs_cpp = pytest.mark.skipif(not rk.extension.available(), reason="the C++ extension did not build")
NAMESPACES = [pytest.param("reft_kernels_cpp", marks=needs_cpp), "reft_kernels"]


def _fwd_args(**over):
    gen = torch.Generator().manual_seed(0)
    args = dict(
        hidden=torch.randn(B, T, D, generator=gen), positions=torch.tensor([[0, 3], [1, -1]]),
        lift=torch.randn(R, D, generator=gen), weight=torch.randn(R, D, generator=gen), bias=torch.randn(R, generator=gen),
        proj_bias=torch.randn(R, generator=gen), source_linear=True, subtract_proj=True, act="identity", dropout=0.0,
        seed=0, save=2,
    )
    args.update(over)
    return args


def _bwd_args(**over):
    gen = torch.Generator().manual_seed(1)
    args = dict(
        grad_out=torch.randn(B, T, D, generator=gen), positions=torch.tensor([[0, 3], [1, -1]]),
        rows=torch.randn(N, D, generator=gen), output=None, stats=torch.randn(N, 2, RP, generator=gen),
        lift=torch.randn(R, D, generator=gen), weight=torch.randn(R, D, generator=gen), source_linear=True,
        subtract_proj=True, has_proj_bias=True, act="identity", dropout=0.0, seed=0, need_grad_hidden=True,
    )
    args.update(over)
    return args


def _op(ns, name):
    return getattr(getattr(torch.ops, ns), name).default


FWD_CASES = [
    # (id, overrides, error, message)
    ("hidden 2-D", dict(hidden=torch.randn(B, D)), ValueError, r"hidden must be \[B, T, d\]"),
    ("hidden float64", dict(hidden=torch.randn(B, T, D, dtype=torch.float64)), TypeError, "hidden must have a dtype in"),
    ("hidden expanded", dict(hidden=torch.randn(B, 1, D).expand(B, T, D)), ValueError, "hidden has overlapping memory"),
    ("positions float", dict(positions=torch.zeros(B, P)), TypeError, "positions must be int32 or int64"),
    ("positions batch", dict(positions=torch.zeros(1, P, dtype=torch.long)), ValueError,
     r"positions must be \[B, P\] with B=2"),
    ("positions 1-D", dict(positions=torch.zeros(P, dtype=torch.long)), ValueError, r"positions must be \[B, P\]"),
    ("lift wrong d", dict(lift=torch.randn(R, D - 1)), ValueError, r"lift must be \[r, "),
    ("lift r > d", dict(lift=torch.randn(D + 1, D), weight=torch.randn(D + 1, D), bias=torch.randn(D + 1),
                        proj_bias=None), ValueError, rf"lift must have 1 <= r <= d={D} rows, got r={D + 1}"),
    ("lift r = 0", dict(lift=torch.randn(0, D), weight=torch.randn(0, D), bias=torch.randn(0), proj_bias=None),
     ValueError, rf"lift must have 1 <= r <= d={D} rows, got r=0"),
    ("lift int", dict(lift=torch.ones(R, D, dtype=torch.long)), TypeError, "lift must have a dtype in"),
    ("lift float64", dict(lift=torch.randn(R, D, dtype=torch.float64)), TypeError, "lift must have a dtype in"),
    ("lift on meta", dict(lift=torch.randn(R, D, device="meta")), ValueError, "lift must be on hidden's device"),
    ("weight missing", dict(weight=None), ValueError, r"weight must be \[r, d\] = \[3, 12\] when source_linear"),
    ("weight wrong shape", dict(weight=torch.randn(R - 1, D)), ValueError, r"weight must be \["),
    ("weight int", dict(weight=torch.ones(R, D, dtype=torch.int32)), TypeError, "weight must have a dtype in"),
    ("weight without a linear source", dict(source_linear=False), ValueError,
     "weight must be None when the source is the bias alone"),
    ("bias short", dict(bias=torch.randn(R - 1)), ValueError, r"bias must be \[3\] \(r\)"),
    ("bias [r, 1]", dict(bias=torch.randn(R, 1)), ValueError, r"bias must be \[3\] \(r\)"),
    ("bias int", dict(bias=torch.ones(R, dtype=torch.long)), TypeError, "bias must have a dtype in"),
    ("bias on meta", dict(bias=torch.randn(R, device="meta")), ValueError, "bias must be on hidden's device"),
    ("proj_bias short", dict(proj_bias=torch.randn(1)), ValueError, r"proj_bias must be \[3\] \(r\)"),
    ("proj_bias long", dict(proj_bias=torch.randn(R + 5)), ValueError, r"proj_bias must be \[3\] \(r\)"),
    ("proj_bias int", dict(proj_bias=torch.ones(R, dtype=torch.long)), TypeError, "proj_bias must have a dtype in"),
    ("proj_bias without subtract_proj", dict(subtract_proj=False), ValueError, "proj_bias needs subtract_proj=True"),
    ("act unknown", dict(act="mish"), ValueError, "act='mish' has no fused kernel"),
    ("dropout 1", dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\), got 1"),
    ("dropout negative", dict(dropout=-0.1), ValueError, r"dropout must lie in \[0, 1\)"),
    ("dropout nan", dict(dropout=math.nan), ValueError, r"dropout must lie in \[0, 1\)"),
    ("save 3", dict(save=3), ValueError, "save must be 0 .nothing., 1 .stats. or 2 .stats and rows., got 3"),
    ("save -1", dict(save=-1), ValueError, "save must be 0"),
]


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("case", FWD_CASES, ids=[c[0] for c in FWD_CASES])
def test_edit_fwd_refuses(ns, case):
    _, over, error, message = case
    args = _fwd_args(**over)
    before = args["hidden"].clone() if args["hidden"].device.type == "cpu" else None
    with pytest.raises(error, match=message):
        _op(ns, "edit_fwd")(*args.values())
    if before is not None:
        assert torch.equal(args["hidden"], before)  # refused before anything was written


EDIT_CASES = [c for c in FWD_CASES if "save" not in c[1]]


@needs_cpp
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("case", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_cpp_edit_refuses(case, grad):
    """reft_kernels_cpp::edit, through its autograd kernel (parameters that require grad) and without."""
    _, over, error, message = case
    args = _fwd_args(**over)
    args.pop("save")
    for name in ("lift", "weight", "bias", "proj_bias"):
        x = args[name]
        if grad and isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.device.type == "cpu":
            args[name] = x.clone().requires_grad_(True)
    with pytest.raises(error, match=message):
        torch.ops.reft_kernels_cpp.edit.default(*args.values(), False, False)


BWD_CASES = [
    ("grad_out 2-D", dict(grad_out=torch.randn(B, D)), ValueError, r"grad_out must be \[B, T, d\]"),
    ("grad_out int", dict(grad_out=torch.ones(B, T, D, dtype=torch.long)), TypeError, "grad_out must have a dtype in"),
    ("positions batch", dict(positions=torch.zeros(3, P, dtype=torch.long)), ValueError,
     r"positions must be \[B, P\] with B=2"),
    ("lift wrong d", dict(lift=torch.randn(R, D + 1)), ValueError, r"lift must be \[r, "),
    ("lift float64", dict(lift=torch.randn(R, D, dtype=torch.float64)), TypeError, "lift must have a dtype in"),
    ("weight missing", dict(weight=None), ValueError, r"weight must be \[r, d\] = \[3, 12\] when source_linear"),
    ("weight without a linear source", dict(source_linear=False), ValueError,
     "weight must be None when the source is the bias alone"),
    ("proj_bias without subtract_proj", dict(subtract_proj=False), ValueError, "proj_bias needs subtract_proj=True"),
    ("stats short", dict(stats=torch.randn(N - 1, 2, RP)), ValueError, r"stats must be \[N, 2, r_pad\] = \[4, 2, 16\]"),
    ("stats flat", dict(stats=torch.randn(N * 2 * RP)), ValueError, r"stats must be \[N, 2, r_pad\]"),
    ("stats narrow", dict(stats=torch.randn(N, 2, R)), ValueError, r"stats must be \[N, 2, r_pad\]"),
    ("stats fp16", dict(stats=torch.randn(N, 2, RP).half()), ValueError, r"stats must be \[N, 2, r_pad\]"),
    ("stats on meta", dict(stats=torch.randn(N, 2, RP, device="meta")), ValueError, "stats must be on"),
    ("rows short", dict(rows=torch.randn(N - 1, D)), ValueError, r"rows must be \[N, d\] = \[4, 12\]"),
    ("rows fp16", dict(rows=torch.randn(N, D).half()), ValueError, r"rows must be \[N, d\]"),
    ("neither rows nor output", dict(rows=None), ValueError, "edit_bwd needs the saved rows"),
    ("output wrong shape", dict(rows=None, output=torch.randn(B, T + 1, D)), ValueError, r"output"),
    ("act unknown", dict(act="mish"), ValueError, "act='mish' has no fused kernel"),
    ("dropout 1", dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\)"),
]


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_edit_bwd_refuses(ns, case):
    _, over, error, message = case
    with pytest.raises(error, match=message):
        _op(ns, "edit_bwd")(*_bwd_args(**over).values())


@pytest.mark.parametrize("ns", NAMESPACES)
def test_good_arguments_pass(ns):
    """The cases above differ from these good calls by one argument each."""
    saved, stats = _op(ns, "edit_fwd")(*_fwd_args().values())
    assert saved.shape == (N, D) and stats.shape == (N, 2, RP)
    grad_hidden, grads = _op(ns, "edit_bwd")(*_bwd_args(rows=saved, stats=stats).values())
    assert grad_hidden.shape == (B, T, D) and grads.shape == (2 * R * D + 2 * R,)


def test_triton_bwd_reads_strided_saved_rows():
    """The Triton backward reads the saved rows through their strides (it assumed [N, d] contiguous)."""
    args = _fwd_args()
    saved, stats = torch.ops.reft_kernels.edit_fwd.default(*args.values())
    wide = torch.zeros(N, 2 * D)
    wide[:, ::2] = saved
    got = torch.ops.reft_kernels.edit_bwd.default(*_bwd_args(rows=wide[:, ::2], stats=stats).values())
    want = torch.ops.reft_kernels.edit_bwd.default(*_bwd_args(rows=saved, stats=stats).values())
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_strided_bias_is_read_by_its_strides(backend):
    """A bias that is a column of a matrix (stride 2): the Triton kernels indexed [r] vectors with unit stride."""
    if backend == "cpp" and not rk.extension.available():
        pytest.skip("the C++ extension did not build")
    a = _fwd_args()
    h, pos, R_, W, b = a["hidden"], a["positions"], a["lift"], a["weight"], a["bias"]
    b2 = torch.stack([b, torch.full_like(b, 1e6)], 1)[:, 0]
    assert not b2.is_contiguous()
    assert torch.allclose(rk.loreft(h.clone(), pos, R_, W, b2, backend=backend),
                          rk.loreft(h.clone(), pos, R_, W, b.clone(), backend="torch"), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Orthonormalization ops
# ------------------------------------------------------------------------------------------------

ORTH_FWD_CASES = [
    ("A 2-D", torch.randn(R, D), ValueError, r"A must be \[L, r, d\]"),
    ("A float64", torch.randn(1, R, D, dtype=torch.float64), TypeError, "A must be float32"),
    ("A r > d", torch.randn(1, D + 1, D), ValueError, r"A must have 1 <= r <= min\(d, 64\) rows"),
    ("A r = 0", torch.randn(1, 0, D), ValueError, r"A must have 1 <= r <= min\(d, 64\) rows"),
    ("A r > 64", torch.randn(1, 65, 80), ValueError, r"A must have 1 <= r <= min\(d, 64\) rows"),
]


@pytest.mark.parametrize("case", ORTH_FWD_CASES, ids=[c[0] for c in ORTH_FWD_CASES])
def test_orthonormalize_fwd_refuses(case):
    _, A, error, message = case
    with pytest.raises(error, match=message):
        torch.ops.reft_kernels.orthonormalize_fwd.default(A)


def _orth_bwd_args():
    A = torch.randn(2, R, D, generator=torch.Generator().manual_seed(0))
    Q, cinv = torch.ops.reft_kernels.orthonormalize_fwd.default(A)
    return torch.randn_like(Q), Q, cinv


ORTH_BWD_CASES = [
    ("grad_q shape", lambda g, q, c: (g[:, :, :-1], q, c), ValueError, "grad_q must be a float tensor of Q's shape"),
    ("grad_q int", lambda g, q, c: (g.long(), q, c), ValueError, "grad_q must be a float tensor"),
    ("Q float64", lambda g, q, c: (g, q.double(), c), TypeError, "Q must be float32"),
    ("cinv short", lambda g, q, c: (g, q, c[:1]), ValueError, r"cinv must be \[L, r_pad, r_pad\] = \[2, 16, 16\]"),
    ("cinv narrow", lambda g, q, c: (g, q, c[:, :R, :R]), ValueError, r"cinv must be \[L, r_pad, r_pad\]"),
    ("cinv on meta", lambda g, q, c: (g, q, c.to("meta")), ValueError, "cinv must be on Q's device"),
]


@pytest.mark.parametrize("case", ORTH_BWD_CASES, ids=[c[0] for c in ORTH_BWD_CASES])
def test_orthonormalize_bwd_refuses(case):
    _, mutate, error, message = case
    with pytest.raises(error, match=message):
        torch.ops.reft_kernels.orthonormalize_bwd.default(*mutate(*_orth_bwd_args()))


def test_orthonormalize_fwd_op_copies_a_strided_stack():
    A = torch.randn(2, R, 2 * D, generator=torch.Generator().manual_seed(0))
    Q, _ = torch.ops.reft_kernels.orthonormalize_fwd.default(A[:, :, ::2])
    Qc, _ = torch.ops.reft_kernels.orthonormalize_fwd.default(A[:, :, ::2].contiguous())
    assert torch.equal(Q, Qc)


# ------------------------------------------------------------------------------------------------
# Aliasing (finding 3): a parameter (or positions) sharing memory with hidden is read as it was before the
# edit, on every backend, forward and gradients (README, Semantics)
# ------------------------------------------------------------------------------------------------

BACKENDS = ["torch", "triton", pytest.param("cpp", marks=needs_cpp)]


def _aliased_run(backend, grad, which):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(B, T, D, generator=gen).requires_grad_(grad)
    h = base * 1.0
    W, b = torch.randn(R, D, generator=gen), torch.randn(R, generator=gen)
    R_ = torch.randn(R, D, generator=gen)
    # rows 0..2 of batch row 0 are edited; the aliased parameter views them
    if which == "lift":
        R_ = h[0, :R]
    elif which == "weight":
        W = h[0, 1 : 1 + R]
    else:
        b = h[0, 0, :R]
    out = rk.loreft(h, torch.tensor([[0, 1], [2, -1]]), R_, W, b, backend=backend)
    if not grad:
        return [out.clone()]
    out.square().sum().backward()
    return [out.detach(), base.grad]


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradients"])
@pytest.mark.parametrize("which", ["lift", "weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_viewing_hidden_reads_the_rows_before_the_edit(backend, which, grad):
    # the reference: the same call with the parameter copied out first
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(B, T, D, generator=gen).requires_grad_(grad)
    h = base * 1.0
    W, b, R_ = torch.randn(R, D, generator=gen), torch.randn(R, generator=gen), torch.randn(R, D, generator=gen)
    h64 = h.double()
    R_, W, b = (x.double() for x in (R_, W, b))
    if which == "lift":
        R_ = h64[0, :R].clone()
    elif which == "weight":
        W = h64[0, 1 : 1 + R].clone()
    else:
        b = h64[0, 0, :R].clone()
    want_out = rk.loreft(h64, torch.tensor([[0, 1], [2, -1]]), R_, W, b, backend="torch")
    got = _aliased_run(backend, grad, which)
    assert torch.allclose(got[0].double(), want_out.detach(), rtol=1e-5, atol=1e-5)
    if grad:
        want_out.square().sum().backward()
        assert torch.allclose(got[1].double(), base.grad.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_viewing_hidden(backend):
    """Positions that are a view of hidden's bytes (zeros read as int32 0: every slot names row 0) are read
    before the edit rewrites them."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(1, T, D, generator=gen)
    h[0, 0] = 0.0
    R_, W, b = torch.randn(R, D, generator=gen), torch.randn(R, D, generator=gen), torch.randn(R, generator=gen)
    want = rk.loreft(h.clone(), torch.zeros(1, 3, dtype=torch.int32), R_, W, b, backend="torch")
    positions = h.view(torch.int32)[:, 0, :3]
    got = rk.loreft(h, positions, R_, W, b, backend=backend, check_positions=False)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_registered_fwd_reads_an_aliased_parameter_before_the_edit(ns):
    args = _fwd_args(save=0)
    want_h = args["hidden"].clone()
    lift = want_h[0, :R].clone()
    _op(ns, "edit_fwd")(*_fwd_args(hidden=want_h, lift=lift, save=0).values())
    h = args["hidden"]
    _op(ns, "edit_fwd")(*_fwd_args(hidden=h, lift=h[0, :R], save=0).values())
    assert torch.allclose(h, want_h, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Views of leaves (finding 5): our error, not autograd's
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_of_a_leaf_that_requires_grad_is_refused(backend):
    a = _fwd_args()
    leaf = a["hidden"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="hidden is a view of a leaf tensor that requires grad"):
        rk.loreft(leaf[:, :], a["positions"], a["lift"], a["weight"], a["bias"], backend=backend)


@needs_cpp
def test_cpp_edit_refuses_leaves_itself():
    a = _fwd_args()
    leaf = a["hidden"].clone().requires_grad_(True)
    args = (a["positions"], a["lift"], a["weight"], a["bias"], None, True, True, "identity", 0.0, 0, False, False)
    with pytest.raises(ValueError, match="hidden is a leaf tensor that requires grad"):
        torch.ops.reft_kernels_cpp.edit.default(leaf, *args)
    with pytest.raises(ValueError, match="hidden is a view of a leaf tensor that requires grad"):
        torch.ops.reft_kernels_cpp.edit.default(leaf[:, 1:], *args)
