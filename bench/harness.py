"""Timing and reporting shared by the benchmark suites.

Method (the device tool's METHOD.md): warm up first; time GPU work with CUDA events; report medians of
many repeats; rotate inputs so a small case does not run out of L2; measure the copy bandwidth in the
same run and give every figure beside its floor (bytes over that bandwidth, and launches).
Whole-model suites (train_step, generate) also find here their Llama shapes, optional providers
(pyreft), wall-clock timing with peak memory, and the interleaved-repeats runner.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
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


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_model_args(ap, what: str = "model dtype") -> None:
    """--dtype and --out, shared by the model-level suites (train_step, generate, pyreft_dropin)."""
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=f"{what} (default bf16 GPU, fp32 CPU)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")


def model_device(args) -> tuple[bool, str, torch.dtype]:
    """(cuda?, device, dtype) of a model-level suite: bf16 on a GPU, fp32 on a CPU, unless --dtype says."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    return cuda, device, DTYPES[args.dtype] if args.dtype else dtype


def failure_reason(probe) -> str:
    """Runs probe(): "" when it works, else a one-line reason. For optional third-party providers (a pyreft
    or peft that does not run with these transformers is reported as skipped, not raised)."""
    import gc

    try:
        probe()
        return ""
    except Exception as e:  # noqa: BLE001 - reported, not raised
        why = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        return why.splitlines()[0][:160]
    finally:
        gc.collect()


def cpu_run_note(dtype: str, extra: str = "") -> str:
    """The line a model-level suite adds to its notes on a CPU run."""
    return (f"CPU run: {dtype}, the torch reference edit, one torch thread (harness.cpu_threads); not the "
            f"product's claim.{' ' + extra if extra else ''}\n")


def finish_suite(suite: str, rows, columns, env: dict, notes: str, skipped: dict, out: str | None) -> None:
    """Appends the skipped providers to the notes, writes the results and prints the markdown."""
    for name, why in sorted(skipped.items()):
        notes += f"{name}: skipped ({why}).\n"
    print(write_results(suite, rows, columns, env, notes, Path(out) if out else None).read_text())


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
    plotted = write_plots(suite, rows, env, out_dir)
    if plotted:
        with open(out_dir / f"{suite}.md", "a") as f:
            f.write(f"\n{plotted}\n")
    return out_dir / f"{suite}.md"


def write_plots(suite: str, rows: Sequence[dict], env: dict, out_dir: Path) -> str:
    """The suite's PNGs beside its results (bench/plots.py; suites without a plotter get none). Returns the
    markdown to append: the images, or a note line saying why there are none. Never raises: a plot must not
    fail a suite (matplotlib missing, odd rows)."""
    try:
        from . import plots

        paths = plots.plot_results(suite, rows, env, out_dir)
    except ImportError as e:
        return f"Plots: not drawn ({e}; they need matplotlib: pip install -e '.[bench]')."
    except Exception as e:  # noqa: BLE001 - reported in the results, never fatal
        return f"Plots: not drawn ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})."
    return "\n".join(f"![{p.stem}]({p.name})" for p in paths)


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------

_STDOUT = sys.stdout  # the real one: bars draw there while print() goes through tqdm.write


def progress(iterable, desc: str, *, total: int | None = None, label: Callable[[object], str] | None = None):
    """Yields the items of `iterable` with a progress bar (tqdm) on a terminal; elsewhere (a log, a pipe) one
    plain line per item: "<desc> k/n: <label(item)>". While a bar is up, print() goes through tqdm.write,
    so the suites' own lines scroll above the bar instead of breaking it. Bars nest (a suite's cases inside
    the main job's suites)."""
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


# ------------------------------------------------------------------------------------------------
# whole-model suites (train_step, generate): models, optional providers, interleaved repeats
# ------------------------------------------------------------------------------------------------

# Llama-shaped configs with random weights (no downloads), as ../shared/notes/anchors.md measures them.
# "tiny" is for CPU runs only: small enough that a suite finishes in seconds; its figures are not the
# product's claim (on a CPU the edit runs the torch reference, and the host dominates).
LLAMA_SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def llama(shape: str, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM of LLAMA_SHAPES[shape], random weights from `seed`, in `dtype` on `device`, eval
    mode, every parameter frozen. Built on the device in fp32 and then cast (what the anchor script
    does; a 7b shape is 27 GB for a moment on the GPU, freed before any measurement)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype).eval().requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def spread_layers(num_layers: int, count) -> list[int]:
    """`count` layers spread evenly from the first to the last (0, 5, 10, 15 of 16 for 4), or every layer
    for count "all" (or count >= num_layers). The first layer is always included, so every provider's
    backward reaches the same depth."""
    if count == "all" or int(count) >= num_layers:
        return list(range(num_layers))
    count = int(count)
    if count == 1:
        return [num_layers // 2]
    return [round(i * (num_layers - 1) / (count - 1)) for i in range(count)]


def import_pyreft():
    """(pyreft, "") when pyreft imports here, else (None, the reason). pyreft imports `datasets`, which the
    benchmarks never use: a stub stands in when it is missing. pyreft 0.1.0 pins transformers 4.45.1
    (scripts/gpu_check.sh puts it first on the path of the benchmark process when its wheels are carried)."""
    import importlib.machinery
    import sys
    import types

    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.Dataset = object
        stub.load_dataset = None
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        sys.modules["datasets"] = stub
    try:
        import pyreft

        return pyreft, ""
    except Exception as e:  # ImportError, or a version clash inside pyreft/pyvene
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]


def optional_versions(names: Sequence[str]) -> dict:
    """{name: version} of the optional packages a suite compares against ("not installed" if absent)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def wall_ms(fn: Callable[[], object]) -> float:
    """Milliseconds for one call of fn, host included (a training step or a generate call is what a user
    waits for): synchronize, read the clock, call, synchronize, read it again."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """torch.cuda.max_memory_allocated() since the last reset_peak_memory(), in GiB; NaN on a CPU, where
    torch keeps no such count (the process's RSS would mix in the allocator's cache and everything else
    the process holds, so it is not reported)."""
    if not torch.cuda.is_available():
        return float("nan")
    return torch.cuda.max_memory_allocated() / 2**30


def spread_pct(samples: Sequence[float]) -> float:
    """Interquartile range over the median, in percent: how far apart repeats of one provider land. A
    difference between providers smaller than this is noise."""
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
        order = names[k % len(names):] + names[:k % len(names)]
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
def cpu_threads(n: int = 1):
    """Runs the block with torch on `n` CPU threads when there is no GPU (restored after). On the 2-core
    CPU machine, two OpenMP threads collapse whenever anything else runs beside them (spinning threads
    wait on a descheduled partner): a tiny Llama's forward measured 3.9 s on 2 threads against 0.09 s on
    1, with two other processes busy. One thread keeps whole-model CPU runs short and their ratios sane."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hook_count(model: torch.nn.Module) -> int:
    """Forward, forward-pre and backward hooks registered on any submodule. Providers that hook a shared
    base model must leave this as they found it, or the next provider pays for their hooks."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
