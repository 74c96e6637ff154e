"""Where an adapter's time goes: one profiled pass (torch.profiler) of the reft_kernels provider, its time
split into the adapter's components.

The pass instruments the built adapter from outside (nothing in reft_kernels is changed for it, and the
timed passes run without any of it): record_function ranges around each intervention module's forward
(the edit), the batched and per-module computation of R (orthonormalization), the hook functions the
adapter registered on the base model (found by comparing the model's hooks before and after the build),
ReftModel's forward/generate and the base model's forward/generate inside it, and the optimizer step.
The backward of the edit and of the orthonormalization is found through autograd's sequence numbers:
the backward node of every op recorded inside those ranges.

Components (each one's time excludes the ones above it, so nothing is counted twice):
- orthonormalization: computing every R from its parameters, forward and backward
- edit: the interventions' forward (the fused op and its argument handling) and its backward
- hooks: the rest of the time inside the adapter's hook functions (finding the rows, the call state)
- ReftModel wrapper: the rest of ReftModel.forward/generate outside the base model (checking and
  placing the locations, opening the batched-R block)
- optimizer: AdamW's step and zero_grad over the adapter's parameters (training)
- rest of the step: the base model, the loss, autograd's own work (profiled step minus the above)
host_ms is CPU time on the threads that ran it; device_ms (GPU) the time of the kernels those ranges
launched. Each figure is the median over several profiled calls, one profiler session each. Profiling
adds its own cost to every recorded op, so the profiled step is slower than the timed
one: compare components with each other and with the timed overhead, not to the microsecond.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import nn
from torch.autograd.profiler import record_function

ORTH, EDIT, HOOKS, WRAPPER, OPTIMIZER = "orthonormalization", "edit", "hooks", "ReftModel wrapper", "optimizer"
COMPONENTS = (ORTH, EDIT, HOOKS, WRAPPER, OPTIMIZER)
REST, TOTAL = "rest of the step", "profiled step"
_LABEL = {ORTH: "rk.bench::orthonormalize", EDIT: "rk.bench::edit", HOOKS: "rk.bench::hook",
          "call": "rk.bench::reft_call", "base": "rk.bench::base_model", OPTIMIZER: "rk.bench::optimizer",
          "step": "rk.bench::step"}


def _ranged(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)  # keeps the signature: transformers inspects forward's parameters
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def hook_snapshot(model: nn.Module) -> dict:
    """{(module, dict name): set of hook ids} of the model's forward and forward-pre hooks."""
    return {(m, name): set(getattr(m, name)) for m in model.modules() for name in ("_forward_hooks", "_forward_pre_hooks")}


@contextlib.contextmanager
def instrumented(built, model: nn.Module, hooks_before: dict):
    """Adds the record_function ranges (module docstring) to a built reft_kernels provider; undone after."""
    from ..modules import orthonormal as orth_module

    undo = []

    def patch(obj, attr, label, *, instance=True):
        had = attr in vars(obj) if instance else True
        old = getattr(obj, attr)
        setattr(obj, attr, _ranged(old, label))
        undo.append((lambda o=obj, a=attr, v=old, h=had: setattr(o, a, v) if h else delattr(o, a)))

    reft = built.reft
    try:
        for m in reft.interventions.values():
            patch(m, "forward", _LABEL[EDIT])
        patch(orth_module, "compute_batched", _LABEL[ORTH])
        patch(orth_module.Orthonormal, "compute", _LABEL[ORTH])
        for (module, name), ids in hooks_before.items():
            hooks = getattr(module, name)
            for key in [k for k in hooks if k not in ids]:
                old = hooks[key]
                hooks[key] = _ranged(old, _LABEL[HOOKS])
                undo.append(lambda h=hooks, k=key, v=old: h.__setitem__(k, v) if k in h else None)
        for attr in ("forward", "generate"):
            patch(reft, attr, _LABEL["call"])
            if hasattr(model, attr):
                patch(model, attr, _LABEL["base"])
        if built.optimizer_step is not None:
            old_step = built.optimizer_step
            built.optimizer_step = _ranged(old_step, _LABEL[OPTIMIZER])
            undo.append(lambda: setattr(built, "optimizer_step", old_step))
        yield
    finally:
        for fn in reversed(undo):
            fn()


# ------------------------------------------------------------------------------------------------
# intervals
# ------------------------------------------------------------------------------------------------


