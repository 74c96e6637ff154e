"""The C++ CPU kernels (csrc/edit_cpu.cpp, backend="cpp"): every intervention type, forward and every
gradient against the float64 reference, fp32/fp16/bf16 storage, dropout masks equal to the Triton kernels',
the dispatcher registrations (opcheck, torch.compile), the autograd op, and the fallback when the extension
cannot be built. CPU tensors whatever the machine has."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import reft_kernels as rk
from reft_kernels import extension
from reft_kernels.ops import activations
from helpers import FAMILY, TOLERANCE, assert_close, make_params, orthonormal_rows, reference_family


REPO = Path(__file__).resolve().parents[1]
# (name, B, T, d, r, positions): d not a power of two, r = 1, one position, padding, duplicates, batch 1
CASES = [
    ("batch1_one_position_r1_d33", 1, 5, 33, 1, [[3]]),
    ("padding_duplicates_d100_r4", 3, 7, 100, 4, [[1, 3, -1], [0, 0, 6], [2, 5, 4]]),
    ("r7_d4099_every_row", 2, 3, 4099, 7, [[0, 1, 2], [2, 1, 0]]),
    ("r64_d256_random", 2, 40, 256, 64, "random20"),
]
# bf16 storage keeps 8 mantissa bits: its rounding of h + L^T delta, not the fp32 math, sets the bound
CPP_TOLERANCE = {**TOLERANCE, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def test_extension_builds_and_registers_its_ops():
    """CI has a compiler: the extension must build (never a silent skip of everything below)."""
    assert extension.available(), extension.load()[1]
    for name in ("edit_fwd", "edit_bwd", "edit"):
        assert hasattr(torch.ops.reft_kernels_cpp, name)


def _params(kind, r, d, gen, has_pb):
    lift_orth, source_linear, _ = FAMILY[kind]
    lift = orthonormal_rows(r, d, gen) if lift_orth else torch.randn(r, d, dtype=torch.float64, generator=gen) * d**-0.5
    weight = torch.randn(r, d, dtype=torch.float64, generator=gen) * d**-0.5 if source_linear else None
    bias = torch.randn(r, dtype=torch.float64, generator=gen)
    pb = torch.randn(r, dtype=torch.float64, generator=gen) if has_pb else None
    return lift, weight, bias, pb


def _inputs(case, dtype, kind, seed=0, has_pb=False):
    _, B, T, d, r, pos = case
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, dtype=torch.float64, generator=gen).to(dtype)
    positions = torch.randint(-1, T, (B, 20), generator=gen) if pos == "random20" else torch.tensor(pos)
    params = _params(kind, r, d, gen, has_pb)
    grad = torch.randn(B, T, d, dtype=torch.float64, generator=gen).to(dtype)
    return hidden, positions, params, grad


def _run(kind, backend, hidden, positions, params, grad, act=None, param_dtype=torch.float32, **kw):
    """Output and gradients (hidden, then each parameter present) of reft_edit on leaf copies."""
    _, source_linear, subtract = FAMILY[kind]
    lift, weight, bias, pb = (None if p is None else p.detach().to(param_dtype).requires_grad_(True) for p in params)
    h = hidden.clone().requires_grad_(True)
    x = h * 1
    out = rk.reft_edit(x, positions, lift, weight, bias, pb, source_linear=source_linear, subtract_proj=subtract,
                       act=act, backend=backend, **kw)
    assert out is x
    (out.double() * grad.double()).sum().backward()
    return [out.detach(), h.grad] + [p.grad for p in (lift, weight, bias, pb) if p is not None]


def _reference(kind, hidden, positions, params, grad, act=None):
    h = hidden.double().requires_grad_(True)
    ps = [None if p is None else p.double().requires_grad_(True) for p in params]
    out = reference_family(kind, h, positions, ps[0], ps[1], ps[2], ps[3], act=act)
    (out * grad.double()).sum().backward()
    return [out.detach(), h.grad] + [p.grad for p in ps if p is not None]


def _check(got, want, dtype, what, scale=1.0):
    for i, (g, w) in enumerate(zip(got, want)):
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item()
        bound = CPP_TOLERANCE[dtype] * scale
        assert err <= bound, f"{what} [{i}] relative error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_every_type_forward_and_gradients(kind, dtype, case):
    hidden, positions, params, grad = _inputs(case, dtype, kind)
    got = _run(kind, "cpp", hidden, positions, params, grad)
    want = _reference(kind, hidden, positions, params, grad)
    assert len(got) == len(want)
    _check(got, want, dtype, f"{kind} {dtype}")


def test_projection_bias_and_int32_positions():
    """NoReFT with add_bias (the projection bias b2) and int32 positions, with recompute on and off."""
    for recompute in (False, True):
        hidden, positions, params, grad = _inputs(CASES[1], torch.float32, "noreft", has_pb=True)
        got = _run("noreft", "cpp", hidden, positions.int(), params, grad, recompute=recompute)
        want = _reference("noreft", hidden, positions, params, grad)
        assert len(got) == 6
        _check(got, want, torch.float32, f"noreft b2 recompute={recompute}")


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows_and_parameter_only_backward(dtype, recompute):
    """fp32 rows with unit stride are edited and read where they lie, other layouts go through fp32 buffers:
    hidden and grad_out with a column stride of T (the buffered path for fp32 too) match the reference, and
    so does a backward that wants the parameter gradients alone (hidden not requiring grad)."""
    hidden, positions, params, grad = _inputs(CASES[2], dtype, "loreft", seed=5)
    want = _reference("loreft", hidden, positions, params, grad)
    strided = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  strides (T d, 1, T)

    lift, weight, bias = (p.detach().float().requires_grad_(True) for p in params[:3])
    h = strided(hidden).requires_grad_(True)
    x = h * 1
    assert x.stride(2) != 1
    out = rk.reft_edit(x, positions, lift, weight, bias, backend="cpp", recompute=recompute)
    out.backward(strided(grad))
    _check([out.detach(), h.grad, lift.grad, weight.grad, bias.grad], want, dtype, f"strided {dtype}")

    lift, weight, bias = (p.detach().float().requires_grad_(True) for p in params[:3])
    out = rk.reft_edit(hidden.clone(), positions, lift, weight, bias, backend="cpp", recompute=recompute)
    out.backward(grad)
    _check([out, lift.grad, weight.grad, bias.grad], [want[0]] + want[2:], dtype, f"parameters only {dtype}")


@pytest.mark.parametrize("act", sorted(activations.SUPPORTED))
def test_every_activation_name(act):
    """The C++ table of activation names matches activations.SUPPORTED (a name it lacks would raise)."""
    hidden, positions, params, grad = _inputs(CASES[1], torch.float32, "loreft", seed=2)
    got = _run("loreft", "cpp", hidden, positions, params, grad, act=act)
    want = _reference("loreft", hidden, positions, params, grad, act=act)
    _check(got, want, torch.float32, act, scale=5.0)


def test_fp32_parameters_with_bf16_hidden_give_gradients_in_each_dtype():
    hidden, positions, params, grad = _inputs(CASES[2], torch.bfloat16, "loreft")
    got = _run("loreft", "cpp", hidden, positions, params, grad, param_dtype=torch.bfloat16)
    assert [g.dtype for g in got[1:]] == [torch.bfloat16] * 4
    _check(got, _reference("loreft", hidden, positions, params, grad), torch.bfloat16, "bf16 params", scale=4.0)


@pytest.mark.skipif(not rk.backend.INTERPRET, reason="the Triton kernels run on the CPU only under TRITON_INTERPRET")
def test_dropout_mask_is_the_triton_kernels_mask():
    """Triton's Philox reimplemented in C++: the same seed drops the same elements, forward and backward."""
    hidden, positions, params, grad = _inputs(CASES[1], torch.float32, "loreft", seed=4)
    outs = {}
    for backend in ("cpp", "triton"):
        torch.manual_seed(123)  # the op draws its dropout seed from torch's CPU generator
        outs[backend] = _run("loreft", backend, hidden, positions, params, grad, dropout=0.5, training=True)
    (y_c, dh_c, *_), (y_t, dh_t, *_) = outs["cpp"], outs["triton"]
    edited = (y_c != hidden) | (y_t != hidden)
    assert torch.equal((y_c == 0) & edited, (y_t == 0) & edited), "dropout masks differ"
    assert ((y_c == 0) & edited).any(), "nothing was dropped: the test checks nothing"
    for a, b in zip(outs["cpp"], outs["triton"]):
        assert_close(a, b, torch.float32, "cpp vs triton with dropout", scale=5.0)


