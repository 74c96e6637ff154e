"""Read and write pyreft checkpoints (pyreft 0.1.0 on pyvene 0.1.8) with reft_kernels' ReftModel.

    from reft_kernels.interop.pyreft_checkpoint import load_pyreft, save_pyreft
    reft = load_pyreft(model, "pyreft_adapter/")                 # a directory written by pyreft's ReftModel.save
    reft = load_pyreft(model, "out/checkpoint-500/intervenable_model",     # a Trainer checkpoint (no config.json)
                       representations=[{"layer": l, "intervention": "loreft", "low_rank_dimension": 4}
                                        for l in (2, 4)])
    save_pyreft(reft, "for_pyreft/")                             # pyreft.ReftModel.load("for_pyreft/", model)

Neither function imports pyreft or pyvene.

The format (what pyvene's IntervenableModel.save writes)
- config.json: `representations` as positional lists [layer, component, unit, max_number_of_units,
  low_rank_dimension, ...] (pyvene 0.1.8 has 14 fields), `intervention_types` as strings
  "<class 'pyreft.interventions.LoreftIntervention'>", `sorted_keys`, `intervention_dimensions` (the
  component's width), `intervention_constant_sources`, `mode`.
- intkey_{key}.bin, one per intervention (torch.save of its state dict). Keys are
  "layer_{l}_comp_{component}_unit_pos_nunit_1#{k}" since pyvene 0.1.7 and
  "layer.{l}.comp.{component}.unit.pos.nunit.1#{k}" before; both are read, the current one is written.
  LoreftIntervention saves {"weight", "bias", "rotate_layer": R [d, r]}; the others save their default
  state dict: `learned_source.weight`/`.bias` (W, b; ConsReFT/LobiReFT: `learned_source` = b [r]),
  `proj_layer.weight` (W2) and `proj_layer.bias` (b2, only with pyreft's add_bias=True),
  `rotate_layer.parametrizations.weight.original` [d, r] with `rotate_layer.parametrizations.weight.0.base`
  [d, d] (torch.nn.utils.parametrizations.orthogonal: R = (base @ householder(original))ᵀ), and the
  buffers `embed_dim`, `interchange_dim`.
- pytorch_model.bin (optional; pyvene's include_model=True, and the pyreft Trainer's checkpoints):
  trainable base-model parameters by their names in the model.

Order of the interventions. pyvene creates one intervention per entry of config.representations, in
that order; `sorted_keys` is that order (pyreft never passes a sort function), and it is the order in
which `unit_locations["sources->base"][1]` and pyreft's `intervention_locations` [B, n, P] index the
interventions, and in which several interventions on one site are applied. A ReftModel indexes its
interventions in the same way (ReftConfig.interventions() order; with share_weights=False and a
"f{p}+l{s}" scheme, all prefix interventions first, then all suffix ones, which is pyreft's
`layers + layers`). So location slot i of a pyreft batch is intervention i here, and its key is
sorted_keys[i] (pyvene numbers repeated sites #0, #1, ... in order, as ReftModel does). load_pyreft checks
that the keys agree; save_pyreft writes the representations in this order.

What pyreft does not store, and the defaults load_pyreft takes for them (pyreft's own defaults)
- dtype of W, b, W2, b2: bfloat16 (dtype=None: the dtype the tensors were saved in). ConsReFT and LobiReFT
  keep b in fp32, as pyreft creates it whatever the dtype argument. R is always fp32.
- act: identity (pyreft's act_fn=None, "linear"). dropout: 0.0 (ConsReFT: always 0, pyreft has none).
- add_bias (NoReFT's b2): False; a NoReFT file holding `proj_layer.bias` needs add_bias=True (or None:
  taken from the file), else a ValueError says so. NodiReFT's `proj_layer.bias` is never used by pyreft's
  forward, and is dropped.
- positions / share_weights: the position scheme the adapter was trained with (None / True).
Pass per-intervention values through `representations` (reft_kernels' dicts, as ReftConfig takes).

R. load_pyreft computes R from the saved matrices exactly as torch's orthogonal parametrization does
(the same ops in fp32: Householder map for a non-square R, matrix_exp for a square one, then base @ Q)
and imports it with Orthonormal.set_ into the parametrization chosen by `parametrization`: by default
reft_kernels' "stereographic" (base = R, delta = 0: the same R, then trained with reft_kernels' own map);
"householder" gives torch's map, with a fresh orthogonal d x d base built around R by torch's
right_inverse. save_pyreft writes, for the types whose R pyreft stores as an (original, base) pair, the
pair torch's right_inverse would produce (original = -I, base = R completed to an orthogonal d x d
matrix, with its first r columns exactly Rᵀ, so that pyreft's R equals ours bit for bit); a householder
Orthonormal writes its own pair unchanged. LoReFT files hold R itself.

Deliberate differences from pyreft's loader (pyvene's IntervenableModel.load)
- W keeps the checkpoint's values at the dtype asked for (pyreft rebuilds W in bf16 whatever it was
  saved in, so an fp32 adapter loads rounded and can no longer run on an fp32 model).
- NoReFT and NodiReFT load (pyreft's loader raises KeyError: 'add_bias').
- A LoReFT R is imported into a consistent parametrization (pyreft writes it into the first r columns
  of a fresh base, which is then no longer orthogonal, and further training drifts off orthonormality).
- Trainer checkpoints without config.json load when `representations` is given.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..integration.adapters import DEFAULT, Adapter
from ..integration.checkpoint import read_json
from ..integration.config import ReftConfig, Representation
from ..integration.formats import register_format
from ..integration.locate import find_layers, hidden_size
from ..integration.model import ReftModel
from ..modules.interventions import BY_PYREFT_NAME, INTERVENTIONS, ReftIntervention

CONFIG_FILE = "config.json"
MODEL_FILE = "pytorch_model.bin"
PYREFT_MODULE = "pyreft.interventions"
# RepresentationConfig of pyvene 0.1.8: layer component unit max_number_of_units low_rank_dimension
# intervention_type intervention subspace_partition group_key intervention_link_key moe_key
# source_representation hidden_source_representation latent_dim
_REPR_FIELDS = 14
_LINK_KEY = 9

_R_KEY = "rotate_layer"  # LoreftIntervention's own state_dict: R [d, r]
_ORIGINAL = "rotate_layer.parametrizations.weight.original"
_BASE = "rotate_layer.parametrizations.weight.0.base"
_PLAIN_R = "rotate_layer.weight"  # an unparametrized [d, r] weight (not written by pyreft 0.1.0)
_BUFFERS = ("embed_dim", "interchange_dim")
_R_TOLERANCE = 1e-4  # a saved R's orthonormality error: pyreft's fp32 Householder map gives ~1e-6

PathLike = Union[str, "os.PathLike[str]"]


# -- file names -----------------------------------------------------------------------------------

def _dotted_key(layer: int, component: str, copy: int) -> str:
    """pyvene < 0.1.7's spelling of a key."""
    return f"layer.{layer}.comp.{component}.unit.pos.nunit.1#{copy}"


