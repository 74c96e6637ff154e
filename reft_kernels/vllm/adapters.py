"""ReFT adapters as a server holds them: every intervention's parameters, site and position group, read
with reft_kernels' own loaders (no vLLM here).

    adapter = load_served_adapter("adapters/sentiment", hidden_size=4096, num_layers=32)
    adapter.interventions[0].params        # AdapterParams: lift [r, d] (R or W2), weight, bias, proj_bias
    adapter.positions_for(37)              # [(group 0 positions), ...] for a 37-token prompt

An adapter is named by a directory, or by a dict {"path": ..., options} for what a checkpoint does not store:
- our format (ReftModel.save_pretrained: reft_config.json + reft_model.safetensors) is read with
  ReftModel.from_pretrained; "positions" may override a saved scheme (or supply a missing one).
- a pyreft checkpoint (config.json + intkey_*.bin, or a Trainer checkpoint's intkey files with
  "representations") is read with reft_kernels.load_pyreft; pyreft stores no position scheme, dtype, act
  or add_bias, so "positions" (required), "share_weights", "dtype", "act", "add_bias" and
  "representations" are passed on to it (its docstring).

Both loaders build a ReftModel; here they build it on a stand-in for the served model (its width, depth and
model_type; a block list with `self_attn` and `mlp` children), so the served model's weights are never
needed and an adapter of the wrong width or depth is refused by the loaders' own checks.

Positions. An adapter edits its prompt at the positions its scheme names ("f{p}+l{s}", "f{p}", "l{s}",
"last"), resolved against the whole prompt exactly as ReftModel.locations does for one unpadded prompt.
Interventions whose positions are the same for every prompt form a group: one group for tied schemes and
"last"; two (prefix, suffix) for share_weights=False with both a prefix and a suffix, where the first half
of the interventions sees the prefix and the second half the suffix. Groups of one adapter never share a
position (pyreft's min(p, n // 2) keeps prefix and suffix apart).

Order. Several interventions of one adapter at one site are applied in the adapter's order; those of one
group at one site get increasing pass numbers (pass k runs after pass k - 1), those of different groups
touch different rows and share a pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..integration.locate import COMPONENTS
from ..integration.positions import parse_positions, scheme_locations
from ..ops.fused_edit import EditSpec

from .mixed_op import AdapterParams

PYREFT_OPTIONS = ("positions", "share_weights", "dtype", "act", "add_bias", "representations")
OUR_CONFIG = "reft_config.json"


@dataclasses.dataclass
class ServedIntervention:
    """One intervention of a served adapter: where (layer, component), in which position group and pass,
    and its parameters in fp32 on the CPU (the edit computes in fp32 whatever the stored dtype)."""

    layer: int
    component: str
    group: int
    pass_index: int
    params: AdapterParams

    @property
    def site(self) -> tuple[int, str]:
        return (self.layer, self.component)

    @property
    def rank(self) -> int:
        return self.params.lift.shape[0]


@dataclasses.dataclass
class ServedAdapter:
    """An adapter ready to serve (module docstring). fingerprint: a digest of its scheme and every parameter
    (same adapter, same fingerprint on every process and rank; prefix-cache salts use it)."""

    source: str
    format: str  # "reft_kernels" or "pyreft"
    hidden_size: int
    num_layers: int
    positions: str
    share_weights: bool
    interventions: list[ServedIntervention]
    num_groups: int
    fingerprint: str = ""
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def sites(self) -> list[tuple[int, str]]:
        return sorted({i.site for i in self.interventions}, key=lambda s: (s[0], COMPONENTS.index(s[1])))

    def positions_for(self, prompt_len: int) -> list[np.ndarray]:
        """Per group, the prompt positions [n_g] (int64, ascending) edited in a prompt of prompt_len tokens."""
        out = self._cache.get(prompt_len)
        if out is None:
            n_int = len(self.interventions)
            locs = scheme_locations(torch.ones(1, prompt_len, dtype=torch.long), self.positions,
                                    num_interventions=n_int, share_weights=self.share_weights)[0].numpy()
            firsts = [next(k for k, i in enumerate(self.interventions) if i.group == g) for g in range(self.num_groups)]
            out = [np.unique(locs[k][locs[k] >= 0]).astype(np.int64) for k in firsts]
            if len(self._cache) < 4096:
                self._cache[prompt_len] = out
        return out

    def cache_salt(self, prompt_len: int) -> str:
        """What keys this adapter's prompt KV in vLLM's prefix cache: the adapter (fingerprint) and the
        positions it edits in this prompt. The KV of a block depends on the tokens up to it (vLLM's block
        hash), the adapter and the edited positions up to it; two prompts share cached blocks only when all
        three agree, so a prompt cached under one adapter (or none) is never reused under another."""
        edited = self.positions_for(prompt_len)
        digest = hashlib.sha256(b"".join(g.tobytes() + b"|" for g in edited)).hexdigest()[:16]
        return f"reft-kernels:{self.fingerprint}:{digest}"


# -- the stand-in model ------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Identity()
        self.mlp = nn.Identity()


class _StandIn(nn.Module):
    """Width, depth and model_type of the served model, and a block list the loaders can find ("layers")."""

    def __init__(self, hidden_size: int, num_layers: int, model_type: Optional[str]):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=hidden_size, num_hidden_layers=num_layers,
                                            model_type=model_type)
        self.layers = nn.ModuleList(_Block() for _ in range(num_layers))


# -- loading -----------------------------------------------------------------------------------------------

def _spec_dict(spec: Union[str, os.PathLike, dict]) -> dict:
    if isinstance(spec, (str, os.PathLike)):
        return {"path": os.fspath(spec)}
    if isinstance(spec, dict) and "path" in spec:
        unknown = set(spec) - {"path", *PYREFT_OPTIONS}
        if unknown:
            raise ValueError(f"unknown adapter options {sorted(unknown)}; known: path, {', '.join(PYREFT_OPTIONS)}")
        return dict(spec, path=os.fspath(spec["path"]))
    raise TypeError(f"an adapter is a directory (str or PathLike) or a dict with a 'path' key, got {spec!r}")


def detect_format(path: str) -> str:
    """"reft_kernels" (reft_config.json) or "pyreft" (intkey_*.bin); FileNotFoundError otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    if os.path.isfile(os.path.join(path, OUR_CONFIG)):
        return "reft_kernels"
    if any(n.startswith("intkey_") and n.endswith(".bin") for n in os.listdir(path)):
        return "pyreft"
    raise FileNotFoundError(f"{path!r} holds neither {OUR_CONFIG} (ReftModel.save_pretrained) nor intkey_*.bin "
                            "(a pyreft checkpoint)")


