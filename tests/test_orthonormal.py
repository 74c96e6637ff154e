"""The orthonormalization: the batched Triton Cholesky-QR and its gradient against float64 (finite
differences and torch's QR), batching across modules, caching, and pyreft's two R bugs fixed by design."""
from __future__ import annotations

import threading

import pytest
import torch

import reft_kernels as rk
from reft_kernels.modules import orthonormal as orth_mod
from reft_kernels.ops import orthonormal as orth_ops
from conftest import DEVICE
from helpers import rel_err

BACKENDS = ["torch", "triton"]
SHAPES = [(1, 1, 64), (3, 4, 100), (2, 7, 4096), (2, 64, 256), (5, 16, 33), (1, 5, 5)]


def _stack(L, r, d, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(L, r, d, generator=gen, dtype=torch.float64) * scale).to(DEVICE, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradient_against_float64(backend, shape):
    A = _stack(*shape).requires_grad_(True)
    Q = rk.orthonormalize(A, backend=backend)
    g = torch.randn(Q.shape, generator=torch.Generator().manual_seed(1)).to(Q)
    (Q * g).sum().backward()
    A64 = A.detach().double().cpu().requires_grad_(True)
    Q64 = orth_ops.orthonormalize_reference(A64)
    (Q64 * g.double().cpu()).sum().backward()
    assert Q.dtype == torch.float32 and Q.shape == A.shape
    assert rel_err(Q, Q64) < 2e-6
    assert rel_err(A.grad, A64.grad) < 5e-6
    assert rk.orthonormality_error(Q) < 2e-6


def test_reference_gradient_against_finite_differences():
    """float64 gradcheck (central finite differences) of the map every backend is compared with."""
    for L, r, d in [(2, 3, 7), (1, 1, 4), (1, 4, 4)]:
        A = torch.randn(L, r, d, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: rk.orthonormalize(x, backend="torch"), (A,))


def test_stereographic_premap_gradient_against_finite_differences():
    base = orth_ops.orthonormalize_reference(torch.randn(2, 3, 9, dtype=torch.float64))
    delta = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    f = lambda x: rk.orthonormalize(orth_ops.stereographic_premap(base, x), backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (delta,))
    # delta = 0 gives base; a row's angle to its base row is 2 atan(|delta_perp|)
    assert rel_err(f(torch.zeros_like(delta)), base) < 1e-14
    e = torch.zeros(1, 1, 9, dtype=torch.float64)
    e[..., 0] = 1
    step = torch.zeros_like(e)
    step[..., 1] = 0.7
    R1 = rk.orthonormalize(orth_ops.stereographic_premap(e, step), backend="torch")
    assert abs(torch.acos(R1[0, 0, 0]).item() - 2 * torch.atan(torch.tensor(0.7, dtype=torch.float64)).item()) < 1e-12


def test_reference_equals_torch_qr_with_positive_diagonal():
    """Q is the Q factor of QR(A^T) with R's diagonal made positive; so is its gradient."""
    A = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    B = A.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    (orth_ops.orthonormalize_reference(A) * g).sum().backward()
    q, rr = torch.linalg.qr(B.mT)
    q = (q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)).mT
    (q * g).sum().backward()
    assert rel_err(orth_ops.orthonormalize_reference(A), q) < 1e-12
    assert rel_err(A.grad, B.grad) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_invariant(backend):
    """orth(c A) = orth(A): what makes weight decay harmless."""
    A = _stack(2, 4, 300)
    Q = rk.orthonormalize(A, backend=backend)
    for c in (1e-3, 1e3):
        assert rel_err(rk.orthonormalize(A * c, backend=backend), Q) < 1e-6