def test_backward_depends_on_thread_count_only():
    """Partial sums per fixed row chunk, added in order: bitwise repeatable at a given thread count, and
    within rounding across thread counts."""
    hidden, positions, params, grad = _inputs(CASES[3], torch.float32, "loreft")
    n = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[threads] = [_run("loreft", "cpp", hidden, positions, params, grad) for _ in range(2)]
            for a, b in zip(*runs[threads]):
                assert torch.equal(a, b)
        for a, b in zip(runs[1][0], runs[2][0]):
            assert_close(a, b, torch.float32, "1 vs 2 threads")
    finally:
        torch.set_num_threads(n)


def test_autograd_op_bumps_the_version_and_checks_saved_tensors():
    """The eager op's C++ autograd formula: the in-place write is visible to autograd, and editing the
    output again before backward is caught (recompute mode saves the output)."""
    hidden, positions, params, grad = _inputs(CASES[1], torch.float32, "loreft")
    R, W, b, _ = (None if p is None else p.float().requires_grad_(True) for p in params)
    h = hidden.clone()
    v0 = h._version
    with torch.no_grad():
        rk.loreft(h, positions, R, W, b, backend="cpp")
    assert h._version > v0
    x = hidden.clone().requires_grad_(True) * 1
    rk.loreft(x, positions, R, W, b, backend="cpp", recompute=True)
    assert x.grad_fn is not None and "EditFunction" in x.grad_fn.name()
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (x * grad).sum().backward()


