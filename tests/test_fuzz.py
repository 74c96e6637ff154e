"""Property-based tests (hypothesis) of the fused edit and of the orthonormalization, every backend against a
float64 reference (issue 18's campaign, made part of CI).

What a drawn example covers: every intervention type the op family spans (source act(Wh + b) or b,
subtracting L h with or without proj_bias, every fused activation), awkward shapes (d below 16 and not a
multiple of 8, or up to 100 with r up to 80; B, T, P small), duplicate and padding (-1) positions, int32 and
int64 positions, non-contiguous hidden (transposed or column-strided) and parameters (stride 2), fp32 and fp16 hidden (bf16 on cpp and
torch: the Triton interpreter mishandles it), parameters in fp32 or hidden's dtype, recompute, which inputs
require grad, dropout. Checked: the output and every gradient against float64 autograd of
helpers.reference_family, and the rows not edited (and their gradient) bit for bit. Dropout: the same seed
gives the same bits, and the C++ kernels draw the Triton kernels' mask.

Profiles (REFT_FUZZ_PROFILE): "ci" (default) is bounded and derandomized (a fixed seed: every CI run draws
the same examples); "long" (`make fuzz`) draws fresh random examples, many more; `make fuzz FUZZ_SEED=n`
replays a long run whose seed was printed. REFT_FUZZ_EXAMPLES=<n> sets the number of examples of every test.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

import reft_kernels as rk
from reft_kernels.ops import activations
from reft_kernels.ops import fused_edit as fe
from reft_kernels.ops import mixed_edit as me
from reft_kernels.ops.orthonormal import orthonormalize_reference
from conftest import DEVICE
from helpers import TOLERANCE, reference_family

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
# examples per test; the Triton interpreter costs ~0.1-1 s per forward+backward, the other backends ~10 ms
_CI_EXAMPLES = {"triton": 20, "cpp": 150, "torch": 60, "dropout": 10, "orthonormal": 10,
                "mixed-triton": 40, "mixed-cpp": 300, "mixed-torch": 120, "mixed-dropout": 20}
_LONG_EXAMPLES = {"triton": 400, "cpp": 3000, "torch": 1000, "dropout": 300, "orthonormal": 300,
                  "mixed-triton": 600, "mixed-cpp": 4000, "mixed-torch": 1500, "mixed-dropout": 300}
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get("REFT_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"REFT_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
settings.load_profile(PROFILE)


def examples(what: str):
    """The example budget of one test; REFT_FUZZ_EXAMPLES=<n> sets every test's (scripts/sanitize.sh does)."""
    n = os.environ.get("REFT_FUZZ_EXAMPLES")
    return settings(max_examples=int(n) if n else (_LONG_EXAMPLES if PROFILE == "long" else _CI_EXAMPLES)[what])


def _cpp_ok() -> bool:
    return rk.extension.available()


BACKENDS = ["torch", "triton", pytest.param("cpp", marks=pytest.mark.skipif(
    DEVICE != "cpu" or not _cpp_ok(), reason="the C++ CPU kernels run CPU tensors (and need the extension)"))]
ACTS = sorted(activations.SUPPORTED)


# ------------------------------------------------------------------------------------------------
# Drawing an example
# ------------------------------------------------------------------------------------------------


