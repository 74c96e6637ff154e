"""The mixed-adapter edit (ops/mixed_edit.py; C++ csrc/mixed_cpu.cpp): every backend against a float64 reference
that loops over the edited rows calling the single-adapter reference with each row's own adapter, forward and
every gradient (hidden, and each adapter's own parameters through stack_adapters), over all six types, mixed
ranks and types in one bank, both layouts, awkward shapes, padding, rows with no adapter, duplicates; untouched
rows bit for bit; A = 1 against the single-adapter op; dropout masks across backends; the serving bank; the
registered ops (opcheck, torch.compile); and the refusals of bad input."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels.ops import fused_edit, mixed_edit as me
from conftest import DEVICE
from helpers import FAMILY, assert_close, orthonormal_rows, reference_family

BACKENDS = ["torch", "triton"] + (["cpp"] if DEVICE == "cpu" else [])
FUSED = [b for b in BACKENDS if b != "torch"]
KINDS = sorted(FAMILY)


def make_adapter(kind, r, d, gen, act="identity", pb=False, dropout=0.0):
    """float64 parameters of one adapter (random, never zero) as a dict."""
    lift_orth, source_linear, subtract = FAMILY[kind]
    lift = orthonormal_rows(r, d, gen) if lift_orth else torch.randn(r, d, dtype=torch.float64, generator=gen) * d**-0.5
    return dict(
        kind=kind, lift=lift,
        weight=torch.randn(r, d, dtype=torch.float64, generator=gen) * d**-0.5 if source_linear else None,
        bias=torch.randn(r, dtype=torch.float64, generator=gen),
        proj_bias=torch.randn(r, dtype=torch.float64, generator=gen) if pb else None,
        act=act if source_linear else "identity", dropout=dropout)


PARAMS = ("lift", "weight", "bias", "proj_bias")


def leaves(adapters, dtype, device=DEVICE):
    """Leaf copies (requires_grad) of every adapter's tensors in dtype."""
    return [{k: (v.detach().to(device, dtype).requires_grad_(True) if isinstance(v, torch.Tensor) else v)
             for k, v in a.items()} for a in adapters]


def bank_of(adapters):
    return rk.stack_adapters([rk.AdapterParams(a["lift"], a["weight"], a["bias"], a["proj_bias"],
                                               fused_edit.EditSpec(FAMILY[a["kind"]][1], FAMILY[a["kind"]][2], a["act"]),
                                               a["dropout"]) for a in adapters])


def owners(positions, ids, T, A, ranks):
    """[(b, t, slot, adapter)] of the slots that edit: the first non-empty slot naming a row of its batch row."""
    out = []
    B, P = positions.shape
    for b in range(B):
        seen = set()
        for j in range(P):
            t = int(positions[b, j])
            a = int(ids[b] if ids.dim() == 1 else ids[b, j])
            if t < 0 or t >= T or a < 0 or a >= A or ranks[a] == 0 or t in seen:
                continue
            seen.add(t)
            out.append((b, t, b * P + j, a))
    return out


def mixed_reference(hidden, positions, ids, adapters, keep=None):
    """float64, out of place: each edited row through reference_family with its own adapter; keep: optional
    {slot: keep-mask [d] (1 kept, 0 dropped)} with each adapter's own dropout probability."""
    flat = hidden.dim() == 2
    h3 = hidden[None] if flat else hidden
    pos = positions[None] if flat else positions
    idv = ids[None] if flat else ids
    out = h3.clone()
    for b, t, n, a in owners(pos, idv, h3.shape[1], len(adapters), [x["lift"].shape[0] for x in adapters]):
        ad = adapters[a]
        y = reference_family(ad["kind"], h3[b, t][None, None], torch.zeros(1, 1, dtype=torch.long), ad["lift"],
                             ad["weight"], ad["bias"], ad["proj_bias"], act=ad["act"])[0, 0]
        if keep is not None and n in keep:
            y = y * keep[n] / (1.0 - ad["dropout"])
        out[b, t] = y
    return out[0] if flat else out


def run(backend, hidden, positions, ids, adapters, dtype, grad, *, flat, grad_hidden=True, param_dtype=None, **kw):
    """(output, hidden gradient, then every adapter's parameter gradients in order) of the op on leaf copies."""
    ps = leaves(adapters, param_dtype or (torch.float64 if backend == "torch" and dtype == torch.float64
                                          else torch.float32))
    bank = bank_of(ps)
    h = hidden.detach().to(DEVICE, dtype).requires_grad_(grad_hidden)
    x = h * 1 if grad_hidden else h.clone()
    fn = rk.mixed_reft_edit_flat if flat else rk.mixed_reft_edit
    out = fn(x, positions, ids, bank, backend=backend, **kw)
    assert out is x, "the op must return the tensor it edited in place"
    (out.double() * grad.to(out.device)).sum().backward()
    return [out.detach(), h.grad] + [p[k].grad for p in ps for k in PARAMS if p[k] is not None]


def reference(hidden, positions, ids, adapters, grad, keep=None):
    ps = leaves(adapters, torch.float64, "cpu")
    h = hidden.detach().double().cpu().requires_grad_(True)
    out = mixed_reference(h, positions.cpu(), ids.cpu(), ps, keep)
    (out * grad.cpu()).sum().backward()
    return [out.detach(), h.grad] + [p[k].grad for p in ps for k in PARAMS if p[k] is not None]


