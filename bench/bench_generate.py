"""Generation suite: time to first token and time per generated token, plain generate against ReFT-edited.

Setting (../shared/notes/anchors.md): the random-weight "1b" Llama shape (harness.LLAMA_SHAPES) in bf16,
prompts of 128 random tokens with no padding, batch 1 and 16, greedy decoding of exactly N new tokens
(min_new_tokens = max_new_tokens = N, N = 128). The ReFT adapters edit the prompt at "f5+l5" (its first
and last 5 tokens) with LoReFT r = 4 on the block outputs of every layer, or of 4 layers spread from the
first to the last; decode steps edit nothing. On a CPU: the "tiny" shape in fp32 with N = 8, which checks
that the suite runs and is not the product's claim (the host dominates a tiny model's decode step).
The providers, the measurement block and the interleaved repeats are reft_kernels.bench's (what
`reft-kernels bench --modes prefill decode` runs).
Providers:
- plain: the base model's generate, no hooks
- ours-all, ours-4: reft_kernels.get_reft_model(...).generate with intervention_locations from
  reft.locations(prompt_mask) (defaults: fused Triton edit on a GPU, the fused C++ kernels on a CPU). The
  adapter's parameters stay trainable, as right after training: each generate call then computes every
  R once, in one batch (a frozen, served adapter would use its cached R instead)
- pyreft-all, pyreft-4: pyreft's generate with intervene_on_prompt=True, as ../shared/tools/anchor_bench.py
  calls it; only when `import pyreft` works
Measured: prefill = one generate call with N = 1 (the prompt's forward and one token: time to first
token); per token = the time per decode step inside one generate call with N new tokens, from the clock
read at every token (reft_kernels.bench.providers.StepClock), median over repeats.
"""
# The floor and the targets. Generation cannot avoid the base model's own prefill and decode steps:
# plain generate in the same run is the floor. An adapter adds its edits to the prefill only (the prompt's
# f5+l5 rows at each edited layer) and, at each decode step, whatever its hooks cost when they find
# nothing to do. The project's targets, as ratios to plain generate in the same run:
#   - time to first token (prefill): within 2% of plain;
#   - time per generated token: at most 0.5% over plain.
# (The training-step targets are in bench_train_step.py.) At batch 1 a decode step of the 1b shape is
# ~13 ms, so 0.5% is ~70 us per token: per-token figures need many repeats, and a difference smaller
# than the spread columns is noise.
from __future__ import annotations

import argparse
import gc
import statistics
from typing import Callable

import torch

from reft_kernels.bench import measure as M
from reft_kernels.bench import providers as P
from reft_kernels.bench.adapters import Adapter
from reft_kernels.integration import ReftConfig

from . import harness as H

RANK = 4
POSITIONS = "f5+l5"
PLAIN = "plain"


def adapter(layers: list) -> Adapter:
    """LoReFT r = 4 on the block outputs of `layers`, f5+l5 tied, fresh init."""
    return Adapter(ReftConfig(representations=[{"layer": layer, "component": "block_output", "intervention": "loreft",
                                                "low_rank_dimension": RANK} for layer in layers], positions=POSITIONS),
                   None, POSITIONS, "LoReFT r = 4")