@st.composite
def edit_cases(draw, backend: str):
    source_linear = draw(st.booleans())
    subtract_proj = draw(st.booleans())
    has_proj_bias = subtract_proj and draw(st.booleans())
    act = draw(st.sampled_from(ACTS)) if source_linear else "identity"
    if draw(st.integers(0, 3)) == 0:  # wide: r up to 80
        d = draw(st.integers(17, 100).filter(lambda v: v % 8))
        r = draw(st.integers(1, min(d, 80)))
    else:
        d = draw(st.integers(1, 15).filter(lambda v: v % 8))
        r = draw(st.integers(1, d))
    B, T, P = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    positions = draw(st.lists(st.lists(st.integers(-1, T - 1), min_size=P, max_size=P), min_size=B, max_size=B))
    # (bf16 under the Triton interpreter is not trusted: it mishandles it; on a GPU the kernels take it)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" or DEVICE == "cuda" else [])
    dtype = draw(st.sampled_from(dtypes))
    return dict(
        source_linear=source_linear, subtract_proj=subtract_proj, has_proj_bias=has_proj_bias, act=act,
        B=B, T=T, d=d, r=r, positions=positions, pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        dtype=dtype, param_dtype=draw(st.sampled_from([torch.float32, dtype])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "column-strided"])),
        strided_params=draw(st.booleans()),
        recompute=draw(st.booleans()), grad_hidden=draw(st.booleans()), grad_params=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make(c, device):
    """(hidden leaf, params, positions, grad_dir) for case c, random (never zero), on device."""
    gen = torch.Generator().manual_seed(c["seed"])
    B, T, d, r = c["B"], c["T"], c["d"], c["r"]
    hidden = torch.randn(B, T, d, dtype=torch.float64, generator=gen)
    scale = d**-0.5
    lift = torch.randn(r, d, dtype=torch.float64, generator=gen) * scale
    weight = torch.randn(r, d, dtype=torch.float64, generator=gen) * scale if c["source_linear"] else None
    bias = torch.randn(r, dtype=torch.float64, generator=gen)
    proj_bias = torch.randn(r, dtype=torch.float64, generator=gen) if c["has_proj_bias"] else None
    grad_dir = torch.randn(B, T, d, dtype=torch.float64, generator=gen)
    pd = c["param_dtype"]
    params = [None if p is None else p.to(device, pd) for p in (lift, weight, bias, proj_bias)]
    positions = torch.tensor(c["positions"], dtype=c["pos_dtype"]).reshape(B, -1)
    return hidden.to(device, c["dtype"]), params, positions, grad_dir.to(device, c["dtype"])


