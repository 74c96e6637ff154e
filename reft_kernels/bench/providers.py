"""What a benchmark compares, each built afresh on the same frozen base model and torn down after its
measurement block (providers that hook one base model must never see each other's hooks):

- frozen: the base model alone. For prefill and decode its own generate. For a training step it cannot
  be "alone" (nothing would train): it is the floor, a learnable bias [d] per intervention added to the
  adapter's own rows by plain hooks (gather, add, index_put_ in place): the frozen model's forward, its
  backward down to the lowest edited layer and an optimizer step on d-sized biases, which any adapter
  editing those rows pays.
- reft_kernels: the adapter through reft_kernels.ReftModel (the fused edit, one batched orthonormalization
  of every R per call).
- pyreft: the same interventions through pyreft.get_reft_model, called as pyreft's trainer and generate
  call it (locations as nested lists every call); only where pyreft imports.
- lora: PEFT LoRA of comparable size: on PEFT's default target modules for the architecture, in the
  adapter's layers, with the rank whose trainable parameter count comes closest to the adapter's (or
  the rank and targets given); only where peft imports.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Callable, Optional

import torch
from torch import nn

PROVIDERS = ("frozen", "reft_kernels", "pyreft", "lora")
OPTIONAL = ("pyreft", "lora")
LR = 1e-4


@dataclasses.dataclass
class Workload:
    """The batch every provider of one comparison runs: ids [B, T] (a prompt of prompt_len tokens, then the
    output tokens a training example has), mask [B, T] (no padding), labels [B, T] (-100 on the prompt:
    the loss is on the output, as ReFT trains), and the prompt's mask [B, prompt_len], from which every
    provider's edited positions are built."""

    model: nn.Module
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.ids[:, :self.prompt_mask.shape[1]]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        from ..integration.locate import hidden_size

        return hidden_size(self.model)


def make_workload(model: nn.Module, batch: int, prompt_len: int, output_len: int, *, seed: int = 1) -> Workload:
    """Random token ids (never the special ids 0-2) for `batch` rows of prompt_len + output_len tokens."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt_len + output_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if output_len:
        labels[:, :prompt_len] = -100
    return Workload(model, ids, mask, labels, mask[:, :prompt_len])


@dataclasses.dataclass
class Built:
    """A provider ready to run. Training: forward_backward() (forward with the loss, backward) then
    optimizer_step() (AdamW step, zero_grad). Generation: generate(n, clock=None) with exactly n new greedy
    tokens (clock: a StepClock reading the time at every token).
    teardown() leaves the base model as it was. For the profiler: reft (the ReftModel, reft_kernels only)
    and hooks_before (the base model's hooks before the build, to find the adapter's own)."""

    trainable: int  # the parameters the provider adds (trained ones in train mode)
    teardown: Callable[[], None]
    forward_backward: Optional[Callable[[], None]] = None
    optimizer_step: Optional[Callable[[], None]] = None
    generate: Optional[Callable[..., object]] = None
    reft: object = None

    def step(self) -> None:
        self.forward_backward()
        self.optimizer_step()


def greedy(n: int, clock: Optional["StepClock"] = None) -> dict:
    """generate() arguments for exactly n greedy new tokens (a random model may emit EOS early), with the
    clock among the logits processors when given."""
    out = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if clock is not None:
        from transformers import LogitsProcessorList

        out["logits_processor"] = LogitsProcessorList([clock])
    return out


class StepClock:
    """A logits processor that reads the clock each time generate has the next token's logits: after the
    prefill forward, then after every decode step. (times[-1] - times[0]) / (N - 1) is the time per decode
    step inside one generate call: forward, sampling and generate's bookkeeping, without the prefill or
    generate's setup, positive by construction (no difference of two noisy calls). On a GPU it
    synchronizes first; generate's loop already waits for the GPU once per token (its stopping check)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        import time

        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def per_step_ms(self) -> float:
        if len(self.times) < 2:
            raise RuntimeError(f"the step clock ran {len(self.times)} time(s); decode needs at least 2 new tokens")
        return (self.times[-1] - self.times[0]) * 1e3 / (len(self.times) - 1)


