"""The six ReFT interventions as torch.nn.Modules over one fused op (reft_kernels.reft_edit).

Every type is the family formula of reft_kernels/ops/fused_edit.py with terms switched on or off:

| class       | pyreft class         | edit of a row h                     | lift L | source      | subtract |
|-------------|----------------------|-------------------------------------|--------|-------------|----------|
| LoReFT      | LoreftIntervention   | h + Rᵀ(act(Wh + b) − Rh)            | R      | act(Wh + b) | Rh       |
| NoReFT      | NoreftIntervention   | h + W2ᵀ(act(Wh + b) − (W2h + b2))   | W2     | act(Wh + b) | W2h + b2 |
| ConsReFT    | ConsreftIntervention | h + Rᵀ(b − Rh)                      | R      | b           | Rh       |
| LobiReFT    | LobireftIntervention | h + Rᵀb                             | R      | b           | -        |
| DiReFT      | NodireftIntervention | h + W2ᵀ act(Wh + b)   (the paper's) | W2     | act(Wh + b) | -        |
| OrthoDiReFT | DireftIntervention   | h + Rᵀ act(Wh + b)                  | R      | act(Wh + b) | -        |

R [rank, dim] has orthonormal rows (an Orthonormal submodule, `rotation`); W, W2 [rank, dim]; b, b2 [rank].

    loreft = LoReFT(4096, 4, dtype=torch.bfloat16)
    hidden = loreft(hidden, positions)      # hidden [B, T, 4096] edited in place at positions [B, P]

Defaults follow pyreft: R fp32 from torch.nn.init.orthogonal_; W, b, W2 (and b2) initialised as
torch.nn.Linear(dim, rank) initialises them, then cast to `dtype` (bf16 by default); ConsReFT's and
LobiReFT's b from U[0, 1) in fp32; act identity; dropout 0 (applied, as in pyreft, to the whole edited
row and only in training mode).

Where these differ from pyreft on purpose
- eval() turns dropout off (pyreft's wrapper never propagates eval() to its interventions).
- A row named twice in one batch row is edited once and its gradient counted once (pyreft multiplies it).
- Wh + b runs in fp32 whatever W's dtype (pyreft runs it in W's dtype).
- ConsReFT honours a dropout argument (pyreft's ignores it); its default 0 matches.
- The default R parametrization ("stereographic": a Cholesky-QR, batched and cached, with no d x d
  buffer; see modules/orthonormal.py) differs from pyreft's; parametrization="householder" is its exact map.
- NoReFT/DiReFT: b2 is created only when add_bias=True and only NoReFT uses it (pyreft's DiReFT creates an
  unused one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..backend import BACKENDS
from ..ops import activations as _acts
from ..ops.fused_edit import reft_edit
from ..ops.validation import check_dropout
from .orthonormal import Orthonormal


def check_backend(backend: Optional[str]) -> Optional[str]:
    """backend as the modules take it: None (automatic), "triton", "cpp" or "torch"."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None (automatic), 'triton', 'cpp' or 'torch', got {backend!r}")
    return backend


def check_act(act: Optional[str], backend: Optional[str] = None) -> str:
    """The canonical name of an activation, checked when a module or config is built rather than at its
    first forward: a transformers ACT2FN name (None: identity). With a fused backend named explicitly
    ("triton" or "cpp") it must also be one the fused kernels have (activations.SUPPORTED); with backend
    None any ACT2FN name works (the others run the torch reference, with a warning)."""
    name = _acts.canonical(act)
    if name not in _acts.SUPPORTED:
        from transformers.activations import ACT2FN  # slow import, only for the names the kernels lack

        if name not in ACT2FN:
            raise ValueError(f"act={act!r} is not a transformers ACT2FN name; the fused kernels have "
                             f"{sorted(_acts.SUPPORTED)}, backend='torch' any of {sorted(ACT2FN)}")
        if backend in ("triton", "cpp"):
            _acts.kernel_code(name)  # raises: no fused kernel, names the supported ones and backend='torch'
    return name


def _linear_init(dim: int, rank: int, bias: bool, dtype, device) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """Weight [rank, dim] and bias [rank] exactly as torch.nn.Linear(dim, rank) initialises them (same
    random draws), created in fp32 and then cast, as pyreft's `nn.Linear(...).to(dtype)` does."""
    lin = nn.Linear(dim, rank, bias=bias, device=device)
    w = nn.Parameter(lin.weight.detach().to(dtype))
    b = nn.Parameter(lin.bias.detach().to(dtype)) if bias else None
    return w, b


