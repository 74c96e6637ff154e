"""Quick CPU micro benchmarks (pytest-benchmark), each also a correctness test of what it times.

    PYTHONPATH=. python -m pytest tests/test_bench_micro.py --benchmark-enable     # prints the timing table

The project's addopts disable benchmarking (--benchmark-disable): then every case runs its timed call once
and checks the result, like any other test. Cases, all on the CPU in fp32 whatever the machine has (the
Triton kernels under the CPU interpreter are a correctness tool, not a timing one: the GPU figures are
`python -m bench`'s):
- the fused LoReFT edit, torch backend, d = 512, r = 4, N = 64 and 4096 edited rows, forward and
  forward+backward, against a float64 reference of the formula (output and every gradient);
- orthonormalize of a stack of 8 [4, 512] matrices (torch backend), forward+backward, against a float64
  Gram-Schmidt from torch.linalg.qr (value and gradient);
- prefix_suffix_locations("f5+l5") on a left-padded [16, 128] mask, against pyreft's rule written out;
- one ReftModel forward of a tiny Llama (tests/hf_models.py) with LoReFT at two layers, against
  float64 hand-written hooks on a copy of the model.
Each timed call gets fresh inputs from a setup function outside the timing (the edit is in place).
"""
from __future__ import annotations

import copy

import pytest
import torch

import reft_kernels as rk
from hf_models import VOCAB, tiny_model
from helpers import assert_close, rel_err

CPU = torch.device("cpu")
D, RANK = 512, 4
P = 16  # edited positions per row: N = B * P, every row of hidden edited


def _loreft_case(N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = N // P
    hidden = torch.randn(B, P, D, generator=gen)
    positions = torch.arange(P).repeat(B, 1)
    q, _ = torch.linalg.qr(torch.randn(D, RANK, dtype=torch.float64, generator=gen))
    R = q.t().contiguous().float()
    W = torch.randn(RANK, D, generator=gen) * D**-0.5
    b = torch.randn(RANK, generator=gen)
    grad = torch.randn(B, P, D, generator=gen)
    return hidden, positions, (R, W, b), grad


def _loreft_reference(hidden, params, grad):
    """Every row edited: h + (W h + b - R h) R^T in float64, with the gradients of <out, grad>."""
    h = hidden.double().requires_grad_(True)
    R, W, b = (p.double().requires_grad_(True) for p in params)
    out = h + (h @ W.T + b - h @ R.T) @ R
    (out * grad.double()).sum().backward()
    return out.detach(), h.grad, R.grad, W.grad, b.grad


@pytest.mark.benchmark(group="fused edit (torch backend), d=512 r=4 fp32")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("N", [64, 4096])
def test_loreft_torch(benchmark, N, mode):
    hidden, positions, params, grad = _loreft_case(N)
    want = _loreft_reference(hidden, params, grad)

    if mode == "fwd":
        def setup():
            return (hidden.clone(),), {}

        def call(h):
            with torch.no_grad():
                return (rk.loreft(h, positions, *params, backend="torch"),)
    else:
        def setup():
            leaf = hidden.clone().requires_grad_(True)
            ps = [p.clone().requires_grad_(True) for p in params]
            # the edit is in place, which autograd forbids on a leaf: a non-leaf copy, made outside the
            # timing (its backward hands the gradient through as is)
            return (leaf, leaf.clone(), ps), {}

        def call(leaf, x, ps):
            out = rk.loreft(x, positions, *ps, backend="torch")
            out.backward(grad)
            return (out.detach(), leaf.grad, *[p.grad for p in ps])

    got = benchmark.pedantic(call, setup=setup, rounds=50 if N <= 64 else 10, warmup_rounds=2)
    for g, w, name in zip(got, want, ["output", "grad hidden", "grad R", "grad W", "grad b"]):
        assert_close(g, w, torch.float32, f"{mode} N={N} {name}", scale=2.0)


def _gram_schmidt_reference(A):
    """Rows of A [L, r, d] orthonormalized in order (Gram-Schmidt), float64, differentiable: from the QR of
    A^T with the signs that make R's diagonal positive."""
    q, r = torch.linalg.qr(A.mT)
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]).mT