def generated_ids(out) -> torch.Tensor:
    """The ids tensor of a generate() result (pyreft returns (base, counterfactual) outputs)."""
    if isinstance(out, tuple):
        out = out[-1]
    return getattr(out, "sequences", out)


def _optimizer(params) -> Callable[[], None]:
    # weight decay off for every provider: under decay pyreft's R collapses to zero after one step (README),
    # which would time a degenerate edit; the optimizer's cost is the same either way
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if params else None

    def step():
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _trained(loss_fn: Callable[[], torch.Tensor], params: list, teardown: Callable[[], None], reft=None) -> Built:
    return Built(sum(p.numel() for p in params), teardown, forward_backward=lambda: loss_fn().backward(),
                 optimizer_step=_optimizer(params), reft=reft)


def _locations(work: Workload, adapter) -> torch.Tensor:
    """[B, n_interventions, P] for the adapter's scheme, built once (as a data collator builds them)."""
    from ..integration.positions import scheme_locations

    return scheme_locations(work.prompt_mask, adapter.positions, num_interventions=len(adapter.interventions()),
                            share_weights=adapter.config.share_weights)


# ------------------------------------------------------------------------------------------------
# frozen (and the training floor)
# ------------------------------------------------------------------------------------------------


class BiasEdit(nn.Module):
    """rows + b: the cheapest learnable edit of the rows (b [d], zero at init, in the model's dtype)."""

    def __init__(self, dim, dtype, device):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, rows):  # rows [B, P, d]
        return rows + self.bias


def hook_rows(model: nn.Module, sites: list, edits: list) -> list:
    """Hooks that edit, in place, the rows of each site: sites[i] = (layer, component, positions [B, P]) and
    edits[i] a module mapping rows [B, P, d] to edited rows. Gather, edit, index_put_ back: what ReftModel
    does, in plain PyTorch (-1 positions are left alone). Returns the hook handles."""
    from ..integration import component_site, find_layers

    _, layers = find_layers(model)
    by_site: dict = {}
    for (layer, component, positions), edit in zip(sites, edits):
        by_site.setdefault((layer, component), []).append((positions, edit))

    def apply(h, site):
        for positions, edit in site:
            rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
            valid = positions >= 0
            idx = positions.clamp(min=0)
            got = h[rows, idx]
            new = edit(got).to(h.dtype)
            if not bool(valid.all()):
                new = torch.where(valid[..., None], new, got)
            h.index_put_((rows, idx), new)

    handles = []
    for (layer, component), site in by_site.items():
        _, module, which = component_site(layers[layer], component)
        if which == "output":
            def hook(_module, _args, out, site=site):
                apply(out[0] if isinstance(out, (tuple, list)) else out, site)  # 4.x: a tuple, 5.x: the tensor
            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(_module, args, kwargs, site=site):
                apply(args[0] if args else kwargs["hidden_states"], site)
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return handles


def build_frozen(work: Workload, adapter, train: bool) -> Built:
    model = work.model
    if not train:
        return Built(0, lambda: None, generate=lambda n, clock=None: model.generate(
            input_ids=work.prompt_ids, attention_mask=work.prompt_mask, **greedy(n, clock)))
    locations = _locations(work, adapter)
    sites = [(rep.layer, rep.component, locations[:, i]) for i, (rep, _) in enumerate(adapter.interventions())]
    edits = [BiasEdit(work.dim, work.dtype, work.ids.device) for _ in sites]
    handles = hook_rows(model, sites, edits)
    params = [p for e in edits for p in e.parameters()]
    return _trained(lambda: model(input_ids=work.ids, attention_mask=work.mask, labels=work.labels).loss, params,
                    lambda: [h.remove() for h in handles])


# ------------------------------------------------------------------------------------------------
# reft_kernels
# ------------------------------------------------------------------------------------------------


