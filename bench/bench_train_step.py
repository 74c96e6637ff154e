"""Training-step suite: one step of ReFT training on a frozen Llama-shaped model, per provider.

One step = forward with the edits, loss, backward, AdamW step on the trainable parameters, zero_grad.
Setting (../shared/notes/anchors.md): random-weight Llama shapes (harness.LLAMA_SHAPES), LoReFT rank 4
on the block outputs of 4 layers spread from the first to the last (or of every layer), positions
"f5+l5" tied (the first and last 5 tokens of every row, one intervention per layer), batch 8 x 512,
labels on the second half of each row, bf16 on a GPU. On a CPU: the "tiny" shape, batch 4 x 128, fp32;
those figures check that the suite runs and are not the product's claim (the edit runs the torch
reference there, and a tiny model leaves the host's share far larger than on a GPU).
Providers:
- frozen-forward: the base model's forward with the loss, under no_grad (no backward, no optimizer): the
  share of the step the forward is; not a floor
- bias-hook (the floor): a learnable [d] bias added to the same rows through plain forward hooks
  (gather, add, index_put_ in place)
- ours: reft_kernels.get_reft_model with LoReFT r = 4 and default settings (fused Triton edit on a GPU,
  the torch reference on a CPU; every R of the adapter in one batched orthonormalization per step)
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
from typing import Callable

import torch
from torch import nn

import reft_kernels as rk

from . import harness as H

RANK = 4
POSITIONS = "f5+l5"
LR = 1e-3
PROVIDERS = ("frozen-forward", "bias-hook", "ours", "plain-torch", "pyreft", "lora")
FLOOR = "bias-hook"
# (shape, edited layers) cases by device: 4 and all 16 layers of the 1b shape, 4 of the 7b shape (as
# anchors.md); on a CPU the tiny shape with 4 and all of its 8 layers
GPU_CASES = {"1b": ("4", "all"), "7b": ("4",)}
CPU_CASES = {"tiny": ("4", "all")}


@dataclasses.dataclass
class Case:
    """One model and batch that every provider of a (shape, layers) case trains on."""

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


@dataclasses.dataclass
class Built:
    """A provider ready to step: step() runs one training step; teardown() leaves the base model as it was."""

    step: Callable[[], None]
    trainable: int
    teardown: Callable[[], None] = lambda: None


def _optimizer(params):
    # weight decay off for every provider: under decay pyreft's R collapses to zero after one step (README),
    # which would time a degenerate edit; the optimizer's cost is the same either way
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def _training_step(loss_fn, params) -> Built:
    opt = _optimizer(params)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Built(step, sum(p.numel() for p in params))


# ------------------------------------------------------------------------------------------------
# plain hooks: the floor and the hand-written LoReFT
# ------------------------------------------------------------------------------------------------


class BiasEdit(nn.Module):
    """rows + b: the cheapest learnable edit of the rows (b [d], zero at init, in the model's dtype)."""

    def __init__(self, dim, dtype, device):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, rows):  # rows [B, P, d]
        return rows + self.bias


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


