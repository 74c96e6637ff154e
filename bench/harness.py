"""Timing and reporting shared by the benchmark suites.

Method (the device tool's METHOD.md): warm up first; time GPU work with CUDA events; report medians of
many repeats; rotate inputs so a small case does not run out of L2; measure the copy bandwidth in the
same run and give every figure beside its floor (bytes over that bandwidth, and launches).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_per_call_us(fn: Callable[[], object], *, reps: int = 30, warmup: int = 5, calls: int = 1) -> float:
    """Median over `reps` of (time for `calls` back-to-back calls) / calls, in microseconds. CUDA events
    on a GPU, perf_counter with a synchronize otherwise. calls > 1 measures the host-bound per-call
    cost of small ops (the GPU never waits for the host only when the host is faster)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / calls)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - t) * 1e6 / calls)
    return statistics.median(out)


def graph_replay_us(fn: Callable[[], object], *, copies: int = 20, reps: int = 20) -> float:
    """GPU time per call with the host out of the way: `copies` calls captured in one CUDA graph,
    replayed `reps` times; median per-call time."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(copies):
            fn()
    g.replay()
    sync()
    return time_per_call_us(g.replay, reps=reps, warmup=2) / copies


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the METHOD.md convention)."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    us = time_per_call_us(lambda: b.copy_(a), reps=20, warmup=3)
    del a, b
    torch.cuda.empty_cache()
    return nbytes / (us * 1e-6) / 1e9


class _Source(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, holder):
        # holder is a list so the tensor is not an input: returning an input (or a view of one) from a
        # custom Function makes autograd forbid the in-place edit that follows
        return holder[0].detach()

    @staticmethod
    def backward(ctx, grad):
        return None, None


_ANCHORS: dict = {}


def as_nonleaf(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (same storage) as a non-leaf that requires grad, at no kernel cost. The fused ops edit
    in place, which autograd forbids on leaves; producing the non-leaf with a real op (h * 1) would add
    that op's time, and its backward's, to every provider. The gradient stops at this node, whose
    anchor lives on the tensor's device (a CPU node would add the autograd engine's thread hop)."""
    anchor = _ANCHORS.get(tensor.device)
    if anchor is None:
        anchor = _ANCHORS[tensor.device] = torch.zeros((), device=tensor.device, requires_grad=True)
    return _Source.apply(anchor, [tensor])


# ------------------------------------------------------------------------------------------------
# environment and results
# ------------------------------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def device_slug() -> str:
    name = device_name().lower()
    for token in ("h200", "h100", "a100", "l40s", "l4", "a10g", "rtx 4090"):
        if token in name:
            return token.replace(" ", "")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = "not installed"
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        if dirty:
            env["commit"] += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = os.environ.get("REFT_KERNELS_COMMIT", "unknown")
    return env


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(suite: str, rows: Sequence[dict], columns: Sequence[str], env: dict, notes: str = "",
                  out_dir: Path | None = None) -> Path:
    """bench/results/<device>/<suite>.{md,csv,json}; returns the markdown path."""
    out_dir = out_dir or RESULTS / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    md = f"# {suite}\n\n{header}\n\n{notes.strip()}\n\n{markdown_table(rows, columns)}\n"
    (out_dir / f"{suite}.md").write_text(md)
    with open(out_dir / f"{suite}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out_dir / f"{suite}.json").write_text(json.dumps({"env": env, "rows": list(rows)}, indent=1, default=str))
    return out_dir / f"{suite}.md"
