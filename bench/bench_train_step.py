"""Training-step suite: one step of ReFT training on a frozen Llama-shaped model, per provider.

One step = forward with the edits, loss, backward, AdamW step on the trainable parameters, zero_grad.
Setting (../shared/notes/anchors.md): random-weight Llama shapes (harness.LLAMA_SHAPES), LoReFT rank 4
on the block outputs of 4 layers spread from the first to the last (or of every layer), positions
"f5+l5" tied (the first and last 5 tokens of every row, one intervention per layer), batch 8 x 512,
labels on the second half of each row, bf16 on a GPU. On a CPU: the "tiny" shape, batch 4 x 128, fp32;
those figures check that the suite runs and are not the product's claim (a tiny model leaves the host's
share far larger than on a GPU; the header's edit_backend says what the edit ran on).
The providers, their measurement blocks and the interleaved rounds are reft_kernels.bench's (what
`reft-kernels bench --modes train` runs); this suite adds frozen-forward and plain-torch.
Providers:
- frozen-forward: the base model's forward with the loss, under no_grad (no backward, no optimizer): the
  share of the step the forward is; not a floor
- bias-hook (the floor): a learnable [d] bias added to the same rows through plain forward hooks
  (gather, add, index_put_ in place); reft_kernels.bench's `frozen` provider in train mode
- ours: reft_kernels.get_reft_model with LoReFT r = 4 and default settings (fused Triton edit on a GPU,
  the fused C++ kernels on a CPU; every R of the adapter in one batched orthonormalization per step)
- plain-torch: the same hooks as the floor with pyreft's LoReFT math in plain PyTorch, rows +
  (W rows + b - rows R) R^T with R [d, r] from torch's orthogonal parametrization (Householder, recomputed
  on each access; read once per call, as ../shared/tools/anchor_bench.py's NaiveLoreft does, where
  pyreft reads it twice): what a careful user writes by hand, without pyvene
- pyreft: pyreft.get_reft_model with LoreftIntervention, called as its trainer calls it (locations turned
  into nested lists every step); only when `import pyreft` works
- lora: PEFT LoRA r = 8 (alpha 16, no dropout) on every linear layer of the blocks, the usual
  alternative; only when `import peft` works
Reported per provider: median step time, spread (interquartile range over the median), overhead over the
floor, peak memory (torch.cuda.max_memory_allocated over the provider's steps; not measured on a CPU),
trainable parameters.
"""
# The floor and the targets. What a step cannot avoid is the frozen model's forward and its backward
# from the loss down to the lowest edited layer (parameter gradients are not needed, activation
# gradients are): the bias-hook provider pays exactly that, plus the cheapest possible edit of the same
# rows. The project's targets, as ratios to that floor measured in the same run:
#   - training-step time: ours at most 2% over the bias-hook step;
#   - peak memory: ours within 2% of the bias-hook step's.
# (The generation targets are in bench_generate.py.) A difference smaller than the providers' spread
# column is noise; anchors.md saw absolute times move by up to 30% between two H100s, so compare
# ratios within one run only.
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics

import torch
from torch import nn

from reft_kernels.bench import measure as M
from reft_kernels.bench import providers as P
from reft_kernels.bench.adapters import Adapter
from reft_kernels.integration import ReftConfig

from . import harness as H

RANK = 4
POSITIONS = "f5+l5"
PROVIDERS = ("frozen-forward", "bias-hook", "ours", "plain-torch", "pyreft", "lora")
FLOOR = "bias-hook"
# (shape, edited layers) cases by device: 4 and all 16 layers of the 1b shape, 4 of the 7b shape (as
# anchors.md); on a CPU the tiny shape with 4 and all of its 8 layers
GPU_CASES = {"1b": ("4", "all"), "7b": ("4",)}
CPU_CASES = {"tiny": ("4", "all")}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter(layers: list) -> Adapter:
    """LoReFT r = 4 on the block outputs of `layers`, f5+l5 tied, fresh init."""
    return Adapter(ReftConfig(representations=[{"layer": layer, "component": "block_output", "intervention": "loreft",
                                                "low_rank_dimension": RANK} for layer in layers], positions=POSITIONS),
                   None, POSITIONS, "LoReFT r = 4")


# ------------------------------------------------------------------------------------------------
# the suite's own providers: the forward alone, and LoReFT by hand
# ------------------------------------------------------------------------------------------------


class _Rotation(nn.Module):
    """pyreft's LowRankRotateLayer: weight [d, r] with orthonormal columns, torch's orthogonal init."""

    def __init__(self, dim, rank, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, rank, device=device))
        nn.init.orthogonal_(self.weight)