def _hook_rows(case: Case, edits) -> list:
    """Forward hooks that edit the output of each layer in case.layers in place at case.positions:
    gather the rows [B, P, d], edit them, index_put_ them back. In place, as ReftModel edits: an
    out-of-place index_put (what anchor_bench.py times) would add a copy of the whole activation per
    layer, forward and backward, to the floor. Returns the hook handles."""
    positions = case.positions
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

    def make(edit):
        def hook(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x the tensor
            h.index_put_((rows, positions), edit(h[rows, positions]).to(h.dtype))

        return hook

    blocks = case.model.model.layers
    return [blocks[layer].register_forward_hook(make(edit)) for layer, edit in zip(case.layers, edits)]


def _hooked(case: Case, edits) -> Built:
    handles = _hook_rows(case, edits)
    params = [p for e in edits for p in e.parameters()]
    built = _training_step(lambda: case.model(input_ids=case.ids, attention_mask=case.mask, labels=case.labels).loss,
                           params)

    def teardown():
        for h in handles:
            h.remove()

    built.teardown = teardown
    return built


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------


def build_frozen_forward(case: Case) -> Built:
    def step():
        with torch.no_grad():
            case.model(input_ids=case.ids, attention_mask=case.mask, labels=case.labels)

    return Built(step, 0)


def build_bias_hook(case: Case) -> Built:
    device = case.ids.device
    return _hooked(case, [BiasEdit(case.dim, case.dtype, device) for _ in case.layers])


def build_plain_torch(case: Case) -> Built:
    device = case.ids.device
    return _hooked(case, [PlainLoReFT(case.dim, RANK, case.dtype, device) for _ in case.layers])


def build_ours(case: Case) -> Built:
    reft = rk.get_reft_model(case.model, rk.ReftConfig(
        representations=[{"layer": layer, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": RANK} for layer in case.layers],
        positions=POSITIONS))
    # [B, n_interventions, P], built once as a data collator builds it, outside the step
    locations = reft.locations(case.mask)
    params = [p for p in reft.parameters() if p.requires_grad]
    built = _training_step(lambda: reft(input_ids=case.ids, attention_mask=case.mask, labels=case.labels,
                                        intervention_locations=locations).loss, params)
    built.teardown = reft.remove_hooks
    return built


def build_pyreft(case: Case) -> Built:
    pyreft, why = H.import_pyreft()
    if pyreft is None:
        raise ImportError(why)
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK,
             "intervention": pyreft.LoreftIntervention(embed_dim=case.dim, low_rank_dimension=RANK, dtype=case.dtype)}
            for layer in case.layers]
    reft = pyreft.get_reft_model(case.model, pyreft.ReftConfig(representations=reps))  # moves and freezes
    # [B, n_interventions, P] as pyreft's collator builds it; its trainer turns it into nested lists every step
    locations = case.positions[:, None, :].expand(-1, len(case.layers), -1)

    def loss():
        _, out = reft({"input_ids": case.ids, "attention_mask": case.mask},
                      unit_locations={"sources->base": (None, locations.permute(1, 0, 2).tolist())},
                      labels=case.labels)
        return out.loss

    # pyvene registers its hooks on each call and removes them after: nothing to tear down
    return _training_step(loss, [p for p in reft.parameters() if p.requires_grad])


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora(case: Case) -> Built:
    import peft

    model = peft.get_peft_model(case.model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=LORA_TARGETS))
    built = _training_step(lambda: model(input_ids=case.ids, attention_mask=case.mask, labels=case.labels).loss,
                           [p for p in model.parameters() if p.requires_grad])

    def teardown():
        model.unload()  # puts the original linear layers back into case.model, dropping the LoRA ones
        left = [n for n, m in case.model.named_modules() if "lora" in type(m).__module__.lower()]
        if left:
            raise RuntimeError(f"peft unload() left LoRA modules in the base model: {left[:3]}")

    built.teardown = teardown
    return built


