"""Measurement blocks and the comparison runner: every provider built afresh per block on one workload,
blocks interleaved over rounds (timing.interleaved), then one untimed pass per provider for peak memory
and, for reft_kernels, the profiler's breakdown.

Modes (what a user waits for):
- train: one training step, forward with the loss on the output tokens, backward, AdamW step and
  zero_grad; per block `warmup` untimed steps (the first allocates the optimizer state), `steps` timed.
- prefill: time to first token, one generate call with 1 new token.
- decode: time per generated token inside one generate call with N new tokens: the clock read at every
  token (providers.StepClock), (t at token N - t at token 1) / (N - 1); positive by construction, where a
  difference of two calls' times (t(N) - t(1)) / (N - 1) went negative under noise.
Every block runs one untimed generate(1) first (first-call costs of a fresh adapter stay out).
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
from typing import Callable, Optional

from . import breakdown as B
from . import providers as P
from .timing import hook_count, interleaved, peak_memory_gb, reset_peak_memory, spread_pct, step_peak_mb, wall_ms

MODES = ("train", "prefill", "decode")


def train_block(work: P.Workload, build: Callable[[], P.Built], *, warmup: int, steps: int, name: str = "") -> Callable:
    """One provider's training block: build, `warmup` untimed steps, `steps` timed ones (wall time,
    synchronized), teardown, free. Returns {"ms": [...], "trainable": [n], "peak_gb": [CUDA peak, NaN on a CPU]}."""
    hooks = hook_count(work.model)

    def block():
        built = build()
        reset_peak_memory()
        for _ in range(warmup):
            built.step()
        times = [wall_ms(built.step) for _ in range(steps)]
        peak = peak_memory_gb()
        built.teardown()
        if hook_count(work.model) != hooks:
            raise RuntimeError(f"{name} left hooks on the base model: the next provider would pay for them")
        trainable = built.trainable
        del built
        gc.collect()  # pyvene and peft objects hold reference cycles; their tensors must not count in the next peak
        return {"ms": times, "trainable": [trainable], "peak_gb": [peak]}

    return block


def generate_block(work: P.Workload, build: Callable[[], P.Built], *, new_tokens: int, decode: bool, repeats: int = 1,
                   name: str = "") -> Callable:
    """One provider's generation block: build, one untimed generate(1) (checked to give one new token), then
    `repeats` times: a timed generate(1) and, for decode, a timed generate(new_tokens) right after it with
    a StepClock; teardown. Returns {"t1_ms": [...], "tn_ms": [wall time of generate(N)], "token_ms": [per
    decode step, from the clock], "trainable": [the adapter's parameter count]}."""
    hooks = hook_count(work.model)
    T = work.prompt_ids.shape[1]

    def block():
        gc.collect()  # the previous block's adapter goes first (pyvene objects hold reference cycles)
        built = build()
        out = P.generated_ids(built.generate(1))
        if out.shape[-1] != T + 1:
            raise RuntimeError(f"{name}: generate(1) returned {tuple(out.shape)}, expected {T + 1} columns")
        t1, tn, token = [], [], []
        for _ in range(repeats):
            t1.append(wall_ms(lambda: built.generate(1)))
            if decode:
                clock = P.StepClock()
                tn.append(wall_ms(lambda: built.generate(new_tokens, clock)))
                token.append(clock.per_step_ms())
        built.teardown()
        if hook_count(work.model) != hooks:
            raise RuntimeError(f"{name} left hooks on the base model: the next provider would pay for them")
        return {"t1_ms": t1, "tn_ms": tn, "token_ms": token, "trainable": [built.trainable]}

    return block


def try_provider(build: Callable[[], P.Built], train: bool) -> str:
    """"" when the provider builds and runs here, else why not, in one line (optional providers: a pyreft or
    peft that does not run with these transformers is reported as skipped, not raised)."""
    try:
        built = build()
        try:
            built.step() if train else built.generate(2)
        finally:
            built.teardown()
        return ""
    except Exception as e:  # noqa: BLE001 - reported, not raised
        why = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        return why.splitlines()[0][:200] if why else type(e).__name__
    finally:
        gc.collect()


@dataclasses.dataclass
class Settings:
    """What `reft-kernels bench` measures. rounds: interleaved rounds kept (after warm_rounds thrown away);
    steps/warmup: timed/untimed training steps per block; repeats: generate pairs per block;
    output: tokens trained on after the prompt, and N new tokens for decode."""

    modes: tuple = MODES
    batches: tuple = (1,)
    prompts: tuple = (128,)
    output: int = 32
    providers: tuple = P.PROVIDERS
    rounds: int = 3
    warm_rounds: int = 1
    steps: int = 3
    warmup: int = 1
    repeats: int = 1
    profile: bool = True
    profile_calls: int = 5
    lora_r: Optional[int] = None
    lora_targets: Optional[list] = None
    trainable_for_generate: bool = False
    seed: int = 1


def builders(adapter, settings: Settings, lora: Optional[P.LoraChoice]) -> dict:
    """{provider: fn(work, train) -> Built} for the providers asked for."""
    table = {
        "frozen": lambda w, train: P.build_frozen(w, adapter, train),
        "reft_kernels": lambda w, train: P.build_reft_kernels(w, adapter, train,
                                                              trainable_for_generate=settings.trainable_for_generate),
        "pyreft": lambda w, train: P.build_pyreft(w, adapter, train),
        "lora": lambda w, train: P.build_lora(w, lora, train),
    }
    return {name: table[name] for name in settings.providers if name in table and (name != "lora" or lora is not None)}


def run_case(work: P.Workload, group: str, build: dict, settings: Settings, skipped: dict, *,
             progress: Optional[Callable[[str], None]] = None, label: str = "") -> tuple[dict, dict]:
    """Times one workload in one group ("train", or "generate" for prefill and decode) over every provider
    in `build`; optional providers that do not run are put in skipped {name: reason} and left out.
    Returns (samples {provider: {key: [samples]}}, extras {provider: {"peak_MB": .., "breakdown": ..}})."""
    train = group == "train"
    decode = "decode" in settings.modes
    blocks = {}
    for name, fn in build.items():
        if name in skipped:
            continue
        make = (lambda fn=fn: fn(work, train))
        if name in P.OPTIONAL:
            why = try_provider(make, train)
            if why:
                skipped[name] = why
                if progress:
                    progress(f"{label}{name} skipped ({why})")
                continue
        if train:
            blocks[name] = train_block(work, make, warmup=settings.warmup, steps=settings.steps, name=name)
        else:
            blocks[name] = generate_block(work, make, new_tokens=settings.output, decode=decode,
                                          repeats=settings.repeats, name=name)
    samples = interleaved(blocks, settings.rounds, warm_rounds=settings.warm_rounds, progress=progress, label=label)
    extras = {name: extra_pass(work, build[name], train, settings) for name in blocks}
    return samples, extras


def extra_pass(work: P.Workload, make: Callable, train: bool, settings: Settings) -> dict:
    """Untimed: peak memory of one step (train) or of generate(1) and generate(N) (after one warm call),
    and for reft_kernels the profiler's breakdown (breakdown.py)."""
    cuda = work.ids.is_cuda
    device = work.ids.device
    before = B.hook_snapshot(work.model)
    built = make(work, train)
    out: dict = {}
    try:
        if train:
            built.step()
            out["peak_MB"] = {"train": step_peak_mb(built.step, device)}
        else:
            built.generate(1)
            out["peak_MB"] = {"prefill": step_peak_mb(lambda: built.generate(1), device)}
            if "decode" in settings.modes:
                out["peak_MB"]["decode"] = step_peak_mb(lambda: built.generate(settings.output), device)
        if settings.profile and built.reft is not None:
            with B.instrumented(built, work.model, before):
                if train:
                    out["breakdown"] = {"train": B.profile(built.step, settings.profile_calls, cuda)}
                else:
                    one = B.profile(lambda: built.generate(1), settings.profile_calls, cuda)
                    out["breakdown"] = {"prefill": one}
                    if "decode" in settings.modes:
                        n = settings.output
                        many = B.profile(lambda: built.generate(n), settings.profile_calls, cuda)
                        out["breakdown"]["decode"] = {c: ((many[c][0] - one[c][0]) / (n - 1),
                                                          (many[c][1] - one[c][1]) / (n - 1)) for c in many}
                    if "prefill" not in settings.modes:  # profiled only as decode's baseline
                        del out["breakdown"]["prefill"]
    finally:
        built.teardown()
        gc.collect()
    return out


def summarize(samples: dict, extras: dict, group: str, settings: Settings, base: dict) -> list[dict]:
    """Rows, one per (mode, provider): median time (per step, per prefill call, per generated token), its
    spread, the overhead over frozen from the same run, peak memory and its difference to frozen's, and the
    parameters the provider adds (the adapter's; the floor's biases in train mode)."""
    modes = ["train"] if group == "train" else [m for m in ("prefill", "decode") if m in settings.modes]
    rows = []
    for mode in modes:
        values = {}
        for name, got in samples.items():
            if mode == "train":
                values[name] = got["ms"]
            elif mode == "prefill":
                values[name] = got["t1_ms"]
            else:
                values[name] = got["token_ms"]
        ref = statistics.median(values["frozen"]) if "frozen" in values else float("nan")
        ref_mem = extras.get("frozen", {}).get("peak_MB", {}).get(mode, float("nan"))
        for name, vals in values.items():
            med = statistics.median(vals)
            mem = extras.get(name, {}).get("peak_MB", {}).get(mode, float("nan"))
            rows.append(dict(base, mode=mode, provider=name, median_ms=med, spread_pct=spread_pct(vals),
                             overhead_pct=float("nan") if name == "frozen" else 100 * (med / ref - 1),
                             peak_MB=mem, extra_MB=float("nan") if name == "frozen" else mem - ref_mem,
                             params=samples[name].get("trainable", [0])[0], samples=len(vals)))
    return rows