def _laid_out(h: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-leaf with h's values in the given memory layout (a view of a fresh tensor, autograd-connected)."""
    if layout == "transposed":  # strides (T*d, 1, T)
        return (h.transpose(1, 2) * 1).transpose(1, 2)
    if layout == "column-strided":  # stride 2 between columns
        return torch.stack([h, h], -1).mul(1)[..., 0]
    return h * 1


def _edited(positions: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] bool: rows some slot names."""
    B = positions.shape[0]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        for t in positions[i].tolist():
            if 0 <= t < T:
                mask[i, t] = True
    return mask


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """||got - want|| <= tol (||want|| + 0.01 sqrt(numel)): relative, with a floor for (near-)zero gradients."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    err = (g - w).norm().item()
    bound = tol * (w.norm().item() + 0.01 * w.numel() ** 0.5)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


def _run(c, backend, device, dropout=0.0, seed=None):
    """The op on fresh inputs; returns (output, d hidden or None, d params (None where absent or frozen),
    positions, grad_dir, hidden before the edit)."""
    hidden, params, positions, grad_dir = _make(c, device)
    leaf = hidden.clone().requires_grad_(c["grad_hidden"])
    # strided_params: every parameter a view with stride 2 along its last dimension (of a leaf that holds a
    # large filler between the values, so a kernel that ignores the stride reads it)
    leaves = [None if p is None else (torch.stack([p, torch.full_like(p, 1e4)], -1) if c["strided_params"] else p)
              .clone().requires_grad_(c["grad_params"]) for p in params]
    ps = [None if q is None else (q[..., 0] if c["strided_params"] else q) for q in leaves]
    x = _laid_out(leaf, c["layout"])
    if seed is not None:
        torch.manual_seed(seed)
    out = rk.reft_edit(x, positions, ps[0], ps[1], ps[2], ps[3], source_linear=c["source_linear"],
                       subtract_proj=c["subtract_proj"], act=c["act"], dropout=dropout, training=dropout > 0,
                       backend=backend, recompute=c["recompute"])
    assert out is x
    if c["grad_hidden"] or c["grad_params"]:
        (out.float() * grad_dir.float()).sum().backward()
    grads = [leaf.grad] + [None if q is None or q.grad is None else (q.grad[..., 0] if c["strided_params"] else q.grad)
                           for q in leaves]
    return out.detach(), grads, positions, grad_dir, hidden


def _reference(c, hidden, params, positions, grad_dir, keep=None, p=0.0):
    kind = {(True, True): "loreft", (False, True): "consreft", (False, False): "lobireft",
            (True, False): "direft"}[(c["source_linear"], c["subtract_proj"])]
    h = hidden.detach().double().cpu().requires_grad_(True)
    ps = [None if x is None else x.detach().double().cpu().requires_grad_(True) for x in params]
    out = reference_family(kind, h, positions.long(), ps[0], ps[1], ps[2], ps[3], act=c["act"], keep=keep, p=p)
    (out * grad_dir.double().cpu()).sum().backward()
    return out.detach(), [h.grad] + [None if x is None else x.grad for x in ps]


def _tolerance(c) -> float:
    # the coarser of hidden's and the parameters' dtypes; x4 headroom over the fixed-shape tests' bounds, for
    # r up to 80 summed terms and activations evaluated near their steep parts
    return 4 * max(TOLERANCE[c["dtype"]], TOLERANCE[c["param_dtype"]])


def _check_against_reference(c, backend, device, out, grads, positions, grad_dir, hidden, keep=None, p=0.0):
    _, params, _, _ = _make(c, device)
    want_out, want_grads = _reference(c, hidden, params, positions, grad_dir, keep=keep, p=p)
    tol = _tolerance(c)
    _close(out, want_out, tol, "output")
    edited = _edited(positions, c["T"])
    untouched = ~edited
    assert torch.equal(out.cpu()[untouched], hidden.cpu()[untouched]), "a row that was not edited changed"
    names = ["grad hidden", "grad lift", "grad weight", "grad bias", "grad proj_bias"]
    wanted = [c["grad_hidden"]] + [c["grad_params"]] * 4
    for g, w, x, name, want_it in zip(grads, want_grads, [hidden] + params, names, wanted):
        if x is None or not want_it:
            assert g is None, f"{name} should not exist"
            continue
        assert g is not None, f"{name} is missing"
        _close(g, torch.zeros(x.shape, dtype=torch.float64) if w is None else w, tol, name)  # None: nothing edited
    if c["grad_hidden"]:
        assert torch.equal(grads[0].cpu()[untouched], grad_dir.cpu()[untouched]), \
            "the gradient of a row that was not edited is not the incoming gradient"


# ------------------------------------------------------------------------------------------------
# The edit, every backend against float64
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_matches_float64(backend):
    device = "cpu" if backend == "cpp" else DEVICE

    @examples(backend)
    @given(c=edit_cases(backend))
    def check(c):
        out, grads, positions, grad_dir, hidden = _run(c, backend, device)
        _check_against_reference(c, backend, device, out, grads, positions, grad_dir, hidden)

    check()


# ------------------------------------------------------------------------------------------------
# Dropout: repeatable, the C++ kernels draw the Triton kernels' mask, and the kept values are the edit's
# ------------------------------------------------------------------------------------------------


def _keep(out: torch.Tensor, positions: torch.Tensor, T: int) -> torch.Tensor:
    """[B, P, d] keep-mask per owning slot, read off the output (random data is never exactly 0)."""
    B, P = positions.shape
    keep = torch.ones(B, P, out.shape[-1], dtype=torch.float64)
    for i in range(B):
        seen = set()
        for j, t in enumerate(positions[i].tolist()):
            if 0 <= t < T and t not in seen:
                seen.add(t)
                keep[i, j] = (out[i, t] != 0).double().cpu()
    return keep


FUSED = ["triton", pytest.param("cpp", marks=pytest.mark.skipif(
    DEVICE != "cpu" or not _cpp_ok(), reason="the C++ CPU kernels run CPU tensors (and need the extension)"))]


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_is_repeatable_and_matches_float64(backend):
    device = "cpu" if backend == "cpp" else DEVICE

    @examples("dropout")
    @given(c=edit_cases("triton"), p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 2**31 - 1))
    def check(c, p, seed):
        c = dict(c, grad_hidden=True)
        first = _run(c, backend, device, dropout=p, seed=seed)
        again = _run(c, backend, device, dropout=p, seed=seed)
        for a, b in zip([first[0]] + first[1], [again[0]] + again[1]):
            assert (a is None and b is None) or torch.equal(a, b), "the same seed gave different bits"
        out, grads, positions, grad_dir, hidden = first
        keep = _keep(out, positions, c["T"])
        _check_against_reference(c, backend, device, out, grads, positions, grad_dir, hidden, keep=keep, p=p)

    check()