def test_triton_stack_equals_one_by_one():
    """Each matrix of a stack is computed exactly as it would be alone (bitwise)."""
    A = _stack(6, 4, 200, seed=3).requires_grad_(True)
    g = torch.randn(6, 4, 200).to(A)
    Q = rk.orthonormalize(A, backend="triton")
    (Q * g).sum().backward()
    for i in range(6):
        a = A.detach()[i].clone().requires_grad_(True)
        q = rk.orthonormalize(a, backend="triton")
        (q * g[i]).sum().backward()
        assert torch.equal(q, Q[i]) and torch.equal(a.grad, A.grad[i])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"A must be \[r, d\] or \[L, r, d\]"):
        rk.orthonormalize(torch.randn(5))
    with pytest.raises(ValueError, match="1 <= r <= d"):
        rk.orthonormalize(torch.randn(6, 5))
    with pytest.raises(TypeError, match="floating-point"):
        rk.orthonormalize(torch.ones(2, 5, dtype=torch.int64))
    if DEVICE == "cpu" and not orth_ops._backend.INTERPRET:
        return
    A = torch.randn(2, 8).to(DEVICE)
    with pytest.raises(TypeError, match="float32 for backend='triton'"):
        rk.orthonormalize(A.double(), backend="triton")
    with pytest.raises(ValueError, match="ranks up to 64"):
        rk.orthonormalize(torch.randn(65, 100).to(DEVICE), backend="triton")
    assert rk.orthonormalize(torch.randn(65, 100).to(DEVICE)).shape == (65, 100)  # backend=None: reference


# ---------------------------------------------------------------------------------------------
# Batching and caching in the modules
# ---------------------------------------------------------------------------------------------


def _trained(rot):
    """The parameter an optimizer moves: delta (stereographic) or weight (cholesky_qr)."""
    return rot.delta if rot.parametrization == "stereographic" else rot.weight


def _modules(n, d=96, r=4, backend="triton", seed=0, parametrization="stereographic"):
    torch.manual_seed(seed)
    mods = [rk.LoReFT(d, r, dtype=torch.float32, device=DEVICE, backend=backend, parametrization=parametrization)
            for _ in range(n)]
    with torch.no_grad():
        for m in mods:
            p = _trained(m.rotation)
            p.add_(0.2 * torch.randn_like(p))
    return mods