def _union(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def _minus(a, b):
    """Intervals of a not covered by b (both unions)."""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _device_us(event) -> float:
    total = getattr(event, "device_time_total", None)  # torch >= 2.4; cuda_time_total before
    return float(total if total is not None else getattr(event, "cuda_time_total", 0) or 0)


def split(events) -> dict:
    """{component: (host_us, device_us)} plus TOTAL and REST from a profiler's events (module docstring)."""
    by_label: dict = {}
    for e in events:
        by_label.setdefault(e.name, []).append(e)

    def spans(label):
        return [(e.thread, e.time_range.start, e.time_range.end) for e in by_label.get(label, [])]

    def inside(ranges, e):
        return any(t == e.thread and s <= e.time_range.start and e.time_range.end <= end for t, s, end in ranges)

    # the backward of what ran inside the orthonormalization and edit ranges, by autograd sequence number
    ranges = {c: spans(_LABEL[c]) for c in (ORTH, EDIT, HOOKS, OPTIMIZER)}
    seqs = {ORTH: set(), EDIT: set()}
    for e in events:
        seq = getattr(e, "sequence_nr", -1)
        if seq is None or seq < 0 or e.name.startswith("rk.bench::") or "evaluate_function" in e.name:
            continue
        if inside(ranges[ORTH], e):
            seqs[ORTH].add(seq)
        elif inside(ranges[EDIT], e):
            seqs[EDIT].add(seq)
    backward = {ORTH: [], EDIT: []}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            for c in (ORTH, EDIT):
                if getattr(e, "sequence_nr", -1) in seqs[c]:
                    backward[c].append(e)

    threads = {e.thread for e in events}
    host = dict.fromkeys((*COMPONENTS, TOTAL), 0.0)
    for t in threads:
        def on(label_spans):
            return _union([(s, e) for th, s, e in label_spans if th == t])

        done: list = []
        parts = {
            ORTH: _union(on(ranges[ORTH]) + [(e.time_range.start, e.time_range.end) for e in backward[ORTH] if e.thread == t]),
            EDIT: _union(on(ranges[EDIT]) + [(e.time_range.start, e.time_range.end) for e in backward[EDIT] if e.thread == t]),
            HOOKS: on(ranges[HOOKS]),
            WRAPPER: _minus(on(spans(_LABEL["call"])), on(spans(_LABEL["base"]))),
            OPTIMIZER: on(ranges[OPTIMIZER]),
        }
        for c in COMPONENTS:
            own = _minus(parts[c], _union(done))
            host[c] += _length(own)
            done += parts[c]
        host[TOTAL] += _length(on(spans(_LABEL["step"])))
    # device time: the kernels each component's outermost events launched (GPU runs only)
    device = dict.fromkeys((*COMPONENTS, TOTAL), 0.0)
    roots = {ORTH: by_label.get(_LABEL[ORTH], []) + backward[ORTH], EDIT: by_label.get(_LABEL[EDIT], []) + backward[EDIT],
             OPTIMIZER: by_label.get(_LABEL[OPTIMIZER], []), TOTAL: by_label.get(_LABEL["step"], [])}
    for c, evs in roots.items():
        outer = [e for e in evs if not any(o is not e and o.thread == e.thread and o.time_range.start <= e.time_range.start
                                           and e.time_range.end <= o.time_range.end for o in evs)]
        device[c] = sum(_device_us(e) for e in outer)
    device[EDIT] -= sum(_device_us(e) for e in roots[ORTH] if inside(spans(_LABEL[EDIT]), e))
    out = {c: (host[c], device[c]) for c in (*COMPONENTS, TOTAL)}
    out[REST] = (host[TOTAL] - sum(host[c] for c in COMPONENTS), device[TOTAL] - sum(device[c] for c in COMPONENTS))
    return out


def profile(fn: Callable[[], object], calls: int, cuda: bool) -> dict:
    """split() of one call of fn (inside a step range), per component the median over `calls` profiled
    calls, each in a profiler session of its own (one slow call, the machine's or the profiler's, moves
    no median); REST is the median step less the median components. Microseconds."""
    import statistics

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from .timing import quiet_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runs = []
    for _ in range(calls):
        with quiet_profiler(), torch_profile(activities=activities) as prof:
            with record_function(_LABEL["step"]):
                fn()
            if cuda:
                torch.cuda.synchronize()
        runs.append(split(prof.events()))
    out = {c: (statistics.median(r[c][0] for r in runs), statistics.median(r[c][1] for r in runs))
           for c in (*COMPONENTS, TOTAL)}
    out[REST] = (out[TOTAL][0] - sum(out[c][0] for c in COMPONENTS), out[TOTAL][1] - sum(out[c][1] for c in COMPONENTS))
    return out


def rows(parts: dict, cuda: bool, base: dict) -> list[dict]:
    """Table rows (one per component, then the rest and the profiled total) in milliseconds, with the share
    of the profiled step. base: the row's identifying columns (mode, batch, ...)."""
    total = parts[TOTAL][0]
    out = []
    for c in (*COMPONENTS, REST, TOTAL):
        host, device = parts[c]
        out.append(dict(base, component=c, host_ms=host / 1e3, device_ms=device / 1e3 if cuda else float("nan"),
                        pct_of_step=100 * host / total if total > 0 else float("nan")))
    return out