BUILDERS = {"frozen-forward": build_frozen_forward, "bias-hook": build_bias_hook, "ours": build_ours,
            "plain-torch": build_plain_torch, "pyreft": build_pyreft, "lora": build_lora}


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def make_case(shape: str, layers, batch: int, seq: int, device, dtype) -> Case:
    model = H.llama(shape, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    # f5+l5 of the whole row, from the library's own helper so every provider edits the same rows as ours
    positions = rk.prefix_suffix_locations(mask, POSITIONS, num_interventions=1)[:, 0]
    return Case(model, H.spread_layers(model.config.num_hidden_layers, layers), ids, mask, labels, positions)


def _block(case: Case, builder, warmup: int, steps: int):
    """One provider's measurement block: build, `warmup` untimed steps (the first allocates AdamW's
    state), `steps` timed steps, peak memory over all of them, teardown, free everything."""
    hooks = H.hook_count(case.model)

    def block():
        built = builder(case)
        H.reset_peak_memory()
        for _ in range(warmup):
            built.step()
        times = [H.wall_ms(built.step) for _ in range(steps)]
        peak = H.peak_memory_gb()
        built.teardown()
        if H.hook_count(case.model) != hooks:
            raise RuntimeError(f"{builder.__name__} left hooks on the base model: the next provider would pay for them")
        trainable = built.trainable
        del built
        gc.collect()  # pyvene and peft objects hold reference cycles; their tensors must not count in the next peak
        return {"ms": times, "peak_gb": [peak], "trainable": [trainable]}

    return block


def _try(case: Case, builder) -> str:
    """"" when the provider builds and steps here, else why not (optional providers only: a pyreft or
    peft that does not run with these transformers is reported as skipped, not fatal)."""

    def probe():
        built = builder(case)
        try:
            built.step()
        finally:
            built.teardown()

    return H.failure_reason(probe)


def run_case(shape, layers, providers, *, batch, seq, rounds, warmup, steps, device, dtype, skipped, progress=None):
    """Rows (one per provider) for one (shape, layers) case. skipped: {provider: reason}, filled here with the
    optional providers that do not run (and not tried again in later cases)."""
    case = make_case(shape, layers, batch, seq, device, dtype)
    blocks = {}
    for name in providers:
        if name in skipped:
            continue
        if name in ("pyreft", "lora"):
            why = _try(case, BUILDERS[name])
            if why:
                skipped[name] = why
                if progress:
                    progress(f"{shape}: {name} skipped ({why})")
                continue
        blocks[name] = _block(case, BUILDERS[name], warmup, steps)
    n_layers = case.model.config.num_hidden_layers
    label = f"{shape} {len(case.layers)}/{n_layers} layers, "
    samples = H.interleaved(blocks, rounds, progress=progress, label=label)
    floor = samples.get(FLOOR)
    floor_ms = statistics.median(floor["ms"]) if floor else float("nan")
    floor_gb = max(floor["peak_gb"]) if floor else float("nan")
    rows = []
    for name, got in samples.items():
        ms = statistics.median(got["ms"])
        peak = max(got["peak_gb"])  # the highest over rounds: peaks do not average
        rows.append({
            "shape": shape, "layers": f"{len(case.layers)} of {n_layers}", "batch": f"{batch}x{seq}", "provider": name,
            "step_ms": ms, "spread_pct": H.spread_pct(got["ms"]),
            "over_floor_pct": float("nan") if name == "frozen-forward" else 100 * (ms / floor_ms - 1),
            "peak_GB": peak, "peak_over_floor_pct": 100 * (peak / floor_gb - 1),
            "trainable_params": got["trainable"][0], "timed_steps": len(got["ms"]),
        })
    del case
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
    with H.cpu_threads(1):
        if not cuda:
            env["cpu_threads"] = torch.get_num_threads()
        for shape, layers in cases:
            rows += run_case(shape, layers, a.providers, batch=batch, seq=seq, rounds=rounds, warmup=warmup,
                             steps=steps, device=device, dtype=dtype, skipped=skipped, progress=progress)
    notes = __doc__.split("\n", 1)[1]
    notes += (f"\nMedians over {rounds} interleaved rounds (provider order rotated each round, after one "
              f"discarded warm-up round) of {steps} timed steps each, after {warmup} untimed steps per round; "
              f"AdamW lr {LR}, no weight decay. step_ms: wall time of one step with a synchronize before and after. "
              "spread_pct: interquartile range over the median. over_floor_pct: step time over the bias-hook "
              "step's, in percent (target for ours: at most 2). peak_GB: torch.cuda.max_memory_allocated during "
              "the provider's steps, model weights included (target for ours: within 2% of the floor's).\n")
    if not cuda:
        notes += H.cpu_run_note(env["dtype"], "Peak memory is not measured on a CPU (torch counts no allocations "
                                "there; the process RSS would include the allocator's cache and everything else), "
                                "shown as '-'.")
    H.finish_suite("train_step", rows, COLUMNS, env, notes, skipped, a.out)


if __name__ == "__main__":
    main()