def check(got, want, dtype, what, scale=1.0):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f"{what}: gradient {k} missing"
        if w is None or w.norm() == 0:  # (the reference has no gradient for an adapter no row uses)
            assert g.abs().max() == 0, f"{what}: tensor {k} should be zero"
        else:
            assert_close(g, w, dtype, f"{what} [{k}]", scale)


def zoo(d, gen):
    """One bank holding all six types, ranks 1 to 6, several activations and NoReFT's b2."""
    return [make_adapter("loreft", 4, d, gen, act="gelu"), make_adapter("noreft", 2, d, gen, pb=True),
            make_adapter("consreft", 3, d, gen), make_adapter("lobireft", 1, d, gen),
            make_adapter("direft", 6, d, gen, act="relu"), make_adapter("orthodireft", 2, d, gen, act="silu"),
            make_adapter("loreft", 5, d, gen)]


# (name, layout, B, T (n_tokens), d, positions or rows, ids): awkward on purpose
CASES = [
    ("flat_duplicates_no_adapter", "flat", 1, 30, 40, [3, 5, 5, 7, -1, 9, 11, 13, 2, 3, 20, 21, 22, 29],
     [0, 1, 2, 3, 4, -1, 5, 4, 2, 1, 0, 3, 6, 1]),
    ("batched_per_row_ids", "rows", 3, 8, 100, [[0, 2, 2, -1], [1, 7, 3, 3], [5, 6, 0, 4]], [1, 4, -1]),
    ("batched_per_slot_ids", "slots", 3, 8, 100, [[0, 2, 2, -1], [1, 7, 3, 3], [5, 6, 0, 4]],
     [[0, 1, 5, 2], [3, -1, 4, 2], [6, 5, 0, 1]]),
    ("batch1_one_position", "slots", 1, 5, 33, [[3]], [[4]]),
    ("flat_one_row", "flat", 1, 4, 33, [2], [3]),
]


def inputs(case, seed=0, A_adapters=None):
    name, layout, B, T, d, pos, ids = case
    gen = torch.Generator().manual_seed(seed)
    adapters = A_adapters or zoo(d, gen)
    shape = (T, d) if layout == "flat" else (B, T, d)
    hidden = torch.randn(shape, dtype=torch.float64, generator=gen)
    grad = torch.randn(shape, dtype=torch.float64, generator=gen)
    return hidden, torch.tensor(pos), torch.tensor(ids), adapters, grad, layout == "flat"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_every_gradient(backend, case):
    hidden, pos, ids, adapters, grad, flat = inputs(case)
    want = reference(hidden, pos, ids, adapters, grad)
    for dtype in ([torch.float64] if backend == "torch" else []) + [torch.float32]:
        got = run(backend, hidden, pos, ids, adapters, dtype, grad, flat=flat)
        check(got, want, dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", FUSED)
def test_half_precision_rows_and_recompute(backend):
    """fp16 hidden with fp32 parameters (computed in fp32), with and without recompute."""
    hidden, pos, ids, adapters, grad, flat = inputs(CASES[2], seed=3)
    want = reference(hidden, pos, ids, adapters, grad)
    for recompute in (False, True):
        got = run(backend, hidden, pos, ids, adapters, torch.float16, grad, flat=flat, recompute=recompute)
        check(got, want, torch.float16, f"{backend} fp16 recompute={recompute}", scale=2.0)
        got = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=flat, recompute=recompute)
        check(got, want, torch.float32, f"{backend} fp32 recompute={recompute}")


