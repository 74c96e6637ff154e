"""The adapter a benchmark times: a spec string, a directory saved by reft_kernels, or a pyreft checkpoint.

    loreft r=4 layers=all positions=f5+l5          # spec: a type, then key=value settings
    direft r=8 layers=0,4,8-11 component=mlp_output dtype=fp32
    path/to/adapter/                               # ReftModel.save_pretrained (reft_config.json)
    path/to/pyreft_checkpoint/                     # pyreft's ReftModel.save (config.json + intkey_*.bin)

Spec keys: r (or rank), layers ("all", or indices and ranges: "0,4,8-11"), positions ("f{p}+l{s}" or
"last"; default f5+l5), component (default block_output), act, dropout, dtype (bf16/fp16/fp32 or
float32 and the like; default: the type's, bf16 for W-bearing types as pyreft), parametrization,
share_weights (true/false), add_bias (noreft). The type is one of reft_kernels' kinds (loreft, noreft,
consreft, lobireft, direft, orthodireft) or pyreft's class name (LoreftIntervention, ...).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

DEFAULT_POSITIONS = "f5+l5"
SPEC_KEYS = ("r", "rank", "layers", "positions", "component", "act", "dropout", "dtype", "parametrization",
             "share_weights", "add_bias")
_SPEC_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16",
                "float16": "float16", "float32": "float32"}


class AdapterError(ValueError):
    """An --adapter that cannot be parsed or loaded, with what to pass instead."""


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise AdapterError(f"adapter spec: {key}={value!r}; expected true or false")


def parse_layers(value: str, num_layers: int) -> list[int]:
    """"all", or comma-separated indices and inclusive ranges ("0,4,8-11") of layers below num_layers."""
    if value == "all":
        return list(range(num_layers))
    out: list[int] = []
    for part in value.split(","):
        try:
            if "-" in part.strip("-"):
                lo, hi = part.split("-", 1)
                picked = list(range(int(lo), int(hi) + 1))
                if not picked:
                    raise ValueError
            else:
                picked = [int(part)]
        except ValueError:
            raise AdapterError(f"adapter spec: layers={value!r}; expected 'all' or indices and ranges such as "
                               "'0,4,8-11'") from None
        out += picked
    bad = [layer for layer in out if not 0 <= layer < num_layers]
    if bad:
        raise AdapterError(f"adapter spec: layers={value!r} names layer(s) {bad}; the model has {num_layers} layers "
                           f"(0-{num_layers - 1})")
    return list(dict.fromkeys(out))


def parse_spec(spec: str, num_layers: int):
    """A ReftConfig from a spec string (module docstring)."""
    from ..integration import ReftConfig

    tokens = spec.split()
    if not tokens:
        raise AdapterError("adapter spec is empty; e.g. 'loreft r=4 layers=all positions=f5+l5'")
    kind, settings = tokens[0], {}
    for token in tokens[1:]:
        key, eq, value = token.partition("=")
        if not eq or not value:
            raise AdapterError(f"adapter spec {spec!r}: {token!r} is not key=value (keys: {', '.join(SPEC_KEYS)})")
        if key not in SPEC_KEYS:
            raise AdapterError(f"adapter spec {spec!r}: unknown key {key!r}; keys: {', '.join(SPEC_KEYS)}")
        if key in settings or (key in ("r", "rank") and ({"r", "rank"} & settings.keys())):
            raise AdapterError(f"adapter spec {spec!r}: {key} given twice")
        settings[key] = value
    rank = settings.pop("r", settings.pop("rank", None))
    if rank is None:
        raise AdapterError(f"adapter spec {spec!r}: the rank is missing (r=4, say); pyreft requires it too")
    try:
        rank = int(rank)
    except ValueError:
        raise AdapterError(f"adapter spec {spec!r}: r={rank!r} is not an integer") from None
    layers = parse_layers(settings.pop("layers", "all"), num_layers)
    rep = {"intervention": kind, "low_rank_dimension": rank, "component": settings.pop("component", "block_output")}
    if "dtype" in settings:
        value = settings.pop("dtype")
        if value not in _SPEC_DTYPES:
            raise AdapterError(f"adapter spec {spec!r}: dtype={value!r}; expected one of {sorted(_SPEC_DTYPES)}")
        rep["dtype"] = _SPEC_DTYPES[value]
    if "dropout" in settings:
        try:
            rep["dropout"] = float(settings.pop("dropout"))
        except ValueError:
            raise AdapterError(f"adapter spec {spec!r}: dropout is not a number") from None
    for key in ("act", "parametrization"):
        if key in settings:
            rep[key] = settings.pop(key)
    if "add_bias" in settings:
        rep["add_bias"] = _bool("add_bias", settings.pop("add_bias"))
    share = _bool("share_weights", settings.pop("share_weights")) if "share_weights" in settings else True
    positions = settings.pop("positions", DEFAULT_POSITIONS)
    try:
        return ReftConfig(representations=[dict(rep, layer=layer) for layer in layers], positions=positions,
                          share_weights=share)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"adapter spec {spec!r}: {e}") from None


@dataclasses.dataclass
class Adapter:
    """What the benchmark builds on the base model, afresh for every measurement block.

    config: the ReftConfig; state: the adapter's weights to load into every build (None: a fresh init from
    `seed`); positions: the position scheme its locations are built with; source: a description."""

    config: object
    state: Optional[dict]
    positions: str
    source: str
    seed: int = 0

    def build(self, model: nn.Module, *, trainable: bool = True):
        """A ReftModel on `model` (its hooks registered; remove_hooks() detaches it). trainable=False
        freezes the interventions, as an adapter being served (R then comes from each module's cache)."""
        from ..integration import ReftModel

        torch.manual_seed(self.seed)
        reft = ReftModel(model, self.config)
        if self.state is not None:
            reft.load_state_dict(self.state)
        if not trainable:
            reft.requires_grad_(False)
        return reft

    def locations(self, reft, prompt_mask: torch.Tensor) -> torch.Tensor:
        return reft.locations(prompt_mask, positions=self.positions)

    def interventions(self) -> list:
        """(Representation, copy) per intervention, in the order of intervention_locations."""
        return self.config.interventions()

    def describe(self) -> str:
        reps = self.config.representations
        kinds = sorted({r.intervention for r in reps})
        ranks = sorted({r.low_rank_dimension for r in reps})
        comps = sorted({r.component for r in reps})
        layers = [r.layer for r in reps]
        return (f"{'/'.join(kinds)} r={'/'.join(map(str, ranks))} on {len(layers)} layer(s) {_ranges(layers)} "
                f"({'/'.join(comps)}), positions {self.positions}"
                f"{'' if self.config.share_weights else ', untied prefix/suffix'}; {self.source}")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, run = [], []
    for layer in sorted(set(layers)):
        if run and layer == run[-1] + 1:
            run.append(layer)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [layer]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def load_adapter(arg: str, model: nn.Module, *, positions: Optional[str] = None, seed: int = 0) -> Adapter:
    """An Adapter from --adapter (a spec string or a directory; module docstring), checked against `model`
    by building it once. positions overrides the adapter's own scheme. Raises AdapterError."""
    from ..integration import ReftModel, find_layers
    from ..integration.model import CONFIG_NAME
    from ..integration.positions import parse_positions
    from ..interop import load_pyreft

    if positions is not None and positions != "last":
        try:
            parse_positions(positions)
        except ValueError as e:
            raise AdapterError(f"--positions: {e}") from None
    path = Path(os.path.expanduser(arg))
    if path.is_dir():
        names = os.listdir(path)
        try:
            if CONFIG_NAME in names:
                reft, source = ReftModel.from_pretrained(model, path), f"reft_kernels adapter {arg}"
            elif any(n.startswith("intkey_") and n.endswith(".bin") for n in names):
                reft, source = load_pyreft(model, path, dtype=None, positions=positions), f"pyreft checkpoint {arg}"
            else:
                raise AdapterError(f"--adapter {arg}: not an adapter directory: it has neither {CONFIG_NAME} "
                                   "(ReftModel.save_pretrained) nor intkey_*.bin files (pyreft's ReftModel.save)")
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"--adapter {arg}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        state = {k: v.detach().to("cpu").clone() for k, v in reft.state_dict().items()}
        config = reft.reft_config
        reft.remove_hooks()
        scheme = positions or config.positions or DEFAULT_POSITIONS
        if config.positions is None and positions is None:
            source += f" (it names no positions: {DEFAULT_POSITIONS} assumed; --positions sets them)"
        return Adapter(config, state, scheme, source, seed)
    if path.exists() or os.sep in arg or arg.startswith((".", "~")):
        raise AdapterError(f"--adapter {arg}: no such directory; pass a directory saved by ReftModel.save_pretrained "
                           "or pyreft's ReftModel.save, or a spec such as 'loreft r=4 layers=all positions=f5+l5'")
    config = parse_spec(arg, len(find_layers(model)[1]))
    if positions is not None:
        config.positions = positions
    adapter = Adapter(config, None, config.positions, f"spec {arg!r}", seed)
    try:
        adapter.build(model).remove_hooks()  # the model fits it (layers, components), before any timing
    except ValueError as e:
        raise AdapterError(f"--adapter {arg!r}: {e}") from None
    return adapter
