"""The vLLM plugin entry point (pyproject: [project.entry-points."vllm.general_plugins"]).

vLLM calls register() in every process it starts (front end, engine core, workers) before it builds a
model. In a process that serves ReFT (REFT_KERNELS_ADAPTERS or REFT_KERNELS_VLLM=1 in the environment, as
reft_kernels.vllm.LLM and `python -m reft_kernels.vllm.serve` set) it hooks vLLM and raises when vLLM lacks
something it needs. Elsewhere it only makes the front end refuse requests that name a ReFT adapter (they
would otherwise run unedited), and never fails vLLM.
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

logger = logging.getLogger("reft_kernels.vllm")
GROUP = "vllm.general_plugins"


def check_registered() -> None:
    """RuntimeError unless this package's entry point is installed: without it vLLM's engine and worker
    processes never load the plugin, and the edits would not happen there."""
    if not any(e.value == f"{__name__}:register" for e in entry_points(group=GROUP)):
        raise RuntimeError(f"reft_kernels' vLLM plugin is not registered ({GROUP} entry point): install the package "
                           "(pip install -e . or pip install reft-kernels), not just put it on the path")


def register() -> None:
    from . import _vllm

    if _vllm.enabled_by_env():
        _vllm.install()
        return
    try:
        _vllm.install_guard()
    except Exception as e:  # noqa: BLE001 - a plain vLLM must keep working whatever this finds
        logger.warning("reft_kernels: cannot guard vLLM's front end against ReFT requests (%s)", e)