def _dtype(x: Any) -> Any:
    if isinstance(x, str):
        name = x.replace("torch.", "")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {x!r}")
        return getattr(torch, name)
    return x


def _load_reft_model(spec: dict, stand_in: nn.Module):
    from ..integration.model import ReftModel

    path = spec["path"]
    fmt = detect_format(path)
    if fmt == "reft_kernels":
        extra = set(spec) - {"path", "positions"}
        if extra:
            raise ValueError(f"{path} is a reft_kernels adapter (its config stores everything); only 'positions' "
                             f"may be given with it, got {sorted(extra)}")
        reft = ReftModel.from_pretrained(stand_in, path, layers_path="layers")
    else:
        from ..interop.pyreft_checkpoint import load_pyreft

        opts = {k: v for k, v in spec.items() if k != "path"}
        if "dtype" in opts:
            opts["dtype"] = _dtype(opts["dtype"])
        if opts.get("positions") is None:
            raise ValueError(f"{path} is a pyreft checkpoint, which stores no position scheme: give the adapter as "
                             "{'path': ..., 'positions': 'f5+l5'} (the scheme it was trained with; also "
                             "'share_weights' if it was trained with share_weights=False)")
        reft = load_pyreft(stand_in, path, layers_path="layers", **opts)
    reft.remove_hooks()
    return reft, fmt


