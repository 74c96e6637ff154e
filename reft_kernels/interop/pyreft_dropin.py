"""Drop-in replacements for pyreft's six interventions, computing with reft_kernels' fused edit.

    import pyreft
    from reft_kernels.interop import pyreft_dropin as fused

    reps = [{"layer": l, "component": "block_output", "low_rank_dimension": 4,
             "intervention": fused.LoreftIntervention(embed_dim=4096, low_rank_dimension=4)}   # was pyreft.Loreft...
            for l in (8, 16)]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, ...)   # unchanged
    reft_model.save("adapter/")      # a pyreft checkpoint: pyreft's state-dict keys, shapes and dtypes

LoreftIntervention, NoreftIntervention, ConsreftIntervention, LobireftIntervention, DireftIntervention and
NodireftIntervention have pyreft 0.1.0's names, base classes (pyvene's SourcelessIntervention,
TrainableIntervention, DistributedRepresentationIntervention), constructor keywords and defaults
(embed_dim, low_rank_dimension, dtype=bfloat16, act_fn=None, dropout=0.0, add_bias), submodules
(`rotate_layer`, `learned_source`, `proj_layer`, `dropout`, `act_fn`), parameter names and state dicts,
so pyvene/pyreft's get_reft_model, ReftModel, trainers, save and load take them unchanged. This module
needs pyvene (imported here); pyreft itself is never imported, and `import reft_kernels` imports neither.

How a call runs. pyvene gathers the rows at the intervention's positions into a fresh [B, P, d] tensor
(`_gather_intervention_output`: a clone of the layer output, then torch.gather), calls
`intervention(base, None, subspaces)` on it and scatters the result back. Here that tensor is edited in
place by one call of reft_kernels.reft_edit with positions arange(P) for every row (each gathered row is
edited once), and returned: no copy of the rows, one fused kernel forward and backward on a GPU (the
torch reference on a CPU), where pyreft runs ~8 separate ops and reads R twice (LoReFT). The input is
copied first only where editing it in place is impossible or visible: a leaf that requires grad (or a view
of one), an inference-mode tensor outside inference mode, or `inplace=False` (pyreft's forward is out of
place; pyvene never reads the tensor it passed in after the call).

R (the orthonormal types). `rotate_layer` is exactly pyreft's: torch.nn.utils.parametrizations.orthogonal
around a [d, r] weight, i.e. Householder map plus a d x d `base` buffer, with the same initialisation and
random draws, so state dicts, gradients and training trajectories are pyreft's. It is computed through a
reft_kernels Orthonormal(parametrization="householder") that shares that very module (held outside the
module tree, so no key changes): once per call (pyreft's LoReFT computes it twice), and while no
parameter of R requires grad (a frozen adapter being served) once in all, cached until the parameters
change. reft_kernels' own "stereographic" parametrization (no d x d buffer, batched) is not used here:
its state is not a pyreft state, and its gradients and trajectory are not pyreft's.

Where the numbers differ from pyreft (deliberately; pyreft's behaviour in parentheses)
- Wh + b, Rh and the lift run in fp32 for every dtype of W and h (pyreft: Wh + b in W's dtype, bf16 by
  default; Rh in fp32; NoReFT/NodiReFT entirely in W's dtype). With fp32 W and h the results agree to
  fp32 rounding (~1e-6 relative); with bf16 they differ by bf16 rounding of W h + b. Mixed dtypes work
  (pyreft raises for fp32 h with bf16 W).
- Dropout draws its mask from the fused kernel's own generator (same p, same rows, same scaling, a
  different mask for one seed than torch's nn.Dropout). It follows `self.dropout.training`, as pyreft's
  nn.Dropout does; pyvene's eval() never reaches the interventions (call reft_model.interventions.eval()).
- A position named twice in a batch row: reft_kernels.reft_edit counts its gradient once, but here every
  gathered row is distinct (positions arange(P)), so the duplicate handling is pyvene's gather/scatter:
  the row is edited once and its gradient multiplied by the count, as with pyreft's classes (the fused
  op's fix applies to reft_kernels.get_reft_model, not to pyvene's path).
- LoreftIntervention.load_state_dict imports R with torch's right_inverse (a fresh orthogonal d x d base
  whose first r columns are R, exactly) instead of pyreft's write of R into the first columns of an
  unrelated base, which leaves the base non-orthogonal so that training after a reload drifts off
  orthonormality. The loaded R equals the saved one bit for bit either way.
- LoreftIntervention.state_dict() called on the intervention returns pyreft's compact
  {weight, bias, rotate_layer}; called by a parent module's state_dict (a `destination` is passed) it
  writes the full module state under its standard keys, so a parent's state_dict()/load_state_dict()
  round-trips (pyreft's override drops LoReFT from any parent's state dict).
- NoreftIntervention/NodireftIntervention default add_bias=False (pyreft requires the keyword and raises
  KeyError without it, which is also why pyvene's loader cannot rebuild them), and their load_state_dict
  gives proj_layer a bias exactly when the state dict has `proj_layer.bias` (the files do not record
  add_bias), so pyreft.ReftModel.load rebuilds both, with or without b2.
- Two extra keywords, which pyreft's classes do not have: backend (None: automatic, Triton on CUDA and
  the C++ kernels on the CPU; "triton", "cpp" or "torch": see reft_kernels.backend) and inplace (default True).

Checkpoints. `reft_model.save(dir)` writes pyreft's files; config.json names each intervention's class as
pyvene always does (str(type(intervention))), here this module's. pyreft.ReftModel.load(dir, model) then
rebuilds these classes (reft_kernels must be importable). set_checkpoint_classes(dir, "pyreft") rewrites
those names to pyreft.interventions.*, making the directory byte-for-byte what pyreft's own classes
would have written for the same state, for machines without reft_kernels ("dropin" switches back).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Optional

import torch
from pyvene import DistributedRepresentationIntervention, SourcelessIntervention, TrainableIntervention
from torch import nn
from transformers.activations import ACT2FN

from ..modules.interventions import check_backend
from ..modules.orthonormal import Orthonormal
from ..ops import activations as _acts
from ..ops.fused_edit import reft_edit

PYREFT_MODULE = "pyreft.interventions"
_UNSET = object()

# positions arange(P) expanded to [B, P], per (device, B, P); tiny and read-only
_ARANGE: dict = {}


def _arange_positions(B: int, P: int, device: torch.device) -> torch.Tensor:
    key = (device, B, P)
    pos = _ARANGE.get(key)
    if pos is None:
        if len(_ARANGE) >= 256:
            _ARANGE.clear()
        pos = _ARANGE[key] = torch.arange(P, device=device).expand(B, P)
    return pos


def _needs_copy(t: torch.Tensor) -> bool:
    """True where an in-place edit of t would be refused (by autograd or inference mode)."""
    if t.requires_grad and (t.is_leaf or (t._base is not None and t._base.is_leaf and t._base.requires_grad)):
        return True
    return t.is_inference() and not torch.is_inference_mode_enabled()


class _FusedIntervention:
    """What the six classes share: constructor bookkeeping and the fused forward. A mixin placed before
    the pyvene bases; subclasses set the flags and provide _operands()."""

    _source_linear = True  # source act(W h + b) rather than the constant b
    _subtract_proj = True  # delta = source - (L h (+ b2))

    def _setup(self, embed_dim, low_rank_dimension, act_fn, backend, inplace):
        if embed_dim is None:
            raise ValueError(f"{type(self).__name__} needs embed_dim (the width of the intervened representation)")
        self._dim, self._rank = int(embed_dim), int(low_rank_dimension)
        if not 1 <= self._rank <= self._dim:
            raise ValueError(f"need 1 <= low_rank_dimension <= embed_dim, got {self._rank} and {self._dim}")
        self.backend, self.inplace = check_backend(backend), bool(inplace)
        # the op's name ("identity" for pyreft's None) and the ACT2FN name for the act_fn attribute
        self._act = "identity" if act_fn is None else _acts.canonical(act_fn)
        self._act_fn_name = "linear" if act_fn is None else self._act
        if self._act_fn_name not in ACT2FN:
            raise ValueError(f"act_fn={act_fn!r} is not a transformers ACT2FN name")

    def _make_rotation(self):
        """pyreft's rotate_layer (parametrized [d, r] weight, same random draws), shared with an
        Orthonormal that computes and caches R; the Orthonormal is kept out of the module tree."""
        orth = Orthonormal(self._dim, self._rank, parametrization="householder", backend=self.backend)
        self.__dict__["_orthonormal"] = orth
        self.rotate_layer = orth.householder

    def rotation(self) -> torch.Tensor:
        """R [r, d] fp32 with orthonormal rows (pyreft's rotate_layer.weight, transposed): computed once
        per call while trainable, cached while frozen (see reft_kernels.modules.orthonormal)."""
        orth = self.__dict__["_orthonormal"]
        if orth.householder is not self.rotate_layer:  # rotate_layer was replaced: follow it
            orth.householder = self.rotate_layer
            orth._cache = None
        return orth()

    def _operands(self):
        """(lift [r, d], weight [r, d] or None, bias [r], proj_bias [r] or None) for reft_edit."""
        raise NotImplementedError

    def _dropout_p(self) -> tuple[float, bool]:
        drop = getattr(self, "dropout", None)
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            return float(drop.p), True
        return 0.0, False

    def forward(self, base, source=None, subspaces=None):
        """base [..., P, d] (pyvene passes the gathered rows [B, P, d]) -> every row edited; base itself is
        edited in place and returned unless that is impossible or inplace=False (module docstring)."""
        lift, weight, bias, proj_bias = self._operands()
        x = base.clone() if (not self.inplace or _needs_copy(base)) else base
        shape = x.shape
        if x.dim() != 3:
            x = x.reshape(-1, shape[-2] if x.dim() >= 2 else 1, shape[-1])
        p, training = self._dropout_p()
        out = reft_edit(
            x, _arange_positions(x.shape[0], x.shape[1], x.device), lift, weight, bias, proj_bias,
            source_linear=self._source_linear, subtract_proj=self._subtract_proj, act=self._act, dropout=p,
            training=training, backend=self.backend, check_positions=False, names=self._names,
        )
        return out if out.shape == shape else out.reshape(shape)

    _names = ("rotate_layer (R)", "learned_source.weight", "learned_source.bias", "proj_layer.bias")

    def extra_repr(self) -> str:
        parts = [f"fused reft_kernels edit, embed_dim={self._dim}", f"low_rank_dimension={self._rank}"]
        if self._source_linear:
            parts.append(f"act_fn={self._act_fn_name}")
        if self.backend:
            parts.append(f"backend={self.backend}")
        return ", ".join(parts)


class _ProjLayer:
    """NoReFT / NodiReFT: the shared constructor (proj_layer W2 [+ b2 with add_bias], learned_source W, b,
    dropout, act_fn), and a load_state_dict in which the state dict decides whether proj_layer has a bias
    (b2), since pyreft's files do not record add_bias and pyvene's loader rebuilds with the constructor
    defaults."""

    def __init__(self, *, embed_dim=None, low_rank_dimension, dtype=_UNSET, act_fn=None, dropout=0.0,
                 add_bias: bool = False, backend: Optional[str] = None, inplace: bool = True, **kwargs):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, **kwargs, keep_last_dim=True)
        self._setup(embed_dim, low_rank_dimension, act_fn, backend, inplace)
        self.add_bias = bool(add_bias)
        self.proj_layer = _linear(self._dim, self._rank, _dtype(dtype), bias=add_bias)
        self.learned_source = _linear(self._dim, self._rank, _dtype(dtype))
        self.dropout = nn.Dropout(dropout)
        self.act_fn = ACT2FN[self._act_fn_name]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        has = self.proj_layer.bias is not None
        wants = "proj_layer.bias" in state_dict
        if wants and not has:
            w = self.proj_layer.weight
            self.proj_layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        elif has and not wants and "proj_layer.weight" in state_dict:
            self.proj_layer.bias = None
        self.add_bias = wants
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _linear(d: int, r: int, dtype, bias: bool = True) -> nn.Linear:
    """pyreft's `nn.Linear(d, r).to(dtype)` (dtype None: left in fp32, as pyreft's .to(None) does)."""
    lin = nn.Linear(d, r, bias=bias)
    return lin.to(dtype) if dtype is not None else lin


def _dtype(dtype):
    return torch.bfloat16 if dtype is _UNSET else dtype


_PYVENE_BASES = (SourcelessIntervention, TrainableIntervention, DistributedRepresentationIntervention)


class _RotationAndLinearSource:
    """LoReFT / DireftIntervention: the shared constructor (rotate_layer R, then learned_source W, b in
    `dtype`, dropout, act_fn; pyreft's order of random draws) and operands (R, W, b)."""

    def __init__(self, *, embed_dim=None, low_rank_dimension, dtype=_UNSET, act_fn=None, dropout=0.0,
                 backend: Optional[str] = None, inplace: bool = True, **kwargs):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, **kwargs, keep_last_dim=True)
        self._setup(embed_dim, low_rank_dimension, act_fn, backend, inplace)
        self._make_rotation()
        self.learned_source = _linear(self._dim, self._rank, _dtype(dtype))
        self.dropout = nn.Dropout(dropout)
        self.act_fn = ACT2FN[self._act_fn_name]

    def _operands(self):
        return self.rotation(), self.learned_source.weight, self.learned_source.bias, None


