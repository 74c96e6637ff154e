"""ReftConfig: which interventions go where, in a form that round-trips through JSON.

    config = ReftConfig(
        representations=[{"layer": l, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 4} for l in range(16)],
        positions="f5+l5", share_weights=True)

A representation names a layer, a component (integration/locate.py), an intervention type (a kind such as
"loreft", a class such as reft_kernels.LoReFT, or pyreft's class name "LoreftIntervention"; a class or its
name, never an instance: the ReftModel builds the modules), a rank (`low_rank_dimension`, pyreft's key,
required as in pyreft; `rank` is accepted too), and optionally dtype, act, dropout, parametrization
(LoReFT-family R) and add_bias (NoReFT). A representation may also be a Representation. Every field is
checked here, so a bad value fails when the config is built (or read from a file), not at the first forward.

positions / share_weights describe the position scheme the adapter was trained with ("f{p}+l{s}" or
"last"): ReftModel.locations(attention_mask) builds matching intervention_locations, and saving keeps them. With
share_weights=False and both a prefix and a suffix, every representation becomes two interventions (one
for the prefix, one for the suffix), all prefix ones first, as pyreft's training script does (`layers +=
layers`); intervention_locations then has 2 x len(representations) entries in that order.

unfrozen_modules: dotted paths of base-model modules to train with the interventions (e.g. "classifier"
or "score" for a sequence-classification head); their weights are saved with the adapter.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch

from ..modules.interventions import BY_PYREFT_NAME, INTERVENTIONS, ReftIntervention, check_act
from ..modules.orthonormal import PARAMETRIZATIONS
from ..ops.validation import check_dropout
from .locate import COMPONENTS
from .positions import parse_positions

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _kind(intervention: Any) -> str:
    if isinstance(intervention, type) and issubclass(intervention, ReftIntervention):
        return intervention.kind
    if isinstance(intervention, torch.nn.Module):  # pyreft's way: an instance built by the caller
        name = type(intervention).__name__
        known = BY_PYREFT_NAME.get(name) or INTERVENTIONS.get(getattr(intervention, "kind", None))
        hint = f"'intervention': {known.kind!r} (or reft_kernels.{known.__name__}, or {known.pyreft_name!r})" \
            if known is not None else f"one of {sorted(INTERVENTIONS)}"
        raise TypeError(f"intervention must be the class or its name, not an instance (got a {name} object): the "
                        f"ReftModel builds one module per intervention from the representation. Pass {hint} and "
                        "give the rank as 'low_rank_dimension' (dtype, act, dropout as fields of the representation)")
    if isinstance(intervention, str):
        name = intervention.rsplit(".", 1)[-1].strip("'<>")  # also "<class 'pyreft.interventions.X'>"
        if name.lower() in INTERVENTIONS:
            return name.lower()
        if name in BY_PYREFT_NAME:
            return BY_PYREFT_NAME[name].kind
    raise ValueError(f"intervention must be one of {sorted(INTERVENTIONS)} (or a reft_kernels class, or pyreft's "
                     f"class name such as 'LoreftIntervention'), got {intervention!r}")


def _dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if not isinstance(dtype, (str, torch.dtype)) or name not in _DTYPES:
        raise ValueError(f"dtype must be None or a floating dtype, one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_scheme(positions: Optional[str]) -> Optional[str]:
    """positions as ReftConfig takes it: None, "last", or "f{p}+l{s}" / "f{p}" / "l{s}"."""
    if positions is None or positions == "last":
        return positions
    if not isinstance(positions, str):
        raise TypeError(f"positions must be None, 'last' or a string like 'f5+l5', got {type(positions).__name__}")
    try:
        parse_positions(positions)
    except ValueError:
        raise ValueError(f"positions must be None, 'last' (the last prompt token) or 'f{{p}}+l{{s}}' / 'f{{p}}' / "
                         f"'l{{s}}' (the first p and last s prompt tokens, e.g. 'f5+l5'), got {positions!r}") from None
    return positions


@dataclasses.dataclass
class Representation:
    """One intervention site and type. low_rank_dimension is required (pyreft requires it too). dtype None:
    the type's default (bf16 for the W-bearing types, as pyreft; fp32 for ConsReFT/LobiReFT)."""

    layer: int
    component: str = "block_output"
    intervention: str = "loreft"
    low_rank_dimension: Optional[int] = None
    dtype: Optional[torch.dtype] = None
    act: Optional[str] = None
    dropout: float = 0.0
    parametrization: str = "stereographic"
    add_bias: bool = False

    def __post_init__(self):
        if not _is_int(self.layer) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        if not isinstance(self.component, str) or self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        self.intervention = _kind(self.intervention)
        if self.low_rank_dimension is None:
            raise ValueError(f"the representation of layer {self.layer} has no low_rank_dimension: give the rank "
                             "r of the edit, e.g. 'low_rank_dimension': 4 (pyreft requires it too)")
        if not _is_int(self.low_rank_dimension) or self.low_rank_dimension < 1:
            raise ValueError(f"low_rank_dimension must be an int >= 1, got {self.low_rank_dimension!r}")
        self.dtype = _dtype(self.dtype)
        if self.act is not None:
            act = check_act(self.act)
            if act not in ("identity", "linear") and not INTERVENTIONS[self.intervention].source_linear:
                raise ValueError(f"{self.intervention} has no W h + b to apply an activation to; got act={self.act!r}")
            self.act = act
        self.dropout = check_dropout(self.dropout)
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        if not isinstance(self.add_bias, bool):
            raise TypeError(f"add_bias must be a bool, got {self.add_bias!r}")
        if self.add_bias and self.intervention != "noreft":
            raise ValueError(f"add_bias applies to noreft only, got intervention={self.intervention!r}")

    @classmethod
    def from_any(cls, rep: Union["Representation", dict]) -> "Representation":
        if isinstance(rep, Representation):
            return dataclasses.replace(rep)
        if not isinstance(rep, dict):
            raise TypeError(f"a representation must be a dict or a Representation, got {type(rep).__name__}")
        rep = dict(rep)
        if "rank" in rep:
            if "low_rank_dimension" in rep and rep["low_rank_dimension"] != rep["rank"]:
                raise ValueError(f"rank={rep['rank']} and low_rank_dimension={rep['low_rank_dimension']} disagree")
            rep["low_rank_dimension"] = rep.pop("rank")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(rep) - fields
        if unknown:
            raise ValueError(f"unknown representation keys {sorted(unknown)}; known: {sorted(fields | {'rank'})}")
        if "layer" not in rep:
            raise ValueError("a representation needs 'layer' (the index of the block it edits)")
        return cls(**rep)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        return out


