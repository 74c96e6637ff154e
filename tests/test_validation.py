"""Bad input: a TypeError or ValueError naming the argument and what was expected, never a kernel run."""
from __future__ import annotations

import pytest
import torch

import reft_kernels as rk
from conftest import DEVICE
from helpers import make_params

B, T, D, R = 2, 6, 64, 4


def _good(kind="loreft"):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen).to(DEVICE)
    positions = torch.tensor([[0, 5], [1, -1]])
    return hidden, positions, list(make_params(kind, R, D, gen))


def _call(hidden, positions, params, kind="loreft", backend="triton", **kw):
    op = rk.loreft if kind == "loreft" else rk.direft
    return op(hidden, positions, *params, backend=backend, **kw)


CASES = [
    # (description, mutate(hidden, positions, params) -> (hidden, positions, params), error, message)
    ("hidden 2-D", lambda h, p, ps: (h[0], p, ps), ValueError, r"hidden must be \[B, T, d\]"),
    ("hidden int", lambda h, p, ps: (h.long(), p, ps), TypeError, "hidden must have a dtype"),
    ("hidden list", lambda h, p, ps: (h.tolist(), p, ps), TypeError, "hidden must be a torch.Tensor"),
    ("hidden expanded", lambda h, p, ps: (h[:, :1].expand(B, T, D), p, ps), ValueError, "overlapping memory"),
    ("positions float", lambda h, p, ps: (h, p.float(), ps), TypeError, "positions must be int32 or int64"),
    ("positions 1-D", lambda h, p, ps: (h, p[0], ps), ValueError, r"positions must be \[B, P\] with B=2"),
    ("positions batch", lambda h, p, ps: (h, p[:1], ps), ValueError, r"positions must be \[B, P\] with B=2"),
    ("position >= T", lambda h, p, ps: (h, torch.tensor([[0, T], [1, 2]]), ps), ValueError, r"positions must lie in \[-1, T\) with T=6"),
    ("position < -1", lambda h, p, ps: (h, torch.tensor([[0, -2], [1, 2]]), ps), ValueError, r"got values in \[-2, 2\]"),
    ("R wrong d", lambda h, p, ps: (h, p, [ps[0][:, :-1], *ps[1:]]), ValueError, r"R must be \[4, 64\]"),
    ("R 1-D", lambda h, p, ps: (h, p, [ps[0][0], *ps[1:]]), ValueError, r"R must be \[4, 64\]"),
    ("W wrong d", lambda h, p, ps: (h, p, [ps[0], ps[1][:, :3], ps[2]]), ValueError, r"W must be \[r, 64\]"),
    ("R rank mismatch", lambda h, p, ps: (h, p, [ps[0][:3], *ps[1:]]), ValueError, r"R must be \[4, 64\]"),
    ("b wrong size", lambda h, p, ps: (h, p, [ps[0], ps[1], ps[2][:2]]), ValueError, r"b must be \[4\]"),
    ("b int", lambda h, p, ps: (h, p, [ps[0], ps[1], ps[2].long()]), TypeError, "b must have a dtype"),
    ("R float64 on triton", lambda h, p, ps: (h, p, [ps[0].double(), *ps[1:]]), TypeError, "R is float64"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(case):
    _, mutate, error, message = case
    hidden, positions, params = _good()
    h, p, ps = mutate(hidden, positions, params)
    with pytest.raises(error, match=message):
        _call(h, p, ps)


def test_r_larger_than_d():
    hidden, positions, _ = _good()
    small = torch.randn(B, T, 3, device=DEVICE)
    R = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"W must have 1 <= r <= d=3 rows, got r=4"):
        rk.loreft(small, positions, R, R.clone(), torch.zeros(4, device=DEVICE), backend="torch")


def test_direft_names_its_arguments():
    hidden, positions, (W1, b, W2) = _good("direft")
    with pytest.raises(ValueError, match=r"W2 must be \[4, 64\]"):
        rk.direft(hidden, positions, W1, b, W2[:, :3], backend="triton")
    with pytest.raises(ValueError, match=r"W1 must be \[r, 64\]"):
        rk.direft(hidden, positions, W1[:, :3], b, W2, backend="triton")


def test_dropout_range_and_type():
    hidden, positions, params = _good()
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got 1.0"):
        _call(hidden, positions, params, dropout=1.0)
    with pytest.raises(TypeError, match="dropout must be a float"):
        _call(hidden, positions, params, dropout="0.1")


def test_leaf_that_requires_grad_is_refused():
    hidden, positions, params = _good()
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        _call(hidden.requires_grad_(True), positions, params)


def test_bad_backend_and_act():
    hidden, positions, params = _good()
    with pytest.raises(ValueError, match="backend must be None, 'triton', 'cpp' or 'torch'"):
        _call(hidden, positions, params, backend="cuda")
    with pytest.raises(TypeError, match="act must be None or a transformers ACT2FN name"):
        _call(hidden, positions, params, act=torch.relu)
    with pytest.raises(ValueError, match="not a transformers ACT2FN name"):
        _call(hidden, positions, params, act="no_such_act", backend="torch")


def test_device_positions_skip_value_check_but_never_write_out_of_bounds():
    """Positions already on hidden's device are not value-checked by default (that would sync); the
    kernels then treat out-of-range positions as empty slots."""
    hidden, _, params = _good()
    bad = torch.tensor([[0, T + 3], [-7, 2]], device=DEVICE)
    good = torch.tensor([[0, -1], [-1, 2]], device=DEVICE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="positions must lie in"):
            _call(hidden.clone(), bad, params)  # CPU positions are always checked
        out = _call(hidden.clone(), bad, params, check_positions=False)
    else:
        out = _call(hidden.clone(), bad, params)
        with pytest.raises(ValueError, match="positions must lie in"):
            _call(hidden.clone(), bad, params, check_positions=True)
    assert torch.equal(out, _call(hidden.clone(), good, params))


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    from reft_kernels import backend

    monkeypatch.setattr(backend, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.resolve("triton", torch.zeros(1, 1, 1))
