"""The mixed-adapter op held to issue 18's standard (tests/test_op_validation.py's twin): every registered mixed
op (reft_kernels_cpp::mixed_fwd / mixed_bwd / mixed_edit with their Meta kernels, reft_kernels::mixed_fwd /
mixed_bwd with their fakes) refuses bad input with a TypeError or ValueError naming the argument, before
anything is written; what indexes memory (the backward's stats and saved rows, the bank's kinds, ranks and
dropout) is read by its shape and strides, never by its numel; a call mixing meta and CPU tensors is refused;
positions, adapter ids and bank tensors that share memory with hidden are read as they were before the edit,
forward and gradients, on every backend."""
from __future__ import annotations

import math

import pytest
import torch

import reft_kernels as rk
from reft_kernels.ops import fused_edit as fe
from conftest import DEVICE

B, T, D, P = 2, 6, 12, 3
N = B * P

needs_cpp = pytest.mark.skipif(DEVICE != "cpu" or not rk.extension.available(),
                               reason="the C++ CPU kernels run CPU tensors (and need the extension)")
# (ids cpp and triton: CI's Triton 3.9 run selects the Triton ops' tests by "triton" in their ids)
NS_ID = {"reft_kernels_cpp": "cpp", "reft_kernels": "triton"}
NAMESPACES = [pytest.param("reft_kernels_cpp", marks=needs_cpp, id="cpp"), pytest.param("reft_kernels", id="triton")]
BACKENDS = ["torch", "triton", pytest.param("cpp", marks=needs_cpp)]


def _bank(device=DEVICE):
    """Three adapters: LoReFT r=3 (gelu), NoReFT r=2 with b2, ConsReFT r=1; bank rank 3."""
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return rk.stack_adapters([
        rk.AdapterParams(rn(3, D), rn(3, D), rn(3), spec=fe.EditSpec(True, True, "gelu")),
        rk.AdapterParams(rn(2, D), rn(2, D), rn(2), rn(2), spec=fe.EditSpec(True, True, "gelu")),
        rk.AdapterParams(rn(1, D), None, rn(1), spec=fe.EditSpec(False, True, "identity")),
    ])


BANK = _bank()
A, R = BANK.num_adapters, BANK.rank
RP = fe.r_pad(R)


def _fwd_args(**over):
    g = torch.Generator().manual_seed(1)
    args = dict(hidden=torch.randn(B, T, D, generator=g).to(DEVICE),
                positions=torch.tensor([[0, 3, 3], [1, -1, 5]], device=DEVICE),
                adapter_ids=torch.tensor([[0, 1, 2], [2, 1, 0]], device=DEVICE),
                lift=BANK.lift, weight=BANK.weight, bias=BANK.bias, proj_bias=BANK.proj_bias, kinds=BANK.kinds,
                ranks=BANK.ranks, dropout=BANK.dropout, act=2, may_subtract=True, apply_dropout=False, seed=0, save=2,
                rows_unique=False)
    args.update(over)
    return args


def _bwd_args(**over):
    g = torch.Generator().manual_seed(2)
    args = dict(grad_out=torch.randn(B, T, D, generator=g).to(DEVICE),
                positions=torch.tensor([[0, 3, 3], [1, -1, 5]], device=DEVICE),
                adapter_ids=torch.tensor([[0, 1, 2], [2, 1, 0]], device=DEVICE),
                rows=torch.randn(N, D, generator=g).to(DEVICE), output=None,
                stats=torch.randn(N, 2, RP, generator=g).to(DEVICE), lift=BANK.lift, weight=BANK.weight,
                has_proj_bias=True, kinds=BANK.kinds, ranks=BANK.ranks, dropout=BANK.dropout, act=2, may_subtract=True,
                apply_dropout=False, seed=0, need_grad_hidden=True)
    args.update(over)
    return args


def _op(ns, name):
    return getattr(getattr(torch.ops, ns), name).default


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32, device=DEVICE)


META = "meta"
BOTH, CPP = ("reft_kernels_cpp", "reft_kernels"), ("reft_kernels_cpp",)

