"""A tiny random Llama with a word-level tokenizer, ReFT adapters of every type for it, and the reference:
ReftModel.generate (greedy) on the same model in Hugging Face transformers. No downloads.

Width 48 (not a power of two), 4 layers, 4 heads of 32 (vLLM's CPU attention needs a head size it has a
kernel for), GQA with 2 KV heads, fp32, initializer_range 0.2 so that greedy choices have clear margins. The
tokenizer maps "w0".."w379" to ids 4..383 (ids 0-3 are specials); prompts are strings of those words, and
ids survive a text round trip. The model has no EOS (generation_config.eos_token_id = None), so both
engines generate exactly max_tokens.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

VOCAB = 384
WIDTH = 48
LAYERS = 4
MAX_LEN = 256


def build_model(path: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                      pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompt(seed: int, length: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (length,), generator=g))


def _config(representations: list[dict], positions: Optional[str], share_weights: bool = True):
    import reft_kernels as rk

    return rk.ReftConfig(representations=[{"dtype": torch.float32, **r} for r in representations],
                         positions=positions, share_weights=share_weights)


def _scale(reft, scale: float) -> None:
    """W, b, W2 scaled up so that the edits change greedy tokens."""
    with torch.no_grad():
        for adapter in reft.adapters.values():
            for m in adapter.modules:
                for name, p in m.named_parameters():
                    if name in ("weight", "bias", "proj_weight", "proj_bias"):
                        p.mul_(scale)


def make_adapter(model_path: str, out: str, *, representations: list[dict], positions: Optional[str],
                 share_weights: bool = True, seed: int = 1, scale: float = 8.0, fmt: str = "reft_kernels") -> str:
    """Saves a ReFT adapter with random parameters (positions=None: saved without a scheme)."""
    import reft_kernels as rk

    torch.manual_seed(seed)
    reft = rk.get_reft_model(hf_model(model_path), _config(representations, positions, share_weights))
    _scale(reft, scale)
    reft.save_pretrained(out, format=fmt)
    return out


def make_multi(model_path: str, out: str, adapters: dict[str, dict], *, seed: int = 1, scale: float = 8.0) -> str:
    """One save_pretrained of several adapters ({name: {"representations": ..., "positions": ...}}, the first
    one "default"): PEFT's layout, "default" in `out` and every other one in out/<name>/."""
    import reft_kernels as rk

    torch.manual_seed(seed)
    (first, cfg), *rest = adapters.items()
    assert first == "default"
    reft = rk.get_reft_model(hf_model(model_path), _config(**cfg))
    for name, cfg in rest:
        reft.add_adapter(name, _config(**cfg))
    _scale(reft, scale)
    reft.save_pretrained(out)
    return out


class Reference:
    """Greedy tokens of the base model and of ReftModel.generate per adapter, one prompt at a time. An adapter
    is given as the server takes it: a directory, or {"path": ..., options} (a pyreft checkpoint's options go
    to load_pyreft; "positions" overrides the scheme)."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.model = hf_model(model_path)
        self.tokenizer = None
        self._refts: dict = {}
        self._cache: dict = {}

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reft(self, spec):
        """(ReftModel with the adapter active, position override or None), by the Hugging Face layer's own
        loaders: load_pyreft, from_pretrained, and load_adapter(..., subfolder=) for a named one of a save."""
        import reft_kernels as rk

        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        key = repr(sorted(spec.items()))
        if key not in self._refts:
            base = hf_model(self.model_path)
            path = spec.pop("path")
            sub = spec.pop("subfolder", None)
            if not os.path.isfile(os.path.join(path, sub or "", "reft_config.json")):
                if isinstance(spec.get("dtype"), str):
                    spec["dtype"] = getattr(torch, spec["dtype"])
                reft = rk.load_pyreft(base, path, **spec)
                positions = None
            elif sub is not None:
                reft = rk.ReftModel.from_pretrained(base, path)
                reft.load_adapter(path, sub, subfolder=sub)
                reft.set_adapter(sub)
                positions = spec.get("positions")
            else:
                reft = rk.ReftModel.from_pretrained(base, path)
                positions = spec.get("positions")
            self._refts[key] = (reft, positions)
        return self._refts[key]

    def mixed_tokens(self, requests: list, adapters: dict, max_new: int) -> list[list[int]]:
        """Greedy tokens of ReftModel.generate(..., adapter_names=[...]) for one left-padded batch: requests
        [(prompt text, adapter name or None)], adapters {name: directory or {"path": ..., pyreft options}}
        (every adapter on one ReftModel: from_pretrained for the first, load_adapter for the others)."""
        import reft_kernels as rk

        names = sorted({a for _, a in requests if a is not None})
        reft = None
        for name in names:
            spec = {"path": adapters[name]} if isinstance(adapters[name], str) else dict(adapters[name])
            path = spec.pop("path")
            if isinstance(spec.get("dtype"), str):
                spec["dtype"] = getattr(torch, spec["dtype"])
            if reft is None:
                reft = rk.ReftModel.from_pretrained(hf_model(self.model_path), path, adapter_name=name) \
                    if not spec else rk.load_pyreft(hf_model(self.model_path), path, adapter_name=name, **spec)
            else:
                reft.load_adapter(path, name, **spec)
        ids = [self.ids(p) for p, _ in requests]
        width = max(map(len, ids))
        input_ids = torch.tensor([[3] * (width - len(i)) + i for i in ids])  # <pad> = 3, left padding
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = reft.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                adapter_names=[a if a is not None else "__base__" for _, a in requests])
        return out[:, width:].tolist()

    def tokens(self, text: str, adapter, max_new: int) -> list[int]:
        key = (text, repr(adapter), max_new)
        if key not in self._cache:
            ids = torch.tensor([self.ids(text)])
            mask = torch.ones_like(ids)
            greedy = dict(attention_mask=mask, do_sample=False, max_new_tokens=max_new)
            with torch.no_grad():
                if adapter is None:
                    out = self.model.generate(ids, **greedy)
                else:
                    reft, positions = self.reft(adapter)
                    out = reft.generate(ids, intervention_locations=reft.locations(mask, positions), **greedy)
            self._cache[key] = out[0, ids.shape[1]:].tolist()
        return self._cache[key]
