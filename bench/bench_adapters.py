"""Adapters suite: mixed-adapter batches (issue 15), the mixed op against a Python loop over adapters and plain torch.

Setting: the flat (server) layout, hidden [N, d] with every row edited (so the floor is exactly the edited rows
plus the bank), rows sorted by request as a server's batch is: A adapters, N / A consecutive rows each, ids
[N]; rows_unique=True (a server's rows are unique by construction). LoReFT, r = 4, d = 4096, parameters
fp32 (the math runs in fp32 whatever the hidden dtype); hidden fp32 on a CPU, bf16 on a GPU. A = 1, 8, 64,
512 distinct adapters, N = 1024 and 16384 edited rows. Random inputs and parameters, never zeros.

Providers (the same run measures all of them on the same buffers):
- mixed: reft_kernels.mixed_reft_edit_flat, one call whatever A is (cpp on a CPU, triton on a GPU).
- loop: a Python loop over the adapters calling today's single-adapter op (reft_kernels.reft_edit) on each
  adapter's rows, what the PreFT fork does. Each adapter's row indices and parameter tensors are prepared
  outside the timed region (in its favour: a real loop also finds each adapter's rows every batch).
- torch: mixed_reft_edit_flat(backend="torch"): plain torch, gather each row's parameters ([N, r, d]), batched
  matmuls, scatter back (index_put_), with the host sync of its nonzero().
- single (A = 1 only): today's single-adapter op on the same rows, the issue's A = 1 goal (mixed within 1.1x).
- mixed-per-type (the "six types" rows): the other design for different types at one site, one call per type
  present, each on its own type's rows (prepared outside the timed region), against mixed's one call with
  per-adapter runtime flags.

Modes: fwd (no gradient: serving) and fwd+bwd (several adapters trained in one batch: forward with gradient,
then backward). For fwd+bwd the mixed and torch providers take a bank whose stacked tensors are the leaves
that receive the gradients (a trainer holding its adapters stacked), the loop each adapter's own tensors.

Floor (floor_MB, floor_us at the copy bandwidth measured in this run; R = N d x hidden bytes per element, p =
the bank slices the batch touches: each touched adapter's lift and weight, r x d fp32 each, and bias):
- fwd: read and write the rows, read the slices: 2 R + p (at A = 512 the slices, 64 MB, outweigh 1024 rows)
- fwd+bwd: the forward, then read the incoming gradient and the original rows and write the hidden gradient
  (3 R), read the slices again and write their gradients (2 p): 5 R + 3 p.
mixed_calls, loop_calls: the op calls (CPU: reft_kernels_cpp ops, counted with the profiler) or kernel launches
(GPU: counted by wrapping the Triton kernels) of one forward.

Method: every (provider, mode) of a case is timed in each of `rounds` rounds after a warm-up round, the
order rotating from round to round (harness.interleaved: drift and other load land on every provider
alike); medians of the pooled calls (CUDA events on a GPU, perf_counter on a CPU, one torch thread there as
in the other suites), mixed_spread_pct the interquartile range of mixed's calls over their median (a
difference smaller than that is noise); on a GPU the hidden buffers rotate over more than 4x the L2 cache.
On a CPU the loop's backward is not timed where its A calls would copy more than 16 GB of hidden gradient,
nor torch's backward at N = 16384 (the skipped list below says which).
Ratios: mixed_over_floor, loop_over_mixed and torch_over_mixed (how many times faster the mixed op is),
mixed_over_single (A = 1), mixed-per-type_over_mixed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import reft_kernels as rk
from reft_kernels.ops import fused_edit as fe
from reft_kernels.ops import mixed_edit as me

from . import harness as H
from .bench_ops import count_launches

L2_BYTES = 50 << 20  # H100; the device's own figure when torch reports it
TYPES6 = {  # the six types as (source_linear, subtract_proj), in reft_edit's terms
    "loreft": (True, True), "noreft": (True, True), "consreft": (False, True), "lobireft": (False, False),
    "direft": (True, False), "orthodireft": (True, False),
}


def _l2_bytes():
    if torch.cuda.is_available():
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or L2_BYTES
    return L2_BYTES


def cpu_copy_bandwidth_gbps(nbytes=256 << 20):
    """Bytes read plus written per second of a 256 MB CPU copy (the GPU figure is the harness's)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8).random_()
    b = torch.empty_like(a)
    us = H.time_per_call_us(lambda: b.copy_(a), reps=7, warmup=2)
    return nbytes / (us * 1e-6) / 1e9


class Case:
    """Rotating hidden buffers and one adapter per request for (A, N, d, r, dtype, bank kind)."""

    def __init__(self, A, N, d, r, dtype, device, types="loreft"):
        self.A, self.N, self.d, self.r, self.dtype, self.types = A, N, d, r, dtype, types
        self.el = torch.finfo(dtype).bits // 8
        rows_bytes = N * d * self.el
        self.copies = max(1, min(64, math.ceil(4 * _l2_bytes() / rows_bytes) + 1)) if device == "cuda" else 1
        gen = torch.Generator(device=device).manual_seed(0)
        self.hidden = [torch.randn(N, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.grads = [torch.randn(N, d, device=device, dtype=dtype, generator=gen) for _ in range(self.copies)]
        self.rows = torch.arange(N, device=device)
        per = N // A
        self.ids = torch.arange(A, device=device).repeat_interleave(per)
        self.adapters = []
        kinds = list(TYPES6) if types == "six" else ["loreft"]
        for a in range(A):
            kind = kinds[a % len(kinds)]
            sl, sp = TYPES6[kind]
            q, _ = torch.linalg.qr(torch.randn(d, r, device=device, generator=gen))
            q = q.t().contiguous()
            noise = 0.1 / math.sqrt(d) * torch.randn(r, d, device=device, generator=gen)
            # bounded under hundreds of in-place edits of the same buffers (bench_ops' choice): with a
            # subtraction the edit contracts the subspace it writes; without one W L^T ~ -0.4 I does
            W = torch.randn(r, d, device=device, generator=gen) * 0.5 / math.sqrt(d) if sp else -0.5 * q + noise
            lift = q if kind in ("loreft", "consreft", "lobireft", "orthodireft") else 0.8 * q + noise
            b = (0.01 if kind == "lobireft" else 0.1) * torch.randn(r, device=device, generator=gen)
            self.adapters.append(rk.AdapterParams(lift.requires_grad_(True), W.requires_grad_(True) if sl else None,
                                                  b.requires_grad_(True), None,
                                                  fe.EditSpec(sl, sp, "identity")))
        with torch.no_grad():
            self.bank = rk.stack_adapters([rk.AdapterParams(p.lift.detach(), None if p.weight is None else p.weight.detach(),
                                                            p.bias.detach(), None, p.spec) for p in self.adapters])
        # the loop's per-adapter rows (prepared outside the timed region)
        self.adapter_rows = [self.rows[a * per:(a + 1) * per][None] for a in range(A)]
        # the per-type calls' rows and ids
        self.type_calls = []
        for kind in kinds:
            sel = torch.tensor([a for a in range(A) if kinds[a % len(kinds)] == kind], device=device)
            mask = torch.isin(self.ids, sel)
            self.type_calls.append((self.rows[mask], self.ids[mask]))
        self.k = 0
        self.rows_bytes = rows_bytes
        self.banks = []  # training banks handed out (their gradients are cleared with the adapters')

    def next(self):
        self.k = (self.k + 1) % self.copies
        return self.hidden[self.k], self.grads[self.k]

    def slice_bytes(self):
        """The bank slices the batch touches (every adapter here): lift, weight and bias, fp32."""
        return sum((p.lift.numel() + (p.weight.numel() if p.weight is not None else 0) + p.bias.numel()) * 4
                   for p in self.adapters)

    def floor_bytes(self, mode):
        R, p = self.rows_bytes, self.slice_bytes()
        return 2 * R + p if mode == "fwd" else 5 * R + 3 * p

    def train_bank(self):
        """The bank as a trainer holding it stacked would: leaf tensors that take the gradients (the loop's
        gradients land in each adapter's own tensors)."""
        bank = rk.stack_adapters(self.adapters)
        for t in bank.tensors():
            if t is not None:
                t.detach_().requires_grad_(True)
        return bank

    def clear_grads(self):
        for p in self.adapters:
            for t in (p.lift, p.weight, p.bias):
                if t is not None:
                    t.grad = None
        for bank in self.banks:
            for t in bank.tensors():
                if t is not None:
                    t.grad = None

    def check_data(self):
        H.check_bench_data(self.hidden)


def providers(case: Case, fused: str):
    """{provider: {mode: fn}}; fns take no arguments and run one call on the next buffer."""
    out = {}

    def mixed_call(h, bank, backend=fused, rows=None, ids=None):
        return rk.mixed_reft_edit_flat(h, case.rows if rows is None else rows, case.ids if ids is None else ids, bank,
                                       rows_unique=True, backend=backend)

    def modes(call, batched=False):
        """fwd and fwd+bwd of call(h, bank_for_training_or_None); batched: h as [1, N, d] (the single-adapter op's
        layout; a view made before the tensor joins the graph, since in-place edits of a view make autograd
        clone the whole gradient once per edit in the backward)."""
        state = {}

        def fwd():
            h, _ = case.next()
            with torch.no_grad():
                call(h.view(1, case.N, case.d) if batched else h, None)

        def fwd_bwd():
            h, g = case.next()
            bank = state.get("bank")
            if bank is None:
                bank = state["bank"] = case.train_bank()
                case.banks.append(bank)
            if batched:
                h, g = h.view(1, case.N, case.d), g.view(1, case.N, case.d)
            call(H.as_nonleaf(h), bank).backward(g)
            case.clear_grads()

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}

    out["mixed"] = modes(lambda h, bank: mixed_call(h, case.bank if bank is None else bank))
    out["torch"] = modes(lambda h, bank: mixed_call(h, case.bank if bank is None else bank, backend="torch"))

    def loop(x, bank):
        for a, p in enumerate(case.adapters):
            if bank is None:
                lift, w, b = p.lift.detach(), None if p.weight is None else p.weight.detach(), p.bias.detach()
            else:
                lift, w, b = p.lift, p.weight, p.bias
            x = rk.reft_edit(x, case.adapter_rows[a], lift, w, b, source_linear=p.spec.source_linear,
                             subtract_proj=p.spec.subtract_proj, backend=fused)
        return x

    out["loop"] = modes(loop, batched=True)
    if case.A == 1:
        out["single"] = out["loop"]  # the loop over one adapter is one call of today's op
    if case.types == "six":
        def per_type(h, bank):
            for rows, ids in case.type_calls:
                h = mixed_call(h, case.bank if bank is None else bank, rows=rows, ids=ids)
            return h

        out["mixed-per-type"] = modes(per_type)
    return out


def count_calls(fn, fused: str) -> int:
    """The op calls (cpp: reft_kernels_cpp ops, from the profiler's record of dispatched ops) or Triton kernel
    launches (triton: the kernels of fused_edit and mixed_edit wrapped while fn runs once)."""
    if fused == "triton":
        with count_launches(fe, me) as counter:
            fn()
            H.sync()
        return counter[0]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    # an op's public entry (its Autograd or CPU kernel) is recorded once per call; nested entries too
    return sum(1 for n in names if n.startswith("reft_kernels_cpp::") and n.split("::")[1] in ("edit", "mixed_edit"))


# On a CPU the loop's backward is skipped where its A calls would copy more than this many bytes of hidden
# gradient: each call of today's op writes a whole new hidden gradient (the rows it does not edit copied
# through), so a loop over A adapters copies A x N x d elements (at A = 512, N = 16384: 128 GB, 178 s a step
# in a one-off run of this suite).
LOOP_BWD_BYTES_CPU = 16 << 30


def skip_reason(case: Case, name: str, mode: str, cuda: bool) -> str:
    """Why (provider, mode) is not timed in this case on this device, or ""."""
    if cuda or mode != "fwd+bwd":
        return ""
    if name == "torch" and case.N * case.d >= 16384 * 4096:
        return "seconds a call on a CPU, and 2 GB of gathered parameters"
    if name == "loop" and case.A * case.rows_bytes > LOOP_BWD_BYTES_CPU:
        return f"its {case.A} backward calls copy {case.A * case.rows_bytes / 2**30:.0f} GB of hidden gradient"
    return ""


def calls_per_round(case: Case, name: str, mode: str, cuda: bool) -> int:
    if cuda:
        return 10
    if name == "torch" or (name == "loop" and mode == "fwd+bwd" and case.A >= 64):
        return 1  # seconds a call
    return 3 if case.N * case.d >= 16384 * 4096 else 5


def measure(case: Case, fused: str, modes, rounds, names, skipped: dict):
    """Rows (one per mode) for one case. Every (provider, mode) is timed in each of `rounds` rounds (after a
    warm-up round), the order rotating from round to round (harness.interleaved), so that drift and other load
    on the machine land on all providers alike; medians of the pooled calls, and their spread for mixed."""
    fns = providers(case, fused)
    cuda = case.hidden[0].is_cuda
    blocks = {}
    for mode in modes:
        for name in names:
            if name not in fns:
                continue
            why = skip_reason(case, name, mode, cuda)
            if why:
                skipped[f"{name} {mode} A={case.A} N={case.N}"] = why
                continue
            fn, k = fns[name][mode], calls_per_round(case, name, mode, cuda)

            def block(fn=fn, k=k):
                samples = [H.time_per_call_us(fn, reps=1, warmup=0) for _ in range(k)]
                case.clear_grads()
                return {"us": samples}

            blocks[f"{name}|{mode}"] = block
    res = H.interleaved(blocks, rounds, warm_rounds=1)
    rows = []
    for mode in modes:
        row = {"bank": "six types" if case.types == "six" else "loreft", "A": case.A, "N": case.N, "d": case.d,
               "r": case.r, "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[case.dtype], "mode": mode}
        for name in names:
            got = res.get(f"{name}|{mode}", {}).get("us")
            if got:
                row[f"{name}_us"] = statistics.median(got)
                if name == "mixed":
                    row["mixed_spread_pct"] = H.spread_pct(got)
            if name in ("mixed", "loop") and mode == "fwd" and name in fns:
                row[f"{name}_calls"] = count_calls(fns[name][mode], fused)
        row["floor_MB"] = case.floor_bytes(mode) / 1e6  # (floor_us: main, once the bandwidth is known)
        m = row.get("mixed_us")
        if m:
            for other in ("loop", "torch", "mixed-per-type"):
                if f"{other}_us" in row:
                    row[f"{other}_over_mixed"] = row[f"{other}_us"] / m
            if "single_us" in row:
                row["mixed_over_single"] = m / row["single_us"]
        rows.append(row)
    case.check_data()
    return rows


COLUMNS = ["bank", "A", "N", "d", "r", "dtype", "mode", "mixed_us", "loop_us", "torch_us", "single_us", "mixed-per-type_us",
           "mixed_spread_pct", "floor_MB", "floor_us", "mixed_calls", "loop_calls", "mixed_over_floor", "loop_over_mixed", "torch_over_mixed", "mixed_over_single",
           "mixed-per-type_over_mixed"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--A", type=int, nargs="*", default=[1, 8, 64, 512], help="distinct adapters per batch")
    ap.add_argument("--n", type=int, nargs="*", default=[1024, 16384], help="edited rows N (multiples of A)")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up one (default 3 GPU, 2 CPU)")
    ap.add_argument("--no-types", action="store_true", help="skip the six-types rows (one call vs one per type)")
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")
    a = ap.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    fused = "triton" if cuda else "cpp"
    skipped = {}
    if not cuda and not rk.extension.available():
        return print(f"  adapters: skipped, the C++ extension is unavailable ({rk.extension.load()[1]})")
    env = H.environment()
    rounds = a.rounds or (3 if cuda else 2)
    out = []
    bandwidth = H.copy_bandwidth_gbps if cuda else cpu_copy_bandwidth_gbps
    with H.cpu_threads(1):
        bw0 = bandwidth()
        cases = [("loreft", A, N) for N in a.n for A in a.A if N % A == 0]
        if not a.no_types:
            cases += [("six", 60, N) for N in a.n]  # 10 adapters of each type
        for kind, A, N in H.progress(cases, "adapters case", label=lambda c: f"{c[0]} A={c[1]} N={c[2]}"):
            n_eff = N - N % A
            case = Case(A, n_eff, a.d, a.r, dtype, device, types=kind)
            names = ["mixed", "loop", "torch", "single"] if kind == "loreft" else ["mixed", "mixed-per-type"]
            out += measure(case, fused, a.modes, rounds, names, skipped)
            del case
            if cuda:
                torch.cuda.empty_cache()
        # the floor at the higher of two bandwidth measurements (start and end of the run): other load on the
        # machine lowers a measurement, and a low one would flatter the ratios
        bw1 = bandwidth()
    bw = max(bw0, bw1)
    for row in out:
        row["floor_us"] = row["floor_MB"] * 1e6 / (bw * 1e9) * 1e6
        if "mixed_us" in row:
            row["mixed_over_floor"] = row["mixed_us"] / row["floor_us"]
    env["copy_bandwidth_GBps"] = (f"{bw:.1f} (the higher of {bw0:.1f} at the start and {bw1:.1f} at the end)" +
                                  ("" if cuda else "; CPU, 256 MB copy"))
    notes = __doc__.split("\n", 1)[1]
    if not cuda:
        notes += ("\nCPU run: fused = the C++ CPU kernels (backend cpp), fp32 rows, one torch thread. The Triton "
                  "kernels' figures (and the issue's GPU goal: within 1.3x of the floor at every A) need a GPU: this "
                  "suite produces them there (bf16 rows).\n")
    notes += f"\nSuite time: {time.time() - t0:.0f} s ({len(out)} rows).\n"
    H.finish_suite("adapters", out, COLUMNS, env, notes, skipped, a.out)
    print(f"  adapters: suite done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
