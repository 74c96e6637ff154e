"""`reft-kernels bench` (also `python -m reft_kernels.bench`): what an adapter costs on a model, on this
device, at given batch sizes and prompt and output lengths, and where its time goes.

    reft-kernels bench --model meta-llama/Llama-3.2-1B --random-weights \\
        --adapter "loreft r=4 layers=all positions=f5+l5" --batch 1 8 --prompt 128 512 --out results/

One run measures side by side, on the same workload and interleaved: the frozen model, the model with the
adapter through reft_kernels, and where they import, pyreft and a PEFT LoRA of comparable size
(providers.py); for a training step, prefill (time to first token) and decode (time per generated token)
(measure.py). It reports medians and spreads, the overhead over the frozen model in percent from the same
run, peak memory, and a per-component breakdown of the adapter's cost from a profiler pass
(breakdown.py): a table on the terminal, and with --out DIR the markdown, CSV, JSON and a plot.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import breakdown as B
from . import measure as M
from . import providers as P
from .adapters import AdapterError, load_adapter
from .models import BUILTIN, DTYPES, ModelError, describe_size, load_model
from .report import environment, markdown_table, optional_versions, text_table, write_csv, write_results
from .timing import cpu_threads, progress

COLUMNS = ["mode", "batch", "prompt", "output", "provider", "per", "median_ms", "spread_pct", "overhead_pct",
           "peak_MB", "extra_MB", "params", "samples"]
BREAKDOWN_COLUMNS = ["mode", "batch", "prompt", "component", "host_ms", "device_ms", "pct_of_step"]
PER = {"train": "step", "prefill": "call", "decode": "token"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", required=True, help="a local directory with config.json, a Hugging Face model name, or "
                   f"one of {', '.join(sorted(BUILTIN))} (a Llama of that shape, random weights)")
    g.add_argument("--random-weights", action="store_true",
                   help="random weights of the model's shape (timing needs no trained weights; needed for a directory "
                        "or a hub name without weights at hand)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bf16 on a GPU, fp32 on a CPU)")
    g.add_argument("--device", default=None, help="cuda or cpu (default cuda when there is a GPU)")
    g = ap.add_argument_group("adapter")
    g.add_argument("--adapter", required=True,
                   help="a spec such as 'loreft r=4 layers=all positions=f5+l5' (keys: reft_kernels.bench.adapters), "
                        "a directory saved by ReftModel.save_pretrained, or a pyreft checkpoint directory")
    g.add_argument("--positions", default=None, help="edited positions, overriding the adapter's ('f5+l5', 'last')")
    g = ap.add_argument_group("workload")
    g.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 and 8 on a GPU, 1 on a CPU)")
    g.add_argument("--prompt", type=int, nargs="+", default=[128], help="prompt lengths in tokens (default 128)")
    g.add_argument("--output", type=int, default=32,
                   help="output tokens: trained on after the prompt (train), generated (decode); default 32")
    g.add_argument("--modes", nargs="+", choices=M.MODES, default=list(M.MODES),
                   help="train (forward, backward, AdamW step), prefill (time to first token), decode (per token)")
    g = ap.add_argument_group("comparison")
    g.add_argument("--providers", nargs="+", choices=P.PROVIDERS, default=list(P.PROVIDERS),
                   help="default: all; pyreft and lora only where they import (skipped with the reason otherwise)")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the one closest to the adapter's size)")
    g.add_argument("--lora-targets", nargs="+", default=None, help="LoRA target modules (default: PEFT's for the model)")
    g = ap.add_argument_group("method")
    g.add_argument("--rounds", type=int, default=None, help="interleaved rounds kept, after one warm-up round (default 5 "
                   "on a GPU, 3 on a CPU)")
    g.add_argument("--steps", type=int, default=3, help="timed training steps per provider per round (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="untimed training steps per provider per round (default 1)")
    g.add_argument("--repeats", type=int, default=1, help="timed generate pairs per provider per round (default 1)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own setting; stated "
                   "in the results)")
    g.add_argument("--no-profile", action="store_true", help="skip the profiler pass (no breakdown)")
    g.add_argument("--profile-calls", type=int, default=5,
                   help="profiled calls per breakdown, one profiler session each; the median is kept (default 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights, adapter init and tokens")
    ap.add_argument("--out", default=None, help="folder for bench.md, bench.csv, bench.json, breakdown.csv, bench.png")


def parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return ap


def _check(ap, a) -> None:
    for name in ("batch", "prompt"):
        values = getattr(a, name) or []
        if any(v < 1 for v in values):
            ap.error(f"--{name} takes positive integers, got {values}")
    if a.output < 1:
        ap.error(f"--output must be at least 1, got {a.output}")
    if "decode" in a.modes and a.output < 2:
        ap.error("decode needs --output of at least 2 (per token = (t(token N) - t(token 1)) / (N - 1))")
    for name in ("rounds", "steps", "repeats", "threads", "lora_r", "profile_calls"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if a.warmup < 0:
        ap.error(f"--warmup must be at least 0, got {a.warmup}")
    if a.device not in (None, "cpu", "cuda") and not str(a.device).startswith("cuda:"):
        ap.error(f"--device must be cpu or cuda, got {a.device!r}")
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available here")


def run(a, *, log=print) -> dict:
    """Runs the benchmark of parsed arguments `a`; returns {"env", "rows", "breakdown", "notes", "skipped"}."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    settings = M.Settings(modes=tuple(a.modes), batches=tuple(a.batch or ([1, 8] if cuda else [1])),
                          prompts=tuple(a.prompt), output=a.output, providers=tuple(a.providers),
                          rounds=a.rounds or (5 if cuda else 3), steps=a.steps, warmup=a.warmup, repeats=a.repeats,
                          profile=not a.no_profile, profile_calls=a.profile_calls, lora_r=a.lora_r,
                          lora_targets=a.lora_targets, seed=a.seed + 1)
    t0 = time.time()
    with cpu_threads(a.threads):
        env = environment(device, threads=torch.get_num_threads() if not cuda else None)
        env.update(optional_versions(["pyreft", "pyvene", "peft"]))
        model, model_desc = load_model(a.model, random_weights=a.random_weights, dtype=dtype, device=device, seed=a.seed)
        adapter = load_adapter(a.adapter, model, positions=a.positions, seed=a.seed)
        env.update({"model": f"{model_desc}; {describe_size(model)}", "dtype": str(dtype).replace("torch.", ""),
                    "adapter": adapter.describe()})
        probe = adapter.build(model)
        adapter_params = sum(p.numel() for p in probe.interventions.parameters())
        probe.remove_hooks()
        del probe
        lora, skipped = None, {}
        if "lora" in settings.providers:
            try:
                __import__("peft")
                lora = P.comparable_lora(model, adapter, adapter_params, settings.lora_r, settings.lora_targets)
                env["lora"] = lora.describe()
            except Exception as e:  # noqa: BLE001 - an optional provider: reported as skipped
                skipped["lora"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        build = M.builders(adapter, settings, lora)
        groups = (["train"] if "train" in settings.modes else []) + \
                 (["generate"] if {"prefill", "decode"} & set(settings.modes) else [])
        cases = [(g, b, p) for g in groups for b in settings.batches for p in settings.prompts]
        rows, parts = [], []
        say = lambda s: print(f"  {s}", flush=True)  # noqa: E731
        for group, batch, prompt in progress(cases, "bench case", label=lambda c: f"{c[0]} batch {c[1]} prompt {c[2]}"):
            work = P.make_workload(model, batch, prompt, settings.output, seed=settings.seed)
            base = {"batch": batch, "prompt": prompt, "output": settings.output}
            samples, extras = M.run_case(work, group, build, settings, skipped, progress=say,
                                         label=f"{group} b{batch} p{prompt}: ")
            case_rows = M.summarize(samples, extras, group, settings, base)
            for r in case_rows:
                r["per"] = PER[r["mode"]]
            rows += case_rows
            for mode, split in extras.get("reft_kernels", {}).get("breakdown", {}).items():
                parts += B.rows(split, cuda, {"mode": mode, "batch": batch, "prompt": prompt})
            del work
    env["suite_time_s"] = round(time.time() - t0)
    notes = method_notes(settings, cuda, env, skipped)
    return {"env": env, "rows": rows, "breakdown": parts, "notes": notes, "skipped": skipped, "cuda": cuda}


def method_notes(settings: M.Settings, cuda: bool, env: dict, skipped: dict) -> str:
    timing = ("CUDA: each timed call between two synchronizations (wall time, host included)" if cuda else
              f"CPU: wall time of each call, torch on {env.get('cpu_threads')} thread(s)")
    lines = [
        f"Medians over {settings.rounds} interleaved rounds (provider order rotated each round, after "
        f"{settings.warm_rounds} discarded warm-up round); each round builds every provider afresh on the same "
        f"base model. {timing}.",
        f"train: one step (forward with the loss on the {settings.output} output tokens after the prompt, backward, "
        f"AdamW step, zero_grad); {settings.steps} timed steps per round after {settings.warmup} untimed. For train, "
        "`frozen` is the floor: the frozen model with a learnable bias added to the adapter's own rows by plain "
        "hooks (what any adapter at these rows pays: the forward, the backward down to the lowest edited layer, "
        "an optimizer step).",
        "prefill: generate with 1 new token (time to first token). decode: per generated token inside one generate "
        f"call of N = {settings.output} new tokens, the clock read at every token (t(token N) - t(token 1)) / (N - 1); "
        "greedy, exactly N tokens. The "
        "adapter is " + ("trainable (R computed once per call)" if settings.trainable_for_generate else
                         "frozen, as served (R cached)") + " while generating.",
        "spread_pct: interquartile range over the median (a difference smaller than it is noise). overhead_pct: "
        "over frozen in the same run. peak_MB: the most tensor memory one step or call allocates above what was "
        "allocated before it (" + ("CUDA allocator statistics" if cuda else "torch.profiler's allocation events") +
        "), one untimed call after a warm one; extra_MB: minus frozen's. params: parameters the provider adds.",
    ]
    if settings.profile:
        lines.append("Breakdown: one profiled pass of reft_kernels (torch.profiler, record_function ranges added "
                     "from outside; reft_kernels.bench.breakdown): per step, call or token, each component without "
                     "the ones above it; the profiler's own cost makes the profiled step slower than the timed one.")
    for name, why in sorted(skipped.items()):
        lines.append(f"{name}: skipped ({why}).")
    return "\n\n".join(lines) + "\n"


def overhead_lines(result: dict) -> list[str]:
    """For each (mode, batch, prompt) with a breakdown: the timed overhead of reft_kernels over frozen."""
    out = []
    for r in result["rows"]:
        if r["provider"] == "reft_kernels":
            frozen = next((f for f in result["rows"] if f["provider"] == "frozen" and
                           (f["mode"], f["batch"], f["prompt"]) == (r["mode"], r["batch"], r["prompt"])), None)
            if frozen:
                out.append(f"- {r['mode']}, batch {r['batch']}, prompt {r['prompt']}: reft_kernels "
                           f"{r['median_ms']:.4g} ms per {r['per']} against frozen {frozen['median_ms']:.4g} ms: "
                           f"{r['median_ms'] - frozen['median_ms']:+.3g} ms ({r['overhead_pct']:+.1f}%)")
    return out


def breakdown_columns(result: dict) -> list[str]:
    return [c for c in BREAKDOWN_COLUMNS if c != "device_ms" or result["cuda"]]


def write(result: dict, out: Path) -> list[Path]:
    """bench.md/.csv/.json, breakdown.csv and bench.png under `out`."""
    from .plot import plot

    notes = result["notes"]
    if result["breakdown"]:
        notes += ("\n## Breakdown of reft_kernels' time\n\nTimed overhead over frozen (same run):\n"
                  + "\n".join(overhead_lines(result)) + "\n\n"
                  + markdown_table(result["breakdown"], breakdown_columns(result))
                  + "\n\n## Results\n")
    md = write_results("bench", result["rows"], COLUMNS, result["env"], notes, out_dir=out,
                       plot=lambda rows, env, d: plot(rows, result["breakdown"], env, d),
                       extra_json={"breakdown": result["breakdown"], "skipped": result["skipped"]})
    write_csv(out / "breakdown.csv", result["breakdown"], breakdown_columns(result))
    return [md, out / "bench.csv", out / "bench.json", out / "breakdown.csv", out / "bench.png"]


def print_result(result: dict) -> None:
    env = result["env"]
    print("\n" + "\n".join(f"{k}: {v}" for k, v in env.items()))
    print("\n" + text_table(result["rows"], COLUMNS))
    if result["breakdown"]:
        print("\nreft_kernels' time by component (profiled pass):")
        print(text_table(result["breakdown"], breakdown_columns(result)))
        print("\n".join(overhead_lines(result)))
    for name, why in sorted(result["skipped"].items()):
        print(f"{name}: skipped ({why})")


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m reft_kernels.bench") -> int:
    ap = parser(prog)
    a = ap.parse_args(argv)
    _check(ap, a)
    try:
        result = run(a)
    except (ModelError, AdapterError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    if a.out:
        paths = write(result, Path(a.out))
        print(f"\nwritten: {', '.join(str(p) for p in paths if p.exists())}")
    return 0


def console(argv: Optional[Sequence[str]] = None) -> int:
    """The `reft-kernels` command: `reft-kernels bench ...` (the only subcommand so far)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="reft-kernels", description="reft-kernels command line")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="latency of a model with a ReFT adapter, against the frozen model, pyreft and LoRA",
                   add_help=False)
    if argv and argv[0] == "bench":
        return main(argv[1:], prog="reft-kernels bench")
    if argv and argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if not argv:
        top.print_help(sys.stderr)
        return 2
    top.parse_args(argv[:1])  # exits with argparse's "invalid choice" message
    return 2


__all__ = ["COLUMNS", "console", "main", "parser", "run"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
