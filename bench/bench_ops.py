"""Op suite: the fused ReFT edit alone, every intervention type, forward, backward and both.

Ours against naive PyTorch (our torch backend) and pyreft, beside the byte floor and our launch count.

Setting: hidden [B, T, d] with T = P = 16 positions per batch row, every row edited, so the N = B * P
edited rows are the whole tensor and the floor is exactly the edited rows. Parameters fp32 (the math runs
in fp32 whatever the hidden dtype); random inputs and parameters, never zeros. Types, as
reft_kernels/modules/interventions.py maps them (term flags of reft_kernels.reft_edit; pyreft's class):
- loreft       h + Rᵀ(Wh + b − Rh)          lift R, source Wh + b, subtract Rh      LoreftIntervention
- noreft       h + W2ᵀ(Wh + b − W2h)        lift W2, source Wh + b, subtract W2h    NoreftIntervention(add_bias=False)
- noreft_b2    h + W2ᵀ(Wh + b − W2h − b2)   the same with the projection bias b2     NoreftIntervention(add_bias=True)
- consreft     h + Rᵀ(b − Rh)               lift R, source b, subtract Rh           ConsreftIntervention
- lobireft     h + Rᵀb                      lift R, source b                        LobireftIntervention
- direft       h + W2ᵀ(Wh + b)              lift W2, source Wh + b                  NodireftIntervention(add_bias=False)
- orthodireft  h + Rᵀ(Wh + b)               lift R, source Wh + b                   DireftIntervention
(activation identity, dropout 0.)

Modes:
- fwd: the forward without gradient (torch.no_grad(): inference; our kernel saves nothing)
- bwd: the backward alone, replayed on a retained graph: the forward is run once per rotating buffer,
  untimed, keeping its graph; each timed call is torch.autograd.backward(out, grad, retain_graph=True) on
  the next one (then the parameter gradients are dropped). That is exactly what autograd runs for this op
  in a training step's backward: for ours the EditFunction backward (its launcher, three kernels), for the
  torch reference and pyreft their autograd graphs. Nothing is subtracted from anything.
- fwd+bwd: the forward with gradient, then out.backward(grad), as a training step runs them.

Providers (the same run measures all of them on the same buffers):
- fused: reft_kernels.reft_edit(backend="triton"), which keeps a copy of the edited rows for the backward
  (GPU; on a CPU only under TRITON_INTERPRET=1 and only when named with --providers: the interpreter is a
  correctness tool, its times mean nothing)
- fused-recompute: the same with recompute=True (the backward rebuilds the rows from the output); by
  default only for the headline LoReFT d = 4096, r = 4, bf16 rows
- cpp: reft_kernels.reft_edit(backend="cpp"), the fused C++ CPU kernels of csrc/ (CPU runs; one pass over
  the edited rows forward, one backward, the parameter gradients summed per thread chunk)
- torch: reft_kernels.reft_edit(backend="torch"), the plain-PyTorch reference (gather, math, index_put_)
- pyreft: pyreft's class for the type on the gathered [N, 1, d] rows (no gather or scatter, but the
  orthonormal types re-orthogonalize R on every call, through a d x d buffer); only when pyreft imports

Floor (floor_MB, floor_us at the copy bandwidth measured in this run; R = N d x hidden bytes per element,
p = the r x d matrices the type has (lift, and W with a source Wh + b) x 4 bytes):
- fwd: read and write the rows, read the parameters: 2 R + p, every type
- bwd: read the incoming gradient, read the original rows (the parameter gradients need them), write
  the hidden gradient: 3 R; LobiReFT: 1 R (its Jacobian is the identity: the hidden gradient is the
  incoming one, and Rᵀb needs only the summed gradient). Plus reading the parameters and writing their
  gradients: 2 p
- fwd+bwd: the sum, 5 R + 3 p (LobiReFT 3 R + 3 p). The README's headline floor is 5 N d bytes (rows only).
Launches: the floor is 1 per pass. `launches` is what our path ran (counted by wrapping the Triton
kernels during one extra, untimed call): forward 1; backward 3 (step 1, step 2, and the sum of the
partial parameter gradients, skipped when one group covers every row). At these settings (fp32
parameters, dropout 0) our path runs no other kernel.
ours_MB (fused, with the saved copy): bytes our kernels read and write, each array counted once per kernel
that touches it (what L2 may absorb is not subtracted): forward 2 R + p without gradient, 3 R + p + stats
with it (stats: 2 r_pad x 4 bytes per row, r_pad = max(16, r rounded up to a power of two)); backward: the
gradient twice (step 1 reduces it to L g, step 2 streams it again), the saved rows (not for LobiReFT),
the hidden gradient written: 4 R (LobiReFT 3 R), plus the stats and step-1 scratch, the parameters (the
lift twice), and the partial parameter gradients (written by every row group of step 2, read back once by
the sum) and the final ones.

Method: CUDA events around each call, medians over `reps` calls after 5 warm-up calls (host time
included: eager, as a user calls the op); inputs rotate over more than 4x the L2 cache (hidden, gradient
and, for bwd, the retained graphs, whose first use in the timed loop follows an L2 flush).
Ratios: fused_over_floor (our time over the floor's), torch_over_fused and pyreft_over_fused (how many
times faster ours is).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import time
from pathlib import Path

import torch

import reft_kernels as rk
from reft_kernels.modules.interventions import INTERVENTIONS
from reft_kernels.ops import fused_edit as fe

from . import harness as H

L2_BYTES = 50 << 20  # H100: 50 MB; the device's own figure is used when torch reports it
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("fused", "fused-recompute", "cpp", "torch", "pyreft")
OURS = ("fused", "cpp")  # the providers whose ratios are reported against the others
WARMUP = 5

# type -> (kind in reft_kernels.modules.interventions, has the projection bias b2, extra pyreft keywords)
TYPES = {
    "loreft": ("loreft", False, {}),
    "noreft": ("noreft", False, {"add_bias": False}),
    "noreft_b2": ("noreft", True, {"add_bias": True}),
    "consreft": ("consreft", False, {}),
    "lobireft": ("lobireft", False, {}),
    "direft": ("direft", False, {"add_bias": False}),
    "orthodireft": ("orthodireft", False, {}),
}
HEADLINE = dict(type="loreft", d=4096, r=4, dtype="bf16")  # the README's table


def type_info(name):
    """(module class, has_proj_bias, pyreft keywords) of a benchmark type."""
    kind, pb, kw = TYPES[name]
    return INTERVENTIONS[kind], pb, kw


def _l2_bytes():
    if torch.cuda.is_available():
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or L2_BYTES
    return L2_BYTES


_FLUSH: dict = {}


def flush_l2():
    """Reads and writes 2x the L2 cache, so that nothing a timed call reads is still cached."""
    if not torch.cuda.is_available():
        return
    buf = _FLUSH.get("buf")
    if buf is None:
        buf = _FLUSH["buf"] = torch.ones(2 * _l2_bytes() // 4, device="cuda")
    buf.add_(1.0)


class Case:
    """Rotating input buffers and random parameters for one (type, N, d, r, dtype)."""

    def __init__(self, N, d, r, dtype, device, P=16, type="loreft"):
        self.type, self.N, self.d, self.r, self.P, self.dtype = type, N, d, r, P, dtype
        cls, has_pb, _ = type_info(type)
        self.source_linear, self.subtract_proj, self.has_proj_bias = cls.source_linear, cls.subtract_proj, has_pb
        self.orthonormal = cls.orthonormal
        B = max(1, N // P)
        self.B, self.T = B, P
        self.N = B * P
        self.el = torch.finfo(dtype).bits // 8
        size = B * self.T * d * self.el
        self.copies = max(1, min(512, math.ceil(4 * _l2_bytes() / size) + 1)) if device == "cuda" else 1
        gen = torch.Generator(device=device).manual_seed(0)
        self.hidden = [torch.randn(B, self.T, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.grads = [torch.randn(B, self.T, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.positions = torch.arange(P, device=device).repeat(B, 1)
        q, _ = torch.linalg.qr(torch.randn(d, r, device=device, generator=gen))
        q = q.t().contiguous()  # orthonormal rows
        noise = lambda: 0.1 / math.sqrt(d) * torch.randn(r, d, device=device, generator=gen)  # noqa: E731
        # Parameters keep repeated in-place edits of the same buffers bounded (every buffer is edited
        # hundreds of times): the edit contracts the r-dimensional subspace it writes.
        if type in ("loreft", "noreft", "noreft_b2"):
            W = torch.randn(r, d, device=device, generator=gen) * 0.5 / math.sqrt(d)  # spectral norm about 0.5
        else:
            W = -0.5 * q + noise()  # without a subtraction, W h feeds back: W L^T ~ -0.4 I contracts it
        lift = q if self.orthonormal else 0.8 * q + noise()
        self.params = {
            "lift": lift,
            "weight": W if self.source_linear else None,
            # LobiReFT adds R^T b on every call: a small b keeps the drift small
            "bias": (0.01 if type == "lobireft" else 0.1) * torch.randn(r, device=device, generator=gen),
            "proj_bias": 0.1 * torch.randn(r, device=device, generator=gen) if has_pb else None,
        }
        for p in self.params.values():
            if p is not None:
                p.requires_grad_(True)
        self.k = 0
        self.rows_bytes = self.N * d * self.el

    # the LoReFT names (small_n, tune and profile_kernels use them)
    R = property(lambda self: self.params["lift"])
    W = property(lambda self: self.params["weight"])
    b = property(lambda self: self.params["bias"])

    @property
    def spec(self):
        return fe.EditSpec(self.source_linear, self.subtract_proj, "identity")

    def next(self):
        self.k = (self.k + 1) % self.copies
        return self.hidden[self.k], self.grads[self.k]

    def clear_grads(self):
        for p in self.params.values():
            if p is not None:
                p.grad = None

    def check_data(self):
        H.check_bench_data(self.hidden)

    def edit(self, backend, recompute=False):
        p = self.params

        def call(h):
            return rk.reft_edit(h, self.positions, p["lift"], p["weight"], p["bias"], p["proj_bias"],
                                source_linear=self.source_linear, subtract_proj=self.subtract_proj,
                                backend=backend, recompute=recompute)

        return call


# ------------------------------------------------------------------------------------------------
# providers: {mode: fn} (bwd: a builder returning fn, so that its retained graphs live only while timed)
# ------------------------------------------------------------------------------------------------


def _graph_count(case, reps):
    # never more graphs than timed calls: each call then meets a graph whose data is not in L2
    return max(1, min(case.copies, _warmup(case, case.hidden[0].is_cuda) + reps))


def _ours(case, backend, recompute=False):
    edit = case.edit(backend, recompute)

    def fwd():
        h, _ = case.next()
        with torch.no_grad():
            edit(h)

    def fwd_bwd():
        h, g = case.next()
        edit(H.as_nonleaf(h)).backward(g)
        case.clear_grads()

    def build_bwd(reps):
        n = _graph_count(case, reps)
        outs = [edit(H.as_nonleaf(case.hidden[k])) for k in range(n)]
        state = [0]

        def bwd():
            k = state[0] = (state[0] + 1) % n
            torch.autograd.backward(outs[k], case.grads[k], retain_graph=True)
            case.clear_grads()

        return bwd

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "bwd": build_bwd}


def _pyreft(case, pyreft):
    cls, has_pb, kw = type_info(case.type)
    iv = getattr(pyreft, cls.pyreft_name)(embed_dim=case.d, low_rank_dimension=case.r, dtype=case.dtype, **kw)
    iv = iv.to(case.hidden[0].device)
    rows = [h.reshape(case.N, 1, case.d) for h in case.hidden]
    grads = [g.reshape(case.N, 1, case.d) for g in case.grads]
    leafs = [x.detach().clone().requires_grad_(True) for x in rows]

    def fwd():
        case.k = (case.k + 1) % case.copies
        with torch.no_grad():
            iv(rows[case.k])

    def fwd_bwd():
        case.k = (case.k + 1) % case.copies
        iv(leafs[case.k]).backward(grads[case.k])
        leafs[case.k].grad = None
        iv.zero_grad(set_to_none=True)

    def build_bwd(reps):
        n = _graph_count(case, reps)
        outs = [iv(leafs[k]) for k in range(n)]
        state = [0]

        def bwd():
            k = state[0] = (state[0] + 1) % n
            torch.autograd.backward(outs[k], grads[k], retain_graph=True)
            leafs[k].grad = None
            iv.zero_grad(set_to_none=True)

        return bwd

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "bwd": build_bwd}


def _fused(case, backend, recompute=False):
    """(fwd, fwd+bwd) of our op (small_n and profile_kernels use it)."""
    fns = _ours(case, backend, recompute)
    return fns["fwd"], fns["fwd+bwd"]


@contextlib.contextmanager
def count_launches(*modules):
    """Counts the Triton kernel launches of reft_kernels' edit while the block runs: every *_kernel of the
    given op modules (default: ops/fused_edit.py) is wrapped (the launchers look them up by name at each call)."""
    counter = [0]

    class _Counted:
        def __init__(self, kernel):
            self._kernel = kernel

        def __getitem__(self, grid):
            counter[0] += 1
            return self._kernel[grid]

        def __getattr__(self, name):
            return getattr(self._kernel, name)

    saved = {(mod, n): getattr(mod, n) for mod in (modules or (fe,)) for n in dir(mod)
             if n.endswith("_kernel") and hasattr(getattr(mod, n), "__getitem__")}
    try:
        for (mod, n), k in saved.items():
            setattr(mod, n, _Counted(k))
        yield counter
    finally:
        for (mod, n), k in saved.items():
            setattr(mod, n, k)


# ------------------------------------------------------------------------------------------------
# bytes
# ------------------------------------------------------------------------------------------------


def _param_bytes(case):
    mats = 1 + case.source_linear
    vecs = 1 + case.has_proj_bias
    return (mats * case.r * case.d + vecs * case.r) * 4


def floor_bytes(case, mode, rows_only=False):
    """The minimum any implementation moves (module docstring)."""
    R = case.rows_bytes
    p = 0 if rows_only else _param_bytes(case)
    lobi = not (case.source_linear or case.subtract_proj)
    fwd = 2 * R + p
    bwd = (1 if lobi else 3) * R + 2 * p
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _bwd_groups(case):
    """Row groups of our backward's step 2 (mirrors fused_edit.edit_bwd_triton)."""
    cfg = fe.launch_config(case.grads[0], case.r, case.P)
    n_items = case.B * case.T
    n_blocks = fe._cdiv(n_items, cfg.bwd_block_n)
    n_cblk = fe._cdiv(case.d, cfg.bwd_block_d)
    target = cfg.bwd_programs or 4 * fe._sms(case.grads[0].device)
    n_groups = max(1, min(n_blocks, fe._cdiv(target, n_cblk)))
    return fe._cdiv(n_blocks, fe._cdiv(n_blocks, n_groups))


