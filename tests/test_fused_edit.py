"""Forward and every gradient of loreft/direft, both backends, against a float64 row-by-row reference."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels.ops import activations, fused_edit
from conftest import DEVICE
from helpers import DTYPES, assert_close, make_params, reference_edit

BACKENDS = ["torch", "triton"] + (["cpp"] if DEVICE == "cpu" else [])  # cpp: the C++ CPU kernels
KINDS = ["loreft", "direft"]
OPS = {"loreft": rk.loreft, "direft": rk.direft}

# (name, B, T, d, r, positions): awkward shapes on purpose
CASES = [
    ("batch1_one_position_r1_d64", 1, 5, 64, 1, [[3]]),
    ("padding_duplicates_d100_r4", 3, 7, 100, 4, [[1, 3, -1], [0, 0, 6], [2, 5, 4]]),
    ("d4096_r5", 2, 6, 4096, 5, [[0, 2, 5, -1], [1, 1, 3, 4]]),
    ("every_row_edited_d96_r7", 2, 4, 96, 7, [[0, 1, 2, 3], [3, 2, 1, 0]]),
    ("r64_d256_many_positions", 2, 40, 256, 64, "random20"),
]


def _positions(spec, B, T, gen):
    if spec == "random20":
        return torch.randint(-1, T, (B, 20), generator=gen)
    return torch.tensor(spec)


def _inputs(case, kind, dtype, seed=0, param_dtype=None):
    _, B, T, d, r, pos = case
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    positions = _positions(pos, B, T, gen)
    params = make_params(kind, r, d, gen, dtype=param_dtype or torch.float32)
    grad_dir = torch.randn(B, T, d, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    return hidden, positions, params, grad_dir


def run_op(kind, backend, hidden, positions, params, grad_dir, *, act=None, grad_hidden=True, grad_params=True, **kw):
    """Runs the op on leaf copies; returns (output, d hidden, d params...)."""
    h = hidden.clone().requires_grad_(grad_hidden)
    ps = [p.clone().requires_grad_(grad_params) for p in params]
    x = h * 1 if grad_hidden else h.clone()
    out = OPS[kind](x, positions, *ps, act=act, backend=backend, **kw)
    assert out is x, "the op must return the tensor it edited in place"
    if grad_hidden or grad_params:
        (out.float() * grad_dir.float()).sum().backward()
    return (out.detach(), h.grad, *[p.grad for p in ps])


def run_reference(kind, hidden, positions, params, grad_dir, act=None, keep=None, p=0.0):
    h = hidden.detach().double().cpu().requires_grad_(True)
    ps = [p_.detach().double().cpu().requires_grad_(True) for p_ in params]
    out = reference_edit(kind, h, positions.cpu(), ps, act=act, keep=keep, p=p)
    (out * grad_dir.double().cpu()).sum().backward()
    return (out.detach(), h.grad, *[p_.grad for p_ in ps])


def check_all(kind, got, want, dtype, names=None, scale=1.0):
    names = names or ["output", "grad hidden"] + (["grad R", "grad W", "grad b"] if kind == "loreft" else ["grad W1", "grad b", "grad W2"])
    for g, w, name in zip(got, want, names):
        assert g is not None, f"{name} is missing"
        assert g.dtype != torch.float64 or dtype == torch.float64
        assert_close(g, w, dtype, name, scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients(backend, kind, dtype, case):
    hidden, positions, params, grad_dir = _inputs(case, kind, dtype)
    got = run_op(kind, backend, hidden, positions, params, grad_dir)
    want = run_reference(kind, hidden, positions, params, grad_dir)
    check_all(kind, got, want, dtype)


@pytest.mark.parametrize("act", sorted(activations.SUPPORTED))
@pytest.mark.parametrize("backend", BACKENDS)
def test_activations(backend, act):
    case = CASES[1]
    for kind in KINDS:
        hidden, positions, params, grad_dir = _inputs(case, kind, torch.float32, seed=3)
        got = run_op(kind, backend, hidden, positions, params, grad_dir, act=act)
        want = run_reference(kind, hidden, positions, params, grad_dir, act=act)
        check_all(kind, got, want, torch.float32, scale=5.0)


def test_unsupported_activation_falls_back_or_raises():
    case = CASES[1]
    hidden, positions, params, grad_dir = _inputs(case, "loreft", torch.float32)
    with pytest.raises(ValueError, match="act='mish' has no fused kernel"):
        rk.loreft(hidden.clone(), positions, *params, act="mish", backend="triton")
    got = run_op("loreft", "torch", hidden, positions, params, grad_dir, act="mish")
    want = run_reference("loreft", hidden, positions, params, grad_dir, act="mish")
    check_all("loreft", got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_recompute_matches(backend, kind, dtype):
    """recompute=True rebuilds the edited rows from the output instead of saving them."""
    for case in (CASES[1], CASES[2]):
        hidden, positions, params, grad_dir = _inputs(case, kind, dtype, seed=5)
        got = run_op(kind, backend, hidden, positions, params, grad_dir, recompute=True)
        want = run_reference(kind, hidden, positions, params, grad_dir)
        check_all(kind, got, want, dtype, scale=2.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_recompute_detects_a_later_in_place_edit(backend):
    hidden, positions, params, grad_dir = _inputs(CASES[1], "loreft", torch.float32)
    h = hidden.clone().requires_grad_(True)
    x = h * 1
    ps = [p.clone().requires_grad_(True) for p in params]
    rk.loreft(x, positions, *ps, backend=backend, recompute=True)
    rk.loreft(x, positions, *ps, backend=backend)  # edits the saved output again, in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (x * grad_dir).sum().backward()


def test_two_edits_in_sequence_on_one_tensor():
    """Several interventions on one layer run in sequence on the same tensor (pyreft's semantics)."""
    hidden, positions, params, grad_dir = _inputs(CASES[1], "loreft", torch.float32)
    gen = torch.Generator().manual_seed(9)
    params2 = make_params("loreft", 4, hidden.shape[-1], gen)
    for backend in BACKENDS:
        h = hidden.clone().requires_grad_(True)
        ps = [p.clone().requires_grad_(True) for p in params + params2]
        x = h * 1
        rk.loreft(x, positions, *ps[:3], backend=backend)
        rk.loreft(x, positions.flip(1), *ps[3:], backend=backend)
        (x * grad_dir).sum().backward()
        hr = hidden.double().requires_grad_(True)
        pr = [p.detach().double().requires_grad_(True) for p in params + params2]
        ref = reference_edit("loreft", reference_edit("loreft", hr, positions, pr[:3]), positions.flip(1), pr[3:])
        (ref * grad_dir.double()).sum().backward()
        assert_close(x.detach(), ref.detach(), torch.float32, f"{backend} output")
        for g, w in zip([h.grad] + [p.grad for p in ps], [hr.grad] + [p.grad for p in pr]):
            assert_close(g, w, torch.float32, f"{backend} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_not_edited_are_bitwise_unchanged(backend):
    for dtype in DTYPES:
        hidden, positions, params, grad_dir = _inputs(CASES[1], "loreft", dtype)
        out, grad_h, *_ = run_op("loreft", backend, hidden, positions, params, grad_dir)
        edited = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        for i in range(positions.shape[0]):
            for t in positions[i].tolist():
                if t >= 0:
                    edited[i, t] = True
        edited = edited.to(hidden.device)
        assert torch.equal(out[~edited], hidden[~edited])
        assert torch.equal(grad_h[~edited], grad_dir[~edited].to(grad_h.dtype))
        assert not torch.equal(out[edited], hidden[edited])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden(backend):
    """Strided views as models produce them: a slice along T, and d not the innermost dimension."""
    case = CASES[1]
    _, B, T, d, r, _ = case
    gen = torch.Generator().manual_seed(2)
    positions = torch.tensor(case[5])
    params = make_params("loreft", r, d, gen)
    grad_dir = torch.randn(B, T, d, generator=gen).to(DEVICE)
    views = {
        "sliced_T": lambda base: base[:, ::2, :],
        "d_outer": lambda base: base.transpose(1, 2),
    }
    bases = {
        "sliced_T": torch.randn(B, 2 * T, d, generator=gen).to(DEVICE),
        "d_outer": torch.randn(B, d, T, generator=gen).to(DEVICE),
    }
    for name, view in views.items():
        base = bases[name].clone().requires_grad_(True)
        x = view(base * 1)
        assert not x.is_contiguous()
        hidden = x.detach().clone()
        ps = [p.clone().requires_grad_(True) for p in params]
        out = rk.loreft(x, positions, *ps, backend=backend)
        (out * grad_dir).sum().backward()
        got = (out.detach(), view(base.grad), *[p.grad for p in ps])
        want = run_reference("loreft", hidden, positions, params, grad_dir)
        check_all("loreft", got, want, torch.float32)


def test_mixed_parameter_dtypes():
    """fp32 R (as pyreft keeps it) with 16-bit hidden, W and b: computed in fp32, each gradient in its
    parameter's dtype."""
    dtype = torch.float16
    hidden, positions, params, grad_dir = _inputs(CASES[2], "loreft", dtype)
    R, W, b = params
    params = (R, W.to(dtype), b.to(dtype))
    for backend in BACKENDS:
        got = run_op("loreft", backend, hidden, positions, params, grad_dir)
        assert [g.dtype for g in got[2:]] == [torch.float32, dtype, dtype]
        want = run_reference("loreft", hidden, positions, params, grad_dir)
        check_all("loreft", got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flags(backend):
    """Frozen model input (only parameters need grad) and frozen parameters (only hidden needs grad)."""
    hidden, positions, params, grad_dir = _inputs(CASES[2], "direft", torch.float32)
    want = run_reference("direft", hidden, positions, params, grad_dir)
    got = run_op("direft", backend, hidden, positions, params, grad_dir, grad_hidden=False)
    assert got[1] is None
    for g, w in zip(got[2:], want[2:]):
        assert_close(g, w, torch.float32, "parameter gradient")
    got = run_op("direft", backend, hidden, positions, params, grad_dir, grad_params=False)
    assert all(g is None for g in got[2:])
    assert_close(got[1], want[1], torch.float32, "hidden gradient")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backward_is_deterministic(backend):
    hidden, positions, params, grad_dir = _inputs(CASES[4], "loreft", DTYPES[-1])
    a = run_op("loreft", backend, hidden, positions, params, grad_dir)
    b = run_op("loreft", backend, hidden, positions, params, grad_dir)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_edit_once_count_once(backend):
    """A row named three times equals the same row named once, forward and gradients."""
    hidden, _, params, grad_dir = _inputs(CASES[1], "loreft", torch.float32)
    once = torch.tensor([[2, -1, -1], [4, -1, -1], [0, 1, -1]])
    thrice = torch.tensor([[2, 2, 2], [-1, 4, 4], [0, 1, 0]])
    a = run_op("loreft", backend, hidden, once, params, grad_dir)
    b = run_op("loreft", backend, hidden, thrice, params, grad_dir)
    for x, y in zip(a, b):
        assert_close(x, y, torch.float32, "duplicates")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_to_edit(backend):
    hidden, _, params, grad_dir = _inputs(CASES[1], "loreft", torch.float32)
    for positions in (torch.full((3, 2), -1), torch.empty((3, 0), dtype=torch.long)):
        out, gh, gR, gW, gb = run_op("loreft", backend, hidden, positions, params, grad_dir)
        assert torch.equal(out, hidden)
        assert torch.equal(gh, grad_dir)
        for g in (gR, gW, gb):
            assert g is None or torch.count_nonzero(g) == 0


GPU_LIKE_CONFIGS = {
    # the tile kernels (tl.dot over column blocks) with column blocks like the GPU's
    "tiles": fused_edit.LaunchConfig(rows=False, fwd_block_n=16, fwd_block_d=128, bwd_block_d=64, bwd_programs=3),
    # the row-resident kernels with small steps, so every persistent program runs several of them
    "rows": fused_edit.LaunchConfig(rows=True, rows_block_n=2, rows_warps=4, bwd_block_d=128, bwd_programs=5),
}


@pytest.mark.parametrize("config", sorted(GPU_LIKE_CONFIGS))
def test_int32_positions_and_gpu_launch_config(monkeypatch, config):
    """int32 positions, and block shapes like the GPU's (the CPU defaults are larger), so masked column
    blocks, several programs per row and persistent programs are exercised under the interpreter too."""
    monkeypatch.setattr(fused_edit, "launch_config", lambda *a: GPU_LIKE_CONFIGS[config])
    for case in (CASES[1], CASES[2], CASES[4]):
        for kind in KINDS:
            hidden, positions, params, grad_dir = _inputs(case, kind, torch.float32, seed=11)
            got = run_op(kind, "triton", hidden, positions.int(), params, grad_dir)
            want = run_reference(kind, hidden, positions, params, grad_dir)
            check_all(kind, got, want, torch.float32)


def test_backend_environment_variable(monkeypatch):
    hidden, positions, params, _ = _inputs(CASES[1], "loreft", torch.float32)
    calls = []
    monkeypatch.setattr(fused_edit, "edit_reference", lambda *a: calls.append("torch") or a[0])
    monkeypatch.setenv(rk.BACKEND_ENV, "torch")
    rk.loreft(hidden.clone(), positions, *params, backend="triton")
    assert calls == []  # an explicit argument wins
    rk.loreft(hidden.clone(), positions, *params)
    assert calls == ["torch"]
    monkeypatch.setenv(rk.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="REFT_KERNELS_BACKEND='cuda'"):
        rk.loreft(hidden.clone(), positions, *params)


def test_default_backend_follows_device():
    from reft_kernels import backend

    # CPU tensors: the C++ kernels when the extension loads (CI builds it), else the torch reference
    assert backend.resolve(None, torch.zeros(1, 1, 1)) == ("cpp" if backend.cpp_available() else "torch")
    assert backend.resolve(None, torch.zeros(1, 1, 1), has_cpp=False) == "torch"
    if torch.cuda.is_available():
        assert backend.resolve(None, torch.zeros(1, 1, 1, device="cuda")) == "triton"


def test_torch_backend_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    B, T, d, r = 2, 5, 12, 3
    positions = torch.tensor([[0, 3, 3], [4, -1, 1]])
    for kind in KINDS:
        params = [p.double().cpu().requires_grad_(True) for p in make_params(kind, r, d, gen, device="cpu")]
        hidden = torch.randn(B, T, d, dtype=torch.float64, generator=gen, requires_grad=True)

        def f(h, *ps):
            return OPS[kind](h * 1, positions, *ps, act="gelu", backend="torch")

        assert torch.autograd.gradcheck(f, (hidden, *params))