def build_reft_kernels(work: Workload, adapter, train: bool, *, trainable_for_generate: bool = False) -> Built:
    """trainable_for_generate: keep the adapter trainable while generating, as right after training (each
    generate call then computes every R once, in one batch); False: frozen, as served (R cached)."""
    reft = adapter.build(work.model, trainable=train or trainable_for_generate)
    locations = adapter.locations(reft, work.prompt_mask)
    if train:
        params = [p for p in reft.parameters() if p.requires_grad]
        return _trained(lambda: reft(input_ids=work.ids, attention_mask=work.mask, labels=work.labels,
                                     intervention_locations=locations).loss, params, reft.remove_hooks, reft=reft)
    return Built(sum(p.numel() for p in reft.interventions.parameters()), reft.remove_hooks, reft=reft,
                 generate=lambda n, clock=None: reft.generate(input_ids=work.prompt_ids, attention_mask=work.prompt_mask,
                                                  intervention_locations=locations, **greedy(n, clock)))


# ------------------------------------------------------------------------------------------------
# pyreft
# ------------------------------------------------------------------------------------------------


def stub_datasets() -> bool:
    """pyreft imports `datasets` at the top, which neither a benchmark nor a test of ours uses: where it is not
    installed, a stub module stands in (tests_pyreft/conftest.py calls this too). Returns whether it did. The
    stub's Dataset is a class nothing is an instance of: transformers' Trainer asks
    `isinstance(train_dataset, datasets.Dataset)` whenever `datasets` imports, and a stand-in that answered yes
    for a list sent it down datasets-only code."""
    import importlib.machinery
    import sys
    import types

    try:
        import datasets  # noqa: F401

        return False
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.Dataset = type("Dataset", (), {"__doc__": "reft_kernels' stand-in: the datasets package is not installed"})
        stub.load_dataset = None
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        sys.modules["datasets"] = stub
        return True


def import_pyreft():
    """(pyreft, "") when pyreft imports here, else (None, the reason); `datasets` is stubbed where missing
    (stub_datasets) for the import only, so the rest of the process still sees it missing. pyreft 0.1.0 pins
    transformers 4.45.1."""
    import sys

    stubbed = stub_datasets()
    try:
        import pyreft

        return pyreft, ""
    except Exception as e:  # ImportError, or a version clash inside pyreft/pyvene
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:160]
    finally:
        if stubbed:
            sys.modules.pop("datasets", None)


def pyreft_model(model: nn.Module, adapter, pyreft=None):
    """pyreft.get_reft_model with the adapter's interventions (same types, sites, ranks, act, dropout;
    dtype: the representation's, else the model's), in intervention_locations' order."""
    from ..modules.interventions import INTERVENTIONS

    if pyreft is None:
        pyreft, why = import_pyreft()
        if pyreft is None:
            raise ImportError(why)
    from ..integration.locate import hidden_size

    dim = hidden_size(model)
    dtype = next(model.parameters()).dtype
    reps = []
    for rep, _ in adapter.interventions():
        kwargs = dict(embed_dim=dim, low_rank_dimension=rep.low_rank_dimension, dtype=rep.dtype or dtype,
                      dropout=rep.dropout)
        if rep.act:
            kwargs["act_fn"] = rep.act
        if rep.intervention in ("noreft", "direft"):
            kwargs["add_bias"] = rep.add_bias
        cls = getattr(pyreft, INTERVENTIONS[rep.intervention].pyreft_name)
        reps.append({"layer": rep.layer, "component": rep.component, "low_rank_dimension": rep.low_rank_dimension,
                     "intervention": cls(**kwargs)})
    return pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))