class LoreftIntervention(_RotationAndLinearSource, _FusedIntervention, *_PYVENE_BASES):
    """LoReFT(h) = h + Rᵀ(act(Wh + b) − Rh), pyreft's LoreftIntervention on the fused edit.

    Submodules as pyreft: rotate_layer (R [d, r] parametrized), learned_source (nn.Linear: W, b in
    `dtype`), dropout, act_fn. state_dict() as pyreft: {"weight", "bias", "rotate_layer": R [d, r] fp32}.
    """

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """pyreft's compact dict {weight, bias, rotate_layer: R [d, r]}; the full module state when a
        parent module collects it (destination given; see the module docstring)."""
        if destination is not None or args:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict()
        for k, v in self.learned_source.state_dict(keep_vars=keep_vars).items():
            out[prefix + k] = v
        with torch.no_grad():
            out[prefix + "rotate_layer"] = self.rotation().t()  # [d, r], the same values as pyreft's weight.data
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """pyreft's compact dict (this class's or pyreft's state_dict()) or the full module state."""
        if "rotate_layer" not in state_dict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        R = state_dict["rotate_layer"]
        if tuple(R.shape) != (self._dim, self._rank):
            raise ValueError(f"rotate_layer must be [{self._dim}, {self._rank}] (embed_dim, low_rank_dimension), "
                             f"got {tuple(R.shape)}")
        linear = {k: state_dict[k] for k in ("weight", "bias") if k in state_dict}
        result = self.learned_source.load_state_dict(linear, strict=strict)
        set_pyreft_rotation(self.rotate_layer, R)
        self.__dict__["_orthonormal"]._cache = None
        return result