class ReftIntervention(nn.Module):
    """Base class: holds the parameters of one intervention and edits hidden states with the fused op.

    Args (shared by the six types): dim (the hidden width d), rank (r, 1 <= r <= d); dtype of W, b, W2, b2
    (None: the type's default); act (None or a transformers ACT2FN name, checked here); dropout in [0, 1);
    parametrization of R (orthonormal types); device; backend: None (automatic: Triton on CUDA, the C++
    kernels on the CPU, see reft_kernels.backend), "triton", "cpp" or "torch".

    Subclasses set the class attributes below and create their parameters; `forward` is shared.
    """

    kind: str = ""  # short name, used by configs and checkpoints
    pyreft_name: str = ""  # pyreft's class
    formula: str = ""  # the edit, for repr and docs
    orthonormal: bool = True  # lift is R (an Orthonormal) rather than a free W2
    source_linear: bool = True  # source act(Wh + b) rather than b
    subtract_proj: bool = True  # subtract L h (+ b2)
    default_dtype: torch.dtype = torch.bfloat16

    def __init__(self, dim: int, rank: int, *, dtype: Optional[torch.dtype] = None, act: Optional[str] = None,
                 dropout: float = 0.0, parametrization: str = "stereographic", device=None,
                 backend: Optional[str] = None):
        super().__init__()
        if not (type(dim) is int and type(rank) is int and 1 <= rank <= dim):  # (bool is an int: refused)
            raise ValueError(f"need integers 1 <= rank <= dim, got dim={dim!r}, rank={rank!r}")
        self.dim, self.rank = dim, rank
        self.dtype = dtype if dtype is not None else self.default_dtype
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.backend = check_backend(backend)
        self.act = check_act(act, backend)
        if not self.source_linear and self.act != "identity":
            raise ValueError(f"{type(self).__name__} has no W h + b to apply an activation to; got act={act!r}")
        self.dropout = check_dropout(dropout)
        if self.orthonormal:
            self.rotation = Orthonormal(dim, rank, parametrization=parametrization, device=device, backend=backend)
        elif parametrization != "stereographic":
            raise ValueError(f"{type(self).__name__} has no orthonormal R; parametrization does not apply")

    # subclasses provide these
    def _lift(self) -> torch.Tensor:
        return self.rotation()

    def _weight(self) -> Optional[torch.Tensor]:
        return self.weight if self.source_linear else None

    def _proj_bias(self) -> Optional[torch.Tensor]:
        return None

    def lift(self) -> torch.Tensor:
        """The [rank, dim] matrix the edit is lifted through: R (orthonormal rows) or W2."""
        return self._lift()

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, *, recompute: bool = False,
                check_positions: Optional[bool] = None) -> torch.Tensor:
        """Edits hidden [B, T, dim] in place at positions [B, P] (-1: no edit) and returns it.

        hidden must not be a leaf that requires grad (clone it first). recompute and check_positions: see
        reft_kernels.reft_edit. Dropout is active only in training mode (module.train()).
        """
        return reft_edit(
            hidden, positions, self._lift(), self._weight(), self.bias, self._proj_bias(),
            source_linear=self.source_linear, subtract_proj=self.subtract_proj, act=self.act,
            dropout=self.dropout, training=self.training, backend=self.backend, recompute=recompute,
            check_positions=check_positions, names=self._names,
        )

    _names = ("rotation", "weight", "bias", "proj_bias")

    def extra_repr(self) -> str:
        dtype = str(self.bias.dtype).replace("torch.", "")  # the live dtype (after any .to())
        parts = [f"dim={self.dim}", f"rank={self.rank}", f"dtype={dtype}"]
        if self.source_linear:
            parts.append(f"act={self.act}")
        parts.append(f"dropout={self.dropout}")
        return f"{self.formula}; " + ", ".join(parts)


class LoReFT(ReftIntervention):
    """LoReFT (pyreft's LoreftIntervention): h + Rᵀ(act(Wh + b) − Rh). Parameters: rotation (R), weight
    (W [rank, dim]), bias (b [rank]). See the module docstring for defaults."""

    kind, pyreft_name, formula = "loreft", "LoreftIntervention", "h + Rᵀ(act(Wh + b) − Rh)"

    def __init__(self, dim: int, rank: int, **kwargs):
        super().__init__(dim, rank, **kwargs)
        self.weight, self.bias = _linear_init(dim, rank, True, self.dtype, kwargs.get("device"))