@pytest.mark.parametrize("backend", FUSED)
def test_half_precision_bank(backend):
    """A bank stored in fp16 (the C++ kernels widen only the slices a call touches): computed in fp32,
    gradients in fp16."""
    hidden, pos, ids, adapters, grad, flat = inputs(CASES[0], seed=4)
    want = reference(hidden, pos, ids, adapters, grad)
    got = run(backend, hidden, pos, ids, adapters, torch.float16, grad, flat=flat, param_dtype=torch.float16)
    assert all(g.dtype == torch.float16 for g in got[2:])
    check(got, want, torch.float16, f"{backend} fp16 bank", scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hidden(backend):
    """Strided views as models produce them: d not the innermost dimension (batched), a row stride of 2 rows
    (flat)."""
    for case, view in ((CASES[2], lambda base: base.transpose(1, 2)), (CASES[0], lambda base: base[::2])):
        hidden, pos, ids, adapters, grad, flat = inputs(case, seed=5)
        want = reference(hidden, pos, ids, adapters, grad)
        if flat:
            base = torch.randn(2 * hidden.shape[0], hidden.shape[1], dtype=torch.float64)
            base[::2] = hidden
        else:
            base = hidden.transpose(1, 2).contiguous()
        base = base.to(DEVICE, torch.float32).requires_grad_(True)
        x = view(base * 1)
        assert not x.is_contiguous()
        ps = leaves(adapters, torch.float32)
        fn = rk.mixed_reft_edit_flat if flat else rk.mixed_reft_edit
        out = fn(x, pos, ids, bank_of(ps), backend=backend)
        out.backward(grad.to(DEVICE, torch.float32))
        got = [out.detach(), view(base.grad)] + [p[k].grad for p in ps for k in PARAMS if p[k] is not None]
        check(got, want, torch.float32, f"{backend} strided {'flat' if flat else 'batched'}", scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_not_edited_are_bitwise_unchanged(backend):
    for case in (CASES[0], CASES[2]):
        hidden, pos, ids, adapters, grad, flat = inputs(case, seed=1)
        got = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=flat)
        h3 = hidden[None] if flat else hidden
        pv, iv = (pos[None], ids[None]) if flat else (pos, ids)
        edited = torch.zeros(h3.shape[:2], dtype=torch.bool)
        for b, t, _, _ in owners(pv, iv, h3.shape[1], len(adapters), [a["lift"].shape[0] for a in adapters]):
            edited[b, t] = True
        edited = edited[0] if flat else edited
        out, dh = got[0].cpu(), got[1].cpu()
        assert torch.equal(out[~edited], hidden.float()[~edited])
        assert torch.equal(dh[~edited], grad.float()[~edited])
        assert not torch.equal(out[edited], hidden.float()[edited])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flags(backend):
    """Only the bank needs a gradient (a frozen model's input), and only hidden (frozen adapters)."""
    hidden, pos, ids, adapters, grad, flat = inputs(CASES[1], seed=2)
    want = reference(hidden, pos, ids, adapters, grad)
    got = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=flat, grad_hidden=False)
    assert got[1] is None
    check(got[:1] + got[2:], want[:1] + want[2:], torch.float32, f"{backend} parameters only")
    ps = leaves(adapters, torch.float32)
    bank = bank_of([{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in p.items()} for p in ps])
    h = hidden.to(DEVICE, torch.float32).requires_grad_(True)
    out = rk.mixed_reft_edit(h * 1, pos, ids, bank, backend=backend)
    out.backward(grad.to(DEVICE, torch.float32))
    assert_close(h.grad, want[1], torch.float32, f"{backend} hidden only")


def test_a_single_adapter_is_the_single_adapter_op():
    """A = 1: the mixed op gives the single-adapter op's output (bitwise on cpp) and gradients, every backend."""
    gen = torch.Generator().manual_seed(4)
    d = 96
    hidden = torch.randn(3, 7, d, generator=gen)
    pos = torch.tensor([[1, 3, -1], [0, 0, 6], [2, 5, 4]])
    grad = torch.randn(3, 7, d, generator=gen)
    ad = make_adapter("loreft", 4, d, gen, act="gelu")
    for backend in BACKENDS:
        R, W, b = (ad[k].float().to(DEVICE).requires_grad_(True) for k in ("lift", "weight", "bias"))
        x = hidden.to(DEVICE).requires_grad_(True)
        single = rk.loreft(x * 1, pos, R, W, b, act="gelu", backend=backend)
        single.backward(grad.to(DEVICE))
        s_grads = [single.detach(), x.grad, R.grad, W.grad, b.grad]
        R2, W2, b2 = (ad[k].float().to(DEVICE).requires_grad_(True) for k in ("lift", "weight", "bias"))
        bank = rk.stack_adapters([rk.AdapterParams(R2, W2, b2, spec=fused_edit.EditSpec(True, True, "gelu"))])
        y = hidden.to(DEVICE).requires_grad_(True)
        mixed = rk.mixed_reft_edit(y * 1, pos, torch.zeros(3, dtype=torch.long), bank, backend=backend)
        mixed.backward(grad.to(DEVICE))
        m_grads = [mixed.detach(), y.grad, R2.grad, W2.grad, b2.grad]
        if backend == "cpp":
            assert torch.equal(m_grads[0], s_grads[0]), "cpp forward differs from the single-adapter op"
        for g, s in zip(m_grads, s_grads):
            assert_close(g, s, torch.float32, f"{backend} A = 1", scale=2.0)


GPU_LIKE = {
    # tile kernels (tl.dot over column blocks) with small blocks, several step-2 chunks (carries between them)
    "tiles": fused_edit.LaunchConfig(rows=False, fwd_block_n=16, fwd_block_d=32, bwd_block_n=16, bwd_block_d=32,
                                     bwd_programs=12),
    # row-resident kernels with two rows per step: several adapters per step, persistent programs
    "rows": fused_edit.LaunchConfig(rows=True, rows_block_n=2, rows_warps=4, rows_max_per_sm=1000, bwd_block_d=64,
                                    bwd_programs=10),
}


