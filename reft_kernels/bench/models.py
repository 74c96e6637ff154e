"""The base model a benchmark times: a local directory, a Hugging Face config name, or one of the built-in
Llama shapes; trained weights, or random weights of that shape (timing does not need trained weights).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

# Llama-shaped configs with random weights (no downloads), as ../shared/notes/anchors.md measures them.
# "tiny" is for CPU runs: small enough that a benchmark finishes in seconds; its figures are host-bound.
LLAMA_SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
BUILTIN = {f"llama-{k}": k for k in LLAMA_SHAPES}  # --model llama-1b: random weights of that shape
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelError(ValueError):
    """A --model that cannot be loaded, with what to pass instead."""


def _frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    model.to(dtype).eval().requires_grad_(False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def llama(shape: str, device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """LlamaForCausalLM of LLAMA_SHAPES[shape], random weights from `seed`, in `dtype` on `device`, eval
    mode, every parameter frozen. Built on the device in fp32 and then cast (a 7b shape is 27 GB for a
    moment on the GPU, freed before any measurement)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return _frozen(model, dtype)


def spread_layers(num_layers: int, count) -> list[int]:
    """`count` layers spread evenly from the first to the last (0, 5, 10, 15 of 16 for 4), or every layer
    for count "all" (or count >= num_layers). The first layer is always included (for count > 1), so every
    provider's backward reaches the same depth."""
    if count == "all" or int(count) >= num_layers:
        return list(range(num_layers))
    count = int(count)
    if count == 1:
        return [num_layers // 2]
    return [round(i * (num_layers - 1) / (count - 1)) for i in range(count)]


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` from transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _causal_lm_from_config(config, device, what: str):
    from transformers import AutoModelForCausalLM

    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ModelError(f"--model {what}: model type {getattr(config, 'model_type', '?')!r} has no causal-LM class "
                         f"in transformers (this benchmark times causal LMs: training with labels, generate); "
                         f"{str(e).splitlines()[0][:200]}") from e


def load_model(name: str, *, random_weights: bool = False, dtype: torch.dtype = torch.float32, device="cpu",
               seed: int = 0) -> tuple[nn.Module, str]:
    """(frozen causal LM in eval mode, a one-line description) for --model `name`:
    - "llama-tiny", "llama-1b", "llama-7b": a Llama of that shape (LLAMA_SHAPES) with random weights;
    - a local directory with config.json: its weights (safetensors/bin), or random weights of its shape
      with random_weights=True (required when the directory holds no weights);
    - a Hugging Face model name ("org/name"): its config from the hub, random weights with random_weights=True,
      else its weights (both need the hub, or its local cache).
    Raises ModelError naming the problem and what to pass instead."""
    if name in BUILTIN:
        shape = LLAMA_SHAPES[BUILTIN[name]]
        return llama(BUILTIN[name], device, dtype, seed), (
            f"{name} (Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab "
            f"{shape['vocab_size']}, random weights)")
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"--model {name}: not a model directory (no config.json in it); pass a directory written "
                             f"by save_pretrained, a Hugging Face model name, or one of {sorted(BUILTIN)}")
        config = AutoConfig.from_pretrained(path)
        has_weights = any(next(path.glob(p), None) for p in WEIGHT_FILES)
        if random_weights or not has_weights:
            if not random_weights:
                raise ModelError(f"--model {name}: the directory has a config.json but no weights "
                                 f"({', '.join(WEIGHT_FILES)}); pass --random-weights to time random weights of "
                                 "this shape")
            torch.manual_seed(seed)
            model = _causal_lm_from_config(config, device, name)
            return _frozen(model, dtype), f"{name} ({config.model_type}, random weights of its shape)"
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(dtype)).to(device)
        except ValueError as e:
            raise ModelError(f"--model {name}: {str(e).splitlines()[0][:300]}") from e
        return _frozen(model, dtype), f"{name} ({config.model_type}, its weights)"
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelError(f"--model {name}: no such directory, and not a Hugging Face model name; pass a local "
                         f"directory with config.json, a name such as 'meta-llama/Llama-3.2-1B', or one of "
                         f"{sorted(BUILTIN)}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {name}: could not get its config from the Hugging Face hub or its cache "
                         f"({str(e).splitlines()[0][:200]}); pass a local directory with config.json (random "
                         f"weights of its shape with --random-weights), or one of {sorted(BUILTIN)}") from e
    if random_weights:
        torch.manual_seed(seed)
        return _frozen(_causal_lm_from_config(config, device, name), dtype), \
            f"{name} ({config.model_type}, random weights of its shape)"
    model = AutoModelForCausalLM.from_pretrained(name, **_dtype_kwargs(dtype)).to(device)
    return _frozen(model, dtype), f"{name} ({config.model_type}, its weights)"


def describe_size(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if params >= 10**6:
        return f"{params / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB"
    return f"{params:,} parameters, {nbytes / 2**10:.0f} KiB"


def num_layers(model: nn.Module, layers_path: Optional[str] = None) -> int:
    from ..integration import find_layers

    return len(find_layers(model, layers_path)[1])