class NoReFT(ReftIntervention):
    """NoReFT (pyreft's NoreftIntervention): h + W2ᵀ(act(Wh + b) − (W2h + b2)), W2 free. Parameters:
    proj_weight (W2), proj_bias (b2, only with add_bias=True), weight (W), bias (b)."""

    kind, pyreft_name, formula = "noreft", "NoreftIntervention", "h + W2ᵀ(act(Wh + b) − (W2h + b2))"
    orthonormal = False
    _names = ("proj_weight", "weight", "bias", "proj_bias")

    def __init__(self, dim: int, rank: int, *, add_bias: bool = False, **kwargs):
        super().__init__(dim, rank, **kwargs)
        device = kwargs.get("device")
        self.add_bias = add_bias
        self.proj_weight, self.proj_bias = _linear_init(dim, rank, add_bias, self.dtype, device)
        self.weight, self.bias = _linear_init(dim, rank, True, self.dtype, device)

    def _lift(self):
        return self.proj_weight

    def _proj_bias(self):
        return self.proj_bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", add_bias={self.add_bias}"


class _BiasSource(ReftIntervention):
    """The types whose source is a learned constant b [rank], drawn from U[0, 1) in fp32 as pyreft does."""

    source_linear = False
    default_dtype = torch.float32

    def __init__(self, dim: int, rank: int, **kwargs):
        super().__init__(dim, rank, **kwargs)
        self.bias = nn.Parameter(torch.rand(rank, device=kwargs.get("device")).to(self.dtype))


class ConsReFT(_BiasSource):
    """ConsReFT (pyreft's ConsreftIntervention): h + Rᵀ(b − Rh). Parameters: rotation (R), bias (b)."""

    kind, pyreft_name, formula = "consreft", "ConsreftIntervention", "h + Rᵀ(b − Rh)"


class LobiReFT(_BiasSource):
    """LobiReFT (pyreft's LobireftIntervention): h + Rᵀb. Parameters: rotation (R), bias (b)."""

    kind, pyreft_name, formula = "lobireft", "LobireftIntervention", "h + Rᵀb"
    subtract_proj = False


class DiReFT(ReftIntervention):
    """DiReFT as the paper defines it (pyreft's NodireftIntervention): h + W2ᵀ act(Wh + b), W2 free.
    Parameters: proj_weight (W2), weight (W), bias (b)."""

    kind, pyreft_name, formula = "direft", "NodireftIntervention", "h + W2ᵀ act(Wh + b)"
    orthonormal = False
    subtract_proj = False
    _names = ("proj_weight", "weight", "bias", "proj_bias")

    def __init__(self, dim: int, rank: int, **kwargs):
        super().__init__(dim, rank, **kwargs)
        device = kwargs.get("device")
        self.proj_weight, _ = _linear_init(dim, rank, False, self.dtype, device)
        self.weight, self.bias = _linear_init(dim, rank, True, self.dtype, device)

    def _lift(self):
        return self.proj_weight


class OrthoDiReFT(ReftIntervention):
    """DiReFT with an orthonormal lift (pyreft's DireftIntervention): h + Rᵀ act(Wh + b).
    Parameters: rotation (R), weight (W), bias (b)."""

    kind, pyreft_name, formula = "orthodireft", "DireftIntervention", "h + Rᵀ act(Wh + b)"
    subtract_proj = False

    def __init__(self, dim: int, rank: int, **kwargs):
        super().__init__(dim, rank, **kwargs)
        self.weight, self.bias = _linear_init(dim, rank, True, self.dtype, kwargs.get("device"))


INTERVENTIONS: dict[str, type[ReftIntervention]] = {
    cls.kind: cls for cls in (LoReFT, NoReFT, ConsReFT, LobiReFT, DiReFT, OrthoDiReFT)
}
BY_PYREFT_NAME: dict[str, type[ReftIntervention]] = {cls.pyreft_name: cls for cls in INTERVENTIONS.values()}

__all__ = ["BY_PYREFT_NAME", "ConsReFT", "check_act", "check_backend", "DiReFT", "INTERVENTIONS", "LoReFT", "LobiReFT", "NoReFT",
           "OrthoDiReFT", "ReftIntervention"]