class PlainLoReFT(nn.Module):
    """pyreft's LoreftIntervention math in plain PyTorch: rows + (W rows + b - rows R) R^T, R [d, r] fp32
    from torch.nn.utils.parametrizations.orthogonal (Householder), W and b in the model's dtype."""

    def __init__(self, dim, rank, dtype, device):
        super().__init__()
        self.rotate = torch.nn.utils.parametrizations.orthogonal(_Rotation(dim, rank, device))
        self.source = nn.Linear(dim, rank, device=device).to(dtype)

    def forward(self, rows):  # rows [B, P, d] -> [B, P, d] in fp32 (the hook casts back)
        R = self.rotate.weight  # the parametrization recomputes R here
        return rows + (self.source(rows) - rows.to(R.dtype) @ R) @ R.T


def build_frozen_forward(work: P.Workload, _adapter) -> P.Built:
    def forward():
        with torch.no_grad():
            work.model(input_ids=work.ids, attention_mask=work.mask, labels=work.labels)

    return P.Built(0, lambda: None, forward_backward=forward, optimizer_step=lambda: None)


def build_plain_torch(work: P.Workload, adapter_: Adapter) -> P.Built:
    """The floor's hooks (reft_kernels.bench.providers.hook_rows: in place, as ReftModel edits) with
    PlainLoReFT as the edit."""
    locations = P._locations(work, adapter_)
    sites = [(rep.layer, rep.component, locations[:, i]) for i, (rep, _) in enumerate(adapter_.interventions())]
    edits = [PlainLoReFT(work.dim, RANK, work.dtype, work.ids.device) for _ in sites]
    handles = P.hook_rows(work.model, sites, edits)
    return P._trained(lambda: work.model(input_ids=work.ids, attention_mask=work.mask, labels=work.labels).loss,
                      [p for e in edits for p in e.parameters()], lambda: [h.remove() for h in handles])