def ours_bytes(case, mode):
    """What our kernels read and write (fused, saving the rows; module docstring)."""
    R, p, N = case.rows_bytes, _param_bytes(case), case.N
    st = N * fe.r_pad(case.r) * 4  # one r_pad-wide fp32 vector per row
    needs_rows = case.source_linear or case.subtract_proj
    if mode == "fwd":
        return 2 * R + p
    fwd = 3 * R + p + 2 * st
    groups = _bwd_groups(case)
    M = p // 4
    partials = (2 * groups * M * 4 if groups > 1 else 0) + M * 4
    item_slot = 2 * case.B * case.T * 4
    lift = case.r * case.d * 4  # step 1 reads the lift, step 2 every parameter matrix
    bwd = ((3 + needs_rows) * R + lift + p + partials + item_slot
           + (st if case.source_linear else 0) + 2 * st  # step 1: reads z, writes d_delta and dz
           + 3 * st)  # step 2: reads delta, d_delta and dz
    return {"bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _cpu_copy_bandwidth_gbps(nbytes=256 << 20):
    a = torch.empty(nbytes // 2, dtype=torch.uint8).random_()
    b = torch.empty_like(a)
    us = H.time_per_call_us(lambda: b.copy_(a), reps=7, warmup=2)
    return nbytes / (us * 1e-6) / 1e9


def copy_bandwidth_gbps():
    """Bytes read plus written per second of a device copy (the harness's), or of a 256 MB CPU copy."""
    return H.copy_bandwidth_gbps() if torch.cuda.is_available() else _cpu_copy_bandwidth_gbps()


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------


def default_groups(cuda: bool, quick: bool):
    """[(types, dtypes, ds, rs, ns, providers)]: the cases are each group's cross product."""
    others = [t for t in TYPES if t != "loreft"]
    if cuda:
        full = ["fused", "torch", "pyreft"]
        if quick:
            return [(list(TYPES), ["bf16"], [4096], [4], [1024, 131072], full)]
        return [
            # the README's table: LoReFT d = 4096, r = 4, bf16
            (["loreft"], ["bf16"], [4096], [4], [64, 1024, 16384, 131072], list(PROVIDERS)),
            # every other type at that shape
            (others, ["bf16"], [4096], [4], [1024, 131072], full),
            # LoReFT over d and r (r = 1 compiles its own kernels: Triton specializes an argument equal to 1)
            (["loreft"], ["bf16"], [2048], [1, 4, 8], [1024, 131072], full),
            (["loreft"], ["bf16"], [4096], [1, 8], [1024, 131072], full),
            # fp32 hidden (the ieee dot path, twice the bytes)
            (["loreft"], ["fp32"], [4096], [4], [1024, 131072], full),
        ]
    cpu = ["cpp", "torch", "pyreft"]
    if quick:
        return [(list(TYPES), ["fp32"], [512], [4], [64], cpu)]
    return [
        (list(TYPES), ["fp32"], [1024], [4], [64, 1024], cpu),
        # the shape of the GPU headline and the C++ kernels' goals (N <= 64 and N = 16384 at d = 4096, r = 4),
        # without pyreft (its d x d orthogonalization: ~1 s a call on a CPU); bf16 storage too (the torch
        # reference computes in fp32 from it, as the fused kernels do)
        (["loreft"], ["fp32", "bf16"], [4096], [4], [16, 64, 1024, 16384], ["cpp", "torch"]),
    ]


def custom_groups(a, cuda):
    """One group from the flags; an axis not given takes the headline's value."""
    types = list(TYPES) if a.types == ["all"] else (a.types or [HEADLINE["type"]])
    for t in types:
        if t not in TYPES:
            raise SystemExit(f"--types: unknown type {t!r}; choose from {', '.join(TYPES)} or all")
    dtypes = a.dtype or [HEADLINE["dtype"] if cuda else "fp32"]
    ns = a.n or ([64, 1024, 16384, 131072] if cuda else [64, 1024])
    providers = a.providers or (["fused", "fused-recompute", "torch", "pyreft"] if cuda else ["torch", "pyreft"])
    return [(types, dtypes, a.d or [HEADLINE["d"]], a.r or [HEADLINE["r"]], ns, providers)]


def _is_headline(type_, d, r, dtype):
    return (type_, d, r, dtype) == (HEADLINE["type"], HEADLINE["d"], HEADLINE["r"], HEADLINE["dtype"])


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------


def _reps(N, d, el, base, cuda):
    if not cuda:  # the torch reference takes ~2 s per fwd+bwd at N = 16384, d = 4096 on 2 cores
        return base if N * d <= 1024 * 4096 else max(3, base // 3)
    return base if N * d * el <= 16384 * 4096 * 2 else max(10, base // 2)


def _warmup(case, cuda):
    # a CPU call on 16384 x 4096 rows takes seconds and has no caches or JIT to warm beyond the first
    return WARMUP if cuda or case.N * case.d <= 1024 * 4096 else 1


def measure_case(case, modes, providers, pyreft, bw, reps, count=True, progress=None):
    """Rows (one per mode) for one case."""
    cuda = case.hidden[0].is_cuda
    base = {"type": case.type, "dtype": {v: k for k, v in DTYPES.items()}[case.dtype], "d": case.d, "r": case.r,
            "N": case.N}
    rows = {m: dict(base, mode=m) for m in modes}
    n_reps = _reps(case.N, case.d, case.el, reps, cuda)
    for prov in providers:
        if prov == "pyreft":
            if pyreft is None:
                continue
            fns = _pyreft(case, pyreft)
        else:
            backend = {"torch": "torch", "cpp": "cpp"}.get(prov, "triton")
            fns = _ours(case, backend, recompute=prov == "fused-recompute")
        for mode in modes:
            if prov == "fused-recompute" and mode == "fwd":
                continue  # without gradient it is the same kernel as "fused"
            if progress:
                progress(f"{case.type} {rows[mode]['dtype']} d={case.d} r={case.r} N={case.N} {mode} {prov}")
            fn = fns[mode]
            if mode == "bwd":
                fn = fn(n_reps)
                flush_l2()
            rows[mode][f"{prov}_us"] = H.time_per_call_us(fn, reps=n_reps, warmup=_warmup(case, cuda))
            if prov == "fused" and count:
                H.sync()
                with count_launches() as c:
                    fn()
                H.sync()
                rows[mode]["launches"] = c[0]
            del fn
        del fns
        case.clear_grads()
    case.check_data()
    for mode, row in rows.items():
        row["floor_MB"] = floor_bytes(case, mode) / 1e6
        row["floor_us"] = floor_bytes(case, mode) / (bw * 1e9) * 1e6
        if "fused" in providers:
            row["ours_MB"] = ours_bytes(case, mode) / 1e6
        for ours in OURS:
            f = row.get(f"{ours}_us")
            if f:
                row[f"{ours}_over_floor"] = f / row["floor_us"]
                for other in ("torch", "pyreft"):
                    if f"{other}_us" in row:
                        row[f"{other}_over_{ours}"] = row[f"{other}_us"] / f
        # the README's headline floor: 5 N d bytes forward+backward, 2 N d forward (rows only)
        row["rows_floor_us"] = floor_bytes(case, mode, rows_only=True) / (bw * 1e9) * 1e6
    if "fused" in providers and count and "launches" in rows.get("bwd", {}):
        expected = 2 + (_bwd_groups(case) > 1)
        if rows["bwd"]["launches"] != expected:
            print(f"  ops: warning: backward ran {rows['bwd']['launches']} kernels, the bytes model assumes {expected}")
    return [rows[m] for m in modes]


def run(groups, modes=MODES, reps=30, progress=None):
    """Measures every case of `groups`; returns (rows, copy bandwidth in GB/s, skipped providers)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skipped = {}
    pyreft = None
    if any("pyreft" in g[5] for g in groups):
        pyreft, why = H.import_pyreft()
        if pyreft is None:
            skipped["pyreft"] = f"does not import here: {why}"
    if device == "cpu" and any(p.startswith("fused") for g in groups for p in g[5]):
        if not fe._backend.INTERPRET:
            skipped["fused"] = "a CPU runs the Triton kernels only under TRITON_INTERPRET=1"
            groups = [g[:5] + ([p for p in g[5] if not p.startswith("fused")],) for g in groups]
    if any("cpp" in g[5] for g in groups):
        why = None
        if device != "cpu":
            why = "the C++ kernels run CPU tensors"
        elif not rk.extension.available():
            why = f"the C++ extension is unavailable: {rk.extension.load()[1]}"
        if why:
            skipped["cpp"] = why
            groups = [g[:5] + ([p for p in g[5] if p != "cpp"],) for g in groups]
    bw = copy_bandwidth_gbps()
    rows = []
    cases = [(c, providers) for *axes, providers in groups for c in itertools.product(*axes)]
    label = lambda item: "{} {} d={} r={} N={}".format(*item[0])  # noqa: E731
    # a bar on a terminal, "ops case k/n: ..." lines in a log (harness.progress, where the harness has it)
    it = H.progress(cases, "ops case", label=label) if hasattr(H, "progress") else cases
    for (type_, dt, d, r, N), providers in it:
        case = Case(N, d, r, DTYPES[dt], device, type=type_)
        rows += measure_case(case, modes, providers, pyreft, bw, reps, progress=progress)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    _FLUSH.clear()
    return rows, bw, skipped


def headline_table(rows):
    """The README's table (LoReFT d = 4096, r = 4, bf16) from the rows, with its column names: every provider
    that ran (fused on a GPU, cpp on a CPU, torch, pyreft) in each mode, columns no provider filled left out."""
    by = {}
    for row in rows:
        if _is_headline(row["type"], row["d"], row["r"], row["dtype"]):
            by.setdefault(row["N"], {})[row["mode"]] = row
    if not by:
        return ""
    nan = float("nan")
    out = []
    for N, m in sorted(by.items()):
        f, fb, b = m.get("fwd", {}), m.get("fwd+bwd", {}), m.get("bwd", {})
        row = {"N rows": N}
        for mode, got in (("fwd", f), ("fwd+bwd", fb)):
            for prov in ("fused", "cpp", "torch", "pyreft"):
                row[f"{prov} {mode}"] = got.get(f"{prov}_us", nan)
        row["floor fwd+bwd (5 N d bytes)"] = fb.get("rows_floor_us", nan)
        row["fused-recompute fwd+bwd"] = fb.get("fused-recompute_us", nan)
        for prov in ("fused", "cpp", "torch", "pyreft"):
            row[f"{prov} bwd"] = b.get(f"{prov}_us", nan)
        out.append(row)
    columns = [c for c in out[0] if any(r[c] == r[c] for r in out)]  # NaN != NaN: a column nobody filled
    return H.markdown_table(out, columns)


def small_n(N=64, d=4096, r=4, dtype=torch.bfloat16, calls=200):
    """The host-bound regime: GPU time under CUDA-graph replay, and eager per-call time beside torch.add_
    and a bare Triton launch measured in the same run."""
    import triton
    import triton.language as tl

    case = Case(N, d, r, dtype, "cuda")
    fwd, fb = _fused(case, "triton")
    res = {"N": N}
    res["graph_fwd_us"] = H.graph_replay_us(fwd)
    res["graph_fwdbwd_us"] = H.graph_replay_us(fb)
    _, fb_torch = _fused(case, "torch")  # index_put_ / nonzero sync: not capturable, eager only

    small = torch.zeros(1024, device="cuda")

    @triton.jit
    def _add1(x_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)

    h0 = case.hidden[0]
    spec = fe.EditSpec(True, True, "identity")
    op_args = (h0, case.positions, case.R.detach(), case.W.detach(), case.b.detach(), None, True, True, "identity", 0.0, 0, 0)

    saved, stats = fe.edit_fwd_triton(h0, case.positions, case.R.detach(), case.W.detach(), case.b.detach(), None, spec, 0.0, 0, 2)
    g0 = case.grads[0]

    def bwd_launcher_only():
        fe.edit_bwd_triton(g0, case.positions, saved, None, stats, case.R.detach(), case.W.detach(), spec, False, 0.0, 0, True)

    def fused_fwd_same_buffer():
        with torch.no_grad():
            rk.loreft(h0, case.positions, case.R, case.W, case.b, backend="triton")

    timings = {
        "eager_torch_add_us": lambda: small.add_(1.0),
        "eager_bare_triton_launch_us": lambda: _add1[(1,)](small, 1024, BLOCK=1024),
        "eager_fused_fwd_us": fused_fwd_same_buffer,
        "eager_fused_fwd_launcher_only_us": lambda: fe.edit_fwd_triton(h0, case.positions, case.R.detach(), case.W.detach(), case.b.detach(), None, spec, 0.0, 0, 0),
        "eager_registered_op_fwd_us": lambda: torch.ops.reft_kernels.edit_fwd(*op_args),
        "eager_bwd_launcher_only_us": bwd_launcher_only,
        "eager_fused_fwdbwd_us": fb,
        "eager_torch_backend_fwdbwd_us": fb_torch,
    }
    # the CUDA host path (csrc/edit_cuda.cu, issue 7): the registered op alone, and the public function
    from reft_kernels import extension

    host_ok, host_how = extension.load_cuda()
    res["cuda_host_path"] = "built" if host_ok else f"unavailable: {host_how}"
    if host_ok:
        host_args = (*op_args[:-1], False, False)  # edit's trailing (recompute, check_positions)

        def host_public_fwd():
            with torch.no_grad():
                rk.loreft(h0, case.positions, case.R, case.W, case.b, backend="cpp")

        def host_op_fwd():
            with torch.no_grad():
                torch.ops.reft_kernels_cpp.edit.default(*host_args)

        timings["eager_cuda_host_op_fwd_us"] = host_op_fwd
        timings["eager_cuda_host_public_fwd_us"] = host_public_fwd
        res["graph_cuda_host_fwd_us"] = H.graph_replay_us(host_op_fwd)
    for name, fn in timings.items():
        res[name] = H.time_per_call_us(fn, reps=7, warmup=20, calls=calls if "bwd" not in name else 50)
    res["eager_fwd_over_torch_add"] = res["eager_fused_fwd_us"] / res["eager_torch_add_us"]
    if host_ok:  # the goal: the op's eager forward within 1.2x of torch.add_
        res["eager_cuda_host_op_over_torch_add"] = res["eager_cuda_host_op_fwd_us"] / res["eager_torch_add_us"]
        res["eager_cuda_host_public_over_torch_add"] = res["eager_cuda_host_public_fwd_us"] / res["eager_torch_add_us"]
    case.check_data()
    return res


def _sweep_configs():
    """Variants around the defaults, so a rerun on another GPU shows whether they still hold."""
    C = fe.LaunchConfig
    always_rows = 10**9
    fwd = {
        "default": C(rows=True),
        "rows always": C(rows=True, rows_max_per_sm=always_rows),
        "tiles always": C(rows=False),
        "tiles n32 d128 w4 s3": C(rows=False, fwd_block_n=32, fwd_warps=4),
        "tiles no L2 hints": C(rows=False, l2_hints=False),
    }
    bwd = {
        "default": C(rows=True),
        "rows always": C(rows=True, rows_max_per_sm=always_rows),
        "tiles always": C(rows=False),
        "main n16 d128 w4 s4": C(rows=True, bwd_block_d=128, bwd_stages=4),
        "main n32 d256 w8 s3": C(rows=True, bwd_block_n=32, bwd_warps=8),
    }
    return fwd, bwd


def tune(ns=(64, 1024, 16384, 131072), d=4096, r=4, dtype=torch.bfloat16):
    """Block-shape sweep at the launcher level (no autograd), forward and backward separately."""
    spec = fe.EditSpec(True, True, "identity")
    fwd_cfgs, bwd_cfgs = _sweep_configs()
    out = []
    for N in ns:
        case = Case(N, d, r, dtype, "cuda")
        R, W, b = case.R.detach(), case.W.detach(), case.b.detach()
        saved, stats = fe.edit_fwd_triton(case.hidden[0], case.positions, R, W, b, None, spec, 0.0, 0, 2)
        for name, cfg in fwd_cfgs.items():
            def f(cfg=cfg):
                h, _ = case.next()
                fe.edit_fwd_triton(h, case.positions, R, W, b, None, spec, 0.0, 0, 2, config=cfg)

            out.append({"N": N, "pass": "fwd (saves rows)", "config": name, "us": H.time_per_call_us(f, reps=15),
                        "graph_us": H.graph_replay_us(f) if N <= 1024 else float("nan")})
        for name, cfg in bwd_cfgs.items():
            def f(cfg=cfg):
                _, g = case.next()
                fe.edit_bwd_triton(g, case.positions, saved, None, stats, R, W, spec, False, 0.0, 0, True, config=cfg)

            out.append({"N": N, "pass": "bwd (hidden grad)", "config": name, "us": H.time_per_call_us(f, reps=15),
                        "graph_us": H.graph_replay_us(f) if N <= 1024 else float("nan")})
        case.check_data()
        del case, saved, stats
        torch.cuda.empty_cache()
    return out


def profile_kernels(cases=None, d=4096, r=4, dtype=torch.bfloat16):
    """GPU time per kernel (torch.profiler) of one fused forward+backward, default configuration: LoReFT
    at N = 64 and 131072, every other type at 131072."""
    from torch.profiler import ProfilerActivity, profile

    cases = cases or [("loreft", 64), ("loreft", 131072)] + [(t, 131072) for t in TYPES if t != "loreft"]
    rows = []
    for type_, N in cases:
        case = Case(N, d, r, dtype, "cuda", type=type_)
        _, fb = _fused(case, "triton")
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
        reps = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fb()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" and ev.count >= reps:
                us = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)) / ev.count
                rows.append({"type": type_, "N": N, "kernel": ev.key[:60], "calls_per_step": ev.count // reps,
                             "us_per_call": us})
        del case
        torch.cuda.empty_cache()
    return rows


OP_COLUMNS = [
    "type", "dtype", "d", "r", "N", "mode", "fused_us", "fused-recompute_us", "cpp_us", "torch_us", "pyreft_us",
    "floor_MB", "floor_us", "ours_MB", "launches", "fused_over_floor", "torch_over_fused", "pyreft_over_fused",
    "cpp_over_floor", "torch_over_cpp", "pyreft_over_cpp",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=None, help=f"{', '.join(TYPES)} or all")
    ap.add_argument("--modes", nargs="*", default=None, choices=MODES)
    ap.add_argument("--n", type=int, nargs="*", default=None, help="edited rows N (multiples of 16)")
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--r", type=int, nargs="*", default=None)
    ap.add_argument("--dtype", nargs="*", default=None, choices=list(DTYPES))
    ap.add_argument("--providers", nargs="*", default=None, choices=PROVIDERS)
    ap.add_argument("--reps", type=int, default=None, help="timed calls per figure (default 30 GPU, 10 CPU; "
                    "halved from 16384 x 4096 x 2 bytes of rows on a GPU)")
    ap.add_argument("--quick", action="store_true", help="every type at one shape, fewer repeats, no extras")
    ap.add_argument("--tune", action="store_true", help="also sweep block shapes (GPU)")
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")
    a = ap.parse_args(argv)

    t0 = time.time()
    out_dir = Path(a.out) if a.out else None
    env = H.environment()
    cuda = torch.cuda.is_available()
    custom = any(x is not None for x in (a.types, a.n, a.d, a.r, a.dtype, a.providers))
    groups = custom_groups(a, cuda) if custom else default_groups(cuda, a.quick)
    reps = a.reps or ((10 if a.quick else 30) if cuda else (3 if a.quick else 10))
    modes = a.modes or list(MODES)
    progress = lambda s: print(f"  ops: {s}", flush=True)  # noqa: E731
    with H.cpu_threads(H.SUITE_THREADS):
        rows, bw, skipped = run(groups, modes, reps, progress=progress)
    env["copy_bandwidth_GBps"] = f"{bw:.0f}" + ("" if cuda else " (CPU, 256 MB copy)")
    notes = H.suite_notes(__doc__)
    if not cuda:
        notes += ("\nCPU run: one torch thread (harness.cpu_threads) for every provider; cpp (the fused C++ CPU "
                  "kernels), torch and pyreft. The fused Triton kernels' figures need a GPU.\n")
    head = headline_table(rows)
    if head:
        notes += ("\nHeadline (the README's table: LoReFT, d = 4096, r = 4, bf16; floor = 5 N d bytes at the "
                  f"measured bandwidth; microseconds per call):\n\n{head}\n\nAll rows:\n")
    notes += f"\nSuite time: {time.time() - t0:.0f} s ({len(rows)} rows).\n"
    H.finish_suite("ops", rows, OP_COLUMNS, env, notes, skipped, a.out)
    if cuda and not a.quick:
        sn = small_n()
        print(H.write_results("ops_small_n", [sn], list(sn), env, "N=64: GPU time under CUDA-graph replay and "
                              "eager per-call times (same run).", out_dir).read_text())
        prof = profile_kernels()
        print(H.write_results("ops_profile", prof, ["type", "N", "kernel", "calls_per_step", "us_per_call"], env,
                              "GPU time per kernel of one fused forward+backward (torch.profiler), d = 4096, r = 4, "
                              "bf16.", out_dir).read_text())
    if cuda and a.tune:
        t = tune()
        print(H.write_results("ops_tune", t, ["N", "pass", "config", "us", "graph_us"], env,
                              "Launcher-level sweep: rows = row-resident kernels, tiles = tl.dot column blocks; "
                              "main = backward step 2.", out_dir).read_text())
    print(f"  ops: suite done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
