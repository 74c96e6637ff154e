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

How it runs (and what it fixes in pyreft, ../shared/notes/reft-semantics.md)
- One hook per (layer, component) site, registered once at construction and removed only by
  ReftModel.remove_hooks() (never other libraries' hooks). A site applies its interventions in order, each
  editing the hidden states in place at its positions with the fused op: no clone of the activation.
- Per-call state (the locations, whether the edit is still due) lives in a ContextVar set by forward and
  generate: two threads running two batches never see each other's positions, and a base-model call
  outside ReftModel runs unedited.
- Locations stay on the device: one transpose + copy per forward, then a view per intervention; no
  Python lists, no host sync.
- Every trainable orthonormal R of the adapter is computed once per forward or generate call, all in one
  batched group (reft_kernels.orthonormal_batch); a frozen adapter's R comes from each module's cache.
- Gradient checkpointing: the checkpoint function of the base model is wrapped so that the recomputation
  in the backward sees the same per-call state (pyreft's recomputation runs without its hooks).
- generate(): the prompt is edited once, at prefill; decode steps run no edit kernels (the hooks return
  at once). Beam search and num_return_sequences repeat each row's locations.
- eval()/train() reach the interventions (dropout is off in eval).
- state_dict() is the adapter only (interventions and unfrozen modules): Trainer checkpoints hold the
  adapter, not a copy of the frozen model.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import json
import os
import warnings
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
from torch import nn

from ..modules.interventions import INTERVENTIONS, ReftIntervention
from ..modules.orthonormal import _BATCHED, Orthonormal, orthonormal_batch
from .config import ReftConfig
from .locate import component_site, find_layers, hidden_size
from .positions import check_locations, scheme_locations

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass
class _Call:
    """What one forward/generate call needs at the hooks."""

    owner: "ReftModel"
    locations: torch.Tensor  # [n_interventions, B, P] int64 on the model's device
    caller_storage: tuple  # data_ptrs of caller tensors the edit must not write into (inputs_embeds)
    edit: bool = True  # generate: False once the prefill forward is done
    generating: bool = False

    def for_batch(self, batch: int) -> torch.Tensor:
        """Locations for a batch of `batch` rows: generate() expands rows for beams and return sequences
        (row b becomes rows b*k .. b*k + k - 1, as transformers' repeat_interleave does)."""
        B = self.locations.shape[1]
        if batch == B:
            return self.locations
        if batch % B:
            raise ValueError(f"hidden states have {batch} rows but intervention_locations has {B}")
        self.locations = self.locations.repeat_interleave(batch // B, dim=1)
        return self.locations


_CALL: contextvars.ContextVar[Optional[_Call]] = contextvars.ContextVar("reft_kernels_call", default=None)


def _site_key(layer: int, component: str, copy: int) -> str:
    """pyvene's key spelling (0.1.7 and later), so checkpoints line up with pyreft's."""
    return f"layer_{layer}_comp_{component}_unit_pos_nunit_1#{copy}"


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


class ReftModel(nn.Module):
    """A frozen base model with ReFT interventions hooked in (module docstring).

    Args:
        model: a transformers PreTrainedModel (or any nn.Module with a config and a list of blocks).
        config: ReftConfig.
        layers_path: dotted path of the block list when it cannot be found generically.
        backend: kernel backend for every intervention ("triton", "torch", None: automatic).
        freeze: set requires_grad=False on the base model (except config.unfrozen_modules).

    Attributes: model (the base model), reft_config, interventions (nn.ModuleDict, keys as pyvene spells
    them: "layer_{l}_comp_{component}_unit_pos_nunit_1#{k}"), config (the base model's config).
    """

    def __init__(self, model: nn.Module, config: ReftConfig, *, layers_path: Optional[str] = None,
                 backend: Optional[str] = None, freeze: bool = True):
        super().__init__()
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a reft_kernels.ReftConfig, got {type(config).__name__}")
        self.model = model
        self.reft_config = config
        self.layers_path, layers = find_layers(model, layers_path)
        self.dim = hidden_size(model)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if freeze:
            model.requires_grad_(False)
        for name in config.unfrozen_modules:
            try:
                model.get_submodule(name).requires_grad_(True)
            except AttributeError as e:
                raise ValueError(f"unfrozen_modules: {name!r} is not a submodule of {type(model).__name__}") from e

        self.interventions = nn.ModuleDict()
        sites: dict[tuple[int, str], list[tuple[int, ReftIntervention]]] = {}
        for index, (rep, copy) in enumerate(config.interventions()):
            if rep.layer >= len(layers):
                raise ValueError(f"representation layer {rep.layer} is out of range: {type(model).__name__} has "
                                 f"{len(layers)} layers ({self.layers_path})")
            cls = INTERVENTIONS[rep.intervention]
            kwargs: dict[str, Any] = dict(dtype=rep.dtype, act=rep.act, dropout=rep.dropout, device=device,
                                          backend=backend)
            if cls.orthonormal:
                kwargs["parametrization"] = rep.parametrization
            if rep.add_bias:
                kwargs["add_bias"] = True
            if not cls.source_linear:
                kwargs.pop("act")
            key = _site_key(rep.layer, rep.component, copy)
            while key in self.interventions:  # the same site named twice: pyvene numbers the copies
                copy += 1
                key = _site_key(rep.layer, rep.component, copy)
            self.interventions[key] = cls(self.dim, rep.low_rank_dimension, **kwargs)
            sites.setdefault((rep.layer, rep.component), []).append((index, self.interventions[key]))
        self.num_interventions = len(self.interventions)
        self._orthonormals = [m for m in self.interventions.modules() if isinstance(m, Orthonormal)]

        self._handles = []
        for (layer, component), site in sites.items():
            _, module, which = component_site(layers[layer], component)
            if which == "input":
                self._handles.append(module.register_forward_pre_hook(self._input_hook(site), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(site)))
        # generate(): the first (prefill) forward of the base model ends the edits of that call
        self._handles.append(model.register_forward_hook(self._end_of_prefill))
        self._checkpointed = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        # Trainer reads this to decide whether to pass num_items_in_batch on to forward
        base_forward = inspect.signature(model.forward).parameters.values()
        self.accepts_loss_kwargs = getattr(model, "accepts_loss_kwargs",
                                           any(p.kind == p.VAR_KEYWORD for p in base_forward))

    # -- hooks ----------------------------------------------------------------------------------

    def _edit(self, site, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Applies a site's interventions to hidden [B, T, d]; returns the tensor to pass on, or None when
        there is nothing to do in this call."""
        state = _CALL.get()
        if state is None or state.owner is not self or not state.edit:
            return None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"a ReFT site got {type(hidden).__name__} {getattr(hidden, 'shape', '')}; expected "
                             "hidden states [B, T, d]")
        # in place, except into a tensor the caller owns (inputs_embeds) or a leaf that requires grad
        if (hidden.is_leaf and hidden.requires_grad) or hidden.untyped_storage().data_ptr() in state.caller_storage:
            hidden = hidden.clone()
        locations = state.for_batch(hidden.shape[0])
        for index, intervention in site:
            hidden = intervention(hidden, locations[index])
        return hidden

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

    def _end_of_prefill(self, module, args, output):
        state = _CALL.get()
        if state is not None and state.owner is self and state.generating:
            state.edit = False

    def remove_hooks(self) -> None:
        """Detaches this adapter from the base model (only its own hooks)."""
        for h in self._handles:
            h.remove()
        self._handles = []
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
        return next(self.interventions.parameters()).device

    def _wrap_checkpointing(self) -> None:
        for m in self._checkpointed:
            f = getattr(m, "_gradient_checkpointing_func", None)
            if f is not None and getattr(f, "reft_wrapped", None) is None:
                m._gradient_checkpointing_func = _carry_call_state(f)

    @contextlib.contextmanager
    def _call(self, intervention_locations, batch: int, generating: bool, caller_tensors=()):
        if intervention_locations is None:
            raise ValueError("intervention_locations is required ([B, n_interventions, P] int64, -1 = no edit; "
                             "reft_model.locations(prompt_attention_mask) builds it). To run the base model "
                             "unedited, call reft_model.model(...)")
        locations = check_locations(intervention_locations, batch, self.num_interventions, self.device)
        storage = tuple(t.untyped_storage().data_ptr() for t in caller_tensors if isinstance(t, torch.Tensor))
        self._wrap_checkpointing()
        token = _CALL.set(_Call(self, locations, storage, generating=generating))
        try:
            # every trainable R once per call, all layers in one batch (frozen ones come from their caches)
            if any(p.requires_grad for m in self._orthonormals for p in m.parameters()):
                with orthonormal_batch(self._orthonormals):
                    yield
            else:
                yield
        finally:
            _CALL.reset(token)

    @staticmethod
    def _batch_size(input_ids, kwargs) -> int:
        for x in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("attention_mask")):
            if isinstance(x, torch.Tensor):
                return x.shape[0]
        raise ValueError("pass input_ids or inputs_embeds")

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, intervention_locations: Optional[torch.Tensor] = None,
                **kwargs):
        """The base model's forward with the edits applied. intervention_locations: [B, n_interventions, P]
        int (-1 = no edit), required. Other arguments go to the base model unchanged."""
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if labels is not None:
            kwargs["labels"] = labels
        batch = self._batch_size(input_ids, kwargs)
        with self._call(intervention_locations, batch, False, (kwargs.get("inputs_embeds"),)):
            return self.model(input_ids=input_ids, **kwargs) if input_ids is not None else self.model(**kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, intervention_locations: Optional[torch.Tensor] = None,
                 **kwargs):
        """The base model's generate with the prompt edited at prefill. intervention_locations is in the
        prompt's coordinates ([B, n_interventions, P]; left padding: see locations()). Other arguments go to
        the base model's generate."""
        batch = self._batch_size(input_ids, kwargs)
        with self._call(intervention_locations, batch, True, (kwargs.get("inputs_embeds"),)):
            if input_ids is not None:
                return self.model.generate(input_ids=input_ids, **kwargs)
            return self.model.generate(**kwargs)

    def locations(self, attention_mask: torch.Tensor, positions: Optional[str] = None,
                  share_weights: Optional[bool] = None) -> torch.Tensor:
        """intervention_locations [B, n_interventions, P] for prompts marked by attention_mask [B, T] (left or
        right padded), with the adapter's position scheme (reft_config.positions, or `positions`: "f{p}+l{s}"
        or "last")."""
        share = self.reft_config.share_weights if share_weights is None else share_weights
        return scheme_locations(attention_mask, positions if positions is not None else self.reft_config.positions,
                                num_interventions=self.num_interventions, share_weights=share)

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

    # -- the adapter's state --------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapter only: "interventions.<key>.<name>" and "model.<unfrozen module>.<name>" entries."""
        if args:
            raise TypeError("ReftModel.state_dict takes keyword arguments only (destination=, prefix=, keep_vars=)")
        out = destination if destination is not None else OrderedDict()
        self.interventions.state_dict(destination=out, prefix=prefix + "interventions.", keep_vars=keep_vars)
        for name in self.reft_config.unfrozen_modules:
            self.model.get_submodule(name).state_dict(destination=out, prefix=f"{prefix}model.{name}.",
                                                      keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads what state_dict() gives (adapter only). strict: every adapter key must be present and no
        other key may be."""
        parts: dict[str, tuple[nn.Module, dict]] = {"interventions.": (self.interventions, {})}
        for name in self.reft_config.unfrozen_modules:
            parts[f"model.{name}."] = (self.model.get_submodule(name), {})
        unexpected = []
        for key, value in state_dict.items():
            for prefix, (_, sub) in parts.items():
                if key.startswith(prefix):
                    sub[key[len(prefix):]] = value
                    break
            else:
                unexpected.append(key)
        missing = []
        for prefix, (module, sub) in parts.items():
            result = module.load_state_dict(sub, strict=False, assign=assign)
            missing += [prefix + k for k in result.missing_keys]
            unexpected += [prefix + k for k in result.unexpected_keys]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading the ReFT adapter: missing keys {missing}, unexpected keys "
                               f"{unexpected}")
        for m in self._orthonormals:
            m._cache = None
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _base_signature(self) -> dict:
        cfg = getattr(self.model, "config", None)
        return {"model_type": getattr(cfg, "model_type", None), "class": type(self.model).__name__,
                "hidden_size": self.dim, "num_layers": len(self.model.get_submodule(self.layers_path)),
                "layers_path": self.layers_path}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], state_dict: Optional[dict] = None,
                        is_main_process: bool = True, format: str = "reft_kernels", **_ignored) -> None:
        """Writes reft_config.json (everything needed to rebuild: representations, position scheme, unfrozen
        modules, and the base model's width and depth) and reft_model.safetensors (the adapter state).

        state_dict: the adapter state to write (default: self.state_dict()). Sharded (DTensor) entries, as
        FSDP2 leaves them, are gathered with full_tensor(), a collective: under FSDP every rank must call
        this, and only the one with is_main_process=True writes.
        format="pyreft": a directory pyreft's ReftModel.load reads (reft_kernels.save_pyreft; no dtype, act or
        dropout is stored there, as pyreft stores none)."""
        if format == "pyreft":
            if state_dict is not None:
                raise ValueError("format='pyreft' saves the live adapter; state_dict= is not supported")
            if is_main_process:
                from ..interop.pyreft_checkpoint import save_pyreft

                save_pyreft(self, save_directory)
            return
        if format != "reft_kernels":
            raise ValueError(f"format must be 'reft_kernels' or 'pyreft', got {format!r}")
        from safetensors.torch import save_file

        from .. import __version__

        state = self.state_dict() if state_dict is None else state_dict
        tensors = {}
        for key, value in state.items():
            if hasattr(value, "full_tensor"):  # a torch.distributed DTensor shard
                value = value.full_tensor()
            tensors[key] = value.detach().to("cpu").contiguous().clone()
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        meta = {"format": "reft_kernels", "format_version": FORMAT_VERSION, "reft_kernels_version": __version__,
                "config": self.reft_config.to_json(), "base_model": self._base_signature()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: Union[str, os.PathLike], *,
                        backend: Optional[str] = None, layers_path: Optional[str] = None,
                        freeze: bool = True) -> "ReftModel":
        """Rebuilds an adapter saved by save_pretrained on `model`, which must have the saved model's width
        and number of layers (ValueError otherwise)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a directory written by ReftModel.save_pretrained")
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != "reft_kernels":
            raise ValueError(f"{path} is not a reft_kernels adapter config")
        saved = meta["base_model"]
        layers_path = layers_path if layers_path is not None else saved.get("layers_path")
        _, layers = find_layers(model, layers_path)
        width = hidden_size(model)
        if width != saved["hidden_size"] or len(layers) != saved["num_layers"]:
            raise ValueError(f"the adapter in {directory} was trained on a {saved['class']} with hidden size "
                             f"{saved['hidden_size']} and {saved['num_layers']} layers; this "
                             f"{type(model).__name__} has hidden size {width} and {len(layers)} layers")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if saved.get("model_type") and model_type != saved["model_type"]:
            warnings.warn(f"the adapter was trained on model_type {saved['model_type']!r}, loading it on "
                          f"{model_type!r}", stacklevel=2)
        reft = cls(model, ReftConfig.from_json(meta["config"]), layers_path=layers_path, backend=backend,
                   freeze=freeze)
        reft.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=str(reft.device)))
        return reft


def get_reft_model(model: nn.Module, config: ReftConfig, **kwargs) -> ReftModel:
    """pyreft's entry point: the base model, frozen, with the config's interventions hooked in."""
    return ReftModel(model, config, **kwargs)


__all__ = ["CONFIG_NAME", "ReftModel", "WEIGHTS_NAME", "get_reft_model"]
