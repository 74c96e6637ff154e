"""The CUDA host path (csrc/edit_cuda.cu): reft_kernels_cpp::edit's CUDA kernel, launched from C++, for
eager forward calls without gradients. Needs a GPU (and nvcc for the first-use build): every test here is
marked gpu. On CPU machines tests/test_compile_sm90.py compiles the kernel for sm_90 instead."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from reft_kernels import extension
from reft_kernels.ops import fused_edit as fe
from helpers import FAMILY
from test_cpp_kernels import CASES, _check, _inputs, _reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _built():
    ok, how = extension.load_cuda()
    assert ok, how  # a GPU machine must build it: never a silent skip of everything below


def _edit(kind, hidden, positions, params, backend="cpp", **kw):
    _, source_linear, subtract = FAMILY[kind]
    lift, weight, bias, pb = (None if p is None else p.to("cuda", torch.float32) for p in params)
    with torch.no_grad():
        return rk.reft_edit(hidden.cuda(), positions.cuda(), lift, weight, bias, pb, source_linear=source_linear,
                            subtract_proj=subtract, backend=backend, **kw)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_every_type_forward_against_float64(kind, dtype, case):
    hidden, positions, params, grad = _inputs(case, dtype, kind)
    out = _edit(kind, hidden, positions, params)
    want = _reference(kind, hidden, positions, params, grad)[0]
    _check([out.cpu()], [want], dtype, f"{kind} {dtype}")


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "silu", "quick_gelu"])
def test_projection_bias_activation_and_int32_positions(act):
    hidden, positions, params, grad = _inputs(CASES[1], torch.float32, "noreft", has_pb=True)
    out = _edit("noreft", hidden, positions.int(), params, act=act)
    want = _reference("noreft", hidden, positions, params, grad, act=act)[0]
    _check([out.cpu()], [want], torch.float32, act)


def test_same_output_as_the_triton_kernels_and_out_of_range_positions_are_empty():
    hidden, _, params, _ = _inputs(CASES[1], torch.bfloat16, "loreft")
    positions = torch.tensor([[1, 99, -1], [0, 0, 6], [-5, 5, 4]])  # out of range and duplicates
    host = _edit("loreft", hidden.clone(), positions, params, check_positions=False)
    triton = _edit("loreft", hidden.clone(), positions, params, backend="triton")
    torch.testing.assert_close(host, triton, atol=2e-2, rtol=2e-2)
    untouched = torch.ones(hidden.shape[:2], dtype=torch.bool)
    untouched[0, 1] = untouched[1, 0] = untouched[1, 6] = untouched[2, 5] = untouched[2, 4] = False
    assert torch.equal(host.cpu()[untouched], hidden[untouched])


def test_gradients_and_dropout_are_refused_under_cpp_and_routed_to_triton_by_default(monkeypatch):
    hidden, positions, params, _ = _inputs(CASES[1], torch.float32, "loreft")
    R, W, b = (p.to("cuda", torch.float32).requires_grad_(True) for p in params[:3])
    h = hidden.cuda().requires_grad_(True) * 1
    with pytest.raises(ValueError, match="without gradients or dropout"):
        rk.loreft(h, positions.cuda(), R, W, b, backend="cpp")
    with torch.no_grad(), pytest.raises(ValueError, match="without gradients or dropout"):
        rk.loreft(hidden.cuda(), positions.cuda(), R, W, b, backend="cpp", dropout=0.1, training=True)
    # REFT_KERNELS_CUDA_HOST=1: automatic choices send eager no-grad calls here, training calls to Triton
    monkeypatch.setenv(extension.CUDA_SWITCH, "1")
    calls = []
    real = fe._fwd
    monkeypatch.setattr(fe, "_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        rk.loreft(hidden.cuda(), positions.cuda(), R, W, b)
    assert calls == []  # the host path ran, not the Triton launcher
    rk.loreft(h, positions.cuda(), R, W, b).sum().backward()
    assert calls and R.grad is not None


def test_compiled_calls_take_the_triton_ops():
    hidden, positions, params, _ = _inputs(CASES[1], torch.float32, "loreft")
    R, W, b = (p.to("cuda", torch.float32) for p in params[:3])
    f = torch.compile(lambda h: rk.loreft(h, positions.cuda(), R, W, b, backend="cpp"), fullgraph=True)
    with torch.no_grad():
        got = f(hidden.cuda().clone())
        want = rk.loreft(hidden.cuda().clone(), positions.cuda(), R, W, b, backend="cpp")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