@pytest.mark.parametrize("config", sorted(GPU_LIKE))
def test_triton_launch_configs_and_chunk_carries(monkeypatch, config):
    """The Triton kernels with GPU-like blocks: masked column blocks, tiles holding several adapters, adapters
    whose sorted rows span several chunks of the backward's step 2 (their pieces added by the fix-up), an
    adapter no row uses (zero gradients), int32 indices, both layouts."""
    monkeypatch.setattr(me, "launch_config", lambda *a: GPU_LIKE[config])
    gen = torch.Generator().manual_seed(5)
    d, T = 72, 40
    adapters = zoo(d, gen)
    adapters.append(make_adapter("direft", 3, d, gen))  # never used
    # batched, per-slot ids: adapter 0 takes many rows (spans chunks), the others a few
    B, P = 4, 24
    pos = torch.stack([torch.randperm(T, generator=gen)[:P] for _ in range(B)])
    pos[0, :3] = -1
    ids = torch.randint(0, len(adapters) - 1, (B, P), generator=gen)
    ids[:, :14] = 0
    ids[1, 20] = -1
    hidden = torch.randn(B, T, d, dtype=torch.float64, generator=gen)
    grad = torch.randn(B, T, d, dtype=torch.float64, generator=gen)
    want = reference(hidden, pos, ids, adapters, grad)
    got = run("triton", hidden, pos.int(), ids.int(), adapters, torch.float32, grad, flat=False)
    check(got, want, torch.float32, f"{config} batched")
    # flat, with duplicates (resolved on the device) and without (rows_unique)
    rows = torch.randperm(T, generator=gen)[:30]
    fids = torch.randint(-1, len(adapters) - 1, (30,), generator=gen)
    h = hidden[0]
    gflat = grad[0]
    for r_, unique in ((rows, True), (torch.cat([rows[:20], rows[5:15]]), False)):
        want = reference(h, r_, fids, adapters, gflat)
        got = run("triton", h, r_, fids, adapters, torch.float32, gflat, flat=True, rows_unique=unique)
        check(got, want, torch.float32, f"{config} flat unique={unique}")