@pytest.mark.skipif(DEVICE != "cpu" or not _cpp_ok(), reason="compares the C++ CPU kernels with the Triton interpreter")
@examples("dropout")
@given(c=edit_cases("triton"), p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 2**31 - 1))
def test_dropout_mask_cpp_equals_triton(c, p, seed):
    outs = [_run(dict(c, grad_hidden=True), backend, "cpu", dropout=p, seed=seed) for backend in ("cpp", "triton")]
    (cpp_out, cpp_grads, positions, *_), (tri_out, tri_grads, *_) = outs
    T = c["T"]
    assert torch.equal(_keep(cpp_out, positions, T), _keep(tri_out, positions, T)), "different dropout masks"
    tol = _tolerance(c)
    _close(cpp_out, tri_out, tol, "output, cpp against triton")
    _close(cpp_grads[0], tri_grads[0], tol, "grad hidden, cpp against triton")


# ------------------------------------------------------------------------------------------------
# Orthonormalization against float64
# ------------------------------------------------------------------------------------------------


@st.composite
def stacks(draw):
    d = draw(st.integers(1, 100))
    r = draw(st.integers(1, max(1, min(64, d // 2))))  # r <= d/2: random Gaussian rows stay well conditioned
    return draw(st.integers(1, 3)), r, d, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_orthonormalize_matches_float64(backend):
    @examples("orthonormal")
    @given(s=stacks())
    def check(s):
        L, r, d, stacked, seed = s
        gen = torch.Generator().manual_seed(seed)
        A64 = torch.randn(L, r, d, dtype=torch.float64, generator=gen)
        assume(torch.linalg.cond(A64).max().item() < 30)
        g = torch.randn(L, r, d, dtype=torch.float64, generator=gen)
        A = A64.float().to(DEVICE).requires_grad_(True)
        Q = rk.orthonormalize(A if stacked else A[0], backend=backend)
        (Q * (g if stacked else g[0]).float().to(DEVICE)).sum().backward()
        a = A64.clone().requires_grad_(True)
        q = orthonormalize_reference(a if stacked else a[0])
        (q * (g if stacked else g[0])).sum().backward()
        _close(Q, q, 1e-5, "Q")
        _close(A.grad, a.grad, 1e-4, "grad A")

    check()


# ------------------------------------------------------------------------------------------------
# The mixed-adapter op (ops/mixed_edit.py): a bank of adapters of random types, ranks and activations, both
# layouts, against a float64 per-row reference
# ------------------------------------------------------------------------------------------------

# (source_linear, subtract_proj) of the six types (the lift's orthonormality does not matter to the op)
_TYPES = [(True, True), (False, True), (False, False), (True, False)]


@st.composite
def mixed_cases(draw, backend: str):
    """A bank of 1-4 adapters, each of a random type (its own rank 1..r, or 0: an empty serving slot), activation
    and proj_bias; the bank's r at or above the largest rank (rows above an adapter's rank hold junk, which the
    op must never read); a batched layout with one adapter per batch row or per slot, or the flat layout; -1 and
    (with the value checks off) out-of-range positions and ids, duplicates; strided hidden, indices and bank."""
    A = draw(st.integers(1, 4))
    if draw(st.integers(0, 3)) == 0:  # wide
        d = draw(st.integers(17, 100).filter(lambda v: v % 8))
        r_max = min(d, 24)
    else:
        d = draw(st.integers(1, 15).filter(lambda v: v % 8))
        r_max = d
    adapters = []
    for _ in range(A):
        source_linear, subtract = draw(st.sampled_from(_TYPES))
        adapters.append(dict(
            source_linear=source_linear, subtract_proj=subtract,
            rank=0 if draw(st.integers(0, 7)) == 0 else draw(st.integers(1, r_max)),
            act=draw(st.sampled_from(ACTS)) if source_linear else "identity",
            proj_bias=subtract and draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))))
    R = min(max(1, max(a["rank"] for a in adapters)) + draw(st.integers(0, 2)), max(r_max, 1) + 2)
    layout = draw(st.sampled_from(["rows", "slots", "flat"]))
    wild = draw(st.integers(0, 4)) == 0  # out-of-range values, value checks off
    lo_t, lo_a = (-3, -2) if wild else (-1, -1)
    if layout == "flat":
        B, T, P = 1, draw(st.integers(1, 12)), draw(st.integers(1, 10))
    else:
        B, T, P = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    hi_t, hi_a = (T + 2, A + 1) if wild else (T - 1, A - 1)
    positions = draw(st.lists(st.lists(st.integers(lo_t, hi_t), min_size=P, max_size=P), min_size=B, max_size=B))
    n_ids = (B, P) if layout != "rows" else (B, 1)
    ids = draw(st.lists(st.lists(st.integers(lo_a, hi_a), min_size=n_ids[1], max_size=n_ids[1]), min_size=B,
                        max_size=B))
    live = [t for t in positions[0] if t >= 0]
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" or DEVICE == "cuda" else [])
    dtype = draw(st.sampled_from(dtypes))
    return dict(
        adapters=adapters, R=R, d=d, layout=layout, B=B, T=T, P=P, positions=positions, ids=ids, wild=wild,
        rows_unique=layout == "flat" and len(live) == len(set(live)) and draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])), strided_index=draw(st.booleans()),
        dtype=dtype, param_dtype=draw(st.sampled_from([torch.float32, dtype])),
        hidden_layout=draw(st.sampled_from(["contiguous", "transposed", "column-strided"])),
        strided_bank=draw(st.booleans()), recompute=draw(st.booleans()), grad_hidden=draw(st.booleans()),
        grad_params=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


