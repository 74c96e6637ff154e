"""pyreft drop-in suite: pyreft's own training loop with pyreft's interventions against the drop-ins.

pyreft's intervention classes against reft_kernels.interop.pyreft_dropin's classes of the same names.

Loop: pyreft.get_reft_model on a frozen Llama-shaped model (harness.LLAMA_SHAPES, random weights), then
pyreft.ReftTrainerForCausalLM (Hugging Face Trainer with pyreft's compute_loss: intervention_locations
[B, n, P] turned into nested lists every step, pyvene's hooks registered and removed on every forward)
for warm-up + timed steps. A step is what the Trainer does between its on_step_begin and on_step_end
callbacks: forward with the edits, loss, backward, gradient clipping (max_grad_norm 1), AdamW (torch,
lr 1e-3, no weight decay: the Trainer's default optimizer; pyreft's R collapses under decay), scheduler,
zero_grad; the DataLoader's batch fetch and collation come before it and are not timed. A synchronize
before and after each step.
Setting: rank 4 on the block output of every layer (1b: all 16), positions "f5+l5" tied (the first and
last 5 tokens of every row, one intervention per layer, the same slots for every intervention, as
pyreft's data module repeats them), batch 8 x 512 with labels on the second half of each row, bf16 model
and bf16 W (pyreft's default dtype) on a GPU. On a CPU: the "tiny" shape (all 8 layers), batch 4 x 128,
fp32; those figures check that the suite runs and are not the product's claim (pyvene's per-call host work
dominates a tiny model; the header's edit_backend says what the drop-in's edit ran on: the fused C++
kernels where they build).
Providers (both start every round from the same intervention state):
- pyreft: pyreft.<Type>Intervention
- dropin: reft_kernels.interop.pyreft_dropin.<Type>Intervention (the fused edit: Triton on a GPU; R from
  the same Householder parametrization, computed once per call)
Types: LoreftIntervention (loreft) and NodireftIntervention (nodireft, the paper's DiReFT) by default.
Reported: median step time, spread (interquartile range over the median), speedup = pyreft's median step
time over the provider's, peak memory (torch.cuda.max_memory_allocated over the provider's steps; not
measured on a CPU), the loss of the first batch before training (the two providers must agree to the
dtype's rounding), trainable parameters.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from . import harness as H
from .bench_train_step import make_case

RANK = 4
POSITIONS = "f5+l5"
LR = 1e-3
TYPES = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention", "consreft": "ConsreftIntervention",
         "lobireft": "LobireftIntervention", "direft": "DireftIntervention", "nodireft": "NodireftIntervention"}
DEFAULT_TYPES = ("loreft", "nodireft")
PROVIDERS = ("pyreft", "dropin")
# (shape, edited layers) by device
GPU_CASES = {"1b": ("all",)}
CPU_CASES = {"tiny": ("all",)}


def _classes(provider: str, pyreft):
    if provider == "pyreft":
        return pyreft
    from reft_kernels.interop import pyreft_dropin

    return pyreft_dropin


def _kwargs(type_name: str, dim: int, dtype: torch.dtype) -> dict:
    kw = {"embed_dim": dim, "low_rank_dimension": RANK, "dtype": dtype}
    if type_name in ("NoreftIntervention", "NodireftIntervention"):
        kw["add_bias"] = False  # pyreft requires the keyword
    return kw


def initial_state(pyreft, type_name: str, case, seed: int = 0) -> list[dict]:
    """One full module state per edited layer (pyreft's classes, seeded), built on the device: every
    provider of every round loads these, so all of them train the same adapter from the same start."""
    torch.manual_seed(seed)
    with torch.device(case.ids.device):
        ivs = [getattr(pyreft, type_name)(**_kwargs(type_name, case.dim, case.dtype)) for _ in case.layers]
    return [{k: v.detach().clone() for k, v in torch.nn.Module.state_dict(iv).items()} for iv in ivs]


def build(pyreft, provider: str, type_name: str, case, states):
    cls = getattr(_classes(provider, pyreft), type_name)
    with torch.device(case.ids.device):
        ivs = [cls(**_kwargs(type_name, case.dim, case.dtype)) for _ in case.layers]
    for iv, state in zip(ivs, states):
        torch.nn.Module.load_state_dict(iv, state)  # the full state (module keys), the same for both classes
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
            for layer, iv in zip(case.layers, ivs)]
    return pyreft.get_reft_model(case.model, pyreft.ReftConfig(representations=reps))


def _dataset(case, n_rows: int) -> list[dict]:
    """Rows as pyreft's data module yields them (here all of one length: no padding), cycled."""
    B = case.ids.shape[0]
    n = len(case.layers)
    ids, mask, labels, pos = (t.cpu() for t in (case.ids, case.mask, case.labels, case.positions))
    return [{"input_ids": ids[i % B], "attention_mask": mask[i % B], "labels": labels[i % B],
             "intervention_locations": pos[i % B][None].expand(n, -1).contiguous()} for i in range(n_rows)]


def _collate(rows: list[dict]) -> dict:
    """What pyreft's collator (DataCollatorForSeq2Seq + ReftDataCollator) returns for rows of one length."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _step_timer():
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.ms, self._t = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            H.sync()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            H.sync()
            self.ms.append((time.perf_counter() - self._t) * 1e3)

    return StepTimer()


def _train(pyreft, reft, case, steps: int, out_dir: str):
    """pyreft.ReftTrainerForCausalLM for `steps` steps; returns the per-step times in ms."""
    import transformers

    B = case.ids.shape[0]
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=B, max_steps=steps, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), seed=0)
    timer = _step_timer()
    trainer = pyreft.ReftTrainerForCausalLM(model=reft, args=args, train_dataset=_dataset(case, B * steps),
                                            data_collator=_collate, callbacks=[timer])
    trainer.train()
    del trainer
    return timer.ms


def _first_loss(pyreft, reft, case) -> float:
    batch = {k: v.to(case.ids.device) for k, v in _collate(_dataset(case, case.ids.shape[0])).items()}
    with torch.no_grad():
        return float(pyreft.ReftTrainer.compute_loss(None, reft, batch))  # pyreft's own (it never reads self)


def _block(pyreft, provider, type_name, case, states, warmup, steps, tmp):
    hooks = H.hook_count(case.model)

    def block():
        reft = build(pyreft, provider, type_name, case, states)
        loss = _first_loss(pyreft, reft, case)
        H.reset_peak_memory()
        ms = _train(pyreft, reft, case, warmup + steps, tmp)[warmup:]
        peak = H.peak_memory_gb()
        trainable = sum(p.numel() for _, p in reft.named_parameters() if p.requires_grad)
        if H.hook_count(case.model) != hooks:
            raise RuntimeError(f"{provider} left hooks on the base model")
        del reft
        gc.collect()  # pyvene objects hold reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"ms": ms, "peak_gb": [peak], "loss": [loss], "trainable": [trainable]}

    return block


def run_case(pyreft, shape, layers, type_key, providers, *, batch, seq, rounds, warmup, steps, device, dtype,
             progress=None):
    case = make_case(shape, layers, batch, seq, device, dtype)
    # the whole row is the prompt here: make_case's positions are f5+l5 of the row, as pyreft's would be
    assert case.positions.shape[1] == 10
    type_name = TYPES[type_key]
    states = initial_state(pyreft, type_name, case)
    n_layers = case.model.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        blocks = {p: _block(pyreft, p, type_name, case, states, warmup, steps, tmp) for p in providers}
        samples = H.interleaved(blocks, rounds, progress=progress,
                                label=f"{shape} {len(case.layers)}/{n_layers} layers {type_key}, ")
    base = statistics.median(samples["pyreft"]["ms"]) if "pyreft" in samples else float("nan")
    rows = []
    for name, got in samples.items():
        ms = statistics.median(got["ms"])
        rows.append({
            "shape": shape, "layers": f"{len(case.layers)} of {n_layers}", "type": type_name, "batch": f"{batch}x{seq}",
            "provider": name, "step_ms": ms, "spread_pct": H.spread_pct(got["ms"]), "speedup": base / ms,
            "peak_GB": max(got["peak_gb"]), "first_loss": got["loss"][0], "trainable_params": got["trainable"][0],
            "timed_steps": len(got["ms"]),
        })
    del case, states
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


COLUMNS = ["shape", "layers", "type", "batch", "provider", "step_ms", "spread_pct", "speedup", "peak_GB",
           "first_loss", "trainable_params", "timed_steps"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="*", choices=sorted(H.LLAMA_SHAPES), default=None,
                    help="model shapes (default: 1b on a GPU, tiny on a CPU)")
    ap.add_argument("--layers", nargs="*", default=None, help="edited layer counts, e.g. 4 all (default: all)")
    ap.add_argument("--types", nargs="*", choices=sorted(TYPES), default=list(DEFAULT_TYPES),
                    help=f"intervention types (default: {' '.join(DEFAULT_TYPES)})")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8 on a GPU, 4 on a CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 512 on a GPU, 128 on a CPU)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds after the warm-up round (default 5 GPU, 3 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per provider per round (default 6 GPU, 3 CPU)")
    ap.add_argument("--quick", action="store_true", help="the first type only, 2 rounds of 2 timed steps")
    H.add_model_args(ap, "model and W dtype")
    a = ap.parse_args(argv)
    pyreft, why = H.import_pyreft()
    if pyreft is None:
        raise SystemExit(f"pyreft_dropin suite needs pyreft: {why}")
    cuda, device, dtype = H.model_device(a)
    defaults = GPU_CASES if cuda else CPU_CASES
    shapes = a.shape or list(defaults)
    cases = [(s, layers) for s in shapes for layers in (a.layers or defaults.get(s, ("all",)))]
    types = a.types
    rounds, steps = a.rounds or (5 if cuda else 3), a.steps or (6 if cuda else 3)
    warmup = 2 if cuda else 1
    if a.quick:
        types, rounds, steps = types[:1], min(rounds, 2), min(steps, 2)
    batch, seq = a.batch or (8 if cuda else 4), a.seq or (512 if cuda else 128)
    env = H.environment()
    env.update(H.optional_versions(["pyreft", "pyvene", "accelerate"]))
    env["dtype"] = str(dtype).replace("torch.", "")
    progress = lambda s: print(f"  pyreft_dropin: {s}", flush=True)  # noqa: E731
    rows = []
    with H.cpu_threads(H.SUITE_THREADS):
        for shape, layers in cases:
            for type_key in types:
                rows += run_case(pyreft, shape, layers, type_key, a.providers, batch=batch, seq=seq, rounds=rounds,
                                 warmup=warmup, steps=steps, device=device, dtype=dtype, progress=progress)
    notes = H.suite_notes(__doc__)
    for r in rows:  # the providers start from the same state: their first losses must agree
        ref = next((x["first_loss"] for x in rows if x["provider"] == "pyreft" and x["type"] == r["type"]
                    and x["shape"] == r["shape"] and x["layers"] == r["layers"]), None)
        if ref is not None and abs(r["first_loss"] - ref) > 0.02 * abs(ref):
            notes += (f"\nWARNING: {r['provider']} {r['type']} {r['shape']}: first loss {r['first_loss']:.4f} against "
                      f"pyreft's {ref:.4f}; the providers do not compute the same model.\n")
    notes += (f"\nMedians over {rounds} interleaved rounds (provider order rotated each round, after one discarded "
              f"warm-up round) of {steps} timed Trainer steps each, after {warmup} untimed steps per round (the first "
              "allocates AdamW's state). spread_pct: interquartile range over the median. speedup: pyreft's median "
              "step time over the row's. peak_GB: model weights included.\n")
    if not cuda:
        notes += H.cpu_run_note(env, "Peak memory is not measured on a CPU, shown as '-'.")
    H.finish_suite("pyreft_dropin", rows, COLUMNS, env, notes, {}, a.out)


if __name__ == "__main__":
    main()
