"""Op suite: the LoReFT edit alone, fused Triton kernels vs naive PyTorch (our torch backend) vs pyreft.

Setting (issue 2): d = 4096, r = 4, bf16 hidden, fp32 parameters, N = B * P edited rows with P = 16
positions per batch row and every row of hidden edited (T = P), so the floor is exactly the edited rows.
Providers:
- fused: reft_kernels.loreft(backend="triton"), keeping a copy of the edited rows for the backward
- fused-recompute: the same with recompute=True (the backward rebuilds the rows from the output)
- torch: reft_kernels.loreft(backend="torch"), the plain-PyTorch reference (gather, math, index_put_)
- pyreft: pyreft.LoreftIntervention on the gathered [N, 1, d] rows, as ../shared/tools/anchor_bench.py
  times it (no gather or scatter, but its orthogonalization runs on every call); only when importable
Floors, at the copy bandwidth measured in this run:
- issue floor: 2 N d bytes-per-element forward, 5 N d forward+backward (read and write the rows; read
  the gradient and the rows, write the gradient)
- design floor: what our kernels must move: forward 2 N d (3 with the saved copy, when a gradient is
  needed); backward 4 N d (the gradient is read twice: d_delta = L g first). Launches: forward 1,
  backward 3.
"""
from __future__ import annotations

import argparse
import math

import torch

import reft_kernels as rk
from reft_kernels.ops import fused_edit as fe

from . import harness as H

L2_BYTES = 50 << 20  # H100: 50 MB; inputs rotate over at least 4x this