@dataclasses.dataclass
class ReftConfig:
    """The adapter's layout (module docstring). representations: a dict or a list of dicts/Representations."""

    representations: Sequence[Union[Representation, dict]]
    positions: Optional[str] = None
    share_weights: bool = True
    unfrozen_modules: Sequence[str] = ()

    def __post_init__(self):
        reps = self.representations
        if isinstance(reps, (dict, Representation)):
            reps = [reps]
        if not isinstance(reps, (list, tuple)):
            raise TypeError(f"representations must be a dict, a Representation or a list of them, got "
                            f"{type(reps).__name__}")
        if not reps:
            raise ValueError("representations is empty")
        out = []
        for i, rep in enumerate(reps):
            try:
                out.append(Representation.from_any(rep))
            except (TypeError, ValueError) as e:  # the same error, saying which representation
                raise type(e)(f"representations[{i}]: {e}") from None
        self.representations = out
        self.positions = check_scheme(self.positions)
        if not isinstance(self.share_weights, bool):
            raise TypeError(f"share_weights must be a bool, got {self.share_weights!r}")
        modules = self.unfrozen_modules
        if isinstance(modules, str):
            modules = [modules]
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
            raise TypeError(f"unfrozen_modules must be a list of dotted module paths (str), got {modules!r}")
        self.unfrozen_modules = list(modules)

    @property
    def untied(self) -> bool:
        """True when every representation is two interventions (prefix, suffix)."""
        if self.share_weights or self.positions is None or self.positions == "last":
            return False
        first, last = parse_positions(self.positions)
        return first > 0 and last > 0

    def interventions(self) -> list[tuple[Representation, int]]:
        """(representation, copy index) per intervention, in the order intervention_locations indexes them."""
        copies = 2 if self.untied else 1
        return [(rep, k) for k in range(copies) for rep in self.representations]

    def to_json(self) -> dict:
        return {"representations": [r.to_json() for r in self.representations], "positions": self.positions,
                "share_weights": self.share_weights, "unfrozen_modules": list(self.unfrozen_modules)}

    _FIELDS = ("representations", "positions", "share_weights", "unfrozen_modules")

    @classmethod
    def from_json(cls, data: dict) -> "ReftConfig":
        """The inverse of to_json; TypeError/ValueError naming the field for anything malformed."""
        if not isinstance(data, dict):
            raise TypeError(f"a ReftConfig in JSON is an object with {list(cls._FIELDS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls._FIELDS))
        if unknown:
            raise ValueError(f"unknown fields {unknown}; a ReftConfig has {list(cls._FIELDS)}")
        if "representations" not in data:
            raise ValueError("the field 'representations' is missing")
        return cls(**{k: data[k] for k in cls._FIELDS if k in data})


__all__ = ["ReftConfig", "Representation", "check_scheme"]
