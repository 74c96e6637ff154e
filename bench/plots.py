"""PNG plots of the benchmark results, written beside their md/csv/json.

harness.write_results draws them after every suite (a failure to draw is a note line in the markdown,
never a failed suite); this entry point redraws them from results already on disk:

    python -m bench.plots bench/runs/<device>/latest          # every <suite>.json in the folder
    python -m bench.plots bench/reference/h100-61fe9a1/ops.json

What each suite gets (suites not named here get no plot):
- ops: time per call against N (log-log), one line per provider time column (`*_us`) and dashed floor
  lines (`*floor*_us`); one panel per mode (fwd, bwd, fwd+bwd: a `mode` column, or the mode in the
  column name as in `fused_fwdbwd_us`), one PNG per group of the other keys (`type`, `dtype`, ...)
- orthonormal: time per training step against L (log-log), one line per provider, the floor dashed
- train_step: step-time overhead over the bias-hook floor per provider, one panel per (shape, layers)
  case; a second row for peak memory where it was measured (GPU)
- generate: prefill and per-token overhead over plain generate, bars per provider for each batch size
- convergence_curves: loss per step, median over seeds per parametrization, band = min..max over seeds
- pyreft_dropin: speedup over pyreft per intervention type
matplotlib (the `bench` extra) is imported inside the functions, with the Agg backend: no display needed.
The helpers every figure shares (colours, title, CPU footnote, labels, legends) are reft_kernels.bench.plot's.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from reft_kernels.bench.plot import bar_labels as _bar_labels, color as _color, finish as _finish  # noqa: F401
from reft_kernels.bench.plot import legend_below, num as _num, pyplot as _plt, room as _room  # noqa: F401

FLOOR_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}
MODE_ORDER = ["fwd", "bwd", "fwdbwd"]
# ops rows: keys that split rows into separate figures (all but "mode", which splits panels)
OPS_GROUP_KEYS = ("type", "kind", "intervention", "dtype", "act", "d", "r")


def _pow2_ticks(ax, values: Sequence[float]):
    """Log x axis with a tick at each value measured (N or L), labelled plainly."""
    from matplotlib.ticker import FixedLocator, NullLocator

    vals = sorted(set(values))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{v:.0f}" if v == int(v) else f"{v:g}" for v in vals])


def _no_data_note(ax, text: str):
    ax.text(0.5, 0.02, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="0.35")


# ------------------------------------------------------------------------------------------------
# ops: time against N per provider, floors dashed
# ------------------------------------------------------------------------------------------------


def _split_mode(name: str, row_mode) -> tuple[str | None, str]:
    """("fwdbwd", "fused") from "fused_fwdbwd"; the row's mode when the name has none."""
    tokens = name.split("_")
    for i, t in enumerate(tokens):
        t_norm = t.replace("+", "")
        if t_norm in MODE_NAMES:
            rest = "_".join(tokens[:i] + tokens[i + 1:])
            return t_norm, rest
    mode = str(row_mode).replace("+", "").replace("-", "").lower() if row_mode not in (None, "") else None
    return mode, name


def _ops_keys(rows: Sequence[dict]) -> tuple[list, dict]:
    """(the OPS_GROUP_KEYS whose value varies across rows: one figure each, {key: value} of those that do not)."""
    values = {k: list(dict.fromkeys(str(r.get(k)) for r in rows)) for k in OPS_GROUP_KEYS if any(k in r for r in rows)}
    return [k for k, v in values.items() if len(v) > 1], {k: rows[0].get(k) for k, v in values.items() if len(v) == 1}


def _ops_series(rows: Sequence[dict]):
    """{group: {mode: {label: {N: us}}}} from every numeric `*_us` column of the rows."""
    out: dict = {}
    varying, _ = _ops_keys(rows)
    for row in rows:
        N = _num(row.get("N"))
        if N is None:
            continue
        group = tuple((k, row.get(k)) for k in varying)
        for key, value in row.items():
            us = _num(value)
            if not key.endswith("_us") or us is None or us <= 0:
                continue
            mode, label = _split_mode(key[:-3], row.get("mode"))
            label = label or "time"
            out.setdefault(group, {}).setdefault(mode, {}).setdefault(label, {})[N] = us
    return out