class Case:
    """Rotating input buffers and parameters for one N."""

    def __init__(self, N, d, r, dtype, device, P=16):
        self.N, self.d, self.r, self.P = N, d, r, P
        B = max(1, N // P)
        self.B, self.T = B, P
        el = torch.finfo(dtype).bits // 8
        size = B * self.T * d * el
        self.copies = max(1, min(256, math.ceil(4 * L2_BYTES / size))) if device == "cuda" else 1
        gen = torch.Generator(device=device).manual_seed(0)
        self.hidden = [torch.randn(B, self.T, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.grads = [torch.randn(B, self.T, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.positions = torch.arange(P, device=device).repeat(B, 1)
        q, _ = torch.linalg.qr(torch.randn(d, r, device=device, generator=gen))
        self.R = q.t().contiguous().requires_grad_(True)
        # a contractive W (spectral norm about 0.5) keeps repeated in-place edits of the same buffers bounded
        self.W = (torch.randn(r, d, device=device, generator=gen) * 0.5 / math.sqrt(d)).requires_grad_(True)
        self.b = (0.1 * torch.randn(r, device=device, generator=gen)).requires_grad_(True)
        self.k = 0
        self.rows_bytes = N * d * el

    def next(self):
        self.k = (self.k + 1) % self.copies
        return self.hidden[self.k], self.grads[self.k]

    def clear_grads(self):
        self.R.grad = self.W.grad = self.b.grad = None

    def check_finite(self):
        for h in self.hidden:
            assert torch.isfinite(h).all(), "benchmark data blew up: timings on inf/NaN are not valid"


def _fused(case, backend, recompute=False):
    def fwd():
        h, _ = case.next()
        with torch.no_grad():
            rk.loreft(h, case.positions, case.R, case.W, case.b, backend=backend)

    def fwd_bwd():
        h, g = case.next()
        x = H.as_nonleaf(h)
        out = rk.loreft(x, case.positions, case.R, case.W, case.b, backend=backend, recompute=recompute)
        out.backward(g)
        case.clear_grads()

    return fwd, fwd_bwd


def _pyreft_fns(case, cls, dtype):
    iv = cls(embed_dim=case.d, low_rank_dimension=case.r, dtype=dtype).to(case.hidden[0].device)
    rows = [h.reshape(case.N, 1, case.d)[: case.N] for h in case.hidden]
    grads = [g.reshape(case.N, 1, case.d)[: case.N] for g in case.grads]
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

    return fwd, fwd_bwd


def run(ns=(64, 1024, 16384, 131072), d=4096, r=4, dtype=torch.bfloat16, providers=None, reps=30, progress=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dtype = torch.float32  # bf16 matmuls on CPU time the dtype emulation, not the op
    providers = providers or (["fused", "fused-recompute", "torch", "pyreft"] if device == "cuda" else ["torch"])
    pyreft_cls = getattr(H.import_pyreft()[0], "LoreftIntervention", None) if "pyreft" in providers else None
    bw = H.copy_bandwidth_gbps() if device == "cuda" else float("nan")
    rows = []
    for N in ns:
        case = Case(N, d, r, dtype, device)
        row = {"N": N, "B": case.B, "P": case.P}
        floor_us = lambda moves: moves * case.rows_bytes / (bw * 1e9) * 1e6  # noqa: E731
        row["issue_floor_fwd_us"] = floor_us(2)
        row["issue_floor_fwdbwd_us"] = floor_us(5)
        row["design_floor_fwdbwd_us"] = floor_us(7)
        row["design_floor_fwdbwd_recompute_us"] = floor_us(6)
        for prov in providers:
            if progress:
                progress(f"N={N} {prov}")
            if prov == "pyreft":
                if pyreft_cls is None:
                    continue
                fwd, fb = _pyreft_fns(case, pyreft_cls, dtype)
            else:
                fwd, fb = _fused(case, "torch" if prov == "torch" else "triton", recompute=prov == "fused-recompute")
            n_reps = reps if N <= 16384 else max(10, reps // 2)
            if prov != "fused-recompute":  # the forward without gradient is the same kernel as "fused"
                row[f"{prov}_fwd_us"] = H.time_per_call_us(fwd, reps=n_reps)
            row[f"{prov}_fwdbwd_us"] = H.time_per_call_us(fb, reps=n_reps)
        case.check_finite()
        for prov in ("fused", "fused-recompute"):
            if f"{prov}_fwdbwd_us" in row:
                row[f"{prov}_fwdbwd_over_issue_floor"] = row[f"{prov}_fwdbwd_us"] / row["issue_floor_fwdbwd_us"]
        if "fused_fwd_us" in row:
            row["fused_fwd_over_floor"] = row["fused_fwd_us"] / row["issue_floor_fwd_us"]
        rows.append(row)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, bw


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
    for name, fn in timings.items():
        res[name] = H.time_per_call_us(fn, reps=7, warmup=20, calls=calls if "bwd" not in name else 50)
    res["eager_fwd_over_torch_add"] = res["eager_fused_fwd_us"] / res["eager_torch_add_us"]
    case.check_finite()
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
        case.check_finite()
        del case, saved, stats
        torch.cuda.empty_cache()
    return out


def profile_kernels(ns=(64, 131072), d=4096, r=4, dtype=torch.bfloat16):
    """GPU time per kernel (torch.profiler) of one fused forward+backward, default configuration."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for N in ns:
        case = Case(N, d, r, dtype, "cuda")
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
                rows.append({"N": N, "kernel": ev.key[:60], "calls_per_step": ev.count // reps, "us_per_call": us})
        del case
        torch.cuda.empty_cache()
    return rows


OP_COLUMNS = [
    "N", "fused_fwd_us", "torch_fwd_us", "pyreft_fwd_us", "issue_floor_fwd_us", "fused_fwd_over_floor",
    "fused_fwdbwd_us", "fused-recompute_fwdbwd_us", "torch_fwdbwd_us", "pyreft_fwdbwd_us",
    "issue_floor_fwdbwd_us", "design_floor_fwdbwd_us", "design_floor_fwdbwd_recompute_us",
    "fused_fwdbwd_over_issue_floor", "fused-recompute_fwdbwd_over_issue_floor",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--tune", action="store_true", help="also sweep block shapes (GPU)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    a = ap.parse_args(argv)
    from pathlib import Path

    out_dir = Path(a.out) if a.out else None
    env = H.environment()
    cuda = torch.cuda.is_available()
    ns = a.n or ((64, 1024, 16384, 131072) if cuda else (64, 1024, 16384))
    rows, bw = run(ns, progress=lambda s: print(f"  ops: {s}", flush=True))
    env["copy_bandwidth_GBps"] = f"{bw:.0f}" if cuda else "n/a (CPU)"
    notes = __doc__.split("\n", 1)[1]
    if not cuda:
        notes += "\nCPU run: fp32, torch provider only. GPU figures (fused kernels, floors) need a GPU.\n"
    print(H.write_results("ops", rows, OP_COLUMNS, env, notes, out_dir).read_text())
    if cuda:
        sn = small_n()
        cols = list(sn)
        print(H.write_results("ops_small_n", [sn], cols, env, "N=64: GPU time under CUDA-graph replay and eager per-call times (same run).", out_dir).read_text())
        prof = profile_kernels()
        print(H.write_results("ops_profile", prof, ["N", "kernel", "calls_per_step", "us_per_call"], env,
                              "GPU time per kernel of one fused forward+backward (torch.profiler).", out_dir).read_text())
        if a.tune:
            t = tune()
            print(H.write_results("ops_tune", t, ["N", "pass", "config", "us", "graph_us"], env,
                                  "Launcher-level sweep: rows = row-resident kernels, tiles = tl.dot column blocks; "
                                  "main = backward step 2.", out_dir).read_text())


if __name__ == "__main__":
    main()