def build_pyreft(work: Workload, adapter, train: bool) -> Built:
    reft = pyreft_model(work.model, adapter)
    # [n_interventions][B][P] nested lists, as pyreft's trainer builds them from the collator's tensor each step
    locations = _locations(work, adapter).permute(1, 0, 2)
    if train:
        def loss():
            _, out = reft({"input_ids": work.ids, "attention_mask": work.mask},
                          unit_locations={"sources->base": (None, locations.tolist())}, labels=work.labels)
            return out.loss

        # pyvene registers its hooks on each call and removes them after: nothing to tear down
        return _trained(loss, [p for p in reft.parameters() if p.requires_grad], lambda: None)
    # (generate runs under no_grad inside transformers' generate, as for the other providers)
    params = sum(p.numel() for p in reft.parameters() if p.requires_grad)
    return Built(params, lambda: None, generate=lambda n, clock=None: reft.generate(
        {"input_ids": work.prompt_ids, "attention_mask": work.prompt_mask},
        unit_locations={"sources->base": (None, locations.tolist())}, intervene_on_prompt=True, **greedy(n, clock)))


# ------------------------------------------------------------------------------------------------
# PEFT LoRA
# ------------------------------------------------------------------------------------------------


def lora_targets(model: nn.Module) -> list:
    """PEFT's default LoRA target modules for the model's architecture (q_proj, v_proj for Llama), or every
    linear layer of the blocks when PEFT has no default for it."""
    mapping = {}
    for where in ("peft.utils.constants", "peft.utils.other", "peft.utils"):
        try:
            mapping = getattr(__import__(where, fromlist=["x"]), "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING")
            break
        except (ImportError, AttributeError):
            continue
    targets = mapping.get(getattr(model.config, "model_type", None))
    if targets:
        return list(targets)
    from ..integration import find_layers

    _, layers = find_layers(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)})


def lora_params_per_rank(model: nn.Module, targets: list, layers: list) -> int:
    """Trainable LoRA parameters per unit of rank: (in + out features) of every targeted linear layer in
    `layers` (A is [r, in], B [out, r])."""
    from ..integration import find_layers

    _, blocks = find_layers(model)
    total = 0
    for layer in sorted(set(layers)):
        for name, m in blocks[layer].named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                total += m.in_features + m.out_features
    return total


@dataclasses.dataclass
class LoraChoice:
    r: int
    targets: list
    layers: list

    def describe(self) -> str:
        return f"LoRA r={self.r} (alpha {2 * self.r}) on {','.join(self.targets)} of layers {self.layers}"


def comparable_lora(model: nn.Module, adapter, adapter_params: int, r: Optional[int] = None,
                    targets: Optional[list] = None) -> LoraChoice:
    """The LoRA of comparable size: targets (default lora_targets) in the adapter's layers, rank r (default:
    the one whose parameter count comes closest to adapter_params, at least 1)."""
    targets = targets or lora_targets(model)
    layers = sorted({rep.layer for rep, _ in adapter.interventions()})
    per_rank = lora_params_per_rank(model, targets, layers)
    if per_rank == 0:
        raise ValueError(f"no linear layer named {targets} in layers {layers}; pass --lora-targets")
    return LoraChoice(r or max(1, round(adapter_params / per_rank)), targets, layers)


def build_lora(work: Workload, choice: LoraChoice, train: bool) -> Built:
    import peft

    model = peft.get_peft_model(work.model, peft.LoraConfig(
        r=choice.r, lora_alpha=2 * choice.r, lora_dropout=0.0, target_modules=choice.targets,
        layers_to_transform=choice.layers))

    def teardown():
        model.unload()  # puts the original linear layers back into the base model, dropping the LoRA ones
        left = [n for n, m in work.model.named_modules() if "lora" in type(m).__module__.lower()]
        if left:
            raise RuntimeError(f"peft unload() left LoRA modules in the base model: {left[:3]}")
        gc.collect()

    params = [p for p in model.parameters() if p.requires_grad]
    if train:
        return _trained(lambda: model(input_ids=work.ids, attention_mask=work.mask, labels=work.labels).loss, params,
                        teardown)
    return Built(sum(p.numel() for p in params), teardown, generate=lambda n, clock=None: model.generate(
        input_ids=work.prompt_ids, attention_mask=work.prompt_mask, **greedy(n, clock)))