def run_shape(shape, batches, layer_counts, *, prompt_len, new, rounds, device, dtype, use_pyreft=True,
              progress: Callable[[str], None] | None = None):
    """Rows (one per batch size and provider) for one model shape, and {provider: reason} for those skipped."""
    model = H.llama(shape, device, dtype)
    n_layers = model.config.num_hidden_layers
    layer_sets = {str(c): H.spread_layers(n_layers, c) for c in layer_counts}
    rows, skipped = [], {}
    for batch in batches:
        work = P.make_workload(model, batch, prompt_len, 0, seed=batch)
        makers = {PLAIN: lambda: P.build_frozen(work, None, False)}
        for count, layers in layer_sets.items():
            # trainable while generating, as right after training: each call computes every R once, in one batch
            makers[f"ours-{count}"] = (lambda a=adapter(layers): P.build_reft_kernels(work, a, False,
                                                                                      trainable_for_generate=True))
        if use_pyreft:
            for count, layers in layer_sets.items():
                make = (lambda a=adapter(layers): P.build_pyreft(work, a, False))
                why = M.try_provider(make, train=False)
                if why:
                    skipped["pyreft"] = why
                    break
                makers[f"pyreft-{count}"] = make
        blocks = {name: M.generate_block(work, make, new_tokens=new, decode=True, name=name)
                  for name, make in makers.items()}
        samples = H.interleaved(blocks, rounds, progress=progress, label=f"{shape} batch {batch}, ")
        prefill = {name: statistics.median(s["t1_ms"]) for name, s in samples.items()}
        # per token inside each repeat's generate(N) call (the step clock), then the median over repeats
        per_token = {name: statistics.median(s["token_ms"]) for name, s in samples.items()}
        plain_t1, plain_tok = prefill[PLAIN], per_token[PLAIN]
        for name, s in samples.items():
            count = name.split("-", 1)[1] if "-" in name else None
            rows.append({
                "shape": shape, "batch": batch, "prompt": prompt_len, "new_tokens": new, "provider": name,
                "layers": f"{len(layer_sets[count])} of {n_layers}" if count else "-",
                "prefill_ms": prefill[name], "prefill_spread_pct": H.spread_pct(s["t1_ms"]),
                "prefill_over_plain_pct": 100 * (prefill[name] / plain_t1 - 1),
                "per_token_ms": per_token[name], "per_token_spread_pct": H.spread_pct(s["token_ms"]),
                "per_token_over_plain_pct": 100 * (per_token[name] / plain_tok - 1),
                "repeats": len(s["t1_ms"]),
            })
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, skipped


COLUMNS = ["shape", "batch", "prompt", "new_tokens", "provider", "layers", "prefill_ms", "prefill_spread_pct",
           "prefill_over_plain_pct", "per_token_ms", "per_token_spread_pct", "per_token_over_plain_pct", "repeats"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="*", choices=sorted(H.LLAMA_SHAPES), default=None,
                    help="model shapes (default: 1b on a GPU, tiny on a CPU)")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--layers", nargs="*", default=["all", "4"], help="edited layer counts (default: all 4)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=None, help="N, new tokens of the long call (default 128 GPU, 8 CPU)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved repeats after the warm-up round (default 7 GPU, 3 CPU)")
    ap.add_argument("--no-pyreft", action="store_true", help="leave pyreft out even when it imports")
    ap.add_argument("--quick", action="store_true", help="the first shape, 2 repeats, N = 16 on a GPU")
    H.add_model_args(ap)
    a = ap.parse_args(argv)
    cuda, device, dtype = H.model_device(a)
    shapes = a.shape or (["1b"] if cuda else ["tiny"])
    new, rounds = a.new or (128 if cuda else 8), a.rounds or (7 if cuda else 3)
    if a.quick:
        shapes, rounds, new = shapes[:1], min(rounds, 2), min(new, 16)
    if new < 2:
        ap.error("--new must be at least 2 (per token: the time between the first and the last token of one call, over N - 1)")
    env = H.environment()
    env.update(H.optional_versions(["pyreft", "pyvene"]))
    env["dtype"] = str(dtype).replace("torch.", "")
    progress = lambda s: print(f"  generate: {s}", flush=True)  # noqa: E731
    rows, skipped = [], {}
    with H.cpu_threads(H.SUITE_THREADS):
        for shape in shapes:
            got, why = run_shape(shape, a.batch, a.layers, prompt_len=a.prompt, new=new, rounds=rounds, device=device,
                                 dtype=dtype, use_pyreft=not a.no_pyreft, progress=progress)
            rows += got
            skipped.update(why)
    notes = H.suite_notes(__doc__)
    notes += (f"\nMedians over {rounds} interleaved repeats (provider order rotated each repeat, after one discarded "
              "warm-up repeat); each repeat builds the provider afresh, runs one untimed prefill, then times "
              f"generate with 1 new token (wall time, synchronized) and with {new}, per decode step (the step clock). "
              "*_over_plain_pct: over plain "
              "generate in the same run, in percent (targets for ours: prefill at most 2, per token at most 0.5). "
              "*_spread_pct: interquartile range over the median of t(1) and of the per-token time.\n")
    if not cuda:
        notes += H.cpu_run_note(env)
    H.finish_suite("generate", rows, COLUMNS, env, notes, skipped, a.out)


if __name__ == "__main__":
    main()
