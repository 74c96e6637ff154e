"""LLM: vLLM's offline engine with ReFT adapters chosen per request.

    llm = LLM(model, reft_adapters={"name": "path" or {"path": ..., options}}, **vllm_kwargs)
    llm.generate(prompts, SamplingParams(..., extra_args={"reft_adapter": "name"}))   # no key: base model
    llm.load_reft_adapter("other", "path2"); llm.remove_reft_adapter("name")

reft_sites chooses where the engine can edit (its model gets an op at each site before vLLM compiles it):
None = the sites of the adapters given here (block_output at every layer when none is given), "all" = every
component at every layer, a component name or list of names = those at every layer, or (layer, component)
pairs; always plus the sites of the adapters given here. An adapter loaded later must edit within them.
A site with no adapter costs a Python call per step that returns at once.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import vllm

from . import _vllm
from .adapters import ServedAdapter, check_name, load_served_adapter
from .plugin import check_registered


def _model_shape(model: str, kwargs: dict) -> tuple[int, int, Optional[str]]:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
                                     revision=kwargs.get("revision"))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size), int(text.num_hidden_layers), getattr(text, "model_type", None)


class LLM(vllm.LLM):
    """vllm.LLM serving ReFT adapters (module docstring). reft_adapters: {name: directory or {"path": ...,
    options}} (reft_kernels.vllm.adapters); reft_sites: see the module docstring. Other arguments go to
    vllm.LLM unchanged (additional_config is kept; the ReFT sites are added to it)."""

    def __init__(self, model: str, *, reft_adapters: Optional[dict[str, Union[str, dict]]] = None,
                 reft_sites: Any = None, **kwargs):
        check_registered()  # worker processes load the plugin through its entry point
        _vllm.install()  # raises here, before any engine starts, when vLLM lacks an internal the plugin needs
        os.environ[_vllm.ENV_ENABLE] = "1"  # worker processes hook vLLM too (the plugin reads it)
        d, L, model_type = _model_shape(model, kwargs)
        self._reft_shape = (d, L, model_type)
        start: dict[str, tuple[Union[str, dict], ServedAdapter]] = {}
        for name, spec in (reft_adapters or {}).items():
            start[check_name(name)] = (spec, load_served_adapter(spec, hidden_size=d, num_layers=L,
                                                                 model_type=model_type))
        sites = _vllm.resolve_sites(reft_sites, [a for _, a in start.values()], L)
        extra = dict(kwargs.pop("additional_config", None) or {})
        extra[_vllm.CONFIG_KEY] = {"sites": [list(s) for s in sites]}
        super().__init__(model, additional_config=extra, **kwargs)
        self._reft_catalogue = _vllm.attach_catalogue(self)
        self.reft_sites = sites
        for name, (spec, adapter) in start.items():
            self._load(name, spec, adapter)

    # -- adapters --------------------------------------------------------------------------------

    @property
    def reft_adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return sorted(self._reft_catalogue.adapters)

    def load_reft_adapter(self, name: str, path: Union[str, os.PathLike, dict]) -> None:
        """Loads an adapter while serving (directory, or {"path": ..., options}); refused (ValueError) when
        the name is taken or the adapter does not fit the model or this engine's sites."""
        d, L, model_type = self._reft_shape
        self._load(check_name(name), path, load_served_adapter(path, hidden_size=d, num_layers=L,
                                                               model_type=model_type))

    def _load(self, name: str, spec, adapter: ServedAdapter) -> None:
        if name in self._reft_catalogue.adapters:
            raise ValueError(f"a ReFT adapter named {name!r} is already loaded; remove it first")
        missing = [s for s in adapter.sites if s not in self.reft_sites]
        if missing:
            raise ValueError(f"adapter {name!r} edits {missing}, which this engine was not started with; start it "
                             f"with reft_sites covering them (e.g. reft_sites='all')")
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
        fingerprints = self.collective_rpc(_vllm.rpc_load, args=(name, spec))
        if any(fp != adapter.fingerprint for fp in fingerprints):
            self.collective_rpc(_vllm.rpc_remove, args=(name,))
            raise RuntimeError(f"adapter {name!r} read differently by the workers than here (its files changed "
                               "while loading?); not loaded")
        self._reft_catalogue.add(name, adapter)

    def remove_reft_adapter(self, name: str) -> None:
        """Removes an adapter: new requests naming it are refused at once; its slots are freed when the
        requests already running with it finish."""
        self._reft_catalogue.remove(name)
        self.collective_rpc(_vllm.rpc_remove, args=(name,))

    def reft_info(self) -> list[dict]:
        """Per worker: model runner, sites, installed sites, adapters (fingerprints), steps and rows edited."""
        return self.collective_rpc(_vllm.rpc_info)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params=None, *args, **kwargs):
        """vllm.LLM.generate; every adapter named is checked first, so an unknown one fails the call
        (ValueError naming it) before any request runs."""
        params: Sequence = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params]
        for p in params:
            name = _vllm.adapter_name(p) if p is not None else None
            if name is not None and name not in self._reft_catalogue.adapters:
                raise ValueError(f"unknown ReFT adapter {name!r}; loaded: {self.reft_adapters}")
        return super().generate(prompts, sampling_params, *args, **kwargs)


__all__ = ["LLM"]
