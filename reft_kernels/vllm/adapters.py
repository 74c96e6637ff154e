"""ReFT adapters as a server holds them: every intervention's parameters, site and position group, read
with reft_kernels.read_adapter (the Hugging Face layer's reader; no base model, no vLLM here).

    adapter = load_served_adapter("adapters/sentiment", hidden_size=4096, num_layers=32)
    adapter.interventions[0].params        # AdapterParams: lift [r, d] (R or W2), weight, bias, proj_bias
    adapter.positions_for(37)              # [(group 0 positions), ...] for a 37-token prompt

An adapter is named by a directory, or by a dict {"path": ..., options} for what a directory does not say:
- "subfolder": a subdirectory of path. ReftModel.save_pretrained of several adapters writes "default" in the
  directory and every other one in <directory>/<name>/ (PEFT's layout); {"path": dir, "subfolder": "german"}
  and the path "dir/german" name the same adapter (as reft.load_adapter(dir, name, subfolder=...) does).
- our format (reft_config.json + reft_model.safetensors) stores everything, checked as
  ReftModel.from_pretrained checks it (integrity record, every tensor's key, shape, dtype, finiteness).
  "positions" may supply the scheme of an adapter saved without one (ReftConfig(positions=None): trained on
  locations its data gave) or serve it with another; it must keep the adapter's layout (an adapter with
  untied prefix / suffix interventions needs an "f{p}+l{s}" scheme, one without them cannot take one).
- a pyreft checkpoint (config.json + intkey_*.bin, or a Trainer checkpoint's intkey files with
  "representations") stores no position scheme, dtype, act or add_bias: "positions" (required),
  "share_weights", "dtype", "act", "add_bias" and "representations" are passed on to read_adapter
  (load_pyreft's docstring).
The served model's width and depth are checked at load (ValueError naming both): ours against the base model
the adapter was saved with, pyreft's against its intervention widths and deepest layer. An adapter that also
trains base-model modules (unfrozen_modules, or pyreft's non-empty pytorch_model.bin) is refused.

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
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch

from ..integration.adapters import Adapter, adapter_format, read_adapter
from ..integration.locate import COMPONENTS
from ..integration.positions import scheme_locations

from .mixed_op import AdapterParams

PYREFT_OPTIONS = ("positions", "share_weights", "dtype", "act", "add_bias", "representations")
OPTIONS = ("path", "subfolder", *PYREFT_OPTIONS)


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


# -- loading -----------------------------------------------------------------------------------------------

def _spec_dict(spec: Union[str, os.PathLike, dict]) -> dict:
    """{"path": the adapter's directory (subfolder joined), options}."""
    if isinstance(spec, (str, os.PathLike)):
        return {"path": os.fspath(spec)}
    if isinstance(spec, dict) and "path" in spec:
        unknown = set(spec) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown adapter options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
        out = dict(spec, path=os.fspath(spec["path"]))
        sub = out.pop("subfolder", None)
        if sub is not None:
            if not isinstance(sub, (str, os.PathLike)) or not os.fspath(sub):
                raise ValueError(f"subfolder must be a subdirectory name (str), got {sub!r}")
            out["path"] = os.path.join(out["path"], os.fspath(sub))
        return out
    raise TypeError(f"an adapter is a directory (str or PathLike) or a dict with a 'path' key, got {spec!r}")


def detect_format(path: str) -> str:
    """"reft_kernels" or "pyreft" (reft_kernels.read_adapter's test); FileNotFoundError otherwise, naming the
    adapters a multi-adapter save holds in subfolders when `path` is the root of one without "default"."""
    try:
        return adapter_format(path)
    except FileNotFoundError as e:
        subs = sorted(n for n in os.listdir(path) if _is_adapter_dir(os.path.join(path, n))) \
            if os.path.isdir(path) else []
        if not subs:
            raise
        raise FileNotFoundError(f"{e}. It holds the adapters {subs} in subfolders (ReftModel.save_pretrained of "
                                f"several adapters): name one as {os.path.join(path, subs[0])!r} or "
                                f"{{'path': {path!r}, 'subfolder': {subs[0]!r}}}") from None


def _is_adapter_dir(path: str) -> bool:
    try:
        adapter_format(path)
    except (FileNotFoundError, OSError):
        return False
    return True


def _dtype(x: Any) -> Any:
    if isinstance(x, str):
        name = x.replace("torch.", "")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {x!r}")
        return getattr(torch, name)
    return x


def _read(spec: dict, hidden_size: int, num_layers: int, model_type: Optional[str]) -> tuple[Adapter, str]:
    """The adapter (reft_kernels.read_adapter), checked against the served model's width and depth."""
    path = spec["path"]
    fmt = detect_format(path)
    if fmt == "reft_kernels":
        extra = set(spec) - {"path", "positions"}
        if extra:
            raise ValueError(f"{path} is a reft_kernels adapter (its config stores everything); only 'positions' "
                             f"and 'subfolder' may be given with it, got {sorted(extra)}")
        adapter = read_adapter(path)
        base = adapter.base_model
        if base["hidden_size"] != hidden_size or base["num_layers"] != num_layers:
            raise ValueError(f"the adapter in {path} was trained on a {base['class']} with hidden size "
                             f"{base['hidden_size']} and {base['num_layers']} layers; the served model has hidden "
                             f"size {hidden_size} and {num_layers} layers")
        if base.get("model_type") and model_type is not None and base["model_type"] != model_type:
            warnings.warn(f"the adapter in {path} was trained on model_type {base['model_type']!r}, serving it on "
                          f"{model_type!r}", stacklevel=4)
        return adapter, fmt
    opts = {k: v for k, v in spec.items() if k != "path"}
    if "dtype" in opts:
        opts["dtype"] = _dtype(opts["dtype"])
    if opts.get("positions") is None:
        raise ValueError(f"{path} is a pyreft checkpoint, which stores no position scheme: give the adapter as "
                         "{'path': ..., 'positions': 'f5+l5'} (the scheme it was trained with; also "
                         "'share_weights' if it was trained with share_weights=False)")
    # pyreft's files say the intervention widths; dim and num_layers make read_pyreft refuse another model
    return read_adapter(path, dim=hidden_size, num_layers=num_layers, where="the served model", **opts), fmt


def _scheme(adapter: Adapter, path: str, override: Optional[str]) -> str:
    """The position scheme to serve with: the saved one, or `override` when it keeps the adapter's layout."""
    config = adapter.config
    if override is None or override == config.positions:
        if config.positions is None:
            raise ValueError(f"{path} has no position scheme (saved with ReftConfig(positions=None)); give the "
                             "adapter as {'path': ..., 'positions': 'f5+l5'} (or 'last'), the scheme to edit with")
        return config.positions
    try:
        served = dataclasses.replace(config, positions=override)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter {path}: {e}") from None
    if served.untied != config.untied:
        have = "has" if config.untied else "has no"
        raise ValueError(f"adapter {path} {have} untied prefix / suffix interventions (share_weights="
                         f"{config.share_weights}, positions={config.positions!r}); positions={override!r} would "
                         f"{'drop' if config.untied else 'need'} them: give a scheme that "
                         f"{'has both a prefix and a suffix' if config.untied else 'keeps one group'}")
    return override


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
    path = spec["path"]
    adapter, fmt = _read(spec, hidden_size, num_layers, model_type)
    config = adapter.config
    if config.unfrozen_modules:
        raise ValueError(f"{path} also trains base-model modules {config.unfrozen_modules}; a served adapter may "
                         "only hold interventions (merge those weights into the served model instead)")
    positions = _scheme(adapter, path, spec.get("positions") if fmt == "reft_kernels" else None)
    untied = config.untied
    half = adapter.num_interventions // 2
    interventions: list[ServedIntervention] = []
    seen: dict[tuple, int] = {}
    f32 = lambda t: None if t is None else t.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
    with torch.no_grad():
        for k, (rep, _copy) in enumerate(config.interventions()):
            group = int(untied and k >= half)
            key = (rep.layer, rep.component, group)
            pass_index = seen.get(key, 0)
            seen[key] = pass_index + 1
            p = adapter.params(k)
            params = AdapterParams(lift=f32(p.lift), weight=f32(p.weight), bias=f32(p.bias),
                                   proj_bias=f32(p.proj_bias), spec=p.spec, dropout=0.0)
            interventions.append(ServedIntervention(rep.layer, rep.component, group, pass_index, params))
    served = ServedAdapter(source=path, format=fmt, hidden_size=hidden_size, num_layers=num_layers,
                           positions=positions, share_weights=config.share_weights, interventions=interventions,
                           num_groups=2 if untied else 1)
    served.fingerprint = _fingerprint(served)
    return served


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