_BANK_FLOATS = ("lift", "weight", "bias", "proj_bias")


def _mixed_make(c):
    """float64 (hidden [B, T, d] (flat: [1, n_tokens, d]), the bank's float tensors [A, R, d] / [A, R] with junk
    above each adapter's rank, grad_dir), random, never zero; and the bank's metadata."""
    gen = torch.Generator().manual_seed(c["seed"])
    A, R, d, ads = len(c["adapters"]), c["R"], c["d"], c["adapters"]
    hidden = torch.randn(c["B"], c["T"], d, dtype=torch.float64, generator=gen)
    grad_dir = torch.randn(c["B"], c["T"], d, dtype=torch.float64, generator=gen)
    rows = torch.arange(R)[None, :, None]
    ranks = torch.tensor([a["rank"] for a in ads])[:, None, None]
    junk = lambda *s: 3.0 * torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    live = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    lift = torch.where(rows < ranks, live(A, R, d) * d**-0.5, junk(A, R, d))
    t = {"lift": lift, "bias": torch.where(rows[..., 0] < ranks[..., 0], live(A, R), junk(A, R))}
    if any(a["source_linear"] for a in ads):
        sl = torch.tensor([a["source_linear"] for a in ads])[:, None, None]
        t["weight"] = torch.where((rows < ranks) & sl, live(A, R, d) * d**-0.5, junk(A, R, d))
    if any(a["proj_bias"] for a in ads):
        pb = torch.tensor([a["proj_bias"] for a in ads])[:, None]
        t["proj_bias"] = torch.where((rows[..., 0] < ranks[..., 0]) & pb, live(A, R), junk(A, R))
    specs = tuple(fe.EditSpec(a["source_linear"], a["subtract_proj"], a["act"]) if a["rank"] else None for a in ads)
    return hidden, t, specs, grad_dir


def _mixed_indices(c):
    B, P = c["B"], c["P"]
    positions = torch.tensor(c["positions"], dtype=c["index_dtype"]).reshape(B, P)
    ids = torch.tensor(c["ids"], dtype=c["index_dtype"])
    ids = ids[:, 0] if c["layout"] == "rows" else ids.reshape(B, P)
    if c["layout"] == "flat":
        positions, ids = positions[0], ids[0]
    if c["strided_index"]:  # stride-2 views over junk
        positions, ids = (torch.stack([x, torch.full_like(x, 12345)], -1)[..., 0] for x in (positions, ids))
    return positions, ids