def _underscore_key(key: str) -> str:
    """pyvene >= 0.1.7's spelling of either spelling (a component name has no dots)."""
    return key.replace(".", "_")


def is_pyreft_checkpoint(directory: PathLike) -> bool:
    """Whether `directory` holds intkey_*.bin files (pyreft's ReftModel.save, or a pyreft Trainer checkpoint's
    intervenable_model/ without config.json): the format's recognizer for read_adapter / load_adapter."""
    directory = os.fspath(directory)
    return os.path.isdir(directory) and any(n.startswith("intkey_") and n.endswith(".bin")
                                            for n in os.listdir(directory))


def _intkey_file(directory: str, *candidates: str) -> str:
    for key in candidates:
        path = os.path.join(directory, f"intkey_{key}.bin")
        if os.path.isfile(path):
            return path
    names = " or ".join(f"intkey_{k}.bin" for k in dict.fromkeys(candidates))
    raise FileNotFoundError(f"{directory} has no {names}")


def _torch_load(path: str) -> dict:
    """A state dict saved by torch.save, checked: the zip archive's CRC-32 of every member (torch.save writes
    them; torch.load does not check them, so a flipped byte in tensor data would load), then a dict of
    tensors. ValueError naming the file otherwise."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path} is a damaged zip archive ({e}): the file is corrupted") from None
        if bad is not None:
            raise ValueError(f"{path}: {bad} fails its CRC-32 check: the file is corrupted (bytes changed after "
                             "torch.save wrote it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on damaged files
        raise ValueError(f"{path} cannot be read by torch.load ({type(e).__name__}: {str(e)[:200]}): the file is "
                         "truncated or corrupted") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} must hold a state dict (names -> tensors), got {type(state).__name__}")
    return state


# -- torch's orthogonal parametrization -------------------------------------------------------------

def orthogonal_weight(original: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
    """What torch.nn.utils.parametrizations.orthogonal (default map, use_trivialization=True) makes of a
    parametrized [n, k] weight with state (original, base): the same ops in the same order
    (torch/nn/utils/parametrizations.py, _Orthogonal.forward). The default map is the Householder one for a
    non-square matrix and matrix_exp for a square one. Returns [n, k] (pyreft's R [d, r])."""
    X = original
    n, k = X.size(-2), X.size(-1)
    transposed = n < k
    if transposed:
        X = X.mT
        n, k = k, n
    if n == k:  # matrix_exp
        A = X.tril()
        A = A - A.mH
        Q = torch.matrix_exp(A)
    else:  # householder
        A = X.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = torch.linalg.householder_product(A, tau)
        Q = Q * X.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)
    if base is not None:
        Q = base @ Q
    if transposed:
        Q = Q.mT
    return Q


