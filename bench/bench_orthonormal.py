"""Orthonormalization suite: the cost of keeping R orthonormal, per training step, for L interventions.

One training step needs every R once forward and its gradient once backward. Timed here: that pair
alone (R from the parameters, then backward from given R gradients), at d = 4096, r = 4 unless given, for
L = 1, 2, 4, 8, 16, 32 and 64 interventions (pyreft's provider only up to L = 2 on a CPU).
Providers:
- ours: reft_kernels' default ("stereographic"), all L interventions together (orthonormal_batch): the
  batched premap (a few torch ops), two Triton launches forward, two backward plus the premap's and one
  stack of the R gradients, whatever L is (GPU only)
- ours-cholqr: the plain Cholesky-QR parametrization, batched: the two + two Triton launches alone
- ours-per-module: the default called once per intervention (what a loop without the batch costs)
- torch-cholqr: the plain map in torch.linalg (float64), batched: what "batched torch Cholesky-QR" costs
- pyreft: torch.nn.utils.parametrizations.orthogonal as pyreft uses it (Householder, a d x d buffer per
  intervention), read twice per intervention per step as LoreftIntervention.forward does
Floor: bytes = 2 L r d x 4 forward (read A, write R) + 3 L r d x 4 backward (read dR and R, write dA) at
the copy bandwidth measured in this run; launches: 4 (2 forward, 2 backward). The default's premap adds
reads of base and delta (2 L r d x 4 more) and its own launches.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import reft_kernels as rk
from reft_kernels.modules.orthonormal import Orthonormal, compute_batched

from . import harness as H


def _modules(L, d, r, parametrization, backend, device):
    torch.manual_seed(0)
    return [Orthonormal(d, r, parametrization=parametrization, device=device, backend=backend) for _ in range(L)]


def _step_fn(mods, grads, mode):
    """One step's orthonormalization: every R forward, then backward from `grads`."""
    if mode == "batched":
        def step():
            Rs = compute_batched(mods)
            torch.autograd.backward([Rs[id(m)] for m in mods], grads)
    elif mode == "per-module":
        def step():
            torch.autograd.backward([m.compute() for m in mods], grads)
    else:  # pyreft: R read twice per call (rotate_layer(base) and rotate_layer.weight.T)
        def step():
            Rs = [m.compute() for m in mods for _ in range(2)]
            torch.autograd.backward(Rs, [g for g in grads for _ in range(2)])
    return step


# L swept by default: 1 to 64 interventions (a model's layers, or layers x positions untied). On a CPU every
# L runs for the torch provider (milliseconds) and pyreft's only up to CPU_PYREFT_MAX_L: its Householder map
# at d = 4096 costs about 1 s per intervention per step there.
LS = (1, 2, 4, 8, 16, 32, 64)
CPU_PYREFT_MAX_L = 2


def _pyreft_fits(L, d, cuda, pyreft_max_L):
    if L * d * d * 4 > (8 << 30):  # its d x d buffers would not fit
        return False
    limit = pyreft_max_L if pyreft_max_L is not None else (None if cuda else CPU_PYREFT_MAX_L)
    return limit is None or L <= limit


def run(Ls=LS, d=4096, r=4, reps=50, progress=None, pyreft_max_L=None):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bw = H.copy_bandwidth_gbps() if cuda else float("nan")
    providers = [("ours", "stereographic", "triton", "batched"), ("ours-cholqr", "cholesky_qr", "triton", "batched"),
                 ("ours-per-module", "stereographic", "triton", "per-module"),
                 ("torch-cholqr", "cholesky_qr", "torch", "batched"), ("pyreft", "householder", None, "pyreft")]
    if not cuda:
        providers = [p for p in providers if p[2] != "triton"]
    rows = []
    for L in H.progress(Ls, "  orthonormal", label=lambda L: f"L = {L}"):
        row = {"L": L, "d": d, "r": r}
        for name, parametrization, backend, mode in providers:
            if name == "pyreft" and not _pyreft_fits(L, d, cuda, pyreft_max_L):
                continue
            mods = _modules(L, d, r, parametrization, backend, device)
            grads = [torch.randn(r, d, device=device) for _ in range(L)]
            step = _step_fn(mods, grads, mode)
            if name != "pyreft":
                n, warmup = reps, 3
            else:  # seconds per step on a CPU: few repeats
                n, warmup = (max(5, reps // 5), 3) if cuda else (3, 1)
            row[f"{name}_us"] = H.time_per_call_us(step, reps=n, warmup=warmup)
            for m in mods:
                m.zero_grad()
            Rs = compute_batched(mods)
            row[f"{name}_orth_err"] = max(rk.orthonormality_error(Rs[id(m)]) for m in mods)
            del mods, grads, step, Rs
            if progress:
                progress(f"L={L} {name}: {row[f'{name}_us']:.1f} us")
        floor_bytes = 5 * L * r * d * 4
        row["floor_us"] = floor_bytes / (bw * 1e3) if cuda else float("nan")
        row["floor_launches"] = 4
        for name, *_ in providers:
            if f"{name}_us" in row and name != "ours" and "ours_us" in row:
                row[f"{name}_over_ours"] = row[f"{name}_us"] / row["ours_us"]
        rows.append(row)
    return rows, bw


COLUMNS = ["L", "d", "r", "ours_us", "ours-cholqr_us", "ours-per-module_us", "torch-cholqr_us", "pyreft_us", "floor_us", "floor_launches",
           "ours-per-module_over_ours", "torch-cholqr_over_ours", "pyreft_over_ours", "ours_orth_err",
           "torch-cholqr_orth_err", "pyreft_orth_err"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="*", default=None, help=f"interventions (default {' '.join(map(str, LS))})")
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    Ls = a.L or LS
    env = H.environment()
    with H.cpu_threads(H.SUITE_THREADS):  # on a CPU: two threads collapse when anything else runs (harness.cpu_threads)
        rows, bw = run(Ls, reps=50 if cuda else 10, progress=lambda s: print(f"  orthonormal: {s}", flush=True))
    env["copy_bandwidth_GBps"] = f"{bw:.0f}" if cuda else "n/a (CPU)"
    notes = H.suite_notes(__doc__)
    notes += "\nTimes in microseconds per training step (median); *_orth_err = max |R R^T - I| after the step.\n"
    if not cuda:
        notes += (f"CPU run: one torch thread, torch providers only; the Triton figures and the floor need a GPU. "
                  f"pyreft up to L = {CPU_PYREFT_MAX_L} only (about 1 s per intervention per step here).\n")
    out = Path(a.out) if a.out else None
    print(H.write_results("orthonormal", rows, [c for c in COLUMNS if any(c in r for r in rows)], env, notes, out).read_text())


if __name__ == "__main__":
    main()
