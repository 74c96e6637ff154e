"""The six intervention modules: forward and every parameter gradient against each type's float64
formula (both backends), defaults, repr, validation, dropout in train/eval, state_dict round trips."""
from __future__ import annotations

import copy

import pytest
import torch

import reft_kernels as rk
from reft_kernels.ops.orthonormal import orthonormalize_reference, stereographic_premap
from conftest import DEVICE
from helpers import DTYPES, FAMILY, assert_close, reference_family

BACKENDS = ["torch", "triton"] + (["cpp"] if DEVICE == "cpu" else [])  # cpp: the C++ CPU kernels
KINDS = list(FAMILY)

# (name, B, T, d, r, positions): padding, duplicates, batch 1, one position, d not a power of two, r = 1
CASES = [
    ("padding_duplicates_d100_r4", 3, 7, 100, 4, [[1, 3, -1], [0, 0, 6], [2, 5, 4]]),
    ("batch1_one_position_d64_r1", 1, 5, 64, 1, [[3]]),
    ("every_row_d96_r7", 2, 4, 96, 7, [[0, 1, 2, 3], [3, 2, 1, 0]]),
]


def make_module(kind, d, r, seed=0, backend=None, **kw):
    """A module with every parameter random (not its init: bias U[0,1) or a near-orthonormal R would
    leave terms untested), on DEVICE, fp32 unless kw says otherwise."""
    torch.manual_seed(seed)
    extra = {"add_bias": True} if kind == "noreft" else {}
    kw.setdefault("dtype", torch.float32)
    m = rk.INTERVENTIONS[kind](d, r, backend=backend, device=DEVICE, **extra, **kw)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "rotation.weight":  # any full-rank matrix is a valid parameter
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p))
            elif name == "rotation.delta":  # rows rotated by about 90 degrees away from base
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * d**-0.5)
            elif "householder" not in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * (d**-0.5 if p.dim() == 2 else 1.0))
    return m


def reference_params(m):
    """float64 leaves of m's parameters, and the formula's (lift, weight, bias, proj_bias) built from
    them independently of our kernels (R via the float64 torch.linalg Cholesky-QR, or torch's own
    Householder parametrization run on a float64 copy)."""
    if m.orthonormal and m.rotation.parametrization == "householder":
        m64 = copy.deepcopy(m).double()
        leaves = dict(m64.named_parameters())
        lift = m64.rotation.householder.weight.t()
    else:
        leaves = {n: p.detach().double().cpu().requires_grad_(True) for n, p in m.named_parameters()}
        if not m.orthonormal:
            lift = leaves["proj_weight"]
        elif m.rotation.parametrization == "stereographic":
            base = m.rotation.base.double().cpu()
            lift = orthonormalize_reference(stereographic_premap(base, leaves["rotation.delta"]))
        else:
            lift = orthonormalize_reference(leaves["rotation.weight"])
    return leaves, (lift.cpu(), leaves.get("weight"), leaves["bias"], leaves.get("proj_bias"))


def run_module(m, hidden, positions, grad_dir):
    h = hidden.clone().requires_grad_(True)
    x = h * 1
    out = m(x, positions)
    assert out is x
    (out.float() * grad_dir.float()).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    m.zero_grad()
    return out.detach(), h.grad, grads


def check_module(m, kind, hidden, positions, grad_dir, dtype, act=None, scale=1.0):
    out, grad_h, grads = run_module(m, hidden, positions, grad_dir)
    leaves, params = reference_params(m)
    h64 = hidden.detach().double().cpu().requires_grad_(True)
    ref = reference_family(kind, h64, positions.cpu(), *params, act=act)
    (ref * grad_dir.double().cpu()).sum().backward()
    assert_close(out, ref.detach(), dtype, f"{kind} output", scale)
    assert_close(grad_h, h64.grad, dtype, f"{kind} grad hidden", scale)
    assert set(grads) == set(leaves)
    for name, g in grads.items():
        assert g is not None, f"{kind}: no gradient for {name}"
        assert g.dtype == dict(m.named_parameters())[name].dtype
        assert_close(g, leaves[name].grad, dtype, f"{kind} grad {name}", scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients(kind, backend, dtype, case):
    _, B, T, d, r, pos = case
    m = make_module(kind, d, r, backend=backend)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    grad_dir = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    check_module(m, kind, hidden, torch.tensor(pos), grad_dir, dtype)


@pytest.mark.parametrize("parametrization", ["cholesky_qr", "householder"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["loreft", "consreft", "lobireft", "orthodireft"])
def test_other_parametrizations(kind, backend, parametrization):
    """The plain Cholesky-QR map, and pyreft's exact one (gradients reach its `original` parameter
    through torch's parametrization)."""
    _, B, T, d, r, pos = CASES[0]
    m = make_module(kind, d, r, backend=backend, parametrization=parametrization)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE)
    grad_dir = torch.randn(B, T, d, generator=gen).to(DEVICE)
    check_module(m, kind, hidden, torch.tensor(pos), grad_dir, torch.float32, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["loreft", "noreft", "direft", "orthodireft"])
def test_activation(kind, backend):
    _, B, T, d, r, pos = CASES[0]
    m = make_module(kind, d, r, backend=backend, act="gelu")
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE)
    grad_dir = torch.randn(B, T, d, generator=gen).to(DEVICE)
    check_module(m, kind, hidden, torch.tensor(pos), grad_dir, torch.float32, act="gelu", scale=3.0)