def _mixed_bank(c, t, specs, device, leaf_of):
    """An AdapterBank over the tensors t (leaf_of(name, x) gives each bank tensor from its float64 values)."""
    ads = c["adapters"]
    f = {k: leaf_of(k, t[k]) if k in t else None for k in _BANK_FLOATS}
    meta = dict(
        kinds=torch.tensor([me.kind_code(s) if s is not None else 0 for s in specs], dtype=torch.int32),
        ranks=torch.tensor([a["rank"] for a in ads], dtype=torch.int32),
        dropout=torch.tensor([a["dropout"] for a in ads], dtype=torch.float32))
    if c["strided_bank"]:
        meta = {k: torch.stack([v, torch.full_like(v, 7)], -1)[..., 0] for k, v in meta.items()}
    return rk.AdapterBank(**f, **{k: v.to(device) for k, v in meta.items()}, specs=specs,
                          host_ranks=tuple(a["rank"] for a in ads), host_dropout=tuple(a["dropout"] for a in ads))


def _mixed_run(c, backend, device, training=False, seed=None):
    """The op on fresh inputs: (output [B, T, d], [d hidden, d lift, d weight, d bias, d proj_bias] (None where
    absent or not wanted), hidden before the edit (float64 values), bank tensors (float64), specs, grad_dir)."""
    hidden, t, specs, grad_dir = _mixed_make(c)
    flat = c["layout"] == "flat"
    leaves = {}

    def leaf_of(name, x):
        x = x.to(device, c["param_dtype"])
        if c["strided_bank"]:  # a view with stride 2 of a leaf holding a large filler between the values
            x = torch.stack([x, torch.full_like(x, 1e4)], -1)
        leaves[name] = x.requires_grad_(c["grad_params"])
        return x[..., 0] if c["strided_bank"] else x

    bank = _mixed_bank(c, t, specs, device, leaf_of)
    leaf = hidden.to(device, c["dtype"]).requires_grad_(c["grad_hidden"])
    h = _laid_out(leaf, c["hidden_layout"])
    positions, ids = _mixed_indices(c)
    if seed is not None:
        torch.manual_seed(seed)
    check = False if c["wild"] else None
    if flat:
        out = rk.mixed_reft_edit_flat(h[0], positions, ids, bank, rows_unique=c["rows_unique"], training=training,
                                      backend=backend, recompute=c["recompute"], check_rows=check)
        assert out is not None and out.data_ptr() == h.data_ptr()
        out = out[None]
    else:
        out = rk.mixed_reft_edit(h, positions, ids, bank, training=training, backend=backend,
                                 recompute=c["recompute"], check_positions=check)
        assert out is h
    if c["grad_hidden"] or c["grad_params"]:
        (out.float() * grad_dir.to(device).float()).sum().backward()
    grads = [leaf.grad] + [None if k not in leaves or leaves[k].grad is None else
                           (leaves[k].grad[..., 0] if c["strided_bank"] else leaves[k].grad) for k in _BANK_FLOATS]
    return out.detach(), grads, hidden, t, specs, grad_dir


def _mixed_owners(c):
    """[(b, t, slot, adapter)] of the slots that edit: the first non-empty slot naming a row of its batch row."""
    positions, ids = _mixed_indices(c)
    pos = positions.reshape(c["B"], c["P"]).tolist()
    idv = ids.reshape(c["B"], -1).tolist()
    out = []
    for b in range(c["B"]):
        seen = set()
        for j in range(c["P"]):
            t, a = pos[b][j], idv[b][j if c["layout"] != "rows" else 0]
            if not (0 <= t < c["T"] and 0 <= a < len(c["adapters"])) or c["adapters"][a]["rank"] == 0 or t in seen:
                continue
            seen.add(t)
            out.append((b, t, b * c["P"] + j, a))
    return out