def _make_orthogonal(A: torch.Tensor) -> torch.Tensor:
    """torch's _make_orthogonal: Q of the QR decomposition of A with diag(R) >= 0."""
    X, tau = torch.geqrf(A)
    Q = torch.linalg.householder_product(X, tau)
    return Q * X.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)


@torch.no_grad()
def orthogonal_state(R: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(original [d, r], base [d, d]) for R [r, d] with orthonormal rows, such that
    orthogonal_weight(original, base) == Rᵀ exactly: what torch's right_inverse of the orthogonal
    parametrization builds (original = -I; base = Rᵀ completed with random columns and made orthogonal by
    QR), except that the random columns come from a generator seeded with `seed` (the file is reproducible)
    and the first r columns of base are Rᵀ itself rather than its QR re-orthogonalization (equal to rounding)."""
    R = R.detach().to(device="cpu", dtype=torch.float32)
    r, d = R.shape
    Q = R.t().contiguous()
    original = torch.zeros(d, r)
    original.diagonal().fill_(-1.0)
    if r == d:
        base = Q.clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        N = torch.randn(d, d - r, generator=gen)
        full = _make_orthogonal(torch.cat([Q, N], dim=1))
        base = torch.cat([Q, full[:, r:]], dim=1).contiguous()
    rebuilt = orthogonal_weight(original, base)
    if not torch.allclose(rebuilt, Q, rtol=0, atol=1e-6):  # cannot happen with torch's map; guards the format
        raise RuntimeError(f"the orthogonal parametrization does not reproduce R (max error "
                           f"{(rebuilt - Q).abs().max().item():.3g})")
    return original, base


# -- the pyvene config ------------------------------------------------------------------------------

def _pyreft_class(type_string: str) -> type[ReftIntervention]:
    name = str(type_string).replace("<class '", "").replace("'>", "").rsplit(".", 1)[-1]
    if name not in BY_PYREFT_NAME:
        raise ValueError(f"intervention type {type_string!r} is not one reft_kernels can load; supported: "
                         f"{sorted(BY_PYREFT_NAME)} (pyreft.interventions)")
    return BY_PYREFT_NAME[name]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_config(directory: str) -> dict:
    """The pyvene config, with its representations as (layer, component, kind, rank) and their keys;
    ValueError naming the file and the field for anything malformed."""
    path = os.path.join(directory, CONFIG_FILE)
    raw = read_json(path)
    reps = raw.get("representations")
    types = raw.get("intervention_types")
    if not isinstance(reps, list) or not reps:
        raise ValueError(f"{path} has no representations: not a config written by pyreft's ReftModel.save")
    if isinstance(types, str):  # one type for every representation
        types = [types] * len(reps)
    if not isinstance(types, list) or len(types) != len(reps):
        raise ValueError(f"{path}: intervention_types must name one type per representation, got {types!r}")
    sites = []
    linked = False
    for i, (rep, type_string) in enumerate(zip(reps, types)):
        if isinstance(rep, dict):
            layer, component, unit = rep.get("layer", 0), rep.get("component", "block_output"), rep.get("unit", "pos")
            units, rank = rep.get("max_number_of_units", 1), rep.get("low_rank_dimension")
            linked = linked or rep.get("intervention_link_key") is not None
        elif isinstance(rep, list):
            rep = rep + [None] * max(0, 5 - len(rep))
            layer, component, unit, units, rank = rep[:5]
            linked = linked or (len(rep) > _LINK_KEY and rep[_LINK_KEY] is not None)
        else:
            raise ValueError(f"{path}: representations[{i}] must be a list [layer, component, unit, "
                             f"max_number_of_units, low_rank_dimension, ...] or an object, got {rep!r}")
        if not _is_int(layer) or layer < 0:
            raise ValueError(f"{path}: representations[{i}]: layer must be an int >= 0, got {layer!r}")
        if not isinstance(component, str):
            raise ValueError(f"{path}: representations[{i}]: component must be a string, got {component!r}")
        if unit != "pos" or units != 1:
            raise ValueError(f"{path}: representation {i} has unit={unit!r}, max_number_of_units={units!r}; "
                             "reft_kernels loads position interventions (unit 'pos', 1 unit) only")
        if rank is None:
            raise ValueError(f"{path}: representations[{i}] has no low_rank_dimension")
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"{path}: representations[{i}]: low_rank_dimension must be an int >= 1, got {rank!r}")
        try:
            kind = _pyreft_class(type_string).kind
        except ValueError as e:
            raise ValueError(f"{path}: intervention_types[{i}]: {e}") from None
        sites.append((layer, component, kind, rank))
    if linked:
        warnings.warn(f"{path} links interventions (intervention_link_key): they are loaded as independent "
                      "copies with the saved values", stacklevel=3)
    keys = raw.get("sorted_keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise ValueError(f"{path}: sorted_keys must be a list of strings, got {keys!r}")
    if keys is not None and len(keys) != len(sites):
        raise ValueError(f"{path}: {len(keys)} sorted_keys for {len(sites)} representations")
    dims = raw.get("intervention_dimensions") or [None] * len(sites)
    if not isinstance(dims, list) or len(dims) != len(sites) or not all(d is None or _is_int(d) for d in dims):
        raise ValueError(f"{path}: intervention_dimensions must list one int width per representation, got {dims!r}")
    return {"sites": sites, "keys": keys, "dims": dims}


# -- load -------------------------------------------------------------------------------------------

def _rep_dict(layer, component, kind, rank, **fields) -> dict:
    return {"layer": layer, "component": component, "intervention": kind, "low_rank_dimension": rank, **fields}


def _defaults(kind: str, dtype, act, dropout, add_bias, parametrization) -> dict:
    """The fields pyreft does not store, for one intervention of `kind`, from load_pyreft's arguments."""
    cls = INTERVENTIONS[kind]
    out: dict[str, Any] = {"dropout": 0.0 if kind == "consreft" else dropout, "parametrization": parametrization}
    if cls.source_linear:
        out["dtype"] = dtype
        out["act"] = None if act in (None, "linear", "identity") else act
    if kind == "noreft":
        out["add_bias"] = add_bias
    return out


def _split(state: dict, kind: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors of one pyreft state dict by our names: R [r, d], weight, bias, proj_weight, proj_bias."""
    state = dict(state)
    for name in (_R_KEY, _ORIGINAL, _BASE, _PLAIN_R):
        if name in state and not state[name].dtype.is_floating_point:
            raise ValueError(f"{where}: {name} is {str(state[name].dtype).replace('torch.', '')}; pyreft stores R "
                             "in fp32: the file is corrupted or not a pyreft checkpoint")
    out: dict[str, torch.Tensor] = {}
    if _R_KEY in state and isinstance(state[_R_KEY], torch.Tensor):
        out["R"] = state.pop(_R_KEY).float().t()
    elif _ORIGINAL in state:
        base = state.pop(_BASE, None)
        out["R"] = orthogonal_weight(state.pop(_ORIGINAL).float(), None if base is None else base.float()).t()
    elif _PLAIN_R in state:
        out["R"] = state.pop(_PLAIN_R).float().t()
    cls = INTERVENTIONS[kind]
    if cls.source_linear:
        for ours, names in (("weight", ("learned_source.weight", "weight")),
                            ("bias", ("learned_source.bias", "bias"))):
            for name in names:
                if name in state:
                    out[ours] = state.pop(name)
                    break
    elif "learned_source" in state:
        out["bias"] = state.pop("learned_source")
    if "proj_layer.weight" in state:
        out["proj_weight"] = state.pop("proj_layer.weight")
    if "proj_layer.bias" in state:
        out["proj_bias"] = state.pop("proj_layer.bias")
    for name in _BUFFERS:
        state.pop(name, None)
    if state:
        raise ValueError(f"{where}: unexpected entries {sorted(state)} for a {cls.pyreft_name} "
                         f"(reft_kernels {cls.__name__}); is the intervention type right?")
    return out


@torch.no_grad()
def _load_into(module: ReftIntervention, state: dict, where: str, dim: int) -> None:
    cls = type(module)
    for name in _BUFFERS:
        value = state.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and int(value) != dim:
            raise ValueError(f"{where} was saved for a model of width {int(value)}; this model has width {dim}")
    parts = _split(state, cls.kind, where)
    if cls.kind == "direft":
        parts.pop("proj_bias", None)  # pyreft's NodireftIntervention never uses it
    need = {"loreft": ("R", "weight", "bias"), "noreft": ("proj_weight", "weight", "bias"),
            "consreft": ("R", "bias"), "lobireft": ("R", "bias"), "direft": ("proj_weight", "weight", "bias"),
            "orthodireft": ("R", "weight", "bias")}[cls.kind]
    missing = [n for n in need if n not in parts]
    extra = [n for n in parts if n not in need and n != "proj_bias"]
    if missing or extra or ("proj_bias" in parts and cls.kind != "noreft"):
        raise ValueError(f"{where} does not hold a {cls.pyreft_name} (reft_kernels {cls.__name__}): it has "
                         f"{sorted(parts)}, a {cls.pyreft_name} needs {list(need)}; is the intervention type right?")
    if cls.kind == "noreft" and (("proj_bias" in parts) != module.add_bias):
        fix = "add_bias=True" if "proj_bias" in parts else "add_bias=False"
        raise ValueError(f"{where}: the NoReFT checkpoint was trained with add_bias={'proj_bias' in parts} "
                         f"(proj_layer.bias {'present' if 'proj_bias' in parts else 'absent'}); pass {fix} "
                         "(or add_bias=None to take it from the file)")
    r, d = module.rank, module.dim
    shapes = {"R": (r, d), "weight": (r, d), "proj_weight": (r, d), "bias": (r,), "proj_bias": (r,)}
    for name, value in parts.items():
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, expected {shapes[name]} (rank "
                             f"{r}, model width {d}): the checkpoint does not fit this model")
        if not value.dtype.is_floating_point:
            raise ValueError(f"{where}: {name} is {str(value.dtype).replace('torch.', '')}; pyreft stores floating "
                             "tensors: the file is corrupted or not a pyreft checkpoint")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {name} holds non-finite values")
    if "R" in parts:  # set_ would re-orthonormalize a damaged R and load another adapter without a word
        R = parts["R"].double()
        error = (R @ R.T - torch.eye(r, dtype=torch.float64)).abs().max().item()
        if error > _R_TOLERANCE:
            raise ValueError(f"{where}: R does not have orthonormal rows (max |R Rᵀ - I| = {error:.3g}; pyreft saves "
                             f"them to fp32 rounding): the file is corrupted")
    for name, value in parts.items():
        if name == "R":
            module.rotation.set_(value.to(module.rotation.inputs()[0].device))
        else:
            getattr(module, name).copy_(value)


def _w_dtype(state: dict) -> Optional[torch.dtype]:
    for name in ("learned_source.weight", "weight"):
        if isinstance(state.get(name), torch.Tensor):
            return state[name].dtype
    return None


def read_pyreft(directory: PathLike, *, name: str = DEFAULT, dim: Optional[int] = None,
                num_layers: Optional[int] = None, where: str = "the model",
                representations: Optional[Sequence[Union[dict, Representation]]] = None,
                dtype: Optional[torch.dtype] = torch.bfloat16, act: Optional[str] = None, dropout: float = 0.0,
                add_bias: Optional[bool] = False, positions: Optional[str] = None, share_weights: bool = True,
                backend: Optional[str] = None, parametrization: str = "stereographic", include_model: bool = True,
                device=None) -> Adapter:
    """A pyreft checkpoint directory as an Adapter (config + loaded intervention modules), without a base
    model: what load_pyreft attaches to a model, ReftModel.load_adapter registers and
    reft_kernels.read_adapter returns for pyreft's files.

    dim: the model's width (checked against the saved intervention_dimensions; required when the directory
    has no config.json, or its config does not say). num_layers, where: the model's depth and a name for it in
    errors (an adapter editing a deeper layer is refused). The base-model weights of pytorch_model.bin
    (include_model) become the adapter's model_state ("model.<name>") and their modules its
    unfrozen_modules. The other arguments: load_pyreft's."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory (a pyreft checkpoint is a directory of "
                                "config.json and intkey_*.bin files)")
    if not is_pyreft_checkpoint(directory):
        raise FileNotFoundError(f"{directory} has no intkey_*.bin file: not a pyreft/pyvene checkpoint")
    has_config = os.path.isfile(os.path.join(directory, CONFIG_FILE))
    if not has_config and representations is None:
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE} (a pyreft Trainer checkpoint, checkpoint-N/intervenable_model, "
            "stores only the weights): pass representations=[{'layer': ..., 'component': ..., 'intervention': "
            "..., 'low_rank_dimension': ...}, ...] as the adapter was built")
    saved = _read_config(directory) if has_config else None
    untied = ReftConfig(representations=[{"layer": 0, "low_rank_dimension": 1}], positions=positions,
                        share_weights=share_weights).untied

    if saved is not None:
        for i, width in enumerate(saved["dims"]):
            if width is not None and dim is not None and width != dim:
                raise ValueError(f"{directory} was saved for a model of width {width} (intervention {i}); {where} "
                                 f"has hidden size {dim}")
        if dim is None:
            dim = next((width for width in saved["dims"] if width is not None), None)
        sites = saved["sites"]
        if untied:
            half = len(sites) // 2
            if len(sites) % 2 or sites[:half] != sites[half:]:
                raise ValueError(f"share_weights=False with positions={positions!r} needs a checkpoint whose "
                                 "representations are the same list twice (prefix ones, then suffix ones), as "
                                 f"pyreft's training script writes; {directory} has (layer, component, type, rank) "
                                 f"{sites}")
            sites = sites[:half]
        if representations is None:
            representations = [_rep_dict(*s) for s in sites]
    if dim is None:
        raise ValueError(f"{directory} does not say the model's width (no intervention_dimensions): pass dim=")
    raw = list(representations)
    if not raw:
        raise ValueError("representations is empty")

    def build(fields: list[dict]) -> ReftConfig:
        reps = []
        for rep, extra in zip(raw, fields):
            if isinstance(rep, Representation):
                reps.append(rep)
                continue
            rep = dict(rep)
            kind = Representation.from_any({**rep, "dtype": None, "add_bias": False, "act": None}).intervention
            for k, v in _defaults(kind, **extra).items():
                rep.setdefault(k, v)
            reps.append(rep)
        return ReftConfig(representations=reps, positions=positions, share_weights=share_weights)

    common = dict(act=act, dropout=dropout, parametrization=parametrization)
    config = build([dict(dtype=dtype, add_bias=bool(add_bias), **common)] * len(raw))
    ours = [(rep.layer, rep.component, rep.intervention, rep.low_rank_dimension) for rep, _ in config.interventions()]
    if saved is not None and ours != saved["sites"]:
        raise ValueError(f"representations do not match {os.path.join(directory, CONFIG_FILE)}: it has (layer, "
                         f"component, type, rank) {saved['sites']}, the representations give {ours}")
    deepest = max(site[0] for site in ours)
    if num_layers is not None and deepest >= num_layers:
        raise ValueError(f"{directory} edits layer {deepest}; {where} has {num_layers} layers")

    # the file of intervention i: the saved key of slot i when there is a config, else ours in both spellings
    candidates = _keys(config)
    if saved is not None and saved["keys"]:
        normalized = [_underscore_key(k) for k in saved["keys"]]
        if normalized != [c[0] for c in candidates]:
            raise ValueError(f"{os.path.join(directory, CONFIG_FILE)}: sorted_keys {saved['keys']} do not follow "
                             f"pyvene's numbering of its representations ({[c[0] for c in candidates]})")
        candidates = [[k] + c for k, c in zip(saved["keys"], candidates)]
    paths = [_intkey_file(directory, *c) for c in candidates]
    states = [_torch_load(p) for p in paths]

    if dtype is None or add_bias is None:  # per representation, from its (first) intervention's file
        fields = []
        for j in range(len(raw)):
            state = states[j]
            fields.append(dict(dtype=dtype if dtype is not None else (_w_dtype(state) or torch.bfloat16),
                               add_bias=bool(add_bias) if add_bias is not None else "proj_layer.bias" in state,
                               **common))
        config = build(fields)

    model_state = {}
    model_file = os.path.join(directory, MODEL_FILE)
    if include_model and os.path.isfile(model_file):
        model_state = _torch_load(model_file) or {}
        if model_state:
            modules = {k.rsplit(".", 1)[0] for k in model_state if "." in k}
            config.unfrozen_modules = sorted(set(config.unfrozen_modules) | modules)

    adapter = Adapter(name, config, dim, device=device, backend=backend)
    for module, state, path in zip(adapter.modules, states, paths):
        _load_into(module, state, path, dim)
    for m in adapter.orthonormals:
        m._cache = None
    adapter.model_state = {f"model.{k}": v for k, v in model_state.items()}
    adapter.source = directory
    adapter.base_model = {"hidden_size": dim}
    return adapter