def builders(layers: list, n_layers: int) -> dict:
    lora = P.LoraChoice(r=8, targets=LORA_TARGETS, layers=list(range(n_layers)))  # every linear layer of the blocks
    return {
        "frozen-forward": build_frozen_forward,
        "bias-hook": lambda w, a: P.build_frozen(w, a, True),
        "ours": lambda w, a: P.build_reft_kernels(w, a, True),
        "plain-torch": build_plain_torch,
        "pyreft": lambda w, a: P.build_pyreft(w, a, True),
        "lora": lambda w, a: P.build_lora(w, lora, True),
    }


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def make_workload(model, batch: int, seq: int) -> P.Workload:
    """batch x seq random ids, labels on the second half of each row, and the edited positions f5+l5 of
    the whole row (its mask as the "prompt" mask)."""
    work = P.make_workload(model, batch, seq, 0, seed=1)
    work.labels[:, : seq // 2] = -100
    return work


@dataclasses.dataclass
class Case:
    """One model and batch (bench_pyreft_dropin trains pyreft's own loop on it)."""

    model: nn.Module
    layers: list  # indices of the edited decoder layers
    ids: torch.Tensor  # [B, T] token ids
    mask: torch.Tensor  # [B, T] attention mask (all ones: no padding)
    labels: torch.Tensor  # [B, T] ids, -100 on the first half of each row (the "prompt")
    positions: torch.Tensor  # [B, P] long, the edited positions of each row (f5+l5), on the device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def make_case(shape: str, layers, batch: int, seq: int, device, dtype) -> Case:
    model = H.llama(shape, device, dtype)
    work = make_workload(model, batch, seq)
    edited = H.spread_layers(model.config.num_hidden_layers, layers)
    positions = P._locations(work, adapter(edited))[:, 0]  # f5+l5 of the whole row, as every provider edits
    return Case(model, edited, work.ids, work.mask, work.labels, positions)


def run_case(shape, layers, providers, *, batch, seq, rounds, warmup, steps, device, dtype, skipped, progress=None):
    """Rows (one per provider) for one (shape, layers) case. skipped: {provider: reason}, filled here with the
    optional providers that do not run (and not tried again in later cases)."""
    model = H.llama(shape, device, dtype)
    n_layers = model.config.num_hidden_layers
    edited = H.spread_layers(n_layers, layers)
    work, adapter_ = make_workload(model, batch, seq), adapter(edited)
    build = builders(edited, n_layers)
    blocks = {}
    for name in providers:
        if name in skipped:
            continue
        make = (lambda fn=build[name]: fn(work, adapter_))
        if name in ("pyreft", "lora"):
            why = M.try_provider(make, train=True)
            if why:
                skipped[name] = why
                if progress:
                    progress(f"{shape}: {name} skipped ({why})")
                continue
        blocks[name] = M.train_block(work, make, warmup=warmup, steps=steps, name=name)
    label = f"{shape} {len(edited)}/{n_layers} layers, "
    samples = H.interleaved(blocks, rounds, progress=progress, label=label)
    floor = samples.get(FLOOR)
    floor_ms = statistics.median(floor["ms"]) if floor else float("nan")
    floor_gb = max(floor["peak_gb"]) if floor else float("nan")
    rows = []
    for name, got in samples.items():
        ms = statistics.median(got["ms"])
        peak = max(got["peak_gb"])  # the highest over rounds: peaks do not average
        rows.append({
            "shape": shape, "layers": f"{len(edited)} of {n_layers}", "batch": f"{batch}x{seq}", "provider": name,
            "step_ms": ms, "spread_pct": H.spread_pct(got["ms"]),
            "over_floor_pct": float("nan") if name == "frozen-forward" else 100 * (ms / floor_ms - 1),
            "peak_GB": peak, "peak_over_floor_pct": 100 * (peak / floor_gb - 1),
            "trainable_params": got["trainable"][0], "timed_steps": len(got["ms"]),
        })
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


COLUMNS = ["shape", "layers", "batch", "provider", "step_ms", "spread_pct", "over_floor_pct", "peak_GB",
           "peak_over_floor_pct", "trainable_params", "timed_steps"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="*", choices=sorted(H.LLAMA_SHAPES), default=None,
                    help="model shapes (default: 1b and 7b on a GPU, tiny on a CPU)")
    ap.add_argument("--layers", nargs="*", default=None,
                    help="edited layer counts, e.g. 4 all (default: 4 and all for 1b and tiny, 4 for 7b)")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8 on a GPU, 4 on a CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 512 on a GPU, 128 on a CPU)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds after the warm-up round (default 5 GPU, 3 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per provider per round (default 4 GPU, 3 CPU)")
    ap.add_argument("--quick", action="store_true", help="one case (the first shape, 4 layers), 2 rounds of 2 steps")
    H.add_model_args(ap)
    a = ap.parse_args(argv)
    cuda, device, dtype = H.model_device(a)
    defaults = GPU_CASES if cuda else CPU_CASES
    shapes = a.shape or list(defaults)
    cases = [(s, layers) for s in shapes for layers in (a.layers or defaults.get(s, ("4", "all")))]
    rounds, steps = a.rounds or (5 if cuda else 3), a.steps or (4 if cuda else 3)
    warmup = 2 if cuda else 1
    if a.quick:
        cases, rounds, steps = cases[:1], min(rounds, 2), min(steps, 2)
    batch, seq = a.batch or (8 if cuda else 4), a.seq or (512 if cuda else 128)
    env = H.environment()
    env.update(H.optional_versions(["pyreft", "pyvene", "peft"]))
    env["dtype"] = str(dtype).replace("torch.", "")
    progress = lambda s: print(f"  train_step: {s}", flush=True)  # noqa: E731
    rows, skipped = [], {}
    with H.cpu_threads(H.SUITE_THREADS):
        for shape, layers in cases:
            rows += run_case(shape, layers, a.providers, batch=batch, seq=seq, rounds=rounds, warmup=warmup,
                             steps=steps, device=device, dtype=dtype, skipped=skipped, progress=progress)
    notes = H.suite_notes(__doc__)
    notes += (f"\nMedians over {rounds} interleaved rounds (provider order rotated each round, after one "
              f"discarded warm-up round) of {steps} timed steps each, after {warmup} untimed steps per round; "
              f"AdamW lr {P.LR}, no weight decay. step_ms: wall time of one step with a synchronize before and after. "
              "spread_pct: interquartile range over the median. over_floor_pct: step time over the bias-hook "
              "step's, in percent (target for ours: at most 2). peak_GB: torch.cuda.max_memory_allocated during "
              "the provider's steps, model weights included (target for ours: within 2% of the floor's).\n")
    if not cuda:
        notes += H.cpu_run_note(env, "Peak memory is not measured on a CPU (torch counts no allocations "
                                "there; the process RSS would include the allocator's cache and everything else), "
                                "shown as '-'.")
    H.finish_suite("train_step", rows, COLUMNS, env, notes, skipped, a.out)


if __name__ == "__main__":
    main()
