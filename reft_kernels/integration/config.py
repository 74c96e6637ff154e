"""ReftConfig: which interventions go where, in a form that round-trips through JSON.

    config = ReftConfig(
        representations=[{"layer": l, "component": "block_output", "intervention": "loreft",
                          "low_rank_dimension": 4} for l in range(16)],
        positions="f5+l5", share_weights=True)

A representation names a layer, a component (integration/locate.py), an intervention type (a kind such as
"loreft", a class such as reft_kernels.LoReFT, or pyreft's class name "LoreftIntervention"), a rank
(`low_rank_dimension`, pyreft's key; `rank` is accepted too), and optionally dtype, act, dropout,
parametrization (LoReFT-family R) and add_bias (NoReFT). A representation may also be a Representation.

positions / share_weights describe the position scheme the adapter was trained with ("f{p}+l{s}"):
ReftModel.locations(attention_mask) builds matching intervention_locations, and saving keeps them. With
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

from ..modules.interventions import BY_PYREFT_NAME, INTERVENTIONS, ReftIntervention
from .locate import COMPONENTS
from .positions import parse_positions

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kind(intervention: Any) -> str:
    if isinstance(intervention, type) and issubclass(intervention, ReftIntervention):
        return intervention.kind
    if isinstance(intervention, str):
        name = intervention.rsplit(".", 1)[-1].strip("'<>")  # also "<class 'pyreft.interventions.X'>"
        if name.lower() in INTERVENTIONS:
            return name.lower()
        if name in BY_PYREFT_NAME:
            return BY_PYREFT_NAME[name].kind
    raise ValueError(f"intervention must be one of {sorted(INTERVENTIONS)} (or a reft_kernels class, or pyreft's "
                     f"class name such as 'LoreftIntervention'), got {intervention!r}")


def _dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


@dataclasses.dataclass
class Representation:
    """One intervention site and type. dtype None: the type's default (bf16 for the W-bearing types, as
    pyreft; fp32 for ConsReFT/LobiReFT)."""

    layer: int
    component: str = "block_output"
    intervention: str = "loreft"
    low_rank_dimension: int = 1
    dtype: Optional[torch.dtype] = None
    act: Optional[str] = None
    dropout: float = 0.0
    parametrization: str = "stereographic"
    add_bias: bool = False

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        if self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        self.intervention = _kind(self.intervention)
        if not isinstance(self.low_rank_dimension, int) or self.low_rank_dimension < 1:
            raise ValueError(f"low_rank_dimension must be an int >= 1, got {self.low_rank_dimension!r}")
        self.dtype = _dtype(self.dtype)
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
        self.representations = [Representation.from_any(r) for r in reps]
        if not self.representations:
            raise ValueError("representations is empty")
        if self.positions is not None:
            parse_positions(self.positions)
        self.unfrozen_modules = list(self.unfrozen_modules)

    @property
    def untied(self) -> bool:
        """True when every representation is two interventions (prefix, suffix)."""
        if self.share_weights or self.positions is None:
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

    @classmethod
    def from_json(cls, data: dict) -> "ReftConfig":
        return cls(**{k: data[k] for k in ("representations", "positions", "share_weights", "unfrozen_modules")
                      if k in data})


__all__ = ["ReftConfig", "Representation"]