def load_pyreft(model: nn.Module, directory: PathLike, *,
                representations: Optional[Sequence[Union[dict, Representation]]] = None,
                dtype: Optional[torch.dtype] = torch.bfloat16, act: Optional[str] = None, dropout: float = 0.0,
                add_bias: Optional[bool] = False, positions: Optional[str] = None, share_weights: bool = True,
                backend: Optional[str] = None, parametrization: str = "stereographic",
                layers_path: Optional[str] = None, include_model: bool = True, freeze: bool = True,
                adapter_name: str = DEFAULT) -> ReftModel:
    """A ReftModel on `model` with the interventions of a pyreft checkpoint directory (as its adapter
    `adapter_name`; to add one to an existing ReftModel: reft.load_adapter(directory, name, **these options)).

    Args:
        model: the base model the adapter was trained on (its width and depth are checked).
        directory: written by pyreft's ReftModel.save (config.json + intkey_*.bin), or a pyreft Trainer
            checkpoint's `checkpoint-N/intervenable_model/` (intkey_*.bin only: pass representations).
        representations: reft_kernels representations (dicts as ReftConfig takes, or Representations), in
            pyreft's order; required without config.json, and with one they must name the same sites, types
            and ranks. Fields a dict leaves out are taken from the arguments below. With share_weights=False
            and a "f{p}+l{s}" scheme, list each representation once (ReftConfig doubles them).
        dtype, act, dropout, add_bias: what pyreft does not store (module docstring), pyreft's defaults.
            dtype=None: the dtype W was saved in; add_bias=None: from the file.
        positions, share_weights: the position scheme it was trained with, kept in reft_config (pyreft's
            training script: "f{p}+l{s}"; share_weights=False means the checkpoint holds every
            representation twice, prefix ones first).
        backend: kernel backend of the interventions (None: automatic, Triton on CUDA and the C++ kernels
            on the CPU; "triton", "cpp" or "torch"). parametrization: of R (module docstring).
        layers_path: the model's block list, if it cannot be found generically.
        include_model: also load pytorch_model.bin (base-model weights pyvene saves with the adapter when
            asked, and the pyreft Trainer always: empty for a frozen model) when it is not empty; the
            modules it touches become the adapter's unfrozen_modules.
        freeze: as ReftModel.

    Raises FileNotFoundError (no such directory, no intkey file for an intervention, no config.json and no
    representations), ValueError (a model whose width or depth does not fit, an intervention type
    reft_kernels does not have, representations or files that disagree with the config).
    """
    layers_path, layers = find_layers(model, layers_path)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = None
    adapter = read_pyreft(directory, name=adapter_name, dim=hidden_size(model), num_layers=len(layers),
                          where=f"this {type(model).__name__}", representations=representations,
                          dtype=dtype, act=act, dropout=dropout, add_bias=add_bias, positions=positions,
                          share_weights=share_weights, backend=backend, parametrization=parametrization,
                          include_model=include_model, device=device)
    unknown = [k[len("model."):] for k in adapter.model_state
               if k[len("model."):] not in dict(model.named_parameters()) and
               k[len("model."):] not in dict(model.named_buffers())]
    if unknown:
        raise ValueError(f"{os.path.join(os.fspath(directory), MODEL_FILE)} holds {unknown}, which this "
                         f"{type(model).__name__} does not have")
    return ReftModel(model, adapter, adapter_name=adapter_name, layers_path=layers_path, backend=backend,
                     freeze=freeze)