# (id, overrides, error, message, namespaces): each differs from the good call by one argument
FWD_CASES = [
    ("hidden 1-D", dict(hidden=torch.randn(D)), ValueError, r"hidden must be \[B, T, d\] \(batched\) or \[n_tokens, d\]",
     BOTH),
    ("hidden 4-D", dict(hidden=torch.randn(1, B, T, D)), ValueError, r"hidden must be \[B, T, d\]", BOTH),
    ("hidden float64", dict(hidden=torch.randn(B, T, D, dtype=torch.float64)), TypeError, "hidden must have a dtype in",
     BOTH),
    ("hidden int", dict(hidden=torch.ones(B, T, D, dtype=torch.int32)), TypeError, "hidden must have a dtype in", BOTH),
    ("hidden expanded", dict(hidden=torch.randn(B, 1, D).expand(B, T, D)), ValueError, "hidden has overlapping memory",
     BOTH),
    ("positions float", dict(positions=torch.zeros(B, P)), TypeError, "positions must be int32 or int64", BOTH),
    ("positions batch", dict(positions=torch.zeros(1, P, dtype=torch.long)), ValueError,
     r"positions must be \[B, P\] with B=2", BOTH),
    ("positions 1-D", dict(positions=torch.zeros(P, dtype=torch.long)), ValueError, r"positions must be \[B, P\]", BOTH),
    ("positions on meta", dict(positions=torch.zeros(B, P, dtype=torch.long, device=META)), ValueError,
     "positions must be on", BOTH),
    ("adapter_ids float", dict(adapter_ids=torch.zeros(B)), TypeError, "adapter_ids must be int32 or int64", BOTH),
    ("adapter_ids [B + 1]", dict(adapter_ids=torch.zeros(B + 1, dtype=torch.long)), ValueError,
     r"adapter_ids must be \[B\] = \[2\] \(one per batch row\) or \[B, P\] = \[2, 3\]", BOTH),
    ("adapter_ids [B, P - 1]", dict(adapter_ids=torch.zeros(B, P - 1, dtype=torch.long)), ValueError,
     r"adapter_ids must be \[B\]", BOTH),
    ("adapter_ids on meta", dict(adapter_ids=torch.zeros(B, dtype=torch.long, device=META)), ValueError,
     "adapter_ids must be on", BOTH),
    ("lift wrong d", dict(lift=torch.randn(A, R, D - 1)), ValueError, r"the bank's lift must be \[A, r, d\] with d = 12",
     BOTH),
    ("lift A = 0", dict(lift=torch.randn(0, R, D)), ValueError, "A >= 1 and r >= 1", BOTH),
    ("lift r = 0", dict(lift=torch.randn(A, 0, D)), ValueError, "A >= 1 and r >= 1", BOTH),
    ("lift 2-D", dict(lift=torch.randn(R, D)), ValueError, r"the bank's lift must be \[A, r, d\]", BOTH),
    ("lift int", dict(lift=torch.ones(A, R, D, dtype=torch.long)), TypeError, "the bank's lift must have a dtype in",
     BOTH),
    ("lift float64", dict(lift=torch.randn(A, R, D, dtype=torch.float64)), TypeError,
     "the bank's lift must have a dtype in", BOTH),
    ("lift on meta", dict(lift=torch.randn(A, R, D, device=META)), ValueError, "the bank's lift must be on", BOTH),
    ("weight wrong shape", dict(weight=torch.randn(A, R - 1, D)), ValueError, r"the bank's weight must be \[", BOTH),
    ("weight int", dict(weight=torch.ones(A, R, D, dtype=torch.int32)), TypeError,
     "the bank's weight must have a dtype in", BOTH),
    ("weight on meta", dict(weight=torch.randn(A, R, D, device=META)), ValueError, "the bank's weight must be on",
     BOTH),
    ("bias short", dict(bias=torch.randn(A, R - 1)), ValueError, r"the bank's bias must be \[", BOTH),
    ("bias [A]", dict(bias=torch.randn(A)), ValueError, r"the bank's bias must be \[", BOTH),
    ("bias int", dict(bias=torch.ones(A, R, dtype=torch.long)), TypeError, "the bank's bias must have a dtype in",
     BOTH),
    ("bias on meta", dict(bias=torch.randn(A, R, device=META)), ValueError, "the bank's bias must be on", BOTH),
    ("proj_bias short", dict(proj_bias=torch.randn(A, 1)), ValueError, r"the bank's proj_bias must be \[", BOTH),
    ("proj_bias long", dict(proj_bias=torch.randn(A, R + 5)), ValueError, r"the bank's proj_bias must be \[", BOTH),
    ("proj_bias fewer adapters", dict(proj_bias=torch.randn(A - 1, R)), ValueError, r"the bank's proj_bias must be \[",
     BOTH),
    ("proj_bias int", dict(proj_bias=torch.ones(A, R, dtype=torch.long)), TypeError,
     "the bank's proj_bias must have a dtype in", BOTH),
    ("kinds short", dict(kinds=_i32(3, 3)), ValueError, r"the bank's kinds must be \[A\] = \[3\]", BOTH),
    ("kinds int64", dict(kinds=BANK.kinds.long()), TypeError, "the bank's kinds must be", BOTH),
    ("kinds on meta", dict(kinds=torch.zeros(A, dtype=torch.int32, device=META)), ValueError,
     "the bank's kinds must be on", BOTH),
    ("ranks [A, 1]", dict(ranks=BANK.ranks[:, None]), ValueError, r"the bank's ranks must be \[A\] = \[3\]", BOTH),
    ("ranks float", dict(ranks=BANK.ranks.float()), TypeError, "the bank's ranks must be", BOTH),
    ("dropout long", dict(dropout=torch.zeros(A + 1)), ValueError, r"the bank's dropout must be \[A\] = \[3\]", BOTH),
    ("dropout float64", dict(dropout=BANK.dropout.double()), TypeError, "the bank's dropout must be", BOTH),
    ("act 8", dict(act=8), ValueError, r"act must be -1 .* or a fused activation code in \[0, 7\], got 8", BOTH),
    ("act -2", dict(act=-2), ValueError, "act must be -1", BOTH),
    ("save 3", dict(save=3), ValueError, "save must be 0 .nothing., 1 .stats. or 2 .stats and rows., got 3", BOTH),
    ("save -1", dict(save=-1), ValueError, "save must be 0", BOTH),
    # values: the C++ ops read kinds, ranks and dropout on the host (the Triton ops, which do not read device
    # values, clamp ranks to r and mask ids: no value can index memory there)
    ("ranks above r", dict(ranks=_i32(3, 4, 1)), ValueError, r"ranks must lie in \[0, r\] with r = 3 .*ranks\[1\] = 4",
     CPP),
    ("ranks negative", dict(ranks=_i32(3, -1, 1)), ValueError, r"ranks must lie in \[0, r\]", CPP),
    ("kinds act 9", dict(kinds=_i32(3 | 9 << 8, 3, 2), act=-1), ValueError, r"kinds\[0\] = 2307 names no fused activation",
     CPP),
    ("kinds negative", dict(kinds=_i32(-1, 3, 2), act=-1), ValueError, r"kinds\[0\] = -1 names no fused activation", CPP),
    ("linear source without weight", dict(weight=None), ValueError, "adapter 0 has a linear source .* no weight", CPP),
    ("dropout 1", dict(dropout=torch.tensor([0.0, 1.0, 0.0])), ValueError, r"dropout must lie in \[0, 1\), got dropout\[1\]",
     CPP),
    ("dropout nan", dict(dropout=torch.tensor([0.0, 0.0, math.nan])), ValueError, r"dropout must lie in \[0, 1\)", CPP),
    ("act disagrees with kinds", dict(act=1), ValueError, r"act=1 disagrees with kinds\[0\]", CPP),
    ("may_subtract disagrees with kinds", dict(may_subtract=False), ValueError, "may_subtract=False but kinds", CPP),
]


