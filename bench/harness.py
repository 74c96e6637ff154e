"""What the repository's suites share beyond the installed package's benchmark code.

The timing, measurement and reporting live in reft_kernels.bench (installed with the package, also behind
`reft-kernels bench`) and are re-exported here: clocks and medians, interleaved rounds, CPU threads, peak
memory, progress bars (timing.py), the environment header and tables (report.py), the Llama shapes
(models.py), pyreft's import (providers.py). This file adds what only the suites need: where results go
(bench/runs/<device>/<UTC time>-<commit>/, not tracked by git; reference results the README quotes are
copied to bench/reference/<device>-<commit>/ by hand), the plots (bench/plots.py), the copy bandwidth and
floors of the ops suites, and argument helpers.

Method (the device tool's METHOD.md): warm up first; time GPU work with CUDA events; report medians of
many repeats; rotate inputs so a small case does not run out of L2; measure the copy bandwidth in the
same run and give every figure beside its floor (bytes over that bandwidth, and launches).
"""
from __future__ import annotations

import datetime as _dt
import inspect
from pathlib import Path
from typing import Sequence

import torch

from reft_kernels.bench import report as _report
from reft_kernels.bench.models import DTYPES, LLAMA_SHAPES, llama, spread_layers  # noqa: F401
from reft_kernels.bench.providers import import_pyreft  # noqa: F401
from reft_kernels.bench.report import device_name, device_slug, markdown_table, optional_versions  # noqa: F401
from reft_kernels.bench.timing import (cpu_threads, graph_replay_us, hook_count, interleaved, peak_memory_gb,  # noqa: F401
                                       progress, reset_peak_memory, spread_pct, sync, time_per_call_us, wall_ms)

BENCH = Path(__file__).resolve().parent
RUNS = BENCH / "runs"  # one folder per run, ignored by git (.gitignore)
REFERENCE = BENCH / "reference"  # results the README quotes, tracked: <device>-<commit>/
SUITE_THREADS = 1  # every suite runs torch on one CPU thread (timing.cpu_threads says why)

_RUN_DIR: list = []


def run_dir() -> Path:
    """This process's results folder: bench/runs/<device>/<UTC date-time>-<commit>/ (created on first use,
    the same for every suite of one run), with bench/runs/<device>/latest pointing at it."""
    if not _RUN_DIR:
        commit = (_report.git_commit(BENCH) or "nocommit").replace("+", "-")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = RUNS / device_slug() / f"{stamp}-{commit}"
        path.mkdir(parents=True, exist_ok=True)
        latest = path.parent / "latest"
        try:
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(path.name)
        except OSError:
            pass  # a file system without symlinks: the folder name says which run is newest
        _RUN_DIR.append(path)
    return _RUN_DIR[0]


def environment() -> dict:
    """The results header (reft_kernels.bench.report.environment) for this checkout, with the suites' CPU
    thread count."""
    return _report.environment(checkout=BENCH, threads=SUITE_THREADS)


def suite_notes(doc: str) -> str:
    """A suite's docstring as the notes of its results (whole: a first sentence may run over two lines)."""
    return inspect.cleandoc(doc) + "\n"


# ------------------------------------------------------------------------------------------------
# floors of the op-level suites
# ------------------------------------------------------------------------------------------------


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
# arguments and results
# ------------------------------------------------------------------------------------------------


def check_bench_data(tensors) -> None:
    """The timed inputs are random data that stayed finite (timings on inf/NaN or on zeros are not valid)."""
    for h in tensors:
        assert torch.isfinite(h).all(), "benchmark data blew up: timings on inf/NaN are not valid"
        assert h.abs().amax() > 0, "benchmark data is all zeros"


def add_model_args(ap, what: str = "model dtype") -> None:
    """--dtype and --out, shared by the model-level suites (train_step, generate, pyreft_dropin)."""
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=f"{what} (default bf16 GPU, fp32 CPU)")
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")


def model_device(args) -> tuple[bool, str, torch.dtype]:
    """(cuda?, device, dtype) of a model-level suite: bf16 on a GPU, fp32 on a CPU, unless --dtype says."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    return cuda, device, DTYPES[args.dtype] if args.dtype else dtype


def cpu_run_note(env: dict, extra: str = "") -> str:
    """The line a model-level suite adds to its notes on a CPU run: what the edit ran on (the backend the
    run resolved, from env), the dtype and threads."""
    return (f"CPU run: {env.get('dtype', '')}, the edit on {env.get('edit_backend', '?')}, "
            f"{env.get('cpu_threads', SUITE_THREADS)} torch thread(s) (harness.cpu_threads); the model is tiny and "
            f"host-bound, so these figures check the suite, not a GPU's overheads.{' ' + extra if extra else ''}\n")


def finish_suite(suite: str, rows, columns, env: dict, notes: str, skipped: dict, out: str | None) -> None:
    """Appends the skipped providers to the notes, writes the results and prints the markdown."""
    for name, why in sorted(skipped.items()):
        notes += f"{name}: skipped ({why}).\n"
    print(write_results(suite, rows, columns, env, notes, Path(out) if out else None).read_text())


def write_results(suite: str, rows: Sequence[dict], columns: Sequence[str], env: dict, notes: str = "",
                  out_dir: Path | None = None) -> Path:
    """<out_dir or run_dir()>/<suite>.{md,csv,json} and the suite's PNGs (bench/plots.py; a failure to draw
    is a note line, never a failed suite); returns the markdown path."""
    from . import plots

    return _report.write_results(suite, rows, columns, env, notes, out_dir=Path(out_dir) if out_dir else run_dir(),
                                 plot=lambda r, e, d: plots.plot_results(suite, r, e, d))