def _keys(config: ReftConfig) -> list[list[str]]:
    """Per intervention, in order: [its key, the same key as pyvene < 0.1.7 spelled it], numbered as pyvene
    and ReftModel number repeated sites."""
    counts: dict[tuple[int, str], int] = {}
    out = []
    for rep, _ in config.interventions():
        site = (rep.layer, rep.component)
        k = counts.get(site, 0)
        counts[site] = k + 1
        out.append([f"layer_{rep.layer}_comp_{rep.component}_unit_pos_nunit_1#{k}",
                    _dotted_key(rep.layer, rep.component, k)])
    return out


# -- save -------------------------------------------------------------------------------------------

@torch.no_grad()
def _pyreft_state(module: ReftIntervention, dim: int, seed: int) -> dict:
    kind = type(module).kind
    cpu = lambda t: t.detach().to("cpu").clone().contiguous()  # noqa: E731
    if kind == "loreft":  # LoreftIntervention.state_dict
        R = module.rotation.compute().float()
        return {"weight": cpu(module.weight), "bias": cpu(module.bias), "rotate_layer": cpu(R.t())}
    state: dict[str, torch.Tensor] = {}
    if kind in ("consreft", "lobireft"):
        state["learned_source"] = cpu(module.bias)
    state["embed_dim"] = torch.tensor(dim)
    state["interchange_dim"] = torch.tensor(dim)
    if module.orthonormal:
        rot = module.rotation
        if rot.parametrization == "householder":
            original, base = (cpu(t) for t in rot.inputs())
        else:
            original, base = orthogonal_state(rot.compute(), seed=seed)
        state[_ORIGINAL] = original
        state[_BASE] = base
    else:
        state["proj_layer.weight"] = cpu(module.proj_weight)
        if getattr(module, "proj_bias", None) is not None:
            state["proj_layer.bias"] = cpu(module.proj_bias)
    if module.source_linear:
        state["learned_source.weight"] = cpu(module.weight)
        state["learned_source.bias"] = cpu(module.bias)
    return state


