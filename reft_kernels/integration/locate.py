"""Where a component lives in a Hugging Face model: the stack of blocks, and the submodule whose input or
output a component names. Generic (no per-architecture table): it finds the block list by shape and the
submodules by the names transformers uses, and is tested on Llama, Mistral, Qwen2, Gemma, GPT-2,
GPT-NeoX, Phi-3, BERT and RoBERTa (tests/test_hf_components.py).

| component        | hooked module                                    | which tensor                 |
|------------------|--------------------------------------------------|------------------------------|
| block_output     | block i                                          | output (residual stream)     |
| block_input      | block i                                          | input hidden states          |
| mlp_output       | block i's mlp / feed_forward / ffn; BERT-style   | output                       |
|                  | encoders: output.dense (before dropout, residual  |                              |
|                  | and LayerNorm, as pyvene hooks it)               |                              |
| attention_output | block i's self_attn / attn / attention /          | output (first element)       |
|                  | self_attention (BERT-style: after the attention  |                              |
|                  | block's own residual and LayerNorm, as pyvene)   |                              |
"""
from __future__ import annotations

from typing import Optional

from torch import nn

COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "output.dense")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def num_layers(model: nn.Module) -> Optional[int]:
    """config.num_hidden_layers (n_layer for GPT-2 style configs), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, name, None)
        if isinstance(n, int):
            return n
    return None


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("hidden_size", "n_embd", "d_model"):
        d = getattr(config, name, None)
        if isinstance(d, int):
            return d
    raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config; pass dim= explicitly")


def find_layers(model: nn.Module, layers_path: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks: (its dotted path, the ModuleList).

    Without layers_path: the shallowest nn.ModuleList whose entries all share one class and whose length is
    config.num_hidden_layers (any length when the config does not say). Raises ValueError when there is no
    such list, or when two differ (e.g. an encoder-decoder model): then pass layers_path.
    """
    if layers_path is not None:
        try:
            found = model.get_submodule(layers_path)
        except AttributeError as e:
            raise ValueError(f"layers_path {layers_path!r} is not a submodule of {type(model).__name__}") from e
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"layers_path {layers_path!r} is a {type(found).__name__}, not an nn.ModuleList")
        return layers_path, found
    want = num_layers(model)
    candidates = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or (want is not None and len(m) != want):
            continue
        if len({type(x) for x in m}) != 1:
            continue
        if any(name.startswith(c + ".") for c, _ in candidates):
            continue  # a list nested inside a block of a list already found
        candidates.append((name, m))
    if not candidates:
        raise ValueError(f"found no list of {want if want is not None else 'identical'} blocks in "
                         f"{type(model).__name__}; pass layers_path='...' (the dotted path of its nn.ModuleList)")
    depth = min(n.count(".") for n, _ in candidates)
    shallowest = [(n, m) for n, m in candidates if n.count(".") == depth]
    if len(shallowest) > 1:
        raise ValueError(f"{type(model).__name__} has several block lists ({[n for n, _ in shallowest]}); pass "
                         "layers_path='...' to choose one")
    return shallowest[0]


def _child(block: nn.Module, names: tuple[str, ...]) -> Optional[tuple[str, nn.Module]]:
    for name in names:
        try:
            return name, block.get_submodule(name)
        except AttributeError:
            continue
    return None


def component_site(block: nn.Module, component: str) -> tuple[str, nn.Module, str]:
    """(path within the block, module to hook, "input" or "output") for a component of one block."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if component == "block_output":
        return "", block, "output"
    if component == "block_input":
        return "", block, "input"
    names = _MLP_NAMES if component == "mlp_output" else _ATTENTION_NAMES
    found = _child(block, names)
    if found is None:
        children = [n for n, _ in block.named_children()]
        raise ValueError(f"{type(block).__name__} has none of the submodules {list(names)} that {component!r} "
                         f"hooks (its children: {children})")
    return found[0], found[1], "output"


__all__ = ["COMPONENTS", "component_site", "find_layers", "hidden_size", "num_layers"]