def _cases(cases, ns):
    return [pytest.param(c, id=c[0]) for c in cases if ns in c[4]]


def _on_device(over):
    """A case's CPU tensors moved to the test device (the meta ones stay on meta)."""
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in over.items()}


@pytest.mark.parametrize("ns,case", [pytest.param(ns, c, id=f"{NS_ID[ns]}-{c[0]}", marks=needs_cpp if ns == CPP[0] else ())
                                     for ns in BOTH for c in FWD_CASES if ns in c[4]])
def test_mixed_fwd_refuses(ns, case):
    _, over, error, message, _ = case
    args = _fwd_args(**_on_device(over))
    before = args["hidden"].clone() if args["hidden"].device.type != "meta" else None
    with pytest.raises(error, match=message):
        _op(ns, "mixed_fwd")(*args.values())
    if before is not None and args["hidden"].shape == before.shape:
        assert torch.equal(args["hidden"], before)  # refused before anything was written


EDIT_CASES = [c for c in FWD_CASES if "save" not in c[1] and "act" not in c[1] and "may_subtract" not in c[1]]


@needs_cpp
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("case", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_cpp_mixed_edit_refuses(case, grad):
    """reft_kernels_cpp::mixed_edit, through its autograd kernel (a bank that requires grad) and without."""
    _, over, error, message, _ = case
    args = _fwd_args(**over)
    for k in ("act", "may_subtract", "save", "rows_unique"):
        args.pop(k)
    for name in ("lift", "weight", "bias", "proj_bias"):
        x = args[name]
        if grad and isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.device.type == "cpu":
            args[name] = x.detach().clone().requires_grad_(True)
    before = args["hidden"].clone()
    with pytest.raises(error, match=message):
        torch.ops.reft_kernels_cpp.mixed_edit.default(*args.values(), False, False)
    if args["hidden"].shape == before.shape:
        assert torch.equal(args["hidden"], before)


BWD_CASES = [
    ("grad_out 1-D", dict(grad_out=torch.randn(D)), ValueError, r"grad_out must be \[B, T, d\]", BOTH),
    ("grad_out int", dict(grad_out=torch.ones(B, T, D, dtype=torch.long)), TypeError, "grad_out must have a dtype in",
     BOTH),
    ("positions batch", dict(positions=torch.zeros(3, P, dtype=torch.long)), ValueError,
     r"positions must be \[B, P\] with B=2", BOTH),
    ("adapter_ids [B + 1]", dict(adapter_ids=torch.zeros(B + 1, dtype=torch.long)), ValueError,
     r"adapter_ids must be \[B\]", BOTH),
    ("lift wrong d", dict(lift=torch.randn(A, R, D + 1)), ValueError, r"the bank's lift must be \[A, r, d\]", BOTH),
    ("lift float64", dict(lift=torch.randn(A, R, D, dtype=torch.float64)), TypeError,
     "the bank's lift must have a dtype in", BOTH),
    ("weight wrong shape", dict(weight=torch.randn(A + 1, R, D)), ValueError, r"the bank's weight must be \[", BOTH),
    ("kinds int64", dict(kinds=BANK.kinds.long()), TypeError, "the bank's kinds must be", BOTH),
    ("ranks above r", dict(ranks=_i32(3, 4, 1)), ValueError, r"ranks must lie in \[0, r\]", CPP),
    ("act 8", dict(act=8), ValueError, "act must be -1", BOTH),
    ("stats short", dict(stats=torch.randn(N - 1, 2, RP)), ValueError, r"stats must be \[N, 2, r_pad\] = \[6, 2, 16\]",
     BOTH),
    # right numel, wrong shape: the C++ op checked the numel alone
    ("stats flat", dict(stats=torch.randn(N * 2 * RP)), ValueError, r"stats must be \[N, 2, r_pad\]", BOTH),
    ("stats [2, N, r_pad]", dict(stats=torch.randn(2, N, RP)), ValueError, r"stats must be \[N, 2, r_pad\]", BOTH),
    ("stats narrow", dict(stats=torch.randn(N, 2, R)), ValueError, r"stats must be \[N, 2, r_pad\]", BOTH),
    ("stats fp16", dict(stats=torch.randn(N, 2, RP).half()), ValueError, r"stats must be \[N, 2, r_pad\]", BOTH),
    ("stats on meta", dict(stats=torch.randn(N, 2, RP, device=META)), ValueError, "stats must be", BOTH),
    ("rows short", dict(rows=torch.randn(N - 1, D)), ValueError, r"rows must be \[N, d\] = \[6, 12\]", BOTH),
    ("rows flat", dict(rows=torch.randn(N * D)), ValueError, r"rows must be \[N, d\]", BOTH),
    ("rows fp16", dict(rows=torch.randn(N, D).half()), ValueError, r"rows must be \[N, d\]", BOTH),
    ("rows on meta", dict(rows=torch.randn(N, D, device=META)), ValueError, "rows must be", BOTH),
    ("neither rows nor output", dict(rows=None), ValueError, "mixed_bwd needs the saved rows", BOTH),
    ("output wrong shape", dict(rows=None, output=torch.randn(B, T + 1, D)), ValueError, "output", BOTH),
    ("output fp16", dict(rows=None, output=torch.randn(B, T, D).half()), ValueError, "output", BOTH),
]


@pytest.mark.parametrize("ns,case", [pytest.param(ns, c, id=f"{NS_ID[ns]}-{c[0]}", marks=needs_cpp if ns == CPP[0] else ())
                                     for ns in BOTH for c in BWD_CASES if ns in c[4]])
def test_mixed_bwd_refuses(ns, case):
    _, over, error, message, _ = case
    with pytest.raises(error, match=message):
        _op(ns, "mixed_bwd")(*_bwd_args(**_on_device(over)).values())


def _flat_fwd_args(**over):
    a = _fwd_args(hidden=torch.randn(T, D).to(DEVICE), positions=torch.tensor([0, 3, 3, 5], device=DEVICE),
                  adapter_ids=torch.tensor([0, 1, 2, -1], device=DEVICE))
    a.update(over)
    return a


FLAT_CASES = [
    ("rows 2-D", dict(positions=torch.zeros(2, 2, dtype=torch.long)), ValueError,
     r"the rows \(positions\) must be \[N\]"),
    ("rows float", dict(positions=torch.zeros(4)), TypeError, r"rows \(positions\) must be int32 or int64"),
    ("adapter_ids [N + 1]", dict(adapter_ids=torch.zeros(5, dtype=torch.long)), ValueError,
     r"adapter_ids must be \[N\] = \[4\] \(one per row\)"),
    ("adapter_ids [1, N]", dict(adapter_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError,
     r"adapter_ids must be \[N\]"),
]


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("case", FLAT_CASES, ids=[c[0] for c in FLAT_CASES])
def test_flat_layout_refuses(ns, case):
    _, over, error, message = case
    with pytest.raises(error, match=message):
        _op(ns, "mixed_fwd")(*_flat_fwd_args(**_on_device(over)).values())


@pytest.mark.parametrize("ns", NAMESPACES)
def test_good_arguments_pass(ns):
    """The cases above differ from these good calls by one argument each; and meta tensors throughout trace."""
    saved, stats = _op(ns, "mixed_fwd")(*_fwd_args().values())
    assert saved.shape == (N, D) and stats.shape == (N, 2, RP)
    out = _op(ns, "mixed_bwd")(*_bwd_args(rows=saved, stats=stats).values())
    assert [tuple(t.shape) for t in out] == [(B, T, D), (A, R, D), (A, R, D), (A, R), (A, R)]
    _op(ns, "mixed_fwd")(*_flat_fwd_args().values())
    meta = {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in _fwd_args().items()}
    saved, stats = _op(ns, "mixed_fwd")(*meta.values())
    assert saved.device.type == META and stats.shape == (N, 2, RP)


@needs_cpp
def test_cpp_mixed_edit_meta_kernel():
    """mixed_edit has a Meta kernel (it checks devices); a meta call through it returns hidden."""
    meta = {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in _fwd_args().items()}
    for k in ("act", "may_subtract", "save", "rows_unique"):
        meta.pop(k)
    with torch.inference_mode():
        out = torch.ops.reft_kernels_cpp.mixed_edit.default(*meta.values(), False, False)
    assert out.device.type == META and out.shape == (B, T, D)
    with torch.inference_mode(), pytest.raises(ValueError, match="the bank's kinds must be on hidden's device"):
        torch.ops.reft_kernels_cpp.mixed_edit.default(*dict(meta, kinds=BANK.kinds.cpu()).values(), False, False)


# ------------------------------------------------------------------------------------------------
# Strides: what indexes memory is read by its strides (or through a copy), never assumed contiguous
# ------------------------------------------------------------------------------------------------


def _strided(x: torch.Tensor, filler) -> torch.Tensor:
    """x's values in a view with stride 2 along its last dimension (a filler between them)."""
    return torch.stack([x, torch.full_like(x, filler)], -1)[..., 0]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_strided_bank_and_saved_tensors_are_read_by_their_strides(ns):
    """kinds, ranks, dropout, bias, proj_bias, lift and weight as stride-2 views (a filler of wrong values between
    them), the backward's stats and saved rows as non-contiguous views of the right shape: the results are the
    contiguous call's, bit for bit."""
    want_h = _fwd_args()["hidden"]
    want_saved, want_stats = _op(ns, "mixed_fwd")(*_fwd_args(hidden=want_h).values())
    over = dict(kinds=_strided(BANK.kinds, 7 << 8), ranks=_strided(BANK.ranks, 1000), dropout=_strided(BANK.dropout, 5.0),
                bias=_strided(BANK.bias, 1e6), proj_bias=_strided(BANK.proj_bias, 1e6), lift=_strided(BANK.lift, 1e6),
                weight=_strided(BANK.weight, 1e6))
    h = _fwd_args()["hidden"]
    saved, stats = _op(ns, "mixed_fwd")(*_fwd_args(hidden=h, **over).values())
    assert torch.equal(h, want_h) and torch.equal(saved, want_saved) and torch.equal(stats, want_stats)
    want = _op(ns, "mixed_bwd")(*_bwd_args(rows=saved, stats=stats).values())
    wide_rows = torch.zeros(N, 2 * D, device=DEVICE)
    wide_rows[:, 1::2] = saved
    t_stats = stats.transpose(0, 1).contiguous().transpose(0, 1)  # [N, 2, r_pad] with strides (r_pad, N r_pad, 1)
    assert not t_stats.is_contiguous()
    bwd_over = {k: over[k] for k in ("kinds", "ranks", "dropout", "lift", "weight")}
    got = _op(ns, "mixed_bwd")(*_bwd_args(rows=wide_rows[:, 1::2], stats=t_stats, **bwd_over).values())
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------------
# Aliasing: positions, adapter ids and bank tensors sharing memory with hidden are read as they were before
# the edit, on every backend, forward and gradients (README, Semantics)
# ------------------------------------------------------------------------------------------------

ALIASED = ["lift", "weight", "bias", "proj_bias"]


def _alias_case(which, h):
    """(positions, ids, bank) with `which` of the bank a view of rows of h that the call edits."""
    bank = _bank()
    pos = torch.tensor([[0, 1, 2], [2, -1, 4]], device=DEVICE)
    ids = torch.tensor([[0, 1, 0], [1, 2, 0]], device=DEVICE)
    A_, R_, d = bank.lift.shape
    flat = h.view(-1)
    view = {"lift": lambda: flat[: A_ * R_ * d].view(A_, R_, d), "weight": lambda: flat[: A_ * R_ * d].view(A_, R_, d),
            "bias": lambda: h[0, 1, : A_ * R_].view(A_, R_), "proj_bias": lambda: h[0, 2, : A_ * R_].view(A_, R_)}
    bank = rk.AdapterBank(**{**bank.__dict__, which: view[which]()})
    return pos, ids, bank


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradients"])
@pytest.mark.parametrize("which", ALIASED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_tensor_viewing_hidden_reads_the_rows_before_the_edit(backend, which, grad):
    g = torch.Generator().manual_seed(3)
    base0 = (torch.randn(B, T, D, generator=g) * 0.5).to(DEVICE)
    gdir = torch.randn(B, T, D, generator=g).to(DEVICE)
    # want: float64, the aliased tensor copied out first
    base = base0.double().requires_grad_(grad)
    h = base * 1
    pos, ids, bank = _alias_case(which, h)
    bank = rk.AdapterBank(**{**bank.__dict__, which: getattr(bank, which).clone()})
    bank = bank.to(dtype=torch.float64)
    want = rk.mixed_reft_edit(h, pos, ids, bank, backend="torch")
    if grad:
        (want * gdir.double()).sum().backward()
    # got: the view itself
    got_base = base0.clone().requires_grad_(grad)
    h = got_base * 1
    pos, ids, bank = _alias_case(which, h)
    got = rk.mixed_reft_edit(h, pos, ids, bank, backend=backend)
    assert torch.allclose(got.detach().double(), want.detach(), rtol=1e-5, atol=1e-5)
    if grad:
        (got * gdir).sum().backward()
        assert torch.allclose(got_base.grad.double(), base.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradients"])
@pytest.mark.parametrize("which", ["positions", "adapter_ids", "kinds", "ranks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_viewing_hidden_are_read_before_the_edit(backend, which, grad):
    """Flat layout: the rows, the adapter ids, the bank's kinds or ranks are int32 views of a row of hidden that
    the call edits (its bytes set to the values wanted); the result is that of the same values copied out."""
    g = torch.Generator().manual_seed(4)
    bank0 = _bank()
    rows = _i32(4, 1, 4, 6)  # row 4 named twice: the first slot edits it
    ids = _i32(1, 0, 2, 0)
    n_tok = 8
    base0 = torch.randn(n_tok, D, generator=g).to(DEVICE)
    values = {"positions": rows, "adapter_ids": ids, "kinds": bank0.kinds, "ranks": bank0.ranks}[which]
    base0.view(torch.int32)[4, : values.numel()] = values  # row 4: edited, and holds the values
    gdir = torch.randn(n_tok, D, generator=g).to(DEVICE)

    def call(alias):
        base = base0.clone().requires_grad_(grad)
        h = base * 1 if grad else base
        src = h.detach().view(torch.int32)[4, : values.numel()] if alias else values.clone()
        args = {"positions": rows, "adapter_ids": ids, "kinds": bank0.kinds, "ranks": bank0.ranks, which: src}
        bank = rk.AdapterBank(**{**bank0.__dict__, "kinds": args["kinds"], "ranks": args["ranks"]})
        out = rk.mixed_reft_edit_flat(h, args["positions"], args["adapter_ids"], bank, backend=backend, check_rows=False)
        if grad:
            (out * gdir).sum().backward()
            return [out.detach(), base.grad]
        return [out.clone()]

    want, got = call(False), call(True)
    assert not torch.equal(want[0], base0)  # the call edits
    for g_, w in zip(got, want):
        assert torch.allclose(g_, w, atol=1e-5)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_registered_fwd_reads_aliased_tensors_before_the_edit(ns):
    """The registered forwards themselves (no public function in between): lift and the positions views of hidden."""
    want_h = _fwd_args()["hidden"]
    lift = want_h.reshape(-1)[: A * R * D].view(A, R, D).clone()
    want = _op(ns, "mixed_fwd")(*_fwd_args(hidden=want_h, lift=lift).values())
    h = _fwd_args()["hidden"]
    got = _op(ns, "mixed_fwd")(*_fwd_args(hidden=h, lift=h.reshape(-1)[: A * R * D].view(A, R, D)).values())
    assert torch.allclose(h, want_h, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Views of leaves: our error, not autograd's
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_of_a_leaf_that_requires_grad_is_refused(backend):
    a = _fwd_args()
    leaf = a["hidden"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="hidden is a view of a leaf tensor that requires grad"):
        rk.mixed_reft_edit(leaf[:, :], a["positions"], a["adapter_ids"], BANK, backend=backend)
    with pytest.raises(ValueError, match="hidden is a leaf tensor that requires grad"):
        rk.mixed_reft_edit_flat(leaf[0].detach().clone().requires_grad_(True), a["positions"][0], a["adapter_ids"][0],
                                BANK, backend=backend)


@needs_cpp
def test_cpp_mixed_edit_refuses_leaves_itself():
    a = _fwd_args()
    for k in ("hidden", "act", "may_subtract", "save", "rows_unique"):
        a.pop(k)
    leaf = torch.randn(B, T, D, requires_grad=True)
    with pytest.raises(ValueError, match="hidden is a leaf tensor that requires grad"):
        torch.ops.reft_kernels_cpp.mixed_edit.default(leaf, *a.values(), False, False)
    with pytest.raises(ValueError, match="hidden is a view of a leaf tensor that requires grad"):
        torch.ops.reft_kernels_cpp.mixed_edit.default(leaf[:, 1:], *a.values(), False, False)