def save_pyreft(reft_model: ReftModel, directory: PathLike, *, seed: int = 0,
                adapter_name: Optional[str] = None) -> None:
    """Writes `reft_model`'s interventions as pyreft's ReftModel.save does: config.json (pyvene 0.1.8's
    format) and intkey_{key}.bin with pyreft's state-dict keys, plus pytorch_model.bin with the unfrozen
    modules' weights when the adapter has any (pyreft loads it with include_model=True).

    pyreft.ReftModel.load(directory, model) then rebuilds the same R and W, b, b2 values. What it cannot
    rebuild (pyreft stores none of it): dtype (its loader makes W bf16), act (identity), dropout (0), and
    NoReFT/DiReFT at all (its loader raises KeyError 'add_bias'; build pyreft's interventions with
    add_bias and load_state_dict the files, or use load_pyreft). A warning names an act pyreft would lose.
    seed: for the random completion of R into pyvene's d x d `base` (reproducible files).
    adapter_name: which adapter of the ReftModel (default: the active one)."""
    if not isinstance(reft_model, ReftModel):
        raise TypeError(f"save_pyreft takes a reft_kernels ReftModel, got {type(reft_model).__name__}")
    if adapter_name is None:
        if len(reft_model.active_adapters) != 1:
            raise ValueError(f"{len(reft_model.active_adapters)} adapters are active ({reft_model.active_adapters}): "
                             "pass adapter_name= to say which one to save")
        adapter = reft_model.adapters[reft_model.active_adapters[0]]
    elif adapter_name in reft_model.adapters:
        adapter = reft_model.adapters[adapter_name]
    else:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {list(reft_model.adapters)}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    dim = reft_model.dim
    reps, types, keys = [], [], []
    lost_act = set()
    for i, ((rep, _), (key, module)) in enumerate(zip(adapter.config.interventions(), adapter.interventions.items())):
        cls = type(module)
        if cls not in INTERVENTIONS.values():
            raise TypeError(f"{key}: {cls.__name__} is not one of reft_kernels' six intervention types")
        if cls.source_linear and module.act not in ("identity", "linear"):
            lost_act.add(module.act)
        row: list[Any] = [rep.layer, rep.component, "pos", 1, module.rank]
        reps.append(row + [None] * (_REPR_FIELDS - len(row)))
        types.append(f"<class '{PYREFT_MODULE}.{cls.pyreft_name}'>")
        keys.append(key)
        torch.save(_pyreft_state(module, dim, seed + i), os.path.join(directory, f"intkey_{key}.bin"))
    if lost_act:
        warnings.warn(f"pyreft stores no activation: pyreft.ReftModel.load rebuilds act=identity, these "
                      f"interventions use {sorted(lost_act)} (load_pyreft(..., act=...) restores it)", stacklevel=2)
    config: dict[str, Any] = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [dim] * len(keys),
        "intervention_types": types,
        "mode": "parallel",
        "representations": reps,
        "sorted_keys": keys,
    }
    try:
        import transformers

        config["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if adapter.config.unfrozen_modules:
        state = {}
        for name in adapter.config.unfrozen_modules:
            for k, v in reft_model.model.get_submodule(name).state_dict().items():
                state[f"{name}.{k}"] = v.detach().to("cpu").clone()
        torch.save(state, os.path.join(directory, MODEL_FILE))


# The integration layer reads and writes pyreft's directories through this registration (it never imports this
# module): rk.read_adapter / ReftModel.load_adapter on a pyreft directory, save_pretrained(format="pyreft").
register_format("pyreft", recognizes=is_pyreft_checkpoint, read=read_pyreft, write=save_pyreft,
                holds="intkey_*.bin files")

__all__ = ["is_pyreft_checkpoint", "load_pyreft", "orthogonal_state", "orthogonal_weight", "read_pyreft",
           "save_pyreft"]