class NoreftIntervention(_ProjLayer, _FusedIntervention, *_PYVENE_BASES):
    """NoReFT(h) = h + W2ᵀ(act(Wh + b) − (W2h + b2)), pyreft's NoreftIntervention on the fused edit.
    Submodules: proj_layer (nn.Linear: W2, b2 only with add_bias), learned_source (W, b), dropout, act_fn."""

    _names = ("proj_layer.weight", "learned_source.weight", "learned_source.bias", "proj_layer.bias")

    def _operands(self):
        return self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias, self.proj_layer.bias


class ConsreftIntervention(_FusedIntervention, *_PYVENE_BASES):
    """ConsReFT(h) = h + Rᵀ(b − Rh), pyreft's ConsreftIntervention on the fused edit. b = learned_source
    [r] fp32 from U[0, 1). As in pyreft there is no dropout and no activation (those keywords are ignored)."""

    _source_linear = False
    _names = ("rotate_layer (R)", "weight", "learned_source", "proj_bias")

    def __init__(self, *, embed_dim=None, low_rank_dimension, backend: Optional[str] = None, inplace: bool = True,
                 **kwargs):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, **kwargs, keep_last_dim=True)
        self._setup(embed_dim, low_rank_dimension, None, backend, inplace)
        self._make_rotation()
        self.learned_source = nn.Parameter(torch.rand(self._rank), requires_grad=True)

    def _operands(self):
        return self.rotation(), None, self.learned_source, None