@pytest.mark.parametrize("parametrization", ["stereographic", "cholesky_qr"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_gives_each_module_its_own_R_and_gradient(backend, parametrization):
    mods = (_modules(5, backend=backend, parametrization=parametrization)
            + _modules(2, d=64, r=2, backend=backend, seed=1, parametrization=parametrization))
    gs = [torch.randn(m.rank, m.dim).to(DEVICE) for m in mods]
    with rk.orthonormal_batch(mods) as batched:
        assert len(batched) == 7
        loss = sum((m.rotation() * g).sum() for m, g in zip(mods, gs))
        assert all(m.rotation() is batched[id(m.rotation)] for m in mods)
    loss.backward()
    batched_grads = [_trained(m.rotation).grad.clone() for m in mods]
    for m in mods:
        m.zero_grad()
    loss = sum((m.rotation() * g).sum() for m, g in zip(mods, gs))
    loss.backward()
    for m, gb in zip(mods, batched_grads):
        assert rel_err(gb, _trained(m.rotation).grad) < 1e-6


def test_batch_launches_do_not_grow_with_the_number_of_modules(monkeypatch):
    """One forward and one backward Triton launch pair per (device, width, rank) group."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = orth_ops.orthonormalize_fwd_triton, orth_ops.orthonormalize_bwd_triton

    def count(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(orth_ops, "orthonormalize_fwd_triton", count("fwd", fwd))
    monkeypatch.setattr(orth_ops, "orthonormalize_bwd_triton", count("bwd", bwd))
    for n in (2, 12):
        calls.update(fwd=0, bwd=0)
        model = torch.nn.ModuleList(_modules(n))
        with rk.orthonormal_batch(model):
            sum(m.rotation().sum() for m in model).backward()
        assert calls == {"fwd": 1, "bwd": 1}, (n, calls)


def test_no_grad_cache_only_for_frozen_parameters():
    (m,) = _modules(1)
    m.requires_grad_(False)  # a served, frozen adapter: R is cached
    with torch.no_grad():
        R1 = m.rotation()
        assert m.rotation() is R1
        m.rotation.delta.add_(0.1)  # bumps the version counter, as load_state_dict does
        R2 = m.rotation()
    assert R2 is not R1 and not torch.equal(R1, R2)
    m.requires_grad_(True)  # trainable: computed on every call, under no_grad too
    with torch.no_grad():
        assert m.rotation() is not m.rotation()


@pytest.mark.parametrize("fused", [False, True])
def test_no_stale_R_after_an_optimizer_step(fused):
    # fused AdamW (Trainer's default optimizer) updates parameters without bumping their version counter:
    # an R cached before training must not survive it (a bug found by the classification example)
    (m,) = _modules(1)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused)
    with torch.no_grad():
        before = m.rotation().clone()
    (m.rotation() * torch.randn(m.rotation().shape)).sum().backward()
    opt.step()
    with torch.no_grad():
        after = m.rotation()
        torch.testing.assert_close(after, m.rotation.compute(), rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_batch_is_private_to_its_thread():
    (m,) = _modules(1)
    seen = {}
    with rk.orthonormal_batch(m) as batched:
        t = threading.Thread(target=lambda: seen.setdefault("R", m.rotation()))
        t.start()
        t.join()
        assert m.rotation() is batched[id(m.rotation)]
    assert seen["R"] is not batched[id(m.rotation)]
    assert torch.equal(seen["R"].detach(), batched[id(m.rotation)].detach())


# ---------------------------------------------------------------------------------------------
# pyreft's R bugs, fixed by design
# ---------------------------------------------------------------------------------------------


def _loreft(backend, parametrization="stereographic", **kw):
    """A LoReFT whose R is orthonormalized by `backend`; the edit itself runs the torch backend (the
    fused edit is tested elsewhere, and 400 interpreted steps of it would cost minutes of CI)."""
    m = rk.LoReFT(64, 4, dtype=torch.float32, device=DEVICE, backend="torch", parametrization=parametrization, **kw)
    m.rotation.backend = backend
    return m


def _train(m, steps, lr=1e-2, weight_decay=0.0, seed=0):
    """A small regression: every row of random hidden states edited towards random targets."""
    gen = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    hidden = torch.randn(B, T, m.dim, generator=gen).to(DEVICE)
    target = torch.randn(B, T, m.dim, generator=gen).to(DEVICE)
    positions = torch.arange(T).repeat(B, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    first = last = None
    for _ in range(steps):
        with rk.orthonormal_batch(m):
            out = m(hidden.clone().requires_grad_(False) * 1, positions)
            loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


@pytest.mark.parametrize("backend,parametrization",
                         [("torch", "stereographic"), ("triton", "stereographic"), ("triton", "cholesky_qr")])
def test_weight_decay_does_not_collapse_R(backend, parametrization):
    torch.manual_seed(0)
    m = _loreft(backend, parametrization)
    first, last = _train(m, 200, weight_decay=0.1)
    R = m.rotation().detach()
    assert last < first
    assert rk.orthonormality_error(R) < 1e-5
    assert abs(R.double().norm().item() ** 2 - 4) < 1e-4  # r unit rows: nowhere near zero


def test_householder_option_is_pyreft_exact_including_its_weight_decay_hazard():
    """Documented: the faithful option keeps torch's map, which one AdamW step with decay zeroes."""
    torch.manual_seed(0)
    m = rk.LoReFT(64, 4, dtype=torch.float32, device=DEVICE, backend="torch", parametrization="householder")
    _train(m, 1, weight_decay=0.1)
    assert m.rotation().abs().max().item() == 0.0


@pytest.mark.parametrize("backend,parametrization",
                         [("torch", "stereographic"), ("triton", "stereographic"), ("triton", "cholesky_qr"),
                          ("torch", "householder")])
def test_reloaded_checkpoint_keeps_R_orthonormal(backend, parametrization):
    """Train, save, load into a fresh module (state_dict, and R alone through set_, which is how a
    pyreft LoReFT checkpoint stores it), train 200 more steps: R stays orthonormal."""
    torch.manual_seed(0)
    kw = dict(parametrization=parametrization)
    m = _loreft(backend, **kw)
    _train(m, 30, lr=3e-2)
    state = m.state_dict()
    torch.manual_seed(1)
    loaded = _loreft(backend, **kw)
    loaded.load_state_dict(state)
    torch.manual_seed(2)
    from_R = _loreft(backend, **kw)
    from_R.load_state_dict({k: v for k, v in state.items() if not k.startswith("rotation.")}, strict=False)
    from_R.rotation.set_(m.rotation().detach())
    assert (from_R.rotation() - m.rotation()).abs().max() < 1e-6
    for mod in (loaded, from_R):
        first, last = _train(mod, 200, lr=3e-2, seed=1)
        assert last < first
        assert rk.orthonormality_error(mod.rotation()) < 1e-5


def test_set_rejects_a_wrong_shape():
    m = orth_mod.Orthonormal(32, 4)
    with pytest.raises(ValueError, match=r"R must be \[4, 32\]"):
        m.set_(torch.randn(32, 4))