@pytest.mark.parametrize("backend", FUSED)
def test_backward_is_deterministic(backend):
    hidden, pos, ids, adapters, grad, flat = inputs(CASES[2], seed=6)
    a = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=flat)
    b = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=flat)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_cpp_backward_across_threads_and_chunks():
    """The C++ backward cuts the sorted rows into one chunk per thread: adapters cut by the boundary are summed
    from their pieces; the result matches the reference at 1 and 2 threads and repeats bitwise."""
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ kernels run CPU tensors")
    gen = torch.Generator().manual_seed(7)
    d, T = 512, 64
    adapters = [make_adapter("loreft", 4, d, gen), make_adapter("noreft", 3, d, gen, pb=True),
                make_adapter("direft", 2, d, gen)]
    rows = torch.randperm(T, generator=gen)
    ids = torch.tensor([0] * 30 + [1] * 20 + [2] * 14)[torch.randperm(T, generator=gen)]
    hidden = torch.randn(T, d, dtype=torch.float64, generator=gen)
    grad = torch.randn(T, d, dtype=torch.float64, generator=gen)
    want = reference(hidden, rows, ids, adapters, grad)
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a = run("cpp", hidden, rows, ids, adapters, torch.float32, grad, flat=True)
            b = run("cpp", hidden, rows, ids, adapters, torch.float32, grad, flat=True)
            check(a, want, torch.float32, f"{threads} threads")
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("backend", FUSED)
def test_dropout_masks(backend):
    """Each adapter's own dropout, training only, the single-adapter op's Philox masks: the mask read off the
    output equals what the reference applies, the gradients agree with that mask, and the same seed drops the
    same elements on both fused backends and in the single-adapter op (A = 1)."""
    gen = torch.Generator().manual_seed(8)
    d = 64
    adapters = [make_adapter("loreft", 4, d, gen, dropout=0.5), make_adapter("direft", 2, d, gen, dropout=0.0),
                make_adapter("consreft", 3, d, gen, dropout=0.2)]
    hidden = torch.randn(2, 6, d, dtype=torch.float64, generator=gen)
    grad = torch.randn(2, 6, d, dtype=torch.float64, generator=gen)
    pos = torch.tensor([[0, 2, 4, 5], [1, 3, 3, -1]])
    ids = torch.tensor([[0, 1, 2, 0], [2, 0, 1, 1]])
    torch.manual_seed(123)
    got = run(backend, hidden, pos, ids, adapters, torch.float32, grad, flat=False, training=True)
    out = got[0].cpu()
    nodrop = mixed_reference(hidden, pos, ids, adapters)
    keep = {}
    for b, t, n, a in owners(pos, ids, 6, 3, [4, 2, 3]):
        k = (out[b, t] != 0).double()
        keep[n] = k
        if adapters[a]["dropout"] == 0.0:
            assert k.all(), "an adapter without dropout dropped elements"
    dropped = sum(int((k == 0).sum()) for k in keep.values())
    assert dropped > 20, "nothing was dropped: the test checks nothing"
    want = reference(hidden, pos, ids, adapters, grad, keep=keep)
    check(got, want, torch.float32, f"{backend} dropout", scale=3.0)
    assert not torch.equal(out, nodrop.float())
    # the same seed: the other fused backend and the single-adapter op draw the same mask
    for other in FUSED:
        torch.manual_seed(123)
        again = run(other, hidden, pos, ids, adapters, torch.float32, grad, flat=False, training=True)
        assert torch.equal(again[0].cpu() == 0, out == 0), f"{backend} and {other} masks differ"
    ad = adapters[0]
    torch.manual_seed(5)
    R, W, b = (ad[k].float().to(DEVICE) for k in ("lift", "weight", "bias"))
    single = rk.loreft(hidden.float().to(DEVICE), pos, R, W, b, dropout=0.5, training=True, backend=backend)
    torch.manual_seed(5)
    bank = rk.stack_adapters([rk.AdapterParams(R, W, b, dropout=0.5)])
    mixed = rk.mixed_reft_edit(hidden.float().to(DEVICE), pos, torch.zeros(2, dtype=torch.long), bank, training=True,
                               backend=backend)
    assert torch.equal(single == 0, mixed == 0)
    # not training: no dropout
    plain = rk.mixed_reft_edit(hidden.float().to(DEVICE), pos, torch.zeros(2, dtype=torch.long), bank, backend=backend)
    assert_close(plain, rk.loreft(hidden.float().to(DEVICE), pos, R, W, b, backend="torch"), torch.float32, "eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_bank_set_and_clear_slots(backend):
    """AdapterBank.empty + set_slot / clear_slot in place: empty slots edit nothing, a slot takes an adapter of
    a lower rank than the bank's, and what ran before a slot changed gives the new result after."""
    gen = torch.Generator().manual_seed(9)
    d = 48
    bank = rk.AdapterBank.empty(5, 4, d, proj_bias=True, device=DEVICE)
    hidden = torch.randn(20, d, dtype=torch.float64, generator=gen)
    rows = torch.arange(0, 20, 2)
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    out = rk.mixed_reft_edit_flat(hidden.float().to(DEVICE), rows, ids, bank, backend=backend)
    assert torch.equal(out.cpu(), hidden.float()), "empty slots must edit nothing"
    a1, a3 = make_adapter("noreft", 2, d, gen, pb=True), make_adapter("orthodireft", 4, d, gen, act="tanh")
    for slot, ad in ((1, a1), (3, a3)):
        p = {k: (v.float().to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in ad.items()}
        bank.set_slot(slot, rk.AdapterParams(p["lift"], p["weight"], p["bias"], p["proj_bias"],
                                             fused_edit.EditSpec(FAMILY[ad["kind"]][1], FAMILY[ad["kind"]][2], ad["act"])))
    zero = dict(make_adapter("lobireft", 1, d, gen), lift=torch.zeros(0, d, dtype=torch.float64))  # an empty slot
    adapters = [zero, a1, zero, a3, zero]
    want = mixed_reference(hidden, rows, ids, adapters)
    out = rk.mixed_reft_edit_flat(hidden.float().to(DEVICE), rows, ids, bank, backend=backend, rows_unique=True)
    assert_close(out, want, torch.float32, f"{backend} serving bank")
    bank.clear_slot(1)
    want = mixed_reference(hidden, rows, ids, [zero, zero, zero, a3, zero])
    out = rk.mixed_reft_edit_flat(hidden.float().to(DEVICE), rows, ids, bank, backend=backend)
    assert_close(out, want, torch.float32, f"{backend} after clear_slot")
    assert bank.spec == fused_edit.EditSpec(True, False, "tanh") and bank.host_ranks == (0, 0, 0, 4, 0)


class _CountingTuple(tuple):
    """A metadata tuple that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_calls_do_not_walk_the_bank_metadata_each_time():
    """A call's bank checks and hints are derived once per version of the host metadata (no per-call loop over
    the adapters: a server's bank holds hundreds of slots), and a changed slot is seen at once."""
    gen = torch.Generator().manual_seed(11)
    d, A = 16, 300
    bank = rk.AdapterBank.empty(A, 2, d)
    ad = make_adapter("loreft", 2, d, gen)
    bank.set_slot(7, rk.AdapterParams(ad["lift"].float(), ad["weight"].float(), ad["bias"].float(), None,
                                      fused_edit.EditSpec(True, True, "identity")))
    hidden, rows, ids = torch.randn(8, d), torch.tensor([1, 3]), torch.tensor([7, -1])
    bank.host_ranks = _CountingTuple(bank.host_ranks)
    bank.host_dropout = _CountingTuple(bank.host_dropout)
    for _ in range(5):
        rk.mixed_reft_edit_flat(hidden.clone(), rows, ids, bank, backend="torch")
    assert _CountingTuple.walks <= 2, f"the bank's metadata was walked {_CountingTuple.walks} times in 5 calls"
    bank.host_ranks = tuple(bank.host_ranks[:3]) + (5,) + tuple(bank.host_ranks[4:])  # a rank above the bank's
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r\] with r = 2"):
        rk.mixed_reft_edit_flat(hidden.clone(), rows, ids, bank, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_indices_edit_nothing_when_unchecked(backend):
    """With the value checks off (as on a GPU), ids outside [0, A) and rows outside [0, n_tokens) are empty
    slots: nothing outside hidden or the bank is read or written."""
    gen = torch.Generator().manual_seed(10)
    d = 32
    adapters = [make_adapter("loreft", 2, d, gen), make_adapter("direft", 3, d, gen)]
    bank = bank_of(leaves(adapters, torch.float32))
    hidden = torch.randn(2, 6, d, generator=gen).to(DEVICE)
    pos = torch.tensor([[0, 1, 2], [3, 7, -5]])
    ids = torch.tensor([[0, 2, -3], [1, 0, 1]])
    out = rk.mixed_reft_edit(hidden.clone(), pos, ids, bank, backend=backend, check_positions=False)
    clean = rk.mixed_reft_edit(hidden.clone(), torch.tensor([[0, -1, -1], [3, -1, -1]]), ids.clamp(0, 1), bank,
                               backend=backend)
    assert torch.equal(out, clean)
    rows = torch.tensor([0, 5, 99, -7, 3])
    fids = torch.tensor([1, 7, 0, 0, -2])
    out = rk.mixed_reft_edit_flat(hidden[0].clone(), rows, fids, bank, backend=backend, check_rows=False)
    clean = rk.mixed_reft_edit_flat(hidden[0].clone(), torch.tensor([0]), torch.tensor([1]), bank, backend=backend)
    assert torch.equal(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_refused_with_a_clear_error(backend):
    gen = torch.Generator().manual_seed(11)
    d = 32
    adapters = [make_adapter("loreft", 2, d, gen), make_adapter("direft", 3, d, gen)]
    bank = bank_of(leaves(adapters, torch.float32))
    hidden = torch.randn(2, 6, d).to(DEVICE)
    pos = torch.tensor([[0, 1], [2, 3]])
    f = lambda *a, **k: rk.mixed_reft_edit(hidden.clone(), *a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, A\) with A=2"):
        f(pos, torch.tensor([0, 2]), bank, check_positions=True)
    with pytest.raises(ValueError, match=r"positions must lie in \[-1, T\) with T=6"):
        f(torch.tensor([[0, 6], [1, 2]]), torch.tensor([0, 1]), bank, check_positions=True)
    with pytest.raises(ValueError, match=r"adapter_ids must be \[B\] = \[2\]"):
        f(pos, torch.tensor([0, 1, 1]), bank)
    with pytest.raises(TypeError, match="adapter_ids must be int32 or int64"):
        f(pos, torch.tensor([0.0, 1.0]), bank)
    with pytest.raises(TypeError, match="bank must be an AdapterBank"):
        f(pos, torch.tensor([0, 1]), adapters)
    with pytest.raises(ValueError, match=r"rows must lie in \[-1, n_tokens\) with n_tokens=6"):
        rk.mixed_reft_edit_flat(hidden[0].clone(), torch.tensor([0, 6]), torch.tensor([0, 1]), bank, backend=backend)
    with pytest.raises(ValueError, match=r"rows must be \[N\]"):
        rk.mixed_reft_edit_flat(hidden[0].clone(), pos, torch.tensor([0, 1]), bank, backend=backend)
    with pytest.raises(ValueError, match=r"hidden must be \[n_tokens, d\]"):
        rk.mixed_reft_edit_flat(hidden.clone(), torch.tensor([0]), torch.tensor([0]), bank, backend=backend)
    wide = bank_of(leaves([make_adapter("loreft", 2, d + 1, gen)], torch.float32))
    with pytest.raises(ValueError, match=r"lift must be \[A, r, d\] with d = 32"):
        f(pos, torch.tensor([0, 0]), wide)
    bad = me.AdapterBank(**{**bank.__dict__, "bias": bank.bias[:, :1]})
    with pytest.raises(ValueError, match=r"bias must be \[2, 3\]"):
        f(pos, torch.tensor([0, 1]), bad)
    bad = me.AdapterBank(**{**bank.__dict__, "host_ranks": (2, 4)})
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r\] with r = 3"):
        f(pos, torch.tensor([0, 1]), bad)
    with pytest.raises(ValueError, match="largest adapter rank"):
        rk.stack_adapters([rk.AdapterParams(**{k: adapters[1][k] for k in PARAMS},
                                            spec=fused_edit.EditSpec(True, False, "identity"))], rank=2)
    with pytest.raises(ValueError, match="weight must be given exactly when spec.source_linear"):
        rk.stack_adapters([rk.AdapterParams(adapters[0]["lift"], None, adapters[0]["bias"])])
    if backend != "torch":
        with pytest.raises(TypeError, match="float64"):
            f(pos, torch.tensor([0, 1]), bank_of(leaves(adapters, torch.float64)))


def test_cpp_ops_check_their_own_inputs():
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ kernels run CPU tensors")
    gen = torch.Generator().manual_seed(12)
    d = 16
    bank = bank_of(leaves([make_adapter("loreft", 2, d, gen), make_adapter("direft", 3, d, gen)], torch.float32))
    t = [x.detach() if x is not None else None for x in bank.tensors()]
    h = torch.randn(2, 4, d)
    pos = torch.tensor([[0, 1], [2, 3]])
    op = torch.ops.reft_kernels_cpp.mixed_fwd

    def call(**kw):
        a = dict(hidden=h.clone(), positions=pos, adapter_ids=torch.tensor([0, 1]), lift=t[0], weight=t[1], bias=t[2],
                 proj_bias=t[3], kinds=bank.kinds, ranks=bank.ranks, dropout=bank.dropout, act=0, may_subtract=True,
                 apply_dropout=False, seed=0, save=0, rows_unique=False)
        a.update(kw)
        return op(*a.values())

    call()
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r\] with r = 3"):
        call(ranks=torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bias must be \[A, r\] = \[2, 3\]"):
        call(bias=t[2][:, :2].contiguous())
    with pytest.raises(TypeError, match=r"kinds must be Int, got Long"):
        call(kinds=bank.kinds.long())
    with pytest.raises(ValueError, match="may_subtract=False but kinds"):
        call(may_subtract=False)
    with pytest.raises(ValueError, match="act=2 disagrees with kinds"):
        call(act=2)
    # out-of-range ids and positions are empty slots in the registered op (the kernels' contract)
    call(adapter_ids=torch.tensor([5, -9]), positions=torch.tensor([[0, 9], [-4, 1]]))
    torch.ops.reft_kernels_cpp.mixed_edit(h.clone(), pos, torch.tensor([0, 1]), *t, bank.kinds, bank.ranks,
                                          bank.dropout, False, 0, False, True)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, A\) with A=2"):
        torch.ops.reft_kernels_cpp.mixed_edit(h.clone(), pos, torch.tensor([0, 2]), *t, bank.kinds, bank.ranks,
                                              bank.dropout, False, 0, False, True)


def test_triton_ops_check_their_own_inputs():
    gen = torch.Generator().manual_seed(13)
    d = 16
    bank = bank_of(leaves([make_adapter("loreft", 2, d, gen)], torch.float32))
    t = [x.detach() if x is not None else None for x in bank.tensors()]
    h = torch.randn(2, 4, d, device=DEVICE)
    args = [h, torch.tensor([[0, 1], [2, 3]], device=DEVICE), torch.tensor([0, 0], device=DEVICE), *t, bank.kinds,
            bank.ranks, bank.dropout, 0, True, False, 0, 0, False]
    with pytest.raises(ValueError, match=r"adapter_ids must be \[B\] = \[2\] \(one per batch row\) or \[B, P\]"):
        torch.ops.reft_kernels.mixed_fwd(*args[:2], torch.tensor([0, 0, 0], device=DEVICE), *args[3:])
    with pytest.raises(ValueError, match=r"the bank's weight must be \[1, 2, 16\]"):
        torch.ops.reft_kernels.mixed_fwd(*args[:4], t[1][:, :1], *args[5:])
    with pytest.raises(TypeError, match=r"ranks must be torch.int32, got torch.int64"):
        torch.ops.reft_kernels.mixed_fwd(*args[:8], bank.ranks.long(), *args[9:])


def _op_args(impl, save):
    gen = torch.Generator().manual_seed(14)
    d = 24
    adapters = [make_adapter("loreft", 2, d, gen, act="silu"), make_adapter("noreft", 3, d, gen, pb=True),
                make_adapter("lobireft", 1, d, gen)]
    bank = bank_of(leaves(adapters, torch.float32, DEVICE))
    t = [x.detach() if x is not None else None for x in bank.tensors()]
    hidden = torch.randn(2, 5, d, generator=gen).to(DEVICE)
    pos = torch.tensor([[0, 3, 3], [4, -1, 1]], device=DEVICE)
    ids = torch.tensor([[0, 1, 2], [1, 0, 2]], device=DEVICE)
    return hidden, pos, ids, t, bank


@pytest.mark.parametrize("impl", ["reft_kernels"] + (["reft_kernels_cpp"] if DEVICE == "cpu" else []),
                         ids=lambda ns: {"reft_kernels": "triton", "reft_kernels_cpp": "cpp"}[ns])
@pytest.mark.parametrize("save", [0, 2])
def test_opcheck(impl, save):
    hidden, pos, ids, t, bank = _op_args(impl, save)
    ns = getattr(torch.ops, impl)
    fwd_args = (hidden, pos, ids, *t, bank.kinds, bank.ranks, bank.dropout, -1, True, False, 0, save, False)
    torch.library.opcheck(ns.mixed_fwd.default, fwd_args)
    flat_args = (hidden[0], pos[0], ids[0], *fwd_args[3:-1], True)
    torch.library.opcheck(ns.mixed_fwd.default, flat_args)
    if save:
        out = hidden.clone()
        rows, stats = ns.mixed_fwd(out, *fwd_args[1:])
        for need_dx, recompute in ((True, False), (False, True)):
            args = (torch.randn_like(hidden), pos, ids, None if recompute else rows, out if recompute else None, stats,
                    t[0], t[1], True, bank.kinds, bank.ranks, bank.dropout, -1, True, False, 0, need_dx)
            torch.library.opcheck(ns.mixed_bwd.default, args)


class _Block(torch.nn.Module):
    """A residual block whose output gets a mixed edit, with a bank built from trainable adapters per call."""

    def __init__(self, d, backend):
        super().__init__()
        gen = torch.Generator().manual_seed(15)
        self.lin = torch.nn.Linear(d, d).to(DEVICE)
        self.adapters = [make_adapter("loreft", 4, d, gen, act="relu"), make_adapter("consreft", 2, d, gen),
                         make_adapter("direft", 3, d, gen)]
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(a[k].float().to(DEVICE)) for a in self.adapters for k in PARAMS if a[k] is not None])
        self.backend = backend

    def bank(self):
        it = iter(self.params)
        ps = []
        for a in self.adapters:
            vals = {k: (next(it) if a[k] is not None else None) for k in PARAMS}
            ps.append(rk.AdapterParams(**vals, spec=fused_edit.EditSpec(FAMILY[a["kind"]][1], FAMILY[a["kind"]][2],
                                                                       a["act"])))
        return rk.stack_adapters(ps)

    def forward(self, x, positions, ids):
        h = x + torch.tanh(self.lin(x))
        h = rk.mixed_reft_edit(h, positions, ids, self.bank(), backend=self.backend)
        return (h * h).sum(-1)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    d = 32
    model = _Block(d, backend)
    x = torch.randn(2, 6, d, device=DEVICE, requires_grad=True)
    positions = torch.tensor([[0, 5, 5], [2, -1, 3]], device=DEVICE)
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]], device=DEVICE)

    def step(m):
        x.grad = None
        m.zero_grad()
        out = m(x, positions, ids)
        out.sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    got = step(torch.compile(model, backend=compiler, fullgraph=True))
    for g, e in zip(got, eager):
        assert_close(g, e, torch.float32, f"{compiler} vs eager", scale=10)


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_serving_call_is_one_op_and_follows_the_bank(backend):
    """What a server compiles: the flat layout, rows_unique, no gradient: one registered op in the graph, and
    set_slot after compiling changes the result (the bank's types are read at run time)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(16)
    d = 32
    bank = rk.AdapterBank.empty(3, 4, d, device=DEVICE)
    ad = make_adapter("loreft", 4, d, gen, act="gelu")
    bank.set_slot(0, rk.AdapterParams(*(ad[k].float().to(DEVICE) for k in ("lift", "weight", "bias")),
                                      spec=fused_edit.EditSpec(True, True, "gelu")))
    ops = []

    def counting_backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "mixed" in str(n.target))
        return gm

    f = torch.compile(lambda h, r, i: rk.mixed_reft_edit_flat(h, r, i, bank, rows_unique=True, backend=backend),
                      backend=counting_backend, fullgraph=True)
    hidden = torch.randn(10, d, generator=gen).to(DEVICE)
    rows = torch.tensor([1, 4, 7], device=DEVICE)
    ids = torch.tensor([0, 1, 0], device=DEVICE)
    with torch.no_grad():
        out = f(hidden.clone(), rows, ids)
    assert len(ops) == 1 and "mixed_fwd" in ops[0], ops
    assert_close(out, rk.mixed_reft_edit_flat(hidden.clone(), rows, ids, bank, backend="torch"), torch.float32, "compiled")
    ad2 = make_adapter("consreft", 2, d, gen)
    bank.set_slot(1, rk.AdapterParams(ad2["lift"].float().to(DEVICE), None, ad2["bias"].float().to(DEVICE),
                                      spec=fused_edit.EditSpec(False, True, "identity")))
    with torch.no_grad():
        out = f(hidden.clone(), rows, ids)
    assert_close(out, rk.mixed_reft_edit_flat(hidden.clone(), rows, ids, bank, backend="torch"), torch.float32,
                 "after set_slot")


def test_torch_backend_gradcheck_float64():
    gen = torch.Generator().manual_seed(17)
    d = 10
    adapters = [make_adapter("noreft", 2, d, gen, act="gelu", pb=True), make_adapter("consreft", 3, d, gen)]
    ps = leaves(adapters, torch.float64, "cpu")
    flat_params = [p[k] for p in ps for k in PARAMS if p[k] is not None]
    pos = torch.tensor([[0, 3, 3], [4, -1, 1]])
    ids = torch.tensor([[0, 1, 0], [1, 1, 0]])

    def f(h, *params):
        it = iter(params)
        bank = rk.stack_adapters([rk.AdapterParams(
            **{k: (next(it) if p[k] is not None else None) for k in PARAMS},
            spec=fused_edit.EditSpec(FAMILY[p["kind"]][1], FAMILY[p["kind"]][2], p["act"])) for p in ps])
        return rk.mixed_reft_edit(h * 1, pos, ids, bank, backend="torch")

    h = torch.randn(2, 5, d, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(f, (h, *flat_params))


def test_activation_without_a_fused_kernel_runs_the_torch_backend():
    """A bank holding an ACT2FN name the kernels lack: backend=None warns once and runs the torch reference
    (exact against the per-row reference), an explicit fused backend raises."""
    gen = torch.Generator().manual_seed(18)
    d = 24
    adapters = [make_adapter("loreft", 3, d, gen, act="mish"), make_adapter("direft", 2, d, gen, act="gelu")]
    hidden = torch.randn(2, 5, d, dtype=torch.float64, generator=gen)
    pos = torch.tensor([[0, 3], [1, 4]])
    ids = torch.tensor([[0, 1], [1, 0]])
    bank = bank_of(leaves(adapters, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="act='mish' has no fused kernel"):
        rk.mixed_reft_edit(hidden.float(), pos, ids, bank, backend=FUSED[0])
    with pytest.warns(UserWarning, match="no fused kernel"):
        out = rk.mixed_reft_edit(hidden.float(), pos, ids, bank)
    assert_close(out, mixed_reference(hidden, pos, ids, adapters), torch.float32, "mish via torch")