class LobireftIntervention(_FusedIntervention, *_PYVENE_BASES):
    """LobiReFT(h) = h + Rᵀb, pyreft's LobireftIntervention on the fused edit. b = learned_source [r] fp32
    from U[0, 1); dropout as pyreft; no activation (act_fn is ignored, as pyreft does)."""

    _source_linear = False
    _subtract_proj = False
    _names = ("rotate_layer (R)", "weight", "learned_source", "proj_bias")

    def __init__(self, *, embed_dim=None, low_rank_dimension, dropout=0.0, backend: Optional[str] = None,
                 inplace: bool = True, **kwargs):
        super().__init__(embed_dim=embed_dim, low_rank_dimension=low_rank_dimension, dropout=dropout, **kwargs,
                         keep_last_dim=True)
        self._setup(embed_dim, low_rank_dimension, None, backend, inplace)
        self._make_rotation()
        self.learned_source = nn.Parameter(torch.rand(self._rank), requires_grad=True)
        self.dropout = nn.Dropout(dropout)

    def _operands(self):
        return self.rotation(), None, self.learned_source, None


class DireftIntervention(_RotationAndLinearSource, _FusedIntervention, *_PYVENE_BASES):
    """h + Rᵀ act(Wh + b) with R orthonormal, pyreft's DireftIntervention on the fused edit. Submodules:
    rotate_layer, learned_source (W, b), dropout, act_fn."""

    _subtract_proj = False


