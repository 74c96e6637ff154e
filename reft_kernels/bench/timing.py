"""Timing and memory measurement shared by `reft-kernels bench` and the repository's suites (bench/).

Method: warm up first (compilation, autotuning, caches and allocator growth stay out of the figures);
on a GPU, synchronize before reading the clock and after the work (wall_ms), or time with CUDA events
(time_per_call_us); report medians of many repeats with their spread; run the providers of one
comparison interleaved, rotating their order every round (interleaved), so slow drift lands on all of
them alike. On a CPU, say how many threads torch used (cpu_threads sets it).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Callable, Sequence

import torch


def sync() -> None:
    """Waits for the GPU (no-op without one), so that a clock read after it counts the GPU's work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], object]) -> float:
    """Milliseconds for one call of fn, host included (a training step or a generate call is what a user
    waits for): synchronize, read the clock, call, synchronize, read it again."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


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


def spread_pct(samples: Sequence[float]) -> float:
    """Interquartile range over the median, in percent: how far apart repeats of one provider land. A
    difference between providers smaller than this is noise. NaN with fewer than 2 samples."""
    if len(samples) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return 100.0 * (q3 - q1) / statistics.median(samples)


def interleaved(blocks: dict, rounds: int, *, warm_rounds: int = 1, progress: Callable[[str], None] | None = None,
                label: str = "") -> dict:
    """Runs each provider's measurement block once per round, rotating the order by one provider each round
    (A B C, B C A, C A B, ...) so that slow drift (clocks, temperature, other load on the machine) lands
    on every provider alike and none always runs first.

    blocks: {provider name: fn() -> {key: [samples]}}; each call builds what it needs, measures, and
    tears down (so providers that hook the same base model never see each other's hooks).
    The first `warm_rounds` rounds are run and thrown away (kernel compilation, autotuning, allocator
    growth). Returns {provider name: {key: samples pooled over the kept rounds}}."""
    names = list(blocks)
    out: dict = {n: {} for n in names}
    total = warm_rounds + rounds
    for k in range(total):
        order = names[k % len(names):] + names[:k % len(names)] if names else []
        for name in order:
            got = blocks[name]()
            if k >= warm_rounds:
                for key, samples in got.items():
                    out[name].setdefault(key, []).extend(samples)
            if progress:
                key, first = next(iter(got.items()), ("", []))
                shown = f"{key} {statistics.median(first):.2f}" if first else "-"
                tag = "warm-up" if k < warm_rounds else f"{k - warm_rounds + 1}/{rounds}"
                progress(f"{label}round {tag} {name}: {shown}")
    return out


@contextlib.contextmanager
def cpu_threads(n: int | None = 1):
    """Runs the block with torch on `n` CPU threads when there is no GPU (restored after; None leaves
    torch's setting alone). On the 2-core CPU machine, two OpenMP threads collapse whenever anything else
    runs beside them (spinning threads wait on a descheduled partner): a tiny Llama's forward measured
    3.9 s on 2 threads against 0.09 s on 1, with two other processes busy. One thread keeps whole-model
    CPU runs short and their ratios sane."""
    if torch.cuda.is_available() or n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """torch.cuda.max_memory_allocated() since the last reset_peak_memory(), in GiB; NaN on a CPU, where
    torch keeps no such count (step_peak_mb measures a CPU step through the profiler instead)."""
    if not torch.cuda.is_available():
        return float("nan")
    return torch.cuda.max_memory_allocated() / 2**30


@contextlib.contextmanager
def quiet_profiler():
    """Keeps the profiler's own start and stop lines (kineto writes "USDT: ... profiler_start" to stderr at
    every session) off the terminal: stderr is sent to a file for the block and everything else in it is
    written back after."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not (ln.startswith("USDT:") and "ProfilerHandler" in ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def step_peak_mb(fn: Callable[[], object], device) -> float:
    """The most tensor memory allocated at once during one call of fn, above what was allocated before
    it, in MiB (activations, gradients, temporaries; optimizer state only if this call creates it). CUDA:
    the caching allocator's statistics. CPU: the allocation and free events of torch.profiler
    (profile_memory=True), summed in time order; torch keeps no CPU allocator statistics, and the
    process's RSS would mix in the allocator's cache and everything else the process holds."""
    device = torch.device(device)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation and free as it happened (FunctionEvent folds them into the op that made them)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak / 2**20


def hook_count(model: torch.nn.Module) -> int:
    """Forward, forward-pre and backward hooks registered on any submodule. Providers that hook a shared
    base model must leave this as they found it, or the next provider pays for their hooks."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------

_STDOUT = sys.stdout  # the real one: bars draw there while print() goes through tqdm.write


def progress(iterable, desc: str, *, total: int | None = None, label: Callable[[object], str] | None = None):
    """Yields the items of `iterable` with a progress bar (tqdm) on a terminal; elsewhere (a log, a pipe) one
    plain line per item: "<desc> k/n: <label(item)>". While a bar is up, print() goes through tqdm.write,
    so other lines scroll above the bar instead of breaking it. Bars nest (a suite's cases inside the
    main job's suites)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    tty = getattr(_STDOUT, "isatty", lambda: False)()
    bar_cls = None
    if tty:
        try:
            from tqdm import tqdm as bar_cls
            from tqdm.contrib import DummyTqdmFile
        except ImportError:
            bar_cls = None
    if bar_cls is None:
        for k, item in enumerate(iterable, 1):
            print(f"{desc} {k}/{total if total is not None else '?'}{': ' + label(item) if label else ''}", flush=True)
            yield item
        return
    nested = isinstance(sys.stdout, DummyTqdmFile)
    with contextlib.ExitStack() as stack:
        if not nested:
            stack.enter_context(contextlib.redirect_stdout(DummyTqdmFile(_STDOUT)))
        bar = stack.enter_context(bar_cls(iterable, desc=desc, total=total, file=_STDOUT, dynamic_ncols=True,
                                          leave=not nested))
        for item in bar:
            if label:
                bar.set_postfix_str(label(item))
            yield item
