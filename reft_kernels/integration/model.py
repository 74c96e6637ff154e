"""ReftModel: ReFT interventions on a frozen Hugging Face model, for training, generation and saving.

    import reft_kernels as rk
    reft = rk.get_reft_model(model, rk.ReftConfig(
        representations=[{"layer": l, "intervention": "loreft", "low_rank_dimension": 4} for l in range(16)],
        positions="f5+l5"))
    locs = reft.locations(prompt_mask)                                # [B, n_interventions, P], -1: no edit
    loss = reft(input_ids=ids, attention_mask=mask, labels=labels, intervention_locations=locs).loss
    out = reft.generate(input_ids=prompt, attention_mask=prompt_mask, intervention_locations=locs,
                        max_new_tokens=32)
    reft.save_pretrained("adapter/"); reft = rk.ReftModel.from_pretrained(model, "adapter/")
    reft.load_adapter("other/", adapter_name="other")                # named adapters: integration/adapters.py
    out = reft.generate(**batch, adapter_names=["default", "other", "__base__"], max_new_tokens=32)  # per row

How it runs (and what it fixes in pyreft, ../shared/notes/reft-semantics.md)
- One hook per (layer, component) site any adapter edits, registered when the first adapter editing it is
  added, removed when the last one is deleted or by ReftModel.remove_hooks() (never other libraries'
  hooks). A site applies the call's edits in order (its plan: integration/plans.py; one adapter's
  interventions, several composed ones in turn, or one mixed-op launch per slot for a mixed batch), each
  editing the hidden states in place at its positions with the fused op: no clone of the activation.
- Per-call state (the locations, where the current forward's tokens start) lives in a ContextVar set by
  forward and generate: two threads running two batches never see each other's positions, and a base-model call
  outside ReftModel runs unedited.
- Locations stay on the device: one transpose + copy per forward, then a view per intervention (a mixed
  batch: one gather per call for every site's positions and bank rows); no Python lists, no host sync.
  Omitted, they come from each adapter's position scheme and the (prompt's) attention mask.
- Every trainable orthonormal R of the call's adapters is computed once per forward or generate call, all in
  one batched group (reft_kernels.orthonormal_batch); a frozen adapter's R comes from each module's cache.
- Gradient checkpointing: the checkpoint function of the base model is wrapped so that the recomputation
  in the backward sees the same per-call state (pyreft's recomputation runs without its hooks).
- Edits follow absolute positions. Before each forward of the base model a pre-hook reads where this
  forward's tokens start in the sequence (the length of the KV cache passed to it, on the host: see
  _past_length), and the hooks edit only the locations that fall among the tokens this forward processes.
  So generate() edits the prompt once at prefill with a KV cache, edits it again at every step without one
  (use_cache=False re-runs the whole sequence; Trainer leaves config.use_cache False), splits the edits of a
  chunked prefill across its chunks, and gives the same tokens with every cache implementation, as a
  step-by-step full forward does (tested). Locations index the prompt: generated tokens are never edited.
  A forward whose tokens all lie past the prompt (every decode step with a cache) returns from the hooks
  at once, decided on the host: no edit kernel runs and no device sync. Beam search and
  num_return_sequences repeat each row's locations. (Where transformers compiles the decode step, with a
  static cache on a GPU, the hooks' ContextVar read is a graph break: correct (checked by hand on the CPU with
  compilation forced, 68 s of compiling: not in CI), but the compiled step is split at each hooked site;
  its cost is not measured.)
- pyreft's call forms (reft.generate(prompt, unit_locations=..., intervene_on_prompt=True) and `_, out = `)
  are converted where unambiguous and refused with what to pass otherwise: integration/pyreft_calls.py.
- eval()/train() reach the interventions (dropout is off in eval).
- state_dict() is the adapters only (interventions and unfrozen modules): Trainer checkpoints hold the
  adapters, not a copy of the frozen model. save_pretrained / from_pretrained: integration/checkpoint.py (an
  integrity record; every tensor checked against the config at load), one directory per adapter.
- forward's signature, as inspect.signature shows it, lists the base model's inputs: transformers' Trainer
  keeps the dataset columns that name one, so remove_unused_columns=False is not needed.
- Several ReftModels on one base model: each one's hooks edit only in its own calls; building another on a
  base that still carries hooks warns (integration/model.py, _register_on_base). Several adapters on one
  model: one ReftModel holding them by name (integration/adapters.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import os
import warnings
import weakref
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .._version import __version__
from ..modules.interventions import check_backend
from ..modules.orthonormal import _BATCHED, orthonormal_batch
from . import checkpoint as _ckpt
from . import formats as _formats
from . import pyreft_calls
from .adapters import (BASE, DEFAULT, Adapter, AdapterRegistry, adapter_path, check_adapter_name, check_base,
                       from_saved, saved_path)
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .config import ReftConfig
from .locate import component_site, find_layers, hidden_size
from .plans import MixedPlan, Plan, SharedBanks, pad_cat, scheme_rows
from .positions import check_locations


@dataclasses.dataclass
class _Call:
    """What one forward/generate call needs at the hooks."""

    owner: "ReftModel"
    locations: torch.Tensor  # [N, B, P] int64 on the model's device (N: the plan's location rows)
    caller_storage: tuple  # data_ptrs of caller tensors the edit must not write into (inputs_embeds)
    bound: Optional[int] = None  # generate: the prompt's length; no location at or past it is edited
    plan: Any = None  # plans.Plan or plans.MixedPlan: the edits of each site
    ids: Optional[torch.Tensor] = None  # mixed batches: [S, B] each slot's bank row per row (-1: none)
    banks: Any = None  # mixed batches: plans.SharedBanks, or the call's token for its own banks (None: per forward)
    offset: int = 0  # where the current base-model forward's first token sits in the sequence (host int)
    fed: dict = dataclasses.field(default_factory=dict)  # id(cache) -> (cache, its length after the last forward)
    window: Optional[tuple] = None  # ((rows, offset, tokens), locations of that forward): computed once a forward

    def for_batch(self, batch: int) -> torch.Tensor:
        """Locations for a batch of `batch` rows: generate() expands rows for beams and return sequences
        (row b becomes rows b*k .. b*k + k - 1, as transformers' repeat_interleave does); a mixed batch's
        bank indices are expanded with them."""
        B = self.locations.shape[1]
        if batch == B:
            return self.locations
        if batch % B:
            raise ValueError(f"hidden states have {batch} rows but intervention_locations has {B}")
        self.locations = self.locations.repeat_interleave(batch // B, dim=1)
        if self.ids is not None:
            self.ids = self.ids.repeat_interleave(batch // B, dim=1)
        return self.locations

    def ids_for(self, batch: int) -> torch.Tensor:
        """A mixed batch's bank indices [S, batch]."""
        self.for_batch(batch)
        return self.ids

    def step_locations(self, batch: int, tokens: int) -> Optional[torch.Tensor]:
        """Locations [n, batch, P] of the current forward, which processes absolute positions offset ..
        offset + tokens - 1, in its own coordinates (-1 elsewhere); None when it can hold none (host ints)."""
        if self.bound is not None and self.offset >= self.bound:
            return None
        locations = self.for_batch(batch)
        if self.offset == 0 and (self.bound is None or tokens >= self.bound):
            return locations  # the whole prompt (or a training batch): the locations as given
        key = (batch, self.offset, tokens)
        if self.window is None or self.window[0] != key:
            shifted = locations - self.offset  # -1 stays negative
            self.window = (key, torch.where((shifted >= 0) & (shifted < tokens), shifted, -1))
        return self.window[1]


_PLANS = 64  # plans kept (the most recently used): one per adapter set that a call has used

_CALL: contextvars.ContextVar[Optional[_Call]] = contextvars.ContextVar("reft_kernels_call", default=None)
# ids of the ReftModels whose adapters are disabled in this context (ReftModel.disable_adapter)
_DISABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("reft_kernels_disabled", default=frozenset())


def _cache_length(cache) -> Union[int, torch.Tensor, None]:
    """Tokens held by a KV cache: an int where the cache keeps its length on the host (dynamic, sliding-window,
    quantized, offloaded caches; legacy tuples of [B, heads, T, head_dim] tensors), a 0-dim tensor where it
    keeps it on the device (static caches), None for an object that does not say."""
    if isinstance(cache, (tuple, list)):  # transformers 4.x legacy format: per layer (key, value)
        if not cache or not cache[0] or not isinstance(cache[0][0], torch.Tensor):
            return 0
        return cache[0][0].shape[-2]
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return None
    n = get()
    return int(n) if isinstance(n, int) else n


def _input_length(args: tuple, kwargs: dict) -> Optional[int]:
    """The number of tokens a base-model forward processes, from its input_ids / inputs_embeds."""
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[1]
    return None


def _past_length(state: _Call, args: tuple, kwargs: dict) -> int:
    """Where a base-model forward's first token sits in the sequence: the length of the KV cache it is given
    (`cache` in transformers 5.x, `past_key_values` in 4.x; 0 without one), read on the host. A static cache
    keeps its length on the device; for it the tokens this call has fed that cache are counted instead, and
    the first time a call sees one whose length is not a host int (transformers 4.x: at prefill; 5.x: never
    within one generate, an empty static cache says 0) it is read once, from cache_position where given
    (one device sync)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    n = _cache_length(cache)
    if isinstance(n, int):
        offset = n
    else:
        seen = state.fed.get(id(cache))
        position = kwargs.get("cache_position")  # transformers 4.x: the absolute positions of this forward
        if seen is not None and seen[0] is cache:
            offset = seen[1]
        elif isinstance(position, torch.Tensor) and position.numel():
            offset = int(position.reshape(-1)[0])  # exact (4.x's static caches count occupied slots, which a
            # sliding-window cache caps at its window)
        elif n is not None:
            offset = int(n)
        else:
            raise TypeError(f"cannot tell where this forward's tokens start: the {type(cache).__name__} passed to "
                            "the base model has no get_seq_length() and no cache_position was given")
    tokens = _input_length(args, kwargs)
    if tokens is not None:
        state.fed[id(cache)] = (cache, offset + tokens)
    return offset


def _is_reentrant(checkpoint_fn) -> bool:
    """Whether a transformers checkpoint function (a functools.partial of torch.utils.checkpoint.checkpoint)
    uses the reentrant variant; torch's default when unset is reentrant."""
    return bool(getattr(checkpoint_fn, "keywords", {}).get("use_reentrant", True))


def _carry_call_state(checkpoint_fn):
    """Wraps a model's gradient-checkpointing function so that the layer's recomputation in the backward
    runs with the per-call state of the forward that checkpointed it.

    Non-reentrant checkpointing also replays the forward's batched R (orthonormal_batch): its recomputation
    must save the same tensors as the forward did, and R was computed outside the checkpointed block.
    Reentrant checkpointing must not: its recomputation is backpropagated on its own, once per block, so each
    block computes its R afresh (a shared batched R would be backpropagated, and freed, by the first block)."""
    replay_batch = not _is_reentrant(checkpoint_fn)

    def checkpoint_with_reft_state(function, *args, **kwargs):
        state = _CALL.get()
        if state is None:
            return checkpoint_fn(function, *args, **kwargs)
        batch = _BATCHED.get() if replay_batch else {}

        def run(*a, **k):
            token, batch_token = _CALL.set(state), _BATCHED.set(batch)
            try:
                return function(*a, **k)
            finally:
                _BATCHED.reset(batch_token)
                _CALL.reset(token)

        return checkpoint_fn(run, *args, **kwargs)

    checkpoint_with_reft_state.reft_wrapped = checkpoint_fn
    return checkpoint_with_reft_state


class _PyreftHints(type):
    """ReftModel's metaclass: `ReftModel.load` (pyreft's loader) names its replacement instead of a bare
    AttributeError (instances do the same through ReftModel.__getattr__)."""

    def __getattr__(cls, name):
        hint = pyreft_calls.pyreft_method_hint(cls.__name__, name)
        if hint is not None:
            raise AttributeError(hint)
        raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")


class _BoundForward:
    """ReftModel.forward bound to one model: calls ReftModel._forward, and shows as its signature the base
    model's inputs plus intervention_locations (see ReftModel._forward_signature). transformers' Trainer
    reads that signature (inspect.signature(model.forward)) to choose the dataset columns it keeps."""

    __slots__ = ("__self__", "__func__")

    def __init__(self, func, owner):
        self.__func__, self.__self__ = func, owner

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return self.__self__._forward_signature()

    @property
    def __doc__(self):
        return self.__func__.__doc__

    def __repr__(self) -> str:
        return f"<bound method ReftModel.forward of {type(self.__self__.model).__name__} with ReFT>"


class _Forward:
    """The descriptor behind ReftModel.forward (a per-model signature; a plain method's is per class)."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls=None):
        return self.func if obj is None else _BoundForward(self.func, obj)


class ReftModel(AdapterRegistry, nn.Module, metaclass=_PyreftHints):
    """A frozen base model with ReFT adapters hooked in (module docstring; named adapters:
    integration/adapters.py).

    Args:
        model: a transformers PreTrainedModel (or any nn.Module with a config and a list of blocks).
        config: the first adapter's ReftConfig (or an Adapter from reft_kernels.read_adapter, kept as loaded).
        adapter_name: its name ("default", PEFT's).
        layers_path: dotted path of the block list when it cannot be found generically.
        backend: kernel backend for every intervention: None (automatic: Triton on CUDA, the C++ kernels on
            the CPU; reft_kernels.backend), "triton", "cpp" or "torch".
        freeze: set requires_grad=False on the base model (except config.unfrozen_modules).

    Attributes:
        model: the base model. config: its config (what transformers utilities read).
        adapters: the adapters by name (integration.adapters.Adapter: config, interventions, locations()).
        active_adapters / active_adapter: what a call without adapter_names applies (set_adapter).
        reft_config: the active adapter's ReftConfig.
        interventions: the active adapter's nn.ModuleDict of intervention modules, keys as pyvene spells them
            ("layer_{l}_comp_{component}_unit_pos_nunit_1#{k}"), in the order intervention_locations indexes.
        num_interventions: the n of intervention_locations [B, n, P] for the active adapter(s) (twice the
            number of representations with share_weights=False and a "f{p}+l{s}" scheme; the sum when several
            are composed).
        dim: the hidden width the interventions edit. device: where the interventions live.

    Methods: forward / generate (native and pyreft call forms, adapter_names=[...] per row),
    locations(attention_mask), load_adapter / add_adapter / delete_adapter / set_adapter /
    disable_adapter, save_pretrained / from_pretrained, remove_hooks, gradient_checkpointing_enable,
    print_trainable_parameters. pyreft's save / load / set_device ... raise an AttributeError naming the
    replacement.
    """

    def __init__(self, model: nn.Module, config: Union[ReftConfig, Adapter], *, adapter_name: str = DEFAULT,
                 layers_path: Optional[str] = None, backend: Optional[str] = None, freeze: bool = True):
        super().__init__()
        if not isinstance(config, (ReftConfig, Adapter)):
            raise TypeError(f"config must be a reft_kernels.ReftConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the base torch.nn.Module (a transformers model), got {type(model).__name__}")
        check_backend(backend)
        adapter_name = check_adapter_name(adapter_name)
        self.model = model
        self.backend = backend
        self.layers_path, layers = find_layers(model, layers_path)
        self.dim = hidden_size(model)
        self._init_registry()
        self._site_handles: dict[tuple[int, str], Any] = {}
        self._handles: list = []
        self._removed = False
        if freeze:
            model.requires_grad_(False)
        adapter = config if isinstance(config, Adapter) else Adapter(
            adapter_name, config, self.dim, num_layers=len(layers), device=self._model_device(), backend=backend,
            layers_path=f"{type(model).__name__} ({self.layers_path})")
        self._model_tensors(adapter.config)  # a missing unfrozen module is named before any hook is added
        self._register_on_base(model)
        self._attach(adapter_name, adapter)
        self._active = [adapter_name]
        # before each forward of the base model: where its tokens start in the sequence
        self._handles.append(model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self._checkpointed = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        # Trainer reads this to decide whether to pass num_items_in_batch on to forward
        base_forward = inspect.signature(model.forward).parameters.values()
        self.accepts_loss_kwargs = getattr(model, "accepts_loss_kwargs",
                                           any(p.kind == p.VAR_KEYWORD for p in base_forward))

    _ADAPTERS = "_reft_kernels_adapters"  # attribute of a base model: weak references to the ReftModels on it

    def _register_on_base(self, model: nn.Module) -> None:
        """Several ReftModels on one base model each edit only in their own calls (the hooks check the call's
        owner), so an older one left attached does not change this one's outputs, and it keeps working
        through its own forward/generate. Its hooks stay until its remove_hooks(): building a second one
        warns, since a user who reloads an adapter onto the model it was trained on usually meant to replace
        the first (and this one's freeze re-freezes the other's unfrozen_modules). Several adapters on one
        model: one ReftModel, reft.load_adapter / add_adapter."""
        refs = [r for r in model.__dict__.get(self._ADAPTERS, []) if r() is not None and r()._handles]
        if refs:
            others = [r() for r in refs]
            unfrozen = sorted({m for o in others for m in o._unfrozen()})
            warnings.warn(
                f"this {type(model).__name__} already carries the hooks of {len(others)} other ReftModel(s). They stay "
                "attached and edit only in their own forward/generate calls, so this adapter's outputs are its own; "
                "call old_reft.remove_hooks() on the one(s) you replace (several adapters on one model: "
                "old_reft.load_adapter(...) / add_adapter(...))"
                + (f" (their unfrozen_modules {unfrozen} were frozen again unless this config unfreezes them)"
                   if unfrozen else ""), stacklevel=4)
        model.__dict__[self._ADAPTERS] = refs + [weakref.ref(self)]

    def _model_device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            hint = pyreft_calls.pyreft_method_hint(type(self).__name__, name)
            if hint is None:
                raise
        raise AttributeError(hint)

    # -- hooks ----------------------------------------------------------------------------------

    def _begin_forward(self, module, args, kwargs):
        state = _CALL.get()
        if state is not None and state.owner is self:
            state.offset = _past_length(state, args, kwargs)
        return None

    def _edit(self, site: tuple[int, str], hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Applies the call's edits at `site` (its plan: integration/plans.py) to hidden [B, T, d]; returns the
        tensor to pass on, or None when there is nothing to do in this forward (decided on the host)."""
        state = _CALL.get()
        if state is None or state.owner is not self or (state.bound is not None and state.offset >= state.bound):
            return None
        edits = state.plan.sites.get(site)
        if not edits:
            return None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"a ReFT site got {type(hidden).__name__} {getattr(hidden, 'shape', '')}; expected "
                             "hidden states [B, T, d]")
        locations = state.step_locations(hidden.shape[0], hidden.shape[1])
        if locations is None:
            return None
        # in place, except into a tensor the caller owns (inputs_embeds) or a leaf that requires grad
        if (hidden.is_leaf and hidden.requires_grad) or hidden.untyped_storage().data_ptr() in state.caller_storage:
            hidden = hidden.clone()
        for edit in edits:
            hidden = edit.apply(hidden, locations, state, self)
        return hidden

    def _check_hooked(self) -> None:
        if self._removed:
            raise RuntimeError("this ReftModel's hooks were removed (remove_hooks()): it takes no more adapters; "
                               "build a new one (get_reft_model / ReftModel.from_pretrained)")

    def _hook_sites(self, adapter: Adapter) -> None:
        """One hook per (layer, component) site any adapter edits, added when the first adapter editing it is."""
        layers = self.model.get_submodule(self.layers_path)
        for site in adapter.sites:
            if site in self._site_handles:
                continue
            layer, component = site
            _, module, which = component_site(layers[layer], component)
            if which == "input":
                handle = module.register_forward_pre_hook(self._input_hook(site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._output_hook(site))
            self._site_handles[site] = handle
            self._handles.append(handle)

    def _unhook_unused_sites(self) -> None:
        """Removes the hooks of sites no adapter edits any more (delete_adapter)."""
        used = {site for a in self._registry.values() for site in a.sites}
        for site in [s for s in self._site_handles if s not in used]:
            handle = self._site_handles.pop(site)
            handle.remove()
            self._handles.remove(handle)

    def _output_hook(self, site):
        def reft_output_hook(module, args, output):
            if isinstance(output, torch.Tensor):
                edited = self._edit(site, output)
                return None if edited is None or edited is output else edited
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                edited = self._edit(site, output[0])
                if edited is None or edited is output[0]:
                    return None
                return type(output)((edited, *output[1:]))
            if _CALL.get() is not None and _CALL.get().owner is self:
                raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; a ReFT output site "
                                "needs a tensor or a tuple whose first element is the hidden states")
            return None

        return reft_output_hook

    def _input_hook(self, site):
        def reft_input_hook(module, args, kwargs):
            if args:
                edited = self._edit(site, args[0])
                return None if edited is None or edited is args[0] else ((edited, *args[1:]), kwargs)
            if "hidden_states" in kwargs:
                edited = self._edit(site, kwargs["hidden_states"])
                if edited is None or edited is kwargs["hidden_states"]:
                    return None
                return args, {**kwargs, "hidden_states": edited}
            if _CALL.get() is not None and _CALL.get().owner is self:
                raise TypeError(f"{type(module).__name__} got no positional hidden states nor hidden_states=; "
                                "cannot apply a block_input intervention")
            return None

        return reft_input_hook

    def remove_hooks(self) -> None:
        """Detaches this adapter from the base model (only its own hooks). Its forward and generate then
        raise; the base model runs as it did before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._site_handles = {}
        self._removed = True
        refs = self.model.__dict__.get(self._ADAPTERS, [])
        self.model.__dict__[self._ADAPTERS] = [r for r in refs if r() is not None and r() is not self]
        for m in self._checkpointed:
            f = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(f, "reft_wrapped", None) is not None:
                m._gradient_checkpointing_func = f.reft_wrapped

    # -- calls ----------------------------------------------------------------------------------

    @property
    def config(self):
        """The base model's config (what transformers utilities read); the adapter's is reft_config."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the adapters live (the base model's device before any adapter has parameters)."""
        for adapter in self._registry.values():
            for p in adapter.interventions.parameters():
                return p.device
        return self._model_device()

    def _wrap_checkpointing(self) -> None:
        for m in self._checkpointed:
            f = getattr(m, "_gradient_checkpointing_func", None)
            if f is not None and getattr(f, "reft_wrapped", None) is None:
                m._gradient_checkpointing_func = _carry_call_state(f)

    @contextlib.contextmanager
    def _call(self, intervention_locations, batch: int, prompt_length: Optional[int] = None, caller_tensors=(),
              adapter_names: Optional[Sequence[str]] = None, mask=None):
        """The per-call state around one forward or generate. prompt_length (generate): locations index the
        prompt; any at or past its end are never edited (checked on the CPU, masked on a device).
        adapter_names: one adapter per row (a mixed batch), else the active adapters. mask: a callable giving
        the prompt's attention mask [B, T], for locations from the adapters' position schemes."""
        if not self._handles:
            raise RuntimeError("this ReftModel's hooks were removed (remove_hooks()): it can no longer edit; build "
                               "a new one (get_reft_model / ReftModel.from_pretrained), or call reft.model(...) for "
                               "the base model")
        if self._disabled():
            yield  # disable_adapter(): the base model, unedited
            return
        plan, locations, ids, banks = self._plan_call(intervention_locations, batch, adapter_names, mask)
        if plan is None:
            yield  # every row "__base__"
            return
        if prompt_length is not None:
            if locations.device.type == "cpu" and locations.numel() and int(locations.max()) >= prompt_length:
                raise ValueError(f"intervention_locations must index the prompt (positions -1 .. {prompt_length - 1}: "
                                 f"it has {prompt_length} tokens), got {int(locations.max())}")
            locations = torch.where(locations < prompt_length, locations, -1)
        storage = tuple(t.untyped_storage().data_ptr() for t in caller_tensors if isinstance(t, torch.Tensor))
        self._wrap_checkpointing()
        if self._shared is not None:  # trainable adapters of this call: their shared-bank rows are rebuilt later
            trainable = [a.name for a in plan.adapters if a.requires_grad()]
            if trainable:
                self._shared.forget(trainable)
        state = _Call(self, locations, storage, bound=prompt_length, plan=plan, ids=ids, banks=banks)
        token = _CALL.set(state)
        try:
            # every trainable R of the call's adapters once per call, all layers in one batch (frozen ones come
            # from their caches)
            orthonormals = [m for a in plan.adapters for m in a.orthonormals]
            if any(p.requires_grad for m in orthonormals for p in m.parameters()):
                with orthonormal_batch(orthonormals):
                    yield
            else:
                yield
        finally:
            _CALL.reset(token)

    def _plan_call(self, intervention_locations, batch: int, adapter_names, mask):
        """(plan, locations [N, B, P] on the adapters' device, bank rows [S, B] or None, the banks' source) for
        a call; Nones when every row is "__base__". See integration/plans.py."""
        device = self.device
        if adapter_names is None:
            if not self._active:
                raise ValueError(f"no adapter is active (adapters: {list(self._registry)}): set_adapter(name), or pass "
                                 "adapter_names=[...] (one per row); the base model alone: reft.model(...)")
            return self._single(tuple(self._active), intervention_locations, batch, mask, device) + (None, None)
        names = self._row_names(adapter_names, batch)
        present = set(names)
        used = tuple(sorted(present - {BASE}))  # (sorted: one plan per set of adapters, no loop over all of them)
        if not used:
            return None, None, None, None
        base = BASE in present
        if len(used) == 1:  # one adapter (and "__base__" rows): the single-adapter path
            plan, locations = self._single(used, intervention_locations, batch, mask, device)
            if base:
                rows = torch.tensor([n == BASE for n in names]).to(device, non_blocking=True)
                locations = locations.masked_fill(rows[None, :, None], -1)
            return plan, locations, None, None
        plan = self._plan(("mixed", used), lambda: MixedPlan([self._registry[n] for n in used], self._shared_banks()))
        rows = [plan.index.get(n, len(used)) for n in names]
        if intervention_locations is None:
            self._need_schemes(plan.adapters)
            rows_locations = scheme_rows(plan.adapters, rows, self._mask(mask), plan.num_locations).to(device)
        else:
            rows_locations = self._check_locations(intervention_locations, batch, plan.num_locations, device,
                                                   f"a mixed batch of {list(used)}: n = the most interventions any "
                                                   "of them has; row b uses its adapter's first n_a").transpose(0, 1)
        if not any(a.requires_grad() for a in plan.adapters):  # frozen: the model's shared banks
            banks = self._shared_banks()
            banks.validate(plan.adapters)
        else:  # trainable: the batch's own banks, once per call under no_grad, every forward with autograd
            banks = None if torch.is_grad_enabled() else object()
        positions, ids = plan.gather(torch.tensor(rows).to(device, non_blocking=True), rows_locations,
                                     shared=isinstance(banks, SharedBanks))
        return plan, positions, ids, banks

    def _plan(self, key: tuple, build):
        """The plan of an adapter configuration, kept for later calls (the _PLANS most recently used)."""
        plan = self._plans.pop(key, None)  # re-inserted below: the most recently used last
        if plan is None:
            plan = build()
            while len(self._plans) >= _PLANS:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def _shared_banks(self) -> SharedBanks:
        if self._shared is None:
            self._shared = SharedBanks(list(self._registry.values()))
        return self._shared

    def _single(self, names: tuple, intervention_locations, batch, mask, device):
        plan = self._plan(("single", names), lambda: Plan([self._registry[n] for n in names]))
        if intervention_locations is None:
            self._need_schemes(plan.adapters)
            locations = pad_cat([a.locations(self._mask(mask)) for a in plan.adapters], 1)
        else:
            locations = intervention_locations
        what = None if len(names) == 1 else (f"the composition {list(names)}: their locations one after the "
                                              "other")
        return plan, self._check_locations(locations, batch, plan.num_locations, device, what)

    @staticmethod
    def _need_schemes(adapters) -> None:
        missing = [a.name for a in adapters if a.config.positions is None]
        if missing:
            raise ValueError(f"intervention_locations is required ([B, n_interventions, P] int64, -1 = no edit; "
                             f"reft_model.locations(prompt_attention_mask) builds it) when omitted, each row's "
                             f"positions come from its adapter's position scheme, and adapter(s) {missing} have none: "
                             "set ReftConfig(positions='f5+l5' or 'last'). To run the base model unedited, call "
                             "reft_model.model(...) or use `with reft_model.disable_adapter():`")

    @staticmethod
    def _check_locations(locations, batch, n, device, what):
        try:
            return check_locations(locations, batch, n, device)
        except ValueError as e:
            if what is None:
                raise
            raise ValueError(f"{e} ({what})") from None

    def _row_names(self, adapter_names, batch: int) -> list[str]:
        names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), one per row ('{BASE}': no edit), "
                            f"got {type(adapter_names).__name__}")
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows (one per row)")
        unknown = sorted({n for n in names if n != BASE and n not in self._registry})
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown}; adapters: {list(self._registry)} (and "
                             f"'{BASE}' for no edit)")
        return names

    @staticmethod
    def _mask(mask) -> torch.Tensor:
        return mask() if callable(mask) else mask

    @staticmethod
    def _prompt_mask(attention_mask, prompt, what: str):
        """A callable giving the mask positions are computed from: attention_mask, or ones over the prompt."""
        def get():
            if isinstance(attention_mask, torch.Tensor):
                return attention_mask
            if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
                return torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
            raise ValueError(f"intervention_locations omitted and no attention_mask nor {what} to compute them from")
        return get

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        for x in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask")):
            if isinstance(x, torch.Tensor):
                return x.shape[0]
        raise ValueError("pass input_ids or inputs_embeds (the prompt, [B, T]) with intervention_locations "
                         "[B, n_interventions, P]: reft(input_ids=..., attention_mask=..., intervention_locations="
                         "reft.locations(attention_mask))")

    def _forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, intervention_locations: Optional[torch.Tensor] = None,
                 adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The base model's forward with the edits applied. Other arguments go to the base model unchanged.

        adapter_names: one adapter name per row ("__base__": no edit), a mixed batch (PEFT's argument; here it
            also trains: each adapter gets the gradient of its rows); None: the active adapter(s).
        intervention_locations: [B, n, P] int (-1 = no edit): n = the active adapter's num_interventions (the
            sum when several are composed, their locations one after the other); in a mixed batch n = the most
            any of its adapters has, row b using its adapter's first n_a. Omitted: each row's positions from
            its adapter's position scheme (ReftConfig.positions) and attention_mask, the whole input being the
            prompt (training data, prompt + answer, carries locations of its prompt: make_data_module).

        pyreft's form, reft(base_dict, unit_locations={"sources->base": (None, locs)}), is converted and
        returns pyreft's pair (original output or None, edited output); see integration/pyreft_calls.py."""
        if pyreft_calls.is_pyreft_call(input_ids, kwargs):
            kwargs, original = pyreft_calls.convert(input_ids, kwargs, self._num_locations(adapter_names),
                                                    generating=False)
            if attention_mask is not None:
                kwargs.setdefault("attention_mask", attention_mask)
            if labels is not None:
                kwargs.setdefault("labels", labels)
            if intervention_locations is not None:
                if "intervention_locations" in kwargs:
                    raise ValueError("give unit_locations (pyreft's form) or intervention_locations, not both")
                kwargs["intervention_locations"] = intervention_locations
            base = self.model(**{k: v for k, v in kwargs.items() if k != "intervention_locations"}) if original else None
            return base, self._forward(adapter_names=adapter_names, **kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if labels is not None:
            kwargs["labels"] = labels
        batch = self._batch_size(input_ids, kwargs)
        prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        with self._call(intervention_locations, batch, caller_tensors=(kwargs.get("inputs_embeds"),),
                        adapter_names=adapter_names, mask=self._prompt_mask(attention_mask, prompt, "input_ids")):
            return self.model(input_ids=input_ids, **kwargs) if input_ids is not None else self.model(**kwargs)

    def _num_locations(self, adapter_names) -> int:
        """The n of intervention_locations a call with these adapter_names takes."""
        if adapter_names is None:
            return self.num_interventions
        names = set(adapter_names) - {BASE}
        return max((a.num_interventions for n, a in self._registry.items() if n in names), default=1)

    forward = _Forward(_forward)

    def _forward_signature(self) -> inspect.Signature:
        """forward's parameters as inspect.signature shows them: input_ids, attention_mask, labels,
        intervention_locations, then the base model's other named inputs (keyword-only), then **kwargs."""
        cached = self.__dict__.get("_signature")
        if cached is not None:
            return cached
        own = list(inspect.signature(self._forward).parameters.values())
        names = {p.name for p in own}
        try:
            base = inspect.signature(self.model.forward).parameters.values()
        except (TypeError, ValueError):
            base = []
        extra = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in base
                 if p.name not in names and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        sig = inspect.Signature(own[:-1] + extra + own[-1:])
        self.__dict__["_signature"] = sig
        return sig

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, intervention_locations: Optional[torch.Tensor] = None,
                 adapter_names: Optional[Sequence[str]] = None, **kwargs):
        """The base model's generate with the prompt edited. intervention_locations: [B, n, P] in the prompt's
        coordinates (left padding: see locations()); omitted: each row's positions from its adapter's position
        scheme and the prompt's attention_mask. adapter_names: one adapter per prompt ("__base__": none), as
        forward; beams and num_return_sequences repeat each row's adapter with its locations. Positions index
        the prompt, generated tokens are never edited. Every forward of the base model edits the locations
        among the tokens it processes, so the tokens are the same with the KV cache (the prompt edited once, at
        prefill), without it (use_cache=False: every step re-runs the prompt, edited) and with any cache
        implementation. Other arguments go to the base model's generate; the result is what it returns.

        pyreft's form, `_, out = reft.generate(prompt, unit_locations={"sources->base": (None, locs)},
        intervene_on_prompt=True, ...)`, is converted and returns pyreft's pair (original output or None, the
        edited generation); see integration/pyreft_calls.py."""
        if pyreft_calls.is_pyreft_call(input_ids, kwargs):
            kwargs, original = pyreft_calls.convert(input_ids, kwargs, self._num_locations(adapter_names),
                                                    generating=True)
            if intervention_locations is not None:
                if "intervention_locations" in kwargs:
                    raise ValueError("give unit_locations (pyreft's form) or intervention_locations, not both")
                kwargs["intervention_locations"] = intervention_locations
            base = self.model.generate(**{k: v for k, v in kwargs.items() if k != "intervention_locations"}) \
                if original else None
            return base, self.generate(adapter_names=adapter_names, **kwargs)
        batch = self._batch_size(input_ids, kwargs)
        embeds = kwargs.get("inputs_embeds")
        prompt = embeds if isinstance(embeds, torch.Tensor) else input_ids
        prompt_length = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None
        with self._call(intervention_locations, batch, prompt_length, (embeds,), adapter_names=adapter_names,
                        mask=self._prompt_mask(kwargs.get("attention_mask"), prompt, "prompt")):
            if input_ids is not None:
                return self.model.generate(input_ids=input_ids, **kwargs)
            return self.model.generate(**kwargs)

    def locations(self, attention_mask: torch.Tensor, positions: Optional[str] = None,
                  share_weights: Optional[bool] = None, adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """intervention_locations for prompts marked by attention_mask [B, T] (left or right padded): what a
        forward or generate without them computes, to inspect or edit.

        Without adapter_names: [B, num_interventions, P] with the active adapter's position scheme
        (reft_config.positions, or `positions`: "f{p}+l{s}" or "last"; share_weights likewise); with several
        composed, theirs one after the other. With adapter_names (one per row): a mixed batch's [B, n, P],
        n = the most interventions any named adapter has, each row from its own adapter's scheme (-1
        elsewhere, and for "__base__" rows)."""
        if adapter_names is None:
            adapters = [self._registry[n] for n in self._active]
            if len(adapters) == 1:
                return adapters[0].locations(attention_mask, positions, share_weights)
            if positions is not None or share_weights is not None:
                raise ValueError(f"positions= / share_weights= override one adapter's scheme; {len(adapters)} are "
                                 f"active ({self._active}): use reft.adapters[name].locations(mask, positions=...)")
            if not adapters:
                raise ValueError("no adapter is active: set_adapter(name), or pass adapter_names=[...]")
            return pad_cat([a.locations(attention_mask) for a in adapters], 1)
        if positions is not None or share_weights is not None:
            raise ValueError("positions= / share_weights= do not combine with adapter_names (each row uses its "
                             "adapter's scheme)")
        names = self._row_names(adapter_names, attention_mask.shape[0])
        used = [n for n in self._registry if n in set(names)]
        if not used:
            return torch.full((len(names), 1, 1), -1, dtype=torch.long, device=attention_mask.device)
        adapters = [self._registry[n] for n in used]
        index = {n: u for u, n in enumerate(used)}
        rows = [index.get(n, len(used)) for n in names]
        n = max(a.num_interventions for a in adapters)
        locations = scheme_rows(adapters, rows, attention_mask, n)
        base = torch.tensor([u == len(used) for u in rows], device=locations.device)
        return locations.masked_fill(base[:, None, None], -1)

    # -- training helpers -----------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """Enables the base model's gradient checkpointing (what Trainer calls in transformers 4.x) and makes
        the recomputation see the edits. With use_reentrant=True the embedding output is made to require grad
        (as PEFT does), or the interventions inside a checkpointed block would get no gradient."""
        self._enable_checkpointing(gradient_checkpointing_kwargs, kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """transformers 5.x's name for gradient_checkpointing_enable (what its Trainer calls)."""
        self._enable_checkpointing(activation_checkpointing_kwargs, kwargs)

    def _enable_checkpointing(self, checkpoint_kwargs: Optional[dict], kwargs: dict) -> None:
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        self._wrap_checkpointing()
        reentrant = False
        for m in self._checkpointed:
            f = getattr(m, "_gradient_checkpointing_func", None)
            if f is not None:
                reentrant = reentrant or _is_reentrant(getattr(f, "reft_wrapped", f))
        if reentrant and hasattr(self.model, "enable_input_require_grads") and getattr(
                self.model, "_require_grads_hook", None) is None:
            self.model.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        disable = getattr(self.model, "activation_checkpointing_disable", None) or self.model.gradient_checkpointing_disable
        disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self._checkpointed)

    is_activation_checkpointing = is_gradient_checkpointing

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable intervention params: {trainable:,d} || model params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- saving and loading -----------------------------------------------------------------------

    def _base_signature(self) -> dict:
        cfg = getattr(self.model, "config", None)
        return {"model_type": getattr(cfg, "model_type", None), "class": type(self.model).__name__,
                "hidden_size": self.dim, "num_layers": len(self.model.get_submodule(self.layers_path)),
                "layers_path": self.layers_path}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], state_dict: Optional[dict] = None,
                        is_main_process: bool = True, format: str = "reft_kernels",
                        selected_adapters: Optional[Sequence[str]] = None, **_ignored) -> None:
        """Writes every adapter (or those in selected_adapters), PEFT's layout: the adapter "default" in
        save_directory, each other one in save_directory/<name>/. Each directory holds reft_config.json
        (everything needed to rebuild: representations, position scheme, unfrozen modules, the base model's
        width and depth, and an integrity record: the SHA-256 of the weights and of the config, checked at
        load) and reft_model.safetensors (the adapter's state, keyed "interventions.<key>.<name>" whatever
        the adapter's name). See integration/checkpoint.py. ReftModel.from_pretrained(model, dir) loads the
        "default" one; reft.load_adapter(dir, name, subfolder=name) each other one.

        state_dict: the state to write (default: self.state_dict()). Sharded (DTensor) entries, as FSDP2
        leaves them, are gathered with full_tensor(), a collective: under FSDP every rank must call this, and
        only the one with is_main_process=True writes.
        format: another registered format's writer (integration/formats.py), same layout. format="pyreft"
        (registered by reft_kernels.interop): directories pyreft's ReftModel.load reads (reft_kernels.save_pyreft;
        no dtype, act or dropout is stored there, as pyreft stores none)."""
        names = self._selected(selected_adapters)
        if format != _formats.NATIVE:
            writer = _formats.get_format(format).write
            if state_dict is not None:
                raise ValueError(f"format={format!r} saves the live adapter; state_dict= is not supported")
            if is_main_process:
                for name in names:
                    writer(self, saved_path(save_directory, name), adapter_name=name)
            return

        state = self.state_dict() if state_dict is None else state_dict
        per_adapter = {name: self.adapter_state(state, name) for name in names}
        if selected_adapters is None:
            prefixes = tuple(f"{adapter_path(n)}." for n in names) + tuple(f"model.{m}." for m in self._unfrozen())
            stray = [k for k in state if not k.startswith(prefixes)]
            if stray:
                raise ValueError(f"state_dict holds entries of no adapter of this model: {stray[:5]}")
        tensors = {}
        for name in names:
            out = {}
            for key, value in per_adapter[name].items():
                if hasattr(value, "full_tensor"):  # a torch.distributed DTensor shard
                    value = value.full_tensor()
                out[key] = value.detach().to("cpu").contiguous().clone()
            tensors[name] = out
        if not is_main_process:
            return
        for name in names:
            _ckpt.write(saved_path(save_directory, name), self._registry[name].config, self._base_signature(),
                        tensors[name], __version__)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: Union[str, os.PathLike], *, adapter_name: str = DEFAULT,
                        is_trainable: bool = True, backend: Optional[str] = None, layers_path: Optional[str] = None,
                        freeze: bool = True, verify: bool = True) -> "ReftModel":
        """Rebuilds an adapter saved by save_pretrained on `model`, which must have the saved model's width
        and number of layers (ValueError otherwise), under `adapter_name` (PEFT's argument). pyreft's argument
        order, from_pretrained(directory, model), is accepted too. The directory's subfolders (the other
        adapters of a save) are not read: reft.load_adapter(directory, name, subfolder=name) adds each.
        is_trainable (default True, as before named adapters existed; PEFT's default is False): whether the
        adapter's parameters require grad.

        Checked (integration/checkpoint.py): the config parses and every field is valid; the integrity record
        matches (a changed byte or field is an error naming the file; verify=False skips this check, for files
        edited on purpose); every tensor has the key, shape and dtype the config implies. Files saved before
        the record existed load with a warning."""
        if isinstance(model, (str, os.PathLike)) and isinstance(directory, nn.Module):
            model, directory = directory, model  # pyreft's ReftModel.load(directory, model) order
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_pretrained(model, directory): model must be the base torch.nn.Module, got "
                            f"{type(model).__name__}")
        adapter_name = check_adapter_name(adapter_name)
        saved = _ckpt.read(directory, verify=verify)
        base = saved.base_model
        layers_path = layers_path if layers_path is not None else base["layers_path"]
        _, layers = find_layers(model, layers_path)
        check_base(saved, model, hidden_size(model), len(layers), stacklevel=3)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        expected = {}
        for m in saved.config.unfrozen_modules:
            try:
                expected.update(model.get_submodule(m).state_dict(prefix=f"model.{m}.", keep_vars=True))
            except AttributeError as e:
                raise ValueError(f"unfrozen_modules: {m!r} is not a submodule of {type(model).__name__}") from e
        adapter = from_saved(saved, adapter_name, device=device, backend=backend, expected_model=expected)
        reft = cls(model, adapter, adapter_name=adapter_name, layers_path=layers_path, backend=backend, freeze=freeze)
        if not is_trainable:
            adapter.interventions.requires_grad_(False)
        return reft


def get_reft_model(model: nn.Module, config: ReftConfig, *, adapter_name: str = DEFAULT, **kwargs) -> ReftModel:
    """pyreft's (and PEFT's get_peft_model's) entry point: the base model, frozen, with the config's
    interventions hooked in as adapter `adapter_name` (keyword-only: pyreft's third positional argument,
    set_device, has no counterpart here)."""
    return ReftModel(model, config, adapter_name=adapter_name, **kwargs)


__all__ = ["CONFIG_NAME", "ReftModel", "WEIGHTS_NAME", "get_reft_model"]
