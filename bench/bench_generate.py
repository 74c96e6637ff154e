"""Generation suite: time to first token and time per generated token, plain generate against ReFT-edited.

Setting (../shared/notes/anchors.md): the random-weight "1b" Llama shape (harness.LLAMA_SHAPES) in bf16,
prompts of 128 random tokens with no padding, batch 1 and 16, greedy decoding of exactly N new tokens
(min_new_tokens = max_new_tokens = N, N = 128). The ReFT adapters edit the prompt at "f5+l5" (its first
and last 5 tokens) with LoReFT r = 4 on the block outputs of every layer, or of 4 layers spread from the
first to the last; decode steps edit nothing. On a CPU: the "tiny" shape in fp32 with N = 8, which checks
that the suite runs and is not the product's claim (the host dominates a tiny model's decode step).
Providers:
- plain: the base model's generate, no hooks
- ours-all, ours-4: reft_kernels.get_reft_model(...).generate with intervention_locations from
  reft.locations(prompt_mask) (defaults: fused Triton edit on a GPU, the torch reference on a CPU). The
  adapter's parameters stay trainable, as right after training: each generate call then computes every
  R once, in one batch (a frozen, served adapter would use its cached R instead)
- pyreft-all, pyreft-4: pyreft's generate with intervene_on_prompt=True, as ../shared/tools/anchor_bench.py
  calls it; only when `import pyreft` works
Measured: prefill = one generate call with N = 1 (the prompt's forward and one token: time to first
token); per token = (t(N new) - t(1 new)) / (N - 1) from each repeat's back-to-back pair, median over
repeats.
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
import dataclasses
import gc
import statistics
from typing import Callable

import torch

import reft_kernels as rk

from . import harness as H

RANK = 4
POSITIONS = "f5+l5"
PLAIN = "plain"


@dataclasses.dataclass
class Prompt:
    """A batch of prompts every provider generates from."""

    model: torch.nn.Module
    ids: torch.Tensor  # [B, T_prompt] token ids
    mask: torch.Tensor  # [B, T_prompt] all ones (no padding)


def _greedy(n: int) -> dict:
    """generate() arguments for exactly n greedy new tokens (a random model may emit EOS early)."""
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _ids(out):
    """The generated ids tensor from a generate() result (pyreft returns (base, counterfactual) outputs)."""
    if isinstance(out, tuple):
        out = out[-1]
    return getattr(out, "sequences", out)


def build_plain(prompt: Prompt, layers):
    def generate(n):
        return prompt.model.generate(input_ids=prompt.ids, attention_mask=prompt.mask, **_greedy(n))

    return generate, lambda: None


def build_ours(prompt: Prompt, layers):
    reft = rk.get_reft_model(prompt.model, rk.ReftConfig(
        representations=[{"layer": layer, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": RANK} for layer in layers],
        positions=POSITIONS))
    reft.eval()
    locations = reft.locations(prompt.mask)  # [B, n_interventions, P], in the prompt's coordinates

    def generate(n):
        return reft.generate(input_ids=prompt.ids, attention_mask=prompt.mask, intervention_locations=locations,
                             **_greedy(n))

    return generate, reft.remove_hooks


def build_pyreft(prompt: Prompt, layers):
    pyreft, why = H.import_pyreft()
    if pyreft is None:
        raise ImportError(why)
    model = prompt.model
    dim, dtype = model.config.hidden_size, next(model.parameters()).dtype
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
             "intervention": pyreft.LoreftIntervention(embed_dim=dim, low_rank_dimension=RANK, dtype=dtype)}
            for layer in layers]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    positions = rk.prefix_suffix_locations(prompt.mask, POSITIONS, num_interventions=1)[:, 0].tolist()
    locations = [positions] * len(layers)  # [n_interventions][B][P], as pyreft's generate takes them

    def generate(n):
        return reft.generate({"input_ids": prompt.ids, "attention_mask": prompt.mask},
                             unit_locations={"sources->base": (None, locations)}, intervene_on_prompt=True,
                             **_greedy(n))

    # pyvene registers its hooks on each call and removes them after: nothing to tear down
    return generate, lambda: None


def _block(prompt: Prompt, builder, layers, new: int):
    """One provider's measurement block: build, one untimed prefill (first-call costs of a new adapter stay
    out: kernel compilation, caches, lazily built buffers; it also checks that generate gives one new
    token), then one timed call with 1 new token and one with `new`; teardown."""
    hooks = H.hook_count(prompt.model)
    T = prompt.ids.shape[1]

    def block():
        gc.collect()  # the previous block's adapter goes first (pyvene objects hold reference cycles)
        generate, teardown = builder(prompt, layers)
        out = _ids(generate(1))
        if out.shape[-1] != T + 1:
            raise RuntimeError(f"{builder.__name__}: generate(1) returned {tuple(out.shape)}, expected {T + 1} columns")
        t1 = H.wall_ms(lambda: generate(1))
        tn = H.wall_ms(lambda: generate(new))
        teardown()
        if H.hook_count(prompt.model) != hooks:
            raise RuntimeError(f"{builder.__name__} left hooks on the base model: the next provider would pay for them")
        return {"t1_ms": [t1], "tn_ms": [tn]}

    return block


def _try(prompt: Prompt, builder, layers) -> str:
    """"" when the provider builds and generates here, else why not (optional providers only)."""

    def probe():
        generate, teardown = builder(prompt, layers)
        try:
            generate(2)
        finally:
            teardown()

    return H.failure_reason(probe)


def run_shape(shape, batches, layer_counts, *, prompt_len, new, rounds, device, dtype, use_pyreft=True,
              progress: Callable[[str], None] | None = None):
    """Rows (one per batch size and provider) for one model shape, and {provider: reason} for those skipped."""
    model = H.llama(shape, device, dtype)
    n_layers = model.config.num_hidden_layers
    layer_sets = {str(c): H.spread_layers(n_layers, c) for c in layer_counts}
    rows, skipped = [], {}
    for batch in batches:
        gen = torch.Generator(device="cpu").manual_seed(batch)
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        prompt = Prompt(model, ids, torch.ones_like(ids))
        blocks = {PLAIN: _block(prompt, build_plain, [], new)}
        for count, layers in layer_sets.items():
            blocks[f"ours-{count}"] = _block(prompt, build_ours, layers, new)
        if use_pyreft:
            for count, layers in layer_sets.items():
                why = _try(prompt, build_pyreft, layers)
                if why:
                    skipped["pyreft"] = why
                    break
                blocks[f"pyreft-{count}"] = _block(prompt, build_pyreft, layers, new)
        samples = H.interleaved(blocks, rounds, progress=progress, label=f"{shape} batch {batch}, ")
        prefill = {name: statistics.median(s["t1_ms"]) for name, s in samples.items()}
        # per token from each repeat's own pair (t(1) and t(N) run back to back in one block), then the median
        # over repeats: drift between repeats cancels within a pair
        per_token = {name: statistics.median((tn - t1) / (new - 1) for t1, tn in zip(s["t1_ms"], s["tn_ms"]))
                     for name, s in samples.items()}
        plain_t1, plain_tok = prefill[PLAIN], per_token[PLAIN]
        for name, s in samples.items():
            count = name.split("-", 1)[1] if "-" in name else None
            rows.append({
                "shape": shape, "batch": batch, "prompt": prompt_len, "new_tokens": new, "provider": name,
                "layers": f"{len(layer_sets[count])} of {n_layers}" if count else "-",
                "prefill_ms": prefill[name], "prefill_spread_pct": H.spread_pct(s["t1_ms"]),
                "prefill_over_plain_pct": 100 * (prefill[name] / plain_t1 - 1),
                "per_token_ms": per_token[name], "gen_n_spread_pct": H.spread_pct(s["tn_ms"]),
                "per_token_over_plain_pct": 100 * (per_token[name] / plain_tok - 1),
                "repeats": len(s["t1_ms"]),
            })
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows, skipped


COLUMNS = ["shape", "batch", "prompt", "new_tokens", "provider", "layers", "prefill_ms", "prefill_spread_pct",
           "prefill_over_plain_pct", "per_token_ms", "gen_n_spread_pct", "per_token_over_plain_pct", "repeats"]


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
        ap.error("--new must be at least 2 (per token = (t(N) - t(1)) / (N - 1))")
    env = H.environment()
    env.update(H.optional_versions(["pyreft", "pyvene"]))
    env["dtype"] = str(dtype).replace("torch.", "")
    progress = lambda s: print(f"  generate: {s}", flush=True)  # noqa: E731
    rows, skipped = [], {}
    with H.cpu_threads(1):
        if not cuda:
            env["cpu_threads"] = torch.get_num_threads()
        for shape in shapes:
            got, why = run_shape(shape, a.batch, a.layers, prompt_len=a.prompt, new=new, rounds=rounds, device=device,
                                 dtype=dtype, use_pyreft=not a.no_pyreft, progress=progress)
            rows += got
            skipped.update(why)
    notes = __doc__.split("\n", 1)[1]
    notes += (f"\nMedians over {rounds} interleaved repeats (provider order rotated each repeat, after one discarded "
              "warm-up repeat); each repeat builds the provider afresh, runs one untimed prefill, then times "
              f"generate with 1 and with {new} new tokens (wall time, synchronized). *_over_plain_pct: over plain "
              "generate in the same run, in percent (targets for ours: prefill at most 2, per token at most 0.5). "
              "*_spread_pct: interquartile range over the median of t(1) and of t(N).\n")
    if not cuda:
        notes += H.cpu_run_note(env["dtype"])
    H.finish_suite("generate", rows, COLUMNS, env, notes, skipped, a.out)


if __name__ == "__main__":
    main()