def test_inference_mode():
    hidden, positions, params, _ = _inputs(CASES[1], torch.float32, "direft")
    W2, W1, b, _ = (None if p is None else p.float() for p in params)
    want = rk.direft(hidden.clone(), positions, W1, b, W2, backend="torch")
    with torch.inference_mode():
        h = hidden.clone()
        got = rk.direft(h, positions, W1, b, W2, backend="cpp")
    assert_close(got, want, torch.float32, "inference_mode")


def _op_args(save_or_need, recompute=False):
    gen = torch.Generator().manual_seed(0)
    d, r = 40, 3
    hidden = torch.randn(2, 5, d, generator=gen)
    positions = torch.tensor([[0, 3, 3], [4, -1, 1]])
    R, W, b = make_params("loreft", r, d, gen, device="cpu")
    return hidden, positions, R, W, b


@pytest.mark.parametrize("save", [0, 1, 2])
def test_opcheck_forward(save):
    hidden, positions, R, W, b = _op_args(save)
    torch.library.opcheck(torch.ops.reft_kernels_cpp.edit_fwd.default,
                          (hidden, positions, R, W, b, None, True, True, "gelu", 0.0, 0, save))


@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_opcheck_backward(need_dx, recompute):
    hidden, positions, R, W, b = _op_args(2)
    out = hidden.clone()
    rows, stats = torch.ops.reft_kernels_cpp.edit_fwd(out, positions, R, W, b, None, True, True, "silu", 0.0, 0, 2)
    args = (torch.randn_like(hidden), positions, None if recompute else rows, out if recompute else None, stats, R, W,
            True, True, False, "silu", 0.0, 0, need_dx)
    torch.library.opcheck(torch.ops.reft_kernels_cpp.edit_bwd.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    """torch.compile traces the cpp backend (through edit_fwd / edit_bwd and their Meta kernels) and gives
    the eager output and gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    d, r = 48, 4
    lin = torch.nn.Linear(d, d)
    R, W, b = (torch.nn.Parameter(p) for p in make_params("loreft", r, d, gen, device="cpu"))
    x = torch.randn(2, 6, d, requires_grad=True)
    positions = torch.tensor([[0, 5, 5], [2, -1, 3]])

    def step(x):
        h = rk.loreft(lin(x), positions, R, W, b, act="relu", backend="cpp")
        return (h * h).sum()

    def run(fn):
        for t in (x, R, W, b):
            t.grad = None
        out = fn(x)
        out.backward()
        return [out.detach(), x.grad.clone(), R.grad.clone(), W.grad.clone(), b.grad.clone()]

    eager = run(step)
    got = run(torch.compile(step, backend=compiler, fullgraph=True))
    for g, e in zip(got, eager):
        assert_close(g, e, torch.float32, f"{compiler} vs eager", scale=10)


def test_errors_name_the_argument():
    hidden, positions, R, W, b = _op_args(0)
    with pytest.raises(ValueError, match=r"positions must be \[B, P\] with B=2"):
        torch.ops.reft_kernels_cpp.edit_fwd(hidden, positions[:1], R, W, b, None, True, True, "identity", 0.0, 0, 0)
    with pytest.raises(ValueError, match=r"lift must be \[r, d\] with d = 40"):
        torch.ops.reft_kernels_cpp.edit_fwd(hidden, positions, R[:, :7], W, b, None, True, True, "identity", 0.0, 0, 0)
    with pytest.raises(ValueError, match="act='mish' has no fused kernel"):
        torch.ops.reft_kernels_cpp.edit_fwd(hidden, positions, R, W, b, None, True, True, "mish", 0.0, 0, 0)
    with pytest.raises(ValueError, match="backend='cpp' runs CPU tensors"):
        rk.loreft(hidden.to("meta"), positions, R, W, b, backend="cpp")
    with pytest.raises(TypeError, match="float64"):
        rk.loreft(hidden.double(), positions, R, W, b, backend="cpp")


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_position_values_are_checked_inside_the_op(grad):
    """Eager cpp calls check position values in C++ (the pass that maps slots to rows), with the message of
    validation.check_positions; check_positions=False makes bad positions empty slots, as the kernels'
    contract says, and the registered edit_fwd never checks."""
    hidden, positions, R, W, b = _op_args(0)
    T = hidden.shape[1]
    params = [p.clone().requires_grad_(grad) for p in (R, W, b)]
    for bad, lo, hi in (([[0, T], [1, 2]], 0, T), ([[0, -2], [1, 2]], -2, 2)):
        bad = torch.tensor(bad + [[0, 1]] * (positions.shape[0] - 2))
        with torch.set_grad_enabled(grad), pytest.raises(
                ValueError, match=rf"positions must lie in \[-1, T\) with T={T} \(-1 = no edit\), got values in "
                                  rf"\[{lo}, {hi}\]"):
            rk.loreft(hidden.clone(), bad, *params, backend="cpp")
        masked = bad.masked_fill((bad < -1) | (bad >= T), -1)
        with torch.set_grad_enabled(grad):
            out = rk.loreft(hidden.clone(), bad, *params, backend="cpp", check_positions=False)
            ref = rk.loreft(hidden.clone(), masked, *params, backend="cpp")
        assert torch.equal(out, ref)
        torch.ops.reft_kernels_cpp.edit_fwd(hidden.clone(), bad, R, W, b, None, True, True, "identity", 0.0, 0, 0)


def test_default_on_cpu_and_float64_falls_back_to_torch():
    hidden, positions, R, W, b = _op_args(0)
    assert rk.backend.resolve(None, hidden) == "cpp"
    # float64 asks for the reference: the automatic choice takes it, silently and exactly
    out = rk.loreft(hidden.double(), positions, R.double(), W.double(), b.double())
    ref = rk.loreft(hidden.double(), positions, R.double(), W.double(), b.double(), backend="torch")
    assert torch.equal(out, ref)


def _python(code: str, env: dict, pythonpath=None, cwd=None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter without the developer's REFT_KERNELS_* switches; reft_kernels comes
    from this checkout unless pythonpath names another place."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("REFT_KERNELS_CPP", "REFT_KERNELS_BACKEND")}
    path = str(pythonpath) if pythonpath else str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full_env.update(env, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", textwrap.dedent(code)],
                          env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)


FALLBACK_CODE = """
    import warnings, torch, reft_kernels as rk
    h = torch.randn(2, 3, 8); pos = torch.tensor([[0, 2], [1, -1]])
    R, W, b = torch.linalg.qr(torch.randn(8, 2))[0].t().contiguous(), torch.randn(2, 8), torch.randn(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = rk.loreft(h.clone(), pos, R, W, b, backend="torch")
        out1 = rk.loreft(h.clone(), pos, R, W, b)
        out2 = rk.loreft(h.clone(), pos, R, W, b)
    ours = [str(w.message) for w in caught if "C++ CPU kernels are unavailable" in str(w.message)]
    print("backend", rk.backend.resolve(None, h), "warnings", len(ours), "equal", torch.equal(out1, want) and torch.equal(out2, want))
    print(ours[0] if ours else "")
"""


def test_fallback_without_a_compiler(tmp_path):
    """No compiler (and no cached build): one warning, and the ops run the torch reference."""
    r = _python(FALLBACK_CODE, {"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr
    assert "backend torch warnings 1 equal True" in r.stdout, r.stdout + r.stderr
    assert "REFT_KERNELS_CPP=0" in r.stdout


def test_switched_off_by_environment(tmp_path):
    r = _python(FALLBACK_CODE, {"REFT_KERNELS_CPP": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert r.returncode == 0, r.stderr
    assert "backend torch warnings 0 equal True" in r.stdout, r.stdout + r.stderr


def test_wheel_install_compiles_from_its_packaged_sources(tmp_path):
    """A wheel (not an editable install) has no top-level csrc/: setup.py packs the C++ sources into
    reft_kernels/csrc/, and the JIT build compiles from there (a fresh extension cache, so it really builds)."""
    src = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((REPO / name).read_bytes())
    for folder in ("csrc", "reft_kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "_cpp*.so"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("reft_kernels-*.whl"))
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    code = """
        import torch, reft_kernels as rk
        from reft_kernels import extension
        print("module", rk.__file__)
        print("sources", extension.SOURCE_DIR)
        h = torch.randn(2, 3, 8); pos = torch.tensor([[0, 2], [1, -1]])
        R, W, b = torch.linalg.qr(torch.randn(8, 2))[0].t().contiguous(), torch.randn(2, 8), torch.randn(2)
        want = rk.loreft(h.clone(), pos, R, W, b, backend="torch")
        print("available", extension.available(), "close", torch.allclose(rk.loreft(h.clone(), pos, R, W, b, backend="cpp"), want, atol=1e-5))
    """
    r = _python(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, pythonpath=site, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"module {site / 'reft_kernels' / '__init__.py'}" in r.stdout, r.stdout
    assert f"sources {site / 'reft_kernels' / 'csrc'}" in r.stdout, r.stdout
    assert "available True close True" in r.stdout, r.stdout + r.stderr
    assert "compiling the C++ CPU kernels" in r.stderr  # a real build, from the packaged sources