def _mixed_reference(c, hidden, t, specs, grad_dir, keep=None):
    """float64 autograd of each edited row through its own adapter's slices [:rank] (the junk above is never
    touched); keep: {slot: keep-mask [d]} with the adapter's dropout. Returns (output, grads as _mixed_run's)."""
    h = hidden.clone().requires_grad_(True)
    ps = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = h.clone()
    for b, tt, n, a in _mixed_owners(c):
        ad, spec, r = c["adapters"][a], specs[a], c["adapters"][a]["rank"]
        u = h[b, tt]
        L, bias = ps["lift"][a, :r], ps["bias"][a, :r]
        if spec.source_linear:
            z = ps["weight"][a, :r] @ u + bias
            s = z if spec.act == "identity" else ACT2FN[spec.act](z)
        else:
            s = bias
        if spec.subtract_proj:
            s = s - L @ u - (ps["proj_bias"][a, :r] if "proj_bias" in ps else 0.0)
        y = u + L.t() @ s
        if keep is not None:
            y = y * keep[n] / (1.0 - ad["dropout"])
        out[b, tt] = y
    (out * grad_dir).sum().backward()
    return out.detach(), [h.grad] + [ps[k].grad if k in ps else None for k in _BANK_FLOATS]


def _mixed_check(c, out, grads, hidden, t, specs, grad_dir, keep=None):
    want_out, want_grads = _mixed_reference(c, hidden, t, specs, grad_dir, keep)
    tol = _tolerance(c)
    _close(out, want_out, tol, "output")
    edited = torch.zeros(c["B"], c["T"], dtype=torch.bool)
    for b, tt, _, _ in _mixed_owners(c):
        edited[b, tt] = True
    h_in = hidden.to(c["dtype"])
    assert torch.equal(out.cpu()[~edited], h_in[~edited]), "a row that was not edited changed"
    names = ["grad hidden"] + [f"grad {k}" for k in _BANK_FLOATS]
    wanted = [c["grad_hidden"]] + [c["grad_params"]] * 4
    for g, w, name, want_it, k in zip(grads, want_grads, names, wanted, (None,) + _BANK_FLOATS):
        if not want_it or (k is not None and k not in t):
            assert g is None, f"{name} should not exist"
            continue
        assert g is not None, f"{name} is missing"
        _close(g, torch.zeros(g.shape, dtype=torch.float64) if w is None else w, tol, name)  # None: nothing edited
    if c["grad_hidden"]:
        assert torch.equal(grads[0].cpu()[~edited], grad_dir.to(c["dtype"])[~edited]), \
            "the gradient of a row that was not edited is not the incoming gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_edit_matches_float64(backend):
    device = "cpu" if backend == "cpp" else DEVICE

    @examples(f"mixed-{backend}")
    @given(c=mixed_cases(backend))
    def check(c):
        out, grads, hidden, t, specs, grad_dir = _mixed_run(c, backend, device)
        _mixed_check(c, out, grads, hidden, t, specs, grad_dir)

    check()


def _mixed_keep(c, out):
    """{slot: keep-mask [d]} of the editing slots, read off the output (random data is never exactly 0)."""
    return {n: (out[b, t] != 0).double().cpu() for b, t, n, _ in _mixed_owners(c)}


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_dropout_is_repeatable_and_matches_float64(backend):
    """Each adapter's own dropout: the same seed gives the same bits (output and every gradient), the kept
    values and the gradients are the edit's under the mask read off the output; on the Triton backend, the C++
    kernels draw the same mask."""
    device = "cpu" if backend == "cpp" else DEVICE

    @examples("mixed-dropout")
    @given(c=mixed_cases("triton"), seed=st.integers(0, 2**31 - 1))
    def check(c, seed):
        c = dict(c, grad_hidden=True)
        first = _mixed_run(c, backend, device, training=True, seed=seed)
        again = _mixed_run(c, backend, device, training=True, seed=seed)
        for a, b in zip([first[0]] + first[1], [again[0]] + again[1]):
            assert (a is None and b is None) or torch.equal(a, b), "the same seed gave different bits"
        out = first[0]
        keep = _mixed_keep(c, out)
        _mixed_check(c, *first, keep=keep)
        if backend == "triton" and DEVICE == "cpu" and _cpp_ok():
            cpp_out = _mixed_run(c, "cpp", "cpu", training=True, seed=seed)[0]
            assert all(torch.equal(k, v) for k, v in zip(keep.values(), _mixed_keep(c, cpp_out).values())), \
                "the C++ and Triton kernels drew different dropout masks"

    check()