@pytest.mark.benchmark(group="orthonormalize")
def test_orthonormalize_stack(benchmark):
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(8, RANK, D, generator=gen)
    grad = torch.randn(8, RANK, D, generator=gen)
    A64 = A.double().requires_grad_(True)
    want = _gram_schmidt_reference(A64)
    (want * grad.double()).sum().backward()

    def setup():
        return (A.clone().requires_grad_(True),), {}

    def call(a):
        Q = rk.orthonormalize(a, backend="torch")
        Q.backward(grad)
        return Q.detach(), a.grad

    Q, dA = benchmark.pedantic(call, setup=setup, rounds=50, warmup_rounds=2)
    assert max(rk.orthonormality_error(q) for q in Q) < 1e-6
    assert rel_err(Q, want) < 1e-6
    assert rel_err(dA, A64.grad) < 1e-5


def _pyreft_locations(mask, first, last):
    """pyreft's rule row by row: a prompt of n tokens edits its first min(first, n // 2) and last
    min(last, n // 2) tokens; the other slots are -1."""
    rows = []
    for m in mask.tolist():
        start, n = m.index(1), sum(m)
        k1, k2 = min(first, n // 2), min(last, n // 2)
        pre = [start + i for i in range(k1)] + [-1] * (first - k1)
        suf = [start + n - k2 + j for j in range(k2)] + [-1] * (last - k2)
        rows.append(pre + suf)
    return torch.tensor(rows)


@pytest.mark.benchmark(group="positions")
def test_prefix_suffix_locations(benchmark):
    B, T = 16, 128
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0], lengths[1] = T, 3  # a full row, and one shorter than f5 + l5
    mask = (torch.arange(T) >= T - lengths[:, None]).long()  # left padding
    got = benchmark(rk.prefix_suffix_locations, mask, "f5+l5", num_interventions=4)
    assert got.shape == (B, 4, 10) and got.dtype == torch.int64
    want = _pyreft_locations(mask, 5, 5)
    assert torch.equal(got, want[:, None, :].expand(B, 4, 10))


LAYERS = (0, 2)


def _reference_logits(plain, reft, ids, mask, locs):
    """A hook-free copy of the base model in float64 with hand-written LoReFT hooks (reft's parameters) on
    the block outputs."""
    model = plain.double()
    handles = []
    for index, iv in enumerate(reft.interventions.values()):
        R, W, b = iv.lift().detach().double(), iv.weight.detach().double(), iv.bias.detach().double()

        def hook(_module, _args, output, R=R, W=W, b=b, index=index):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            for row in range(h.shape[0]):
                for p in set(locs[row, index].tolist()) - {-1}:
                    x = h[row, p]
                    h[row, p] = x + R.T @ (W @ x + b - R @ x)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(model.model.layers[LAYERS[index]].register_forward_hook(hook))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.benchmark(group="ReftModel forward (tiny Llama)")
def test_reft_model_forward(benchmark):
    base = tiny_model("llama")
    plain = copy.deepcopy(base)  # before get_reft_model hooks the base
    reft = rk.get_reft_model(base, rk.ReftConfig(
        [{"layer": layer, "intervention": "loreft", "low_rank_dimension": RANK, "dtype": torch.float32}
         for layer in LAYERS], positions="f2+l2"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter, not the near-identity init
        for p in reft.interventions.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    ids = torch.randint(3, VOCAB, (4, 32), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ids[1, :5] = 0
    locs = reft.locations(mask)
    want = _reference_logits(plain, reft, ids, mask, locs)

    def call():
        with torch.no_grad():
            return reft(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits

    got = benchmark(call)
    assert rel_err(got, want) < 1e-5
