"""Convergence parity: does the default R parametrization ("stereographic") train LoReFT as well as
pyreft's exact Householder one? The plain Cholesky-QR parametrization runs beside them.

Task (issue 3): a tiny random-init Llama (frozen), one prompt, LoReFT at a middle layer, trained to make
the model emit a fixed 20-token answer. All runs start from the same R, W and b (copied from the
default module), see the same data and use the same optimizer; only the map from the trained parameters
to R differs. Reported: the loss curve of each (CSV), the steps each needs to
reach fixed loss levels, and the final loss.

The intervention is applied by a forward hook on the middle decoder layer that edits its output in
place at every position of the sequence (prompt and answer, teacher-forced). Two choices make a random
model able to memorise at all, measured before settling on them (150 steps, r = 4 unless said):
- the LM head is drawn with std 0.2 instead of the config's 0.02: with 0.02 the logits cannot move far
  enough from uniform (loss 6.37 -> 4.98 with every position edited);
- every position is edited: through a random model's near-uniform attention, edits at the prompt alone
  cannot tell answer positions apart (loss 9.6 -> 6.3 editing the whole prompt, 9.6 -> 8.6 at f1+l1,
  against 9.9 -> 0.14 editing every position; r = 8 reaches 0.006).
The Hugging Face integration proper is reft_kernels' hook layer; this suite only needs the edit.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import reft_kernels as rk

from . import harness as H

LEVELS = (1.0, 0.1, 0.01)


def tiny_llama(device, seed=0, layers=4, hidden=128, vocab=512, lm_head_std=0.2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, lm_head_std)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _layer_output(out):
    """Decoder layers return a tensor (transformers 5.x) or a tuple whose first item is it (4.x)."""
    return out[0] if isinstance(out, tuple) else out


def train(model, intervention, ids, labels, positions, layer, steps, lr):
    """Adam on the intervention only; returns the per-step loss and the seconds per step."""
    def hook(_module, _args, out):
        intervention(_layer_output(out), positions)  # in place

    handle = model.model.layers[layer].register_forward_hook(hook)
    opt = torch.optim.Adam(intervention.parameters(), lr=lr)
    losses = []
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            with rk.orthonormal_batch(intervention):
                loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        handle.remove()
    return losses, (time.perf_counter() - t0) / steps


def steps_to(losses, level):
    return next((i + 1 for i, v in enumerate(losses) if v <= level), float("nan"))


def run(steps=200, lr=1e-2, rank=8, prompt_len=12, answer_len=20, seeds=(0, 1, 2, 3, 4), progress=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(device)
    cfg = model.config
    layer = cfg.num_hidden_layers // 2
    curves, summary = {}, []
    for seed in H.progress(seeds, "  convergence", label=lambda s: f"seed {s}"):
        gen = torch.Generator().manual_seed(100 + seed)
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen)
        answer = torch.randint(0, cfg.vocab_size, (1, answer_len), generator=gen)
        ids = torch.cat([prompt, answer], 1).to(device)
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        positions = torch.arange(prompt_len + answer_len, device=device)[None]
        torch.manual_seed(seed)
        ours = rk.LoReFT(cfg.hidden_size, rank, dtype=torch.float32, device=device)
        runs = [("stereographic", ours)]
        for name in ("cholesky_qr", "householder"):
            other = rk.LoReFT(cfg.hidden_size, rank, dtype=torch.float32, device=device, parametrization=name)
            with torch.no_grad():  # identical starting point: same R, W, b
                other.rotation.set_(ours.rotation())
                other.weight.copy_(ours.weight)
                other.bias.copy_(ours.bias)
            runs.append((name, other))
        for name, module in runs:
            losses, sec = train(model, module, ids, labels, positions, layer, steps, lr)
            curves[(seed, name)] = losses
            row = {"seed": seed, "parametrization": name, "first_loss": losses[0], "final_loss": losses[-1],
                   "min_loss": min(losses), "ms_per_step": sec * 1e3,
                   "final_orth_err": rk.orthonormality_error(module.rotation())}
            for lv in LEVELS:
                row[f"steps_to_{lv:g}"] = steps_to(losses, lv)
            summary.append(row)
            if progress:
                progress(f"seed {seed} {name}: loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    for name in ("stereographic", "cholesky_qr", "householder"):  # medians over seeds
        rows = [r for r in summary if r["parametrization"] == name]
        med = {"seed": "median", "parametrization": name}
        for key in rows[0]:
            if key not in med:
                med[key] = statistics.median(r[key] for r in rows)
        summary.append(med)
    return summary, curves, layer


COLUMNS = ["seed", "parametrization", "first_loss", "final_loss", "min_loss"] + [f"steps_to_{lv:g}" for lv in LEVELS] + [
    "ms_per_step", "final_orth_err"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="results folder (default: a new bench/runs/<device>/<time>-<commit>/)")
    a = ap.parse_args(argv)
    env = H.environment()
    # one thread: with two, torch's CPU threads stall each other whenever another process runs (measured:
    # this suite went from 35 s to 191 s beside another benchmark)
    with H.cpu_threads(H.SUITE_THREADS):
        summary, curves, layer = run(a.steps, progress=lambda s: print(f"  convergence: {s}", flush=True))
    notes = H.suite_notes(__doc__) + (
        f"\nModel: LlamaConfig(hidden 128, 4 layers, 4 heads, vocab 512), random init (LM head std 0.2), frozen; "
        f"LoReFT r = 8 at layer {layer}, fp32; Adam lr 1e-2; {a.steps} steps; 5 seeds (prompt, answer and initial parameters "
        f"change with the seed). Loss: mean cross-entropy over the 20 answer tokens. steps_to_x: first step "
        f"whose loss is <= x. Curves: convergence_curves.csv.\n")
    out = Path(a.out) if a.out else None
    md = H.write_results("convergence", summary, COLUMNS, env, notes, out)
    names = sorted(curves)
    rows = [{"step": i + 1, **{f"seed{s}_{n}": curves[(s, n)][i] for s, n in names}} for i in range(a.steps)]
    H.write_results("convergence_curves", rows, ["step"] + [f"seed{s}_{n}" for s, n in names], env,
                    "Loss per step for each seed and parametrization (see convergence.md).", out)
    print(md.read_text())


if __name__ == "__main__":
    main()