def _has_floor_column(rows, mode) -> bool:
    return any("floor" in k and k.endswith("_us") and (mode is None or _split_mode(k[:-3], r.get("mode"))[0] == mode)
               for r in rows for k in r)


def plot_ops(rows, env, out_dir: Path, suite: str = "ops") -> list[Path]:
    plt = _plt()
    paths = []
    for group, by_mode in _ops_series(rows).items():
        modes = sorted(by_mode, key=lambda m: (MODE_ORDER.index(m) if m in MODE_ORDER else 9, str(m)))
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series = by_mode[mode]
            # the floor (or a plain "floor") first: black; the others grey
            floors = sorted((l for l in series if "floor" in l), key=lambda l: (not ("issue" in l or l == "floor"), l))
            providers = [l for l in series if "floor" not in l]
            all_n = [n for s in series.values() for n in s]
            for k, label in enumerate(providers):
                pts = sorted(series[label].items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=_color(label, k), label=label, lw=1.8)
            for k, label in enumerate(floors):
                pts = sorted(series[label].items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=FLOOR_STYLES[k % len(FLOOR_STYLES)],
                        color="black" if k == 0 else "0.45", lw=1.4, label=label.replace("_", " "))
            if not floors and _has_floor_column(rows, mode):
                _no_data_note(ax, "no floor here: it needs the GPU's copy bandwidth")
            if all_n:
                _pow2_ticks(ax, all_n)
            ax.set_yscale("log")
            ax.set_xlabel("N (edited rows)")
            ax.set_ylabel("time per call (µs)")
            ax.set_title(MODE_NAMES.get(mode, mode or "time"), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        what = ", ".join(f"{k} {v}" for k, v in [*group, *_ops_keys(rows)[1].items()] if v not in (None, ""))
        # ops_loreft_d4096_bf16.png: names as they are, numbers after their key
        parts = [str(v) if isinstance(v, str) else f"{k}{v}" for k, v in group]
        name = suite + "".join("_" + re.sub(r"[^A-Za-z0-9._+-]+", "-", p) for p in parts)
        paths.append(_finish(fig, f"{suite}: time per call against N{' (' + what + ')' if what else ''}", env,
                             out_dir / f"{name}.png", "Medians of repeated calls; dashed: floors (bytes moved at the "
                             "copy bandwidth measured in the same run). Lower is better."))
    return paths


# ------------------------------------------------------------------------------------------------
# orthonormal: time per step against L
# ------------------------------------------------------------------------------------------------


def plot_orthonormal(rows, env, out_dir: Path, suite: str = "orthonormal") -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    cols = [k for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("_us") and k != "floor_us"]
    Ls = [_num(r.get("L")) for r in rows if _num(r.get("L")) is not None]
    for k, col in enumerate(cols):
        pts = [(_num(r.get("L")), _num(r.get(col))) for r in rows]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            name = col[:-3]
            ax.plot(*zip(*pts), "o-", color=_color(name, k), label=name, lw=1.8)
    floor = [(_num(r.get("L")), _num(r.get("floor_us"))) for r in rows]
    floor = [p for p in floor if p[0] is not None and p[1] is not None]
    if floor:
        ax.plot(*zip(*floor), "--", color="black", lw=1.4, label="floor (bytes at copy bandwidth)")
    elif any("floor_us" in r for r in rows):
        _no_data_note(ax, "no floor here: it needs the GPU's copy bandwidth")
    if Ls:
        _pow2_ticks(ax, Ls)
    ax.set_yscale("log")
    ax.set_xlabel("L (interventions)")
    ax.set_ylabel("time per training step (µs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    dims = ", ".join(f"{k} = {rows[0][k]}" for k in ("d", "r") if rows and k in rows[0])
    return [_finish(fig, f"orthonormalization per training step (R forward + backward){', ' + dims if dims else ''}",
                    env, out_dir / f"{suite}.png", "Median per step; every R computed once forward and its gradient "
                    "once backward. pyreft: Householder, R read twice per intervention. Lower is better.")]


# ------------------------------------------------------------------------------------------------
# train_step and generate: overhead bars
# ------------------------------------------------------------------------------------------------


def _target(ax, y, text):
    """The target as a red dashed line, named at its right end outside the axes (a legend inside the axes
    hid a bar's value label in train_step.png)."""
    ax.axhline(y, color="tab:red", ls="--", lw=1)
    ax.annotate(text, xy=(1, y), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                ha="left", va="center", fontsize=7, color="tab:red")


def plot_train_step(rows, env, out_dir: Path, suite: str = "train_step") -> list[Path]:
    plt = _plt()
    cases = list(dict.fromkeys((r.get("shape"), r.get("layers"), r.get("batch")) for r in rows))
    memory = any(_num(r.get("peak_over_floor_pct")) is not None for r in rows)
    nrows = 2 if memory else 1
    fig, axes = plt.subplots(nrows, len(cases), figsize=(max(5.5, 4.6 * len(cases)), 4.4 * nrows), squeeze=False)
    for c, case in enumerate(cases):
        case_rows = [r for r in rows if (r.get("shape"), r.get("layers"), r.get("batch")) == case]
        floor_ms = next((_num(r.get("step_ms")) for r in case_rows if r.get("provider") == "bias-hook"), None)
        for row_i, (col, ylabel, target) in enumerate(
                [("over_floor_pct", "step time over the floor (%)", 2.0),
                 ("peak_over_floor_pct", "peak memory over the floor (%)", 2.0)][:nrows]):
            ax = axes[row_i][c]
            shown = [r for r in case_rows if _num(r.get(col)) is not None and r.get("provider") != "bias-hook"]
            names = [r["provider"] for r in shown]
            vals = [_num(r[col]) for r in shown]
            err = None
            if col == "over_floor_pct" and floor_ms:
                # half the provider's interquartile range, in percent of the floor's step
                err = [0.5 * (_num(r.get("spread_pct")) or 0) * _num(r.get("step_ms")) / floor_ms for r in shown]
            bars = ax.bar(range(len(vals)), vals, color=[_color(n, k) for k, n in enumerate(names)], yerr=err,
                          capsize=3, ecolor="0.3")
            if col == "over_floor_pct":
                texts = [f"{v:+.1f}%\n{_num(r.get('step_ms')):.3g} ms" for v, r in zip(vals, shown)]
            else:
                texts = [f"{v:+.1f}%\n{_num(r.get('peak_GB')):.3g} GB" for v, r in zip(vals, shown)]
            _bar_labels(ax, bars, texts, err)
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
            ax.axhline(0, color="black", lw=0.8)
            _target(ax, target, f"target for ours: {target:g}%")
            ax.set_ylabel(ylabel)
            _room(ax, 0.15)
            floor_txt = f"; floor {floor_ms:.3g} ms/step" if floor_ms and col == "over_floor_pct" else ""
            ax.set_title(f"{case[0]}, {case[1]} layers edited, batch {case[2]}{floor_txt}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    return [_finish(fig, "training step: overhead over the bias-hook floor (lower is better)", env,
                    out_dir / f"{suite}.png", "Floor: a learnable bias added to the same rows by plain hooks. Error "
                    "bars: half the interquartile range of the provider's steps; a difference inside them is noise. "
                    "Labels: overhead and median step time.")]


def plot_generate(rows, env, out_dir: Path, suite: str = "generate") -> list[Path]:
    plt = _plt()
    groups = list(dict.fromkeys((r.get("shape"), r.get("batch")) for r in rows))
    providers = list(dict.fromkeys(r.get("provider") for r in rows if r.get("provider") != "plain"))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(groups) * max(1, len(providers)) / 2 + 4), 4.6))
    width = 0.8 / max(1, len(providers))
    specs = [("prefill_over_plain_pct", "prefill_ms", "prefill (time to first token)", 2.0),
             ("per_token_over_plain_pct", "per_token_ms", "per generated token", 0.5)]
    for ax, (col, ms_col, title, target) in zip(axes, specs):
        for k, prov in enumerate(providers):
            xs, vals, texts = [], [], []
            for g, grp in enumerate(groups):
                row = next((r for r in rows if (r.get("shape"), r.get("batch")) == grp and r.get("provider") == prov), None)
                v = _num(row.get(col)) if row else None
                if v is None:
                    continue
                xs.append(g + (k - (len(providers) - 1) / 2) * width)
                vals.append(v)
                texts.append(f"{v:+.1f}%")
            bars = ax.bar(xs, vals, width, color=_color(prov, k), label=prov)
            _bar_labels(ax, bars, texts)
        plain = {grp: next((_num(r.get(ms_col)) for r in rows if (r.get("shape"), r.get("batch")) == grp
                            and r.get("provider") == "plain"), None) for grp in groups}
        ax.set_xticks(range(len(groups)), [f"{s}, batch {b}" + (f"\nplain {plain[(s, b)]:.3g} ms" if plain[(s, b)] else "")
                                           for s, b in groups], fontsize=8)
        ax.axhline(0, color="black", lw=0.8)
        _target(ax, target, f"target for ours: {target:g}%")
        _room(ax, 0.12)
        ax.set_ylabel("time over plain generate (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        legend_below(ax, len(providers))
    return [_finish(fig, "generation: overhead over plain generate (lower is better)", env, out_dir / f"{suite}.png",
                    "Medians over interleaved repeats; per token: decode steps inside one generate call (the step clock). Under the x "
                    "labels: plain generate's own time.")]


# ------------------------------------------------------------------------------------------------
# convergence curves, pyreft drop-in
# ------------------------------------------------------------------------------------------------


def plot_convergence_curves(rows, env, out_dir: Path, suite: str = "convergence_curves") -> list[Path]:
    plt = _plt()
    runs: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        m = re.match(r"^seed(\d+)_(.+)$", key)
        if m:
            runs.setdefault(m.group(2), []).append(key)
    steps = [_num(r.get("step")) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, (name, cols) in enumerate(runs.items()):
        xs, med, lo, hi = [], [], [], []
        for s, r in zip(steps, rows):
            vals = [_num(r.get(c)) for c in cols]
            vals = [v for v in vals if v is not None and v > 0]
            if s is None or not vals:
                continue
            xs.append(s)
            med.append(statistics.median(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        color = {"stereographic": "tab:blue", "cholesky_qr": "tab:green", "householder": "tab:red"}.get(name, f"C{k}")
        label = f"{name}{' (default)' if name == 'stereographic' else ' (pyreft)' if name == 'householder' else ''}"
        ax.plot(xs, med, color=color, lw=1.8, label=f"{label}, median of {len(cols)} seeds")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    for level in (1.0, 0.1, 0.01):
        ax.axhline(level, color="0.6", lw=0.7, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean cross-entropy over the answer tokens)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return [_finish(fig, "convergence: LoReFT on a memorization task, per R parametrization", env,
                    out_dir / f"{suite}.png", "Lines: median over seeds; bands: min to max over seeds. All "
                    "parametrizations start from the same R, W, b and see the same data (convergence.md).")]


def plot_pyreft_dropin(rows, env, out_dir: Path, suite: str = "pyreft_dropin") -> list[Path]:
    plt = _plt()
    groups = list(dict.fromkeys((r.get("shape"), r.get("type")) for r in rows))
    providers = list(dict.fromkeys(r.get("provider") for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(providers)), 4.6))
    width = 0.8 / max(1, len(providers))
    for k, prov in enumerate(providers):
        xs, vals = [], []
        for g, grp in enumerate(groups):
            row = next((r for r in rows if (r.get("shape"), r.get("type")) == grp and r.get("provider") == prov), None)
            v = _num(row.get("speedup")) if row else None
            if v is not None:
                xs.append(g + (k - (len(providers) - 1) / 2) * width)
                vals.append(v)
        bars = ax.bar(xs, vals, width, color=_color(prov, k), label=prov)
        _bar_labels(ax, bars, [f"{v:.2f}x" for v in vals])
    ax.set_xticks(range(len(groups)), [f"{s}, {t}" for s, t in groups], fontsize=8)
    ax.axhline(1, color="black", lw=0.8)
    ax.set_ylabel("speedup over pyreft (pyreft step time / provider's)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return [_finish(fig, "pyreft's training loop: pyreft's interventions against the drop-ins (higher is better)", env,
                    out_dir / f"{suite}.png")]


def plot_adapters(rows, env, out_dir: Path, suite: str = "adapters") -> list[Path]:
    """Time against A (distinct adapters in the batch) per provider, one panel per N, the floor dashed; one
    figure per mode. (Saved here rather than through _finish: on a CPU this suite times the fused C++ kernels,
    which _finish's CPU footnote does not describe.)"""
    plt = _plt()
    paths = []
    rows = [r for r in rows if r.get("bank") == "loreft"]
    for mode in dict.fromkeys(r.get("mode") for r in rows):
        sel = [r for r in rows if r.get("mode") == mode]
        ns = sorted({int(_num(r["N"])) for r in sel if _num(r.get("N")) is not None})
        if not ns:
            continue
        fig, axes = plt.subplots(1, len(ns), figsize=(5.2 * len(ns), 4.6), squeeze=False)
        for ax, n in zip(axes[0], ns):
            part = sorted((r for r in sel if _num(r.get("N")) == n), key=lambda r: _num(r.get("A")) or 0)
            for k, name in enumerate(("mixed", "loop", "torch")):
                pts = [(_num(r.get("A")), _num(r.get(f"{name}_us"))) for r in part]
                pts = [p for p in pts if p[0] is not None and p[1] is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=_color(name, k), label=name, lw=1.8)
            floor = [(_num(r.get("A")), _num(r.get("floor_us"))) for r in part]
            floor = [p for p in floor if p[0] is not None and p[1] is not None]
            if floor:
                ax.plot(*zip(*floor), "--", color="black", lw=1.4, label="floor (rows + touched bank slices)")
            _pow2_ticks(ax, [p[0] for p in floor] or [1])
            ax.set_yscale("log")
            ax.set_xlabel("A (distinct adapters in the batch)")
            ax.set_ylabel("time per call (µs)")
            ax.set_title(f"N = {n} edited rows", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        dims = ", ".join(f"{k} = {sel[0][k]}" for k in ("d", "r", "dtype") if k in sel[0])
        fig.suptitle(f"mixed-adapter batches, LoReFT {dims}, {mode}\n{_subtitle(env)}", fontsize=10)
        fig.text(0.01, 0.005, "mixed: one call of the mixed-adapter op; loop: today's single-adapter op once per "
                 "adapter; torch: gather/bmm/scatter. Lower is better.", fontsize=7.5, color="0.3", ha="left",
                 va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = out_dir / f"{suite}_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


PLOTTERS: dict[str, Callable] = {
    "adapters": plot_adapters,
    "ops": plot_ops,
    "orthonormal": plot_orthonormal,
    "train_step": plot_train_step,
    "generate": plot_generate,
    "convergence_curves": plot_convergence_curves,
    "pyreft_dropin": plot_pyreft_dropin,
}


def plot_results(suite: str, rows: Sequence[dict], env: dict, out_dir: Path) -> list[Path]:
    """The PNGs of one suite's results (none for a suite without a plotter, or without rows)."""
    plotter = PLOTTERS.get(suite)
    if plotter is None or not rows:
        return []
    try:
        return plotter(list(rows), dict(env), Path(out_dir), suite=suite)
    except Exception:
        _plt().close("all")  # a figure left half drawn would stay in memory for the rest of the run
        raise


# ------------------------------------------------------------------------------------------------
# redrawing results on disk
# ------------------------------------------------------------------------------------------------


def load(path: Path) -> tuple[list, dict]:
    """(rows, env) of <suite>.json, or of <suite>.csv (rows only) when there is no JSON."""
    path = Path(path)
    if path.suffix == ".json" or path.with_suffix(".json").exists():
        data = json.loads(path.with_suffix(".json").read_text())
        return data.get("rows", []), data.get("env", {})
    with open(path.with_suffix(".csv"), newline="") as f:
        rows = [{k: (_num(v) if _num(v) is not None or v.lower() == "nan" else v) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return rows, {}


def redraw(target: Path) -> list[Path]:
    """Redraws the plots of a results folder (every suite with a plotter) or of one <suite>.json/.csv."""
    target = Path(target)
    files = sorted(target.glob("*.json")) if target.is_dir() else [target]
    if target.is_dir():
        files += [p for p in sorted(target.glob("*.csv")) if not p.with_suffix(".json").exists()]
    paths = []
    for f in files:
        if f.stem not in PLOTTERS:
            continue
        rows, env = load(f)
        paths += plot_results(f.stem, rows, env, f.parent)
    return paths


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="results folders (bench/runs/<device>/<run>) or <suite>.json files")
    a = ap.parse_args(argv)
    failed = False
    for p in a.paths:
        try:
            for png in redraw(Path(p)):
                print(png)
        except Exception as e:  # noqa: BLE001 - report and go on with the other folders
            failed = True
            print(f"{p}: plots not drawn ({type(e).__name__}: {e})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
