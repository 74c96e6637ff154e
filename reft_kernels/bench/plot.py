"""The figure of `reft-kernels bench`, and the figure helpers the repository's plots (bench/plots.py) share:
one colour per provider, a title with the device, versions and commit, a footnote saying what a CPU run
times. matplotlib (the `bench` extra) is imported inside the functions, with the Agg backend: no display
needed. Legends sit outside the axes, so no label is ever drawn under one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

# fixed colours per provider, so one provider looks the same in every figure
COLORS = {
    "reft_kernels": "tab:blue", "fused": "tab:blue", "ours": "tab:blue", "dropin": "tab:blue", "ours-all": "tab:blue",
    "ours-4": "tab:cyan", "fused-recompute": "tab:cyan", "ours-cholqr": "tab:cyan", "ours-per-module": "tab:purple",
    "cpp": "tab:purple", "torch": "tab:green", "torch-cholqr": "tab:green", "plain-torch": "tab:green",
    "pyreft": "tab:red", "pyreft-all": "tab:red", "pyreft-4": "tab:pink",
    "lora": "tab:orange", "bias-hook": "tab:gray", "frozen": "tab:gray", "plain": "tab:gray",
    "frozen-forward": "tab:brown",
}
COMPONENT_COLORS = {"orthonormalization": "tab:purple", "edit": "tab:blue", "hooks": "tab:cyan",
                    "ReftModel wrapper": "tab:olive", "optimizer": "tab:orange", "rest of the step": "0.85"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def num(v) -> float | None:
    """v as a finite float, or None (missing, empty, NaN, text)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def color(name: str, k: int) -> str:
    return COLORS.get(name, f"C{k % 10}")


def subtitle(env: dict) -> str:
    parts = [env.get("device", "?"), env.get("date", "")]
    if env.get("commit"):
        parts.append(f"commit {env['commit']}")
    versions = [f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if env.get(k)]
    return " | ".join(p for p in parts if p) + ("\n" + ", ".join(versions) if versions else "")


def cpu_note(env: dict) -> str:
    """What a CPU run times, from the environment header (the edit's backend as resolved in that run)."""
    if not str(env.get("device", "")).lower().startswith("cpu"):
        return ""
    threads = env.get("cpu_threads")
    backend = str(env.get("edit_backend", "")).split(" (")[0] or "?"
    return (f"CPU run{f' ({threads} torch thread(s))' if threads else ''}: the edit runs backend {backend}; the fused "
            "Triton kernels' figures need a GPU.")


def finish(fig, title: str, env: dict, path: Path, footnote: str = "") -> Path:
    note = cpu_note(env)
    footnote = " ".join(p for p in (footnote, note) if p)
    fig.suptitle(f"{title}\n{subtitle(env)}", fontsize=10)
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize=7.5, color="0.3", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if footnote else 0, 1, 1))
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def bar_labels(ax, bars, texts, errs=None):
    """Text above each bar (below a negative one), past its error bar when it has one."""
    for bar, text, err in zip(bars, texts, errs or [0.0] * len(texts)):
        h = bar.get_height()
        y = h + err if h >= 0 else h - err
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), xytext=(0, 3 if h >= 0 else -3),
                    textcoords="offset points", ha="center", va="bottom" if h >= 0 else "top", fontsize=7)


def room(ax, frac):
    """Room above the bars (and below negative ones) for their labels."""
    lo, hi = ax.get_ylim()
    span = hi - lo
    ax.set_ylim(lo - frac * span if lo < 0 else min(lo, 0), hi + frac * span)


def legend_below(ax, ncol: int):
    """The legend under the axes, outside them: never over a bar or its label."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=max(1, ncol), frameon=False)


def plot(rows: Sequence[dict], breakdown: Sequence[dict], env: dict, out_dir: Path) -> list[Path]:
    """bench.png: per mode, the median time of each provider for each (batch, prompt), labelled with its
    overhead over frozen; then the breakdown of reft_kernels' profiled time by component."""
    plt = pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    panels = len(modes) + (1 if breakdown else 0)
    ncols = min(2, panels)
    nrows = (panels + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.8 * nrows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, mode in zip(axes, modes):
        mrows = [r for r in rows if r["mode"] == mode]
        cases = list(dict.fromkeys((r["batch"], r["prompt"]) for r in mrows))
        provs = list(dict.fromkeys(r["provider"] for r in mrows))
        width = 0.8 / max(1, len(provs))
        for k, prov in enumerate(provs):
            xs, vals, errs, texts = [], [], [], []
            for c, case in enumerate(cases):
                row = next((r for r in mrows if (r["batch"], r["prompt"]) == case and r["provider"] == prov), None)
                v = num(row["median_ms"]) if row else None
                if v is None:
                    continue
                xs.append(c + (k - (len(provs) - 1) / 2) * width)
                vals.append(v)
                errs.append(0.5 * (num(row.get("spread_pct")) or 0) * v / 100)
                over = num(row.get("overhead_pct"))
                texts.append(f"{over:+.1f}%" if over is not None else f"{v:.3g}")
            bars = ax.bar(xs, vals, width, color=color(prov, k), label=prov, yerr=errs, capsize=2, ecolor="0.3")
            bar_labels(ax, bars, texts, errs)
        ax.set_xticks(range(len(cases)), [f"batch {b}\nprompt {p}" for b, p in cases], fontsize=8)
        per = mrows[0].get("per", "")
        ax.set_ylabel(f"ms per {per} (median)")
        ax.set_title({"train": "training step", "prefill": "prefill (time to first token)",
                      "decode": "decode (per generated token)"}.get(mode, mode), fontsize=10)
        room(ax, 0.12)
        ax.grid(True, axis="y", alpha=0.3)
        legend_below(ax, len(provs))
    if breakdown:
        ax = axes[panels - 1]
        groups = list(dict.fromkeys((r["mode"], r["batch"], r["prompt"]) for r in breakdown))
        comps = [c for c in COMPONENT_COLORS if any(r["component"] == c for r in breakdown)]
        left = [0.0] * len(groups)
        for comp in comps:
            widths = []
            for g in groups:
                row = next((r for r in breakdown
                            if (r["mode"], r["batch"], r["prompt"]) == g and r["component"] == comp), None)
                widths.append(max(0.0, num(row["pct_of_step"]) or 0.0) if row else 0.0)
            ax.barh(range(len(groups)), widths, left=left, color=COMPONENT_COLORS[comp], label=comp)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(groups)), [f"{m}, b{b} p{p}" for m, b, p in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("% of reft_kernels' profiled step, call or token")
        ax.set_title("reft_kernels' time by component (profiled)", fontsize=10)
        legend_below(ax, 2)
    return [finish(fig, "reft-kernels bench: median time per provider, labelled with the overhead over frozen", env,
                   Path(out_dir) / "bench.png", "Error bars: half the interquartile range. Train: frozen is the "
                   "floor (a learnable bias at the adapter's rows).")]