def test_noreft_without_bias():
    _, B, T, d, r, pos = CASES[0]
    torch.manual_seed(0)
    m = rk.NoReFT(d, r, dtype=torch.float32, device=DEVICE)
    assert m.proj_bias is None and "proj_bias" not in dict(m.named_parameters())
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        m.bias.copy_(torch.randn(r, generator=gen))
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE)
    grad_dir = torch.randn(B, T, d, generator=gen).to(DEVICE)
    for backend in BACKENDS:
        m.backend = backend
        check_module(m, "noreft", hidden, torch.tensor(pos), grad_dir, torch.float32)


def test_defaults_as_pyreft():
    torch.manual_seed(0)
    m = rk.LoReFT(64, 4)
    assert m.rotation.delta.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    assert not m.rotation.delta.any()
    assert m.bias.dtype == torch.bfloat16 and m.act == "identity" and m.dropout == 0.0
    assert rk.orthonormality_error(m.rotation()) < 1e-6
    # W and b are what torch.nn.Linear(64, 4) draws right after the orthogonal init of R
    torch.manual_seed(0)
    R0 = torch.nn.init.orthogonal_(torch.empty(64, 4))
    lin = torch.nn.Linear(64, 4)
    assert torch.equal(m.rotation.base, R0.t())
    assert torch.equal(m.weight, lin.weight.to(torch.bfloat16)) and torch.equal(m.bias, lin.bias.to(torch.bfloat16))
    for cls in (rk.ConsReFT, rk.LobiReFT):
        b = cls(64, 4).bias
        assert b.dtype == torch.float32 and (b >= 0).all() and (b < 1).all()
    # every parametrization starts from the same R for one seed
    Rs = []
    for parametrization in ("stereographic", "cholesky_qr", "householder"):
        torch.manual_seed(5)
        Rs.append(rk.LoReFT(64, 4, parametrization=parametrization).rotation())
    assert max((R - Rs[0]).abs().max() for R in Rs) < 1e-6


def test_repr_names_the_formula():
    assert "h + Rᵀ(act(Wh + b) − Rh)" in repr(rk.LoReFT(32, 2))
    assert "h + W2ᵀ act(Wh + b)" in repr(rk.DiReFT(32, 2))
    assert "parametrization=householder" in repr(rk.ConsReFT(32, 2, parametrization="householder"))
    assert "add_bias=True" in repr(rk.NoReFT(32, 2, add_bias=True))
    assert {cls.pyreft_name for cls in rk.INTERVENTIONS.values()} == {
        "LoreftIntervention", "NoreftIntervention", "ConsreftIntervention", "LobireftIntervention",
        "DireftIntervention", "NodireftIntervention"}
    assert rk.BY_PYREFT_NAME["NodireftIntervention"] is rk.DiReFT


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank <= dim"):
        rk.LoReFT(4, 8)
    with pytest.raises(ValueError, match="no W h \\+ b"):
        rk.ConsReFT(16, 2, act="relu")
    with pytest.raises(ValueError, match="dropout"):
        rk.LoReFT(16, 2, dropout=1.0)
    with pytest.raises(ValueError, match="parametrization"):
        rk.LoReFT(16, 2, parametrization="cayley")
    with pytest.raises(ValueError, match="parametrization does not apply"):
        rk.DiReFT(16, 2, parametrization="householder")
    with pytest.raises(TypeError, match="dtype"):
        rk.LoReFT(16, 2, dtype=torch.int32)
    m = rk.LoReFT(16, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight must be \\[r, d\\]|weight"):
        m(torch.randn(1, 3, 17), torch.tensor([[0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_follows_train_and_eval(backend):
    """eval() turns the intervention's dropout off, train() back on (pyreft keeps it on at eval)."""
    d, r = 64, 4
    m = make_module("loreft", d, r, backend=backend, dropout=0.5)
    model = torch.nn.Sequential(torch.nn.Identity(), m)  # eval() must reach a nested module
    hidden = torch.randn(2, 6, d).to(DEVICE)
    positions = torch.tensor([[0, 2, 4], [1, 3, 5]])
    model.eval()
    with torch.no_grad():
        a = m(hidden.clone(), positions)
        b = m(hidden.clone(), positions)
        m.dropout = 0.0
        plain = m(hidden.clone(), positions)
        m.dropout = 0.5
    assert torch.equal(a, b) and torch.equal(a, plain)
    model.train()
    with torch.no_grad():
        c = m(hidden.clone(), positions)
    assert not torch.equal(c, plain)
    rows = c[torch.arange(2)[:, None], positions]
    assert (rows == 0).float().mean() > 0.3  # about half of every edited row is dropped


ROUND_TRIPS = [(k, "stereographic") for k in KINDS] + [
    (k, p) for k in KINDS if FAMILY[k][0] for p in ("cholesky_qr", "householder")]


@pytest.mark.parametrize("kind,parametrization", ROUND_TRIPS)
def test_state_dict_round_trip_is_bitwise(kind, parametrization):
    d, r = 48, 3
    kw = {"parametrization": parametrization} if parametrization != "stereographic" else {}
    m = make_module(kind, d, r, seed=1, **kw)
    fresh = make_module(kind, d, r, seed=2, **kw)
    hidden = torch.randn(2, 5, d).to(DEVICE)
    positions = torch.tensor([[0, 4], [2, -1]])
    with torch.no_grad():
        want = m(hidden.clone(), positions)
        before = fresh(hidden.clone(), positions)  # fills fresh's cache: loading must invalidate it
        assert not torch.equal(before, want)
        fresh.load_state_dict(m.state_dict())
        got = fresh(hidden.clone(), positions)
    assert torch.equal(got, want)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    fresh2 = make_module(kind, d, r, seed=3, **kw)
    fresh2.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh2(hidden.clone(), positions), want)