class NodireftIntervention(_ProjLayer, _FusedIntervention, *_PYVENE_BASES):
    """DiReFT of the paper, h + W2ᵀ act(Wh + b), pyreft's NodireftIntervention on the fused edit.
    Submodules: proj_layer (W2; its bias, created with add_bias, is unused as in pyreft), learned_source
    (W, b), dropout, act_fn."""

    _subtract_proj = False
    _names = ("proj_layer.weight", "learned_source.weight", "learned_source.bias", "proj_bias")

    def _operands(self):
        return self.proj_layer.weight, self.learned_source.weight, self.learned_source.bias, None


CLASSES = {cls.__name__: cls for cls in (LoreftIntervention, NoreftIntervention, ConsreftIntervention,
                                         LobireftIntervention, DireftIntervention, NodireftIntervention)}


@torch.no_grad()
def set_pyreft_rotation(rotate_layer: nn.Module, R: torch.Tensor) -> None:
    """Makes a parametrized rotate_layer (torch's orthogonal parametrization of a [d, r] weight) return R
    [d, r] exactly: torch's right_inverse builds a fresh orthogonal d x d base around R (and sets original
    = -I, for which the Householder map is the identity), then the base's first r columns are set to R
    itself, so the forward returns R bit for bit while the base stays orthogonal to rounding."""
    param = rotate_layer.parametrizations.weight
    R = R.to(device=param.original.device, dtype=param.original.dtype)
    rotate_layer.weight = R
    param[0].base[:, : R.shape[1]] = R


def set_checkpoint_classes(directory, to: str = "pyreft") -> int:
    """Rewrites the intervention class names in `directory`/config.json (written by pyvene's / pyreft's
    ReftModel.save) between this module's classes (to="dropin") and pyreft's (to="pyreft"). The state
    files are the same for both. Returns how many names changed."""
    if to not in ("pyreft", "dropin"):
        raise ValueError(f"to must be 'pyreft' or 'dropin', got {to!r}")
    path = os.path.join(os.fspath(directory), "config.json")
    with open(path) as f:
        config = json.load(f)
    target = PYREFT_MODULE if to == "pyreft" else __name__
    changed, out = 0, []
    for type_string in config.get("intervention_types", []):
        name = type_string.replace("<class '", "").replace("'>", "").rsplit(".", 1)[-1]
        new = f"<class '{target}.{name}'>" if name in CLASSES else type_string
        changed += new != type_string
        out.append(new)
    config["intervention_types"] = out
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return changed


__all__ = ["CLASSES", "ConsreftIntervention", "DireftIntervention", "LobireftIntervention", "LoreftIntervention",
           "NodireftIntervention", "NoreftIntervention", "set_checkpoint_classes", "set_pyreft_rotation"]