def _fingerprint(adapter: ServedAdapter) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([adapter.positions, adapter.share_weights, adapter.hidden_size]).encode())
    for it in adapter.interventions:
        p = it.params
        h.update(json.dumps([it.layer, it.component, it.group, dataclasses.astuple(p.spec)]).encode())
        for t in (p.lift, p.weight, p.bias, p.proj_bias):
            h.update(b"-" if t is None else t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_served_adapter(spec: Union[str, os.PathLike, dict], *, hidden_size: int, num_layers: int,
                        model_type: Optional[str] = None) -> ServedAdapter:
    """Reads an adapter for a model of this width and depth (module docstring). Raises FileNotFoundError for
    a missing or unrecognised directory and ValueError for an adapter that does not fit the model, has no
    position scheme, or trains base-model modules (unfrozen_modules cannot be served as an adapter)."""
    spec = _spec_dict(spec)
    reft, fmt = _load_reft_model(spec, _StandIn(hidden_size, num_layers, model_type))
    config = reft.reft_config
    path = spec["path"]
    if config.unfrozen_modules:
        raise ValueError(f"{path} also trains base-model modules {config.unfrozen_modules}; a served adapter may "
                         "only hold interventions (merge those weights into the served model instead)")
    positions = spec.get("positions") or config.positions
    if positions is None:
        raise ValueError(f"{path} has no position scheme; give the adapter as {{'path': ..., 'positions': "
                         "'f5+l5'}} (or 'last'), the scheme it was trained with")
    if positions != "last":
        parse_positions(positions)
    share = config.share_weights
    untied = positions != "last" and not share and all(parse_positions(positions))
    interventions: list[ServedIntervention] = []
    modules = list(reft.interventions.values())
    half = len(modules) // 2
    seen: dict[tuple, int] = {}
    with torch.no_grad():
        for k, ((rep, _copy), module) in enumerate(zip(config.interventions(), modules)):
            group = int(untied and k >= half)
            key = (rep.layer, rep.component, group)
            pass_index = seen.get(key, 0)
            seen[key] = pass_index + 1
            f32 = lambda t: None if t is None else t.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
            params = AdapterParams(
                lift=f32(module.lift()), weight=f32(module._weight()), bias=f32(module.bias),
                proj_bias=f32(module._proj_bias()),
                spec=EditSpec(module.source_linear, module.subtract_proj, module.act), dropout=0.0)
            interventions.append(ServedIntervention(rep.layer, rep.component, group, pass_index, params))
    adapter = ServedAdapter(source=path, format=fmt, hidden_size=hidden_size, num_layers=num_layers,
                            positions=positions, share_weights=share, interventions=interventions,
                            num_groups=2 if untied else 1)
    adapter.fingerprint = _fingerprint(adapter)
    return adapter


def parse_adapter_list(text: str) -> dict[str, Union[str, dict]]:
    """The adapters of REFT_KERNELS_ADAPTERS / --reft-adapter: a JSON object {"name": "path" or {"path": ...,
    options}}, or comma-separated name=path pairs."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ReFT adapters: {text!r} is not valid JSON ({e})") from None
        if not isinstance(out, dict):
            raise ValueError("ReFT adapters as JSON must be an object {\"name\": \"path\", ...}")
        return out
    out: dict[str, Union[str, dict]] = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"ReFT adapters: expected name=path, got {item!r}")
        out[name.strip()] = path.strip()
    return out


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"a ReFT adapter name must be a non-empty string without spaces, got {name!r}")
    return name


__all__ = ["ServedAdapter", "ServedIntervention", "check_name", "detect_format", "load_served_adapter",
           "parse_adapter_list"]
