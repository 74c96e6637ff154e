"""Named adapters (PEFT's conventions): what one adapter is, the ReftModel methods that hold several by name,
and reading one adapter directory without a base model.

    reft = rk.get_reft_model(model, config)                     # one adapter, named "default" (PEFT's name)
    reft.load_adapter("out/german", adapter_name="german")      # ours or a pyreft checkpoint (frozen: PEFT's
                                                                #   is_trainable=False)
    reft.add_adapter("instruct", rk.ReftConfig(...))            # a fresh one (trainable)
    reft.set_adapter(["german", "instruct"])                    # composition: Φ_instruct(Φ_german(h))
    out = reft.generate(**batch, adapter_names=["german", "__base__", "instruct"], max_new_tokens=32)
    with reft.disable_adapter(): base_out = reft(**batch)       # the base model
    reft.save_pretrained("out")                                 # "default" in out/, the others in out/<name>/
    adapter = rk.read_adapter("out/german")                     # config + loaded modules, no base model

- Adapter: one adapter's ReftConfig and intervention modules (keys as pyvene spells them), built for a width
  without a base model. read_adapter(path) reads one directory, ours (integration/checkpoint.py) or one of a
  registered format (integration/formats.py: pyreft's, registered by reft_kernels.interop), into one: the
  loading code ReftModel, the vLLM plugin and other servers share.
- AdapterRegistry: the named-adapter methods of ReftModel (load_adapter, add_adapter, delete_adapter,
  set_adapter, set_requires_grad, active_adapters / active_adapter, disable_adapter, adapters), the
  adapters' state (state_dict, load_state_dict, save_pretrained's layout), and the per-call choice of a plan
  (integration/plans.py: composition and mixed batches).

What an expert PEFT user should know about the differences
- adapter_names works in training too (PEFT refuses it there): several adapters train in one batch, each
  getting the gradient of its own rows (ReftDataCollator carries the names).
- set_adapter(names) makes the named adapters trainable and the others frozen, as PEFT does
  (inference_mode=True freezes them all); set_requires_grad(names, flag) sets it explicitly.
- ReftModel.from_pretrained keeps a trainable adapter (is_trainable=True: it did before named adapters
  existed), load_adapter a frozen one (is_trainable=False, PEFT's default).
- An adapter with unfrozen_modules trains base-model modules, which every adapter would share: it must be
  the only adapter of its ReftModel (PEFT's modules_to_save keeps a copy per adapter; here it is refused).
- State-dict keys: the adapter "default" keeps "interventions.<key>.<name>" (and "model.<module>.<name>"
  for unfrozen modules), any other adapter n has "adapter_interventions.<n>.<key>.<name>", the module paths
  (named_parameters, DDP and distributed checkpoints see the same names). Files are per adapter and keyed
  as they always were ("interventions.<key>.<name>"), whatever the adapter's name.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import types
import warnings
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..modules.interventions import INTERVENTIONS, ReftIntervention
from ..modules.orthonormal import Orthonormal
from ..ops.fused_edit import EditSpec
from ..ops.mixed_edit import AdapterParams
from . import checkpoint as _ckpt
from . import formats as _formats
from .config import ReftConfig
from .positions import scheme_locations

DEFAULT = "default"  # PEFT's name of the adapter get_reft_model / from_pretrained create
BASE = "__base__"  # PEFT's spelling, in adapter_names, of a row that gets no edit
PathLike = Union[str, "os.PathLike[str]"]


def check_adapter_name(name: Any) -> str:
    """An adapter name: a non-empty string without "." (it names a submodule), not "__base__" and not an
    attribute of nn.ModuleDict (such as "training")."""
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter_name must be a non-empty string without '.' ('{BASE}' names the base model in "
                         f"adapter_names), got {name!r}")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter_name {name!r} is an attribute of torch.nn.ModuleDict (the adapters are its "
                         "entries): choose another name")
    return name


def site_key(layer: int, component: str, copy: int) -> str:
    """pyvene's key spelling (0.1.7 and later), so checkpoints line up with pyreft's."""
    return f"layer_{layer}_comp_{component}_unit_pos_nunit_1#{copy}"


class Adapter:
    """One adapter: its ReftConfig and its intervention modules, built for a hidden width `dim` without a base
    model.

    Attributes:
        name: the adapter's name (ReftModel's key). config: its ReftConfig.
        interventions: nn.ModuleDict, keys as pyvene spells them, in the order intervention_locations indexes.
        modules: the same modules as a list, by intervention index. num_interventions: len(modules).
        sites: {(layer, component): (intervention indices at that site, in order)}.
        dim: the width. model_state: base-model tensors saved with it ("model.<module>.<name>": its
            unfrozen_modules), applied when it is attached to a model. source: the directory it was read
            from (or None). base_model: what the directory says of the model it was trained on (ours:
            hidden_size, num_layers, class, model_type, layers_path; pyreft's: hidden_size), or None.
    """

    def __init__(self, name: str, config: ReftConfig, dim: int, *, num_layers: Optional[int] = None,
                 device=None, backend: Optional[str] = None, layers_path: str = "the model"):
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a reft_kernels.ReftConfig, got {type(config).__name__}")
        self.name, self.config, self.dim = name, config, dim
        self.interventions = nn.ModuleDict()
        sites: dict[tuple[int, str], list[int]] = {}
        for index, (rep, copy) in enumerate(config.interventions()):
            if num_layers is not None and rep.layer >= num_layers:
                raise ValueError(f"representation layer {rep.layer} is out of range: {layers_path} has "
                                 f"{num_layers} layers")
            cls = INTERVENTIONS[rep.intervention]
            kwargs: dict[str, Any] = dict(dtype=rep.dtype, act=rep.act, dropout=rep.dropout, device=device,
                                          backend=backend)
            if cls.orthonormal:
                kwargs["parametrization"] = rep.parametrization
            if rep.add_bias:
                kwargs["add_bias"] = True
            if not cls.source_linear:
                kwargs.pop("act")
            key = site_key(rep.layer, rep.component, copy)
            while key in self.interventions:  # the same site named twice: pyvene numbers the copies
                copy += 1
                key = site_key(rep.layer, rep.component, copy)
            self.interventions[key] = cls(dim, rep.low_rank_dimension, **kwargs)
            sites.setdefault((rep.layer, rep.component), []).append(index)
        self.modules: list[ReftIntervention] = list(self.interventions.values())
        self._holders = list(self.interventions.modules())  # every submodule: their own parameter/buffer dicts
        self.sites = {s: tuple(v) for s, v in sites.items()}
        self.model_state: dict[str, torch.Tensor] = {}
        self.source: Optional[str] = None
        self.base_model: Optional[dict] = None

    @property
    def num_interventions(self) -> int:
        return len(self.modules)

    @property
    def orthonormals(self) -> list[Orthonormal]:
        return [m for m in self.interventions.modules() if isinstance(m, Orthonormal)]

    def locations(self, attention_mask: torch.Tensor, positions: Optional[str] = None,
                  share_weights: Optional[bool] = None) -> torch.Tensor:
        """[B, num_interventions, P] for prompts marked by attention_mask [B, T], with this adapter's position
        scheme (reft_config.positions, or `positions`: "f{p}+l{s}" or "last")."""
        share = self.config.share_weights if share_weights is None else share_weights
        return scheme_locations(attention_mask, positions if positions is not None else self.config.positions,
                                num_interventions=self.num_interventions, share_weights=share)

    def params(self, index: int) -> AdapterParams:
        """Intervention `index` in the mixed op's terms (live tensors: differentiable when trainable)."""
        m = self.modules[index]
        return AdapterParams(m.lift(), m._weight(), m.bias, m._proj_bias(),
                             EditSpec(m.source_linear, m.subtract_proj, m.act), m.dropout)

    def tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the interventions (read from the submodules' own dicts: several times
        cheaper than Module.parameters(), which this is called in place of once per mixed call)."""
        return [t for h in self._holders for d in (h._parameters, h._buffers) for t in d.values() if t is not None]

    def requires_grad(self) -> bool:
        return any(p is not None and p.requires_grad for h in self._holders for p in h._parameters.values())

    def fingerprint(self) -> tuple:
        """Changes whenever a tensor of the adapter is replaced, moved, cast or written in place (its version
        counter; writes through .data bypass it, as they bypass the orthonormal R cache)."""
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.tensors())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies "interventions.<key>.<name>" entries (what save_pretrained writes) into the modules."""
        prefix = "interventions."
        self.interventions.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                           strict=True)
        self.model_state = {k: v for k, v in tensors.items() if k.startswith("model.")}
        for m in self.orthonormals:
            m._cache = None

    def state(self, keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":
        """The interventions' state with save_pretrained's keys ("interventions.<key>.<name>")."""
        return self.interventions.state_dict(prefix="interventions.", keep_vars=keep_vars)

    def __repr__(self) -> str:
        kinds = sorted({type(m).kind for m in self.modules})
        return (f"Adapter({self.name!r}, {self.num_interventions} interventions {kinds} at "
                f"{len(self.sites)} sites, positions={self.config.positions!r})")


# -- reading one adapter directory ------------------------------------------------------------------------

def adapter_format(path: PathLike) -> str:
    """"reft_kernels" (reft_config.json, ReftModel.save_pretrained) or the name of the registered format that
    recognizes the directory (integration/formats.py; "pyreft": intkey_*.bin, pyreft's ReftModel.save or a
    pyreft Trainer checkpoint); FileNotFoundError naming what is missing otherwise."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, _ckpt.CONFIG_NAME)):
        return _formats.NATIVE
    fmt = _formats.recognize(path) if os.path.isdir(path) else None
    if fmt is None:
        raise _formats.unrecognized(path, _ckpt.CONFIG_NAME)
    return fmt.name


def from_saved(saved: _ckpt.SavedAdapter, name: str = DEFAULT, *, device=None, backend: Optional[str] = None,
               expected_model: Optional[dict] = None) -> Adapter:
    """An Adapter built from what checkpoint.read returned, its tensors checked (key, shape, dtype, finite:
    checkpoint.check_tensors) and loaded. expected_model: the base model's "model.<module>.<name>" tensors
    its unfrozen_modules must match (None: those entries are taken as saved, to be checked when attached)."""
    base = saved.base_model
    adapter = Adapter(name, saved.config, base["hidden_size"], num_layers=base["num_layers"], device=device,
                      backend=backend, layers_path=f"the saved {base['class']}")
    expected = dict(adapter.state(keep_vars=True))
    if expected_model is None:
        prefixes = tuple(f"model.{m}." for m in saved.config.unfrozen_modules)
        expected.update({k: v for k, v in saved.tensors.items() if k.startswith(prefixes)})
    else:
        expected.update(expected_model)
    _ckpt.check_tensors(saved, expected, castable=lambda key: key.startswith("model."))
    adapter.load_tensors(saved.tensors)
    adapter.source = saved.directory
    adapter.base_model = dict(base)
    return adapter


def read_adapter(path: PathLike, *, name: str = DEFAULT, verify: bool = True, device=None,
                 backend: Optional[str] = None, **pyreft_options) -> Adapter:
    """Reads one adapter directory, ours (ReftModel.save_pretrained) or pyreft's (config.json + intkey_*.bin),
    into an Adapter (config + loaded intervention modules, on `device`, CPU by default) without a base model.

    Ours is checked as ReftModel.from_pretrained checks it (integrity record unless verify=False, every
    tensor's key, shape, dtype and finiteness); adapter.base_model is the saved model's signature
    (hidden_size, num_layers, class, model_type, layers_path). Another format goes through its registered
    reader (integration/formats.py): pyreft's is reft_kernels.interop's read_pyreft, and pyreft_options are
    load_pyreft's (positions, share_weights, dtype, act, dropout, add_bias, parametrization, representations,
    include_model); a Trainer checkpoint without config.json needs representations= and its width as dim=.
    Each module's params() gives the mixed op's AdapterParams (what a server's bank needs)."""
    fmt = adapter_format(path)
    if fmt != _formats.NATIVE:
        return _formats.get_format(fmt).read(path, name=name, device=device, backend=backend, **pyreft_options)
    if pyreft_options:
        raise TypeError(f"{os.fspath(path)} is a reft_kernels adapter (its config stores everything); "
                        f"{sorted(pyreft_options)} apply to pyreft checkpoints only")
    saved = _ckpt.read(path, verify=verify)
    return from_saved(saved, name, device=device, backend=backend)



def check_base(saved: _ckpt.SavedAdapter, model: nn.Module, width: int, num_layers: int, stacklevel: int = 2) -> None:
    """A saved adapter's base model against `model`: width and depth (ValueError), model_type (a warning)."""
    base = saved.base_model
    if width != base["hidden_size"] or num_layers != base["num_layers"]:
        raise ValueError(f"the adapter in {saved.directory} was trained on a {base['class']} with hidden size "
                         f"{base['hidden_size']} and {base['num_layers']} layers; this {type(model).__name__} has "
                         f"hidden size {width} and {num_layers} layers")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base["model_type"] and model_type != base["model_type"]:
        warnings.warn(f"the adapter was trained on model_type {base['model_type']!r}, loading it on "
                      f"{model_type!r}", stacklevel=stacklevel + 1)


# -- the named-adapter methods of ReftModel ---------------------------------------------------------------

# ids of the ReftModels whose adapters are disabled in this context (ReftModel.disable_adapter): a ContextVar,
# so that another thread or task using the same model keeps its adapters
_DISABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("reft_kernels_disabled", default=frozenset())


def adapter_path(name: str) -> str:
    """The module path (and state-dict prefix) of an adapter's interventions in a ReftModel."""
    return "interventions" if name == DEFAULT else f"adapter_interventions.{name}"


def saved_path(directory: PathLike, name: str) -> str:
    """Where save_pretrained writes adapter `name` (PEFT's layout: "default" in the directory, others in a
    subfolder each)."""
    return os.fspath(directory) if name == DEFAULT else os.path.join(os.fspath(directory), name)


_NO_MODULES = ReftConfig([{"layer": 0, "low_rank_dimension": 1}])  # a config without unfrozen_modules


class AdapterRegistry:
    """The named-adapter half of ReftModel (module docstring); ReftModel provides model, dim, backend,
    layers_path and the hooks (_check_hooked, _hook_sites, _unhook_unused_sites, _model_device)."""

    # -- what is there and what is active ---------------------------------------------------------

    def _init_registry(self) -> None:
        self._registry: "OrderedDict[str, Adapter]" = OrderedDict()
        self._active: list[str] = []
        self._plans: dict = {}  # (kind, adapter names) -> plans.Plan / MixedPlan, the most recently used last
        self._shared = None  # plans.SharedBanks of the current adapters, made at the first frozen mixed batch

    @property
    def adapters(self) -> Mapping[str, Adapter]:
        """The adapters by name, in the order they were added (read-only: use add_adapter / load_adapter /
        delete_adapter)."""
        return types.MappingProxyType(self._registry)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters (those a call without adapter_names applies, in order)."""
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """The active adapter's name; the list when several are active (as PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _the_active(self, what: str) -> Adapter:
        if len(self._active) != 1:
            raise ValueError(f"reft.{what} belongs to one adapter and {len(self._active)} are active "
                             f"({self._active}): use reft.adapters[name].{what}"
                             + ("" if self._active else ", or set_adapter(name)"))
        return self._registry[self._active[0]]

    @property
    def interventions(self) -> nn.ModuleDict:
        """The active adapter's intervention modules (keys as pyvene spells them, in the order
        intervention_locations indexes them). With several active: reft.adapters[name].interventions."""
        return self._the_active("interventions").interventions

    @property
    def reft_config(self) -> ReftConfig:
        """The active adapter's ReftConfig (several active: reft.adapters[name].config)."""
        return self._the_active("reft_config").config

    @property
    def num_interventions(self) -> int:
        """The n of intervention_locations [B, n, P] for a call with the active adapters: the active adapter's
        number of interventions, or their sum when several are composed."""
        return sum(self._registry[n].num_interventions for n in self._active)

    @property
    def _orthonormals(self) -> list:
        return [m for a in self._registry.values() for m in a.orthonormals]

    def _invalidate(self) -> None:
        """Drops the plans and banks (adapters were added, deleted or loaded)."""
        self._plans.clear()
        self._shared = None

    def _unfrozen(self) -> list[str]:
        return [m for a in self._registry.values() for m in a.config.unfrozen_modules]

    # -- adding and removing ------------------------------------------------------------------------

    def _check_new(self, name: Any, config: ReftConfig) -> str:
        name = check_adapter_name(name)
        if name in self._registry:
            raise ValueError(f"an adapter named {name!r} already exists (adapters: {list(self._registry)}); "
                             "delete_adapter it first or choose another name")
        if self._registry and (config.unfrozen_modules or self._unfrozen()):
            which = (f"the new adapter trains base-model modules {list(config.unfrozen_modules)}"
                     if config.unfrozen_modules else
                     f"adapter {next(n for n, a in self._registry.items() if a.config.unfrozen_modules)!r} trains "
                     f"base-model modules {self._unfrozen()}")
            raise ValueError(f"{which} (unfrozen_modules), which every adapter on this model would share: an adapter "
                             "with unfrozen_modules must be the only one on its ReftModel. Put it on a ReftModel of "
                             "its own (another copy of the base model)")
        return name

    def _model_tensors(self, config: ReftConfig) -> dict[str, torch.Tensor]:
        """The base model's "model.<module>.<name>" tensors of config.unfrozen_modules (what a saved adapter's
        entries must match)."""
        out = {}
        for m in config.unfrozen_modules:
            try:
                module = self.model.get_submodule(m)
            except AttributeError as e:
                raise ValueError(f"unfrozen_modules: {m!r} is not a submodule of {type(self.model).__name__}") from e
            out.update(module.state_dict(prefix=f"model.{m}.", keep_vars=True))
        return out

    def _attach(self, name: str, adapter: Adapter) -> None:
        """Registers a built adapter under `name`: its modules (on the model's device), its unfrozen modules
        (made trainable; its saved values copied in), and the hooks of sites not hooked yet."""
        if adapter.dim != self.dim:
            raise ValueError(f"adapter {name!r} is {adapter.dim} wide; this {type(self.model).__name__} has hidden "
                             f"size {self.dim}")
        layers = len(self.model.get_submodule(self.layers_path))
        deepest = max(layer for layer, _ in adapter.sites)
        if deepest >= layers:
            raise ValueError(f"adapter {name!r} edits layer {deepest}; this {type(self.model).__name__} has {layers} "
                             f"layers ({self.layers_path})")
        expected = self._model_tensors(adapter.config)
        saved = adapter.model_state
        unknown = [k for k in saved if k not in expected]
        bad = [k for k, v in saved.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if unknown or bad:
            found = ", ".join(f"{k}: {tuple(saved[k].shape)} vs {tuple(expected[k].shape) if k in expected else 'none'}"
                              for k in unknown + bad)
            raise ValueError(f"adapter {name!r}: base-model tensors {unknown + bad} do not fit this "
                             f"{type(self.model).__name__} ({found})")
        self._check_hooked()
        device = self._model_device()
        if any(t.device != device for t in adapter.tensors()):
            adapter.interventions.to(device)
        for m in adapter.config.unfrozen_modules:
            self.model.get_submodule(m).requires_grad_(True)
        with torch.no_grad():
            for key, value in saved.items():
                expected[key].copy_(value)
        adapter.name = name
        if name == DEFAULT:
            self._modules["interventions"] = adapter.interventions
        else:
            if "adapter_interventions" not in self._modules:
                self._modules["adapter_interventions"] = nn.ModuleDict()
            self._modules["adapter_interventions"][name] = adapter.interventions
        self._registry[name] = adapter
        self._invalidate()
        self._hook_sites(adapter)

    def add_adapter(self, adapter_name: str, config: ReftConfig) -> None:
        """Adds a new adapter (fresh, trainable interventions) built from `config`. As in PEFT it is not made
        active: set_adapter(name), or name it per row with adapter_names=[...]."""
        if not isinstance(config, ReftConfig):
            raise TypeError(f"config must be a reft_kernels.ReftConfig, got {type(config).__name__}")
        name = self._check_new(adapter_name, config)
        adapter = Adapter(name, config, self.dim, num_layers=len(self.model.get_submodule(self.layers_path)),
                          device=self._model_device(), backend=self.backend, layers_path=f"{type(self.model).__name__}"
                          f" ({self.layers_path})")
        self._model_tensors(config)  # names a missing unfrozen module before anything is attached
        self._attach(name, adapter)

    def load_adapter(self, model_id: PathLike, adapter_name: str, is_trainable: bool = False, *,
                     subfolder: Optional[str] = None, verify: bool = True, **pyreft_options) -> None:
        """Loads a saved adapter under `adapter_name`: a directory written by save_pretrained (checked as
        from_pretrained checks it) or a pyreft checkpoint (pyreft_options: load_pyreft's positions,
        share_weights, dtype, act, dropout, add_bias, parametrization, representations, include_model).
        subfolder: a subdirectory of model_id (save_pretrained puts a non-default adapter in
        <directory>/<name>). is_trainable=False (PEFT's default): the adapter is frozen. As in PEFT it is not
        made active. A base model of another width or depth is refused with a ValueError."""
        path = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        name = self._check_new(adapter_name, _NO_MODULES)  # before reading: a taken name fails fast
        fmt = adapter_format(path)
        layers = len(self.model.get_submodule(self.layers_path))
        if fmt != _formats.NATIVE:  # a registered format's reader (integration/formats.py), e.g. pyreft's
            adapter = _formats.get_format(fmt).read(path, name=name, dim=self.dim, num_layers=layers,
                                                    device=self._model_device(), backend=self.backend,
                                                    **pyreft_options)
        else:
            if pyreft_options:
                raise TypeError(f"{path} is a reft_kernels adapter (its config stores everything); "
                                f"{sorted(pyreft_options)} apply to pyreft checkpoints only")
            saved = _ckpt.read(path, verify=verify)
            check_base(saved, self.model, self.dim, layers, stacklevel=3)
            adapter = from_saved(saved, name, device=self._model_device(), backend=self.backend,
                                 expected_model=self._model_tensors(saved.config))
        self._check_new(name, adapter.config)
        self._attach(name, adapter)
        if not is_trainable:
            adapter.interventions.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter (its modules and the hooks of sites no other adapter edits). If it was active it
        leaves the active set; if none is left active, the first remaining adapter becomes active (with a
        warning), as in PEFT. An adapter that trained base-model modules (unfrozen_modules) leaves their
        trained values in the base model (they are frozen again; a warning says so)."""
        if adapter_name not in self._registry:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self._registry)}")
        adapter = self._registry.pop(adapter_name)
        if adapter_name == DEFAULT:
            del self._modules["interventions"]
        else:
            del self._modules["adapter_interventions"][adapter_name]
            if not len(self._modules["adapter_interventions"]):
                del self._modules["adapter_interventions"]
        if adapter.config.unfrozen_modules:
            for m in adapter.config.unfrozen_modules:
                self.model.get_submodule(m).requires_grad_(False)
            warnings.warn(f"adapter {adapter_name!r} trained base-model modules {adapter.config.unfrozen_modules}: "
                          "they keep its values (frozen again); reload the base model for the original ones",
                          stacklevel=2)
        self._invalidate()
        self._unhook_unused_sites()
        if adapter_name in self._active:
            self._active.remove(adapter_name)
            if not self._active and self._registry:
                self._active = [next(iter(self._registry))]
                warnings.warn(f"adapter {adapter_name!r} was the active adapter; {self._active[0]!r} is active now",
                              stacklevel=2)

    def _names(self, adapter_names: Union[str, Sequence[str]], what: str) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{what} takes an adapter name or a non-empty list of names, got {adapter_names!r}")
        unknown = [n for n in names if n not in self._registry]
        if unknown:
            raise ValueError(f"{what}: no adapter named {unknown}; adapters: {list(self._registry)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: an adapter is named twice in {list(names)}")
        return list(names)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Makes `adapter_name` (a name, or a list: composed in that order) the active adapter(s): what calls
        without adapter_names apply. Composition: at a site edited by several, they apply in the order given,
        Φ_b(Φ_a(h)) for ["a", "b"]; the call's intervention_locations are theirs one after the other
        [B, n_a + n_b, P] (or omitted: each adapter's own position scheme). As in PEFT, the named adapters
        become trainable (frozen with inference_mode=True) and every other adapter frozen."""
        names = self._names(adapter_name, "set_adapter")
        for n, a in self._registry.items():
            a.interventions.requires_grad_(n in names and not inference_mode)
        self._active = names

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Makes the named adapters trainable (or frozen), leaving the others as they are (PEFT's name)."""
        for n in self._names(adapter_names, "set_requires_grad"):
            self._registry[n].interventions.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self):
        """`with reft.disable_adapter():` calls run the base model unedited (intervention_locations and
        adapter_names are ignored inside). Per context: another thread using this model keeps its adapters."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield
        finally:
            _DISABLED.reset(token)

    def _disabled(self) -> bool:
        return id(self) in _DISABLED.get()

    # -- the adapters' state --------------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapters only: each adapter's interventions under its module path (adapter_path: the adapter
        "default" has "interventions.<key>.<name>", another adapter n "adapter_interventions.<n>.<key>.<name>")
        and "model.<unfrozen module>.<name>" entries."""
        if args:
            raise TypeError("ReftModel.state_dict takes keyword arguments only (destination=, prefix=, keep_vars=)")
        out = destination if destination is not None else OrderedDict()
        for name, adapter in self._registry.items():
            adapter.interventions.state_dict(destination=out, prefix=f"{prefix}{adapter_path(name)}.",
                                             keep_vars=keep_vars)
        for name in self._unfrozen():
            self.model.get_submodule(name).state_dict(destination=out, prefix=f"{prefix}model.{name}.",
                                                      keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads what state_dict() gives (adapters only). strict: every key must be present and no other key
        may be. Checked before anything is copied (a refused state dict leaves the adapters as they were):
        with strict, the keys; always, that no integer or boolean tensor lands in a floating parameter (torch
        would cast it silently; shapes are checked by torch)."""
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading the ReFT adapter: missing keys {missing}, unexpected keys "
                               f"{unexpected}")
        for key, value in state_dict.items():
            want = own.get(key)
            if isinstance(value, torch.Tensor) and want is not None and want.dtype.is_floating_point and \
                    not (value.dtype.is_floating_point or value.dtype.is_complex):
                raise RuntimeError(f"Error(s) in loading the ReFT adapter: {key} is {value.dtype}, the adapter holds "
                                   f"{want.dtype}: not a state dict of this adapter, or a damaged one")
        parts: dict[str, tuple[nn.Module, dict]] = {f"{adapter_path(n)}.": (a.interventions, {})
                                                    for n, a in self._registry.items()}
        for name in self._unfrozen():
            parts[f"model.{name}."] = (self.model.get_submodule(name), {})
        for key, value in state_dict.items():
            for prefix, (_, sub) in parts.items():
                if key.startswith(prefix):
                    sub[key[len(prefix):]] = value
                    break
        for module, sub in parts.values():
            module.load_state_dict(sub, strict=False, assign=assign)
        for m in self._orthonormals:
            m._cache = None
        self._invalidate()
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _selected(self, selected_adapters: Optional[Sequence[str]]) -> list[str]:
        if selected_adapters is None:
            return list(self._registry)
        return self._names(list(selected_adapters), "selected_adapters")

    def adapter_state(self, state: dict, name: str) -> dict:
        """One adapter's entries of a state_dict() with the keys its directory stores ("interventions.<key>.
        <name>", "model.<module>.<name>")."""
        prefix = f"{adapter_path(name)}."
        modules = tuple(f"model.{m}." for m in self._registry[name].config.unfrozen_modules)
        out = {}
        for key, value in state.items():
            if key.startswith(prefix):
                out["interventions." + key[len(prefix):]] = value
            elif modules and key.startswith(modules):
                out[key] = value
        return out


__all__ = ["Adapter", "AdapterRegistry", "BASE", "DEFAULT", "adapter_format", "adapter_path", "check_adapter_name",
           "check_base",
           "from_saved", "read_adapter", "saved_path", "site_key"]
