"""Orthonormal R [rank, dim] as a module: the default parametrization (batched across interventions,
cached at inference), a plain Cholesky-QR one, and pyreft's exact Householder one.

    rot = Orthonormal(4096, 4)                  # R from rot.base and rot.delta, both [4, 4096] fp32
    R = rot()                                   # [4, 4096], rows orthonormal, differentiable
    with orthonormal_batch(model):              # every R of the model in one batched computation
        loss = model(...)                       # each Orthonormal in the model returns its batched R

Parametrizations
- "stereographic" (default): R = orthonormalize(stereographic_premap(base, delta)). base [r, d] is a
  buffer (the initial R), delta [r, d] the trained parameter, zero at init. Rows rotate away from base by
  2 atan(|delta_perp|), the angle profile of torch's Householder map, so training follows pyreft's
  (bench/reference/*/convergence.md: losses 1.0 and 0.1 reached in fewer steps on every seed; loss 0.01
  3 steps later, median of 5 seeds).
- "cholesky_qr": R = orthonormalize(weight), weight [r, d] trained directly (scale-invariant). Fewer
  launches, but Adam's angular steps shrink as the weight grows: it needs 20-26% more steps than
  pyreft's map to each loss level of the convergence suite (medians).
- "householder": torch.nn.utils.parametrizations.orthogonal, pyreft's exact map (see Orthonormal).

Why not Householder by default (reft_kernels/ops/orthonormal.py has the math): it needs a d x d buffer
(64 MiB per intervention at d = 4096) and runs per intervention; the other two have no d x d state, run
for any number of interventions in a constant number of launches when batched, cannot be collapsed by
AdamW weight decay (pyreft's R becomes exactly zero after one step with decay; here decay pulls delta
towards 0, i.e. R towards base, or shrinks a scale-invariant weight), and map every parameter value to an
orthonormal R (a reloaded checkpoint keeps training on the manifold, which pyreft's reload does not).

When R is computed
- Inside `with orthonormal_batch(...)`: once for all the modules given (stereographic and cholesky_qr
  ones batched by parametrization, device, width and rank; householder ones one by one), and every call
  of those modules in the block returns that R. The hook layer opens one
  such block per model forward, so the cost per training step does not grow with the number of layers.
- Otherwise, with autograd recording: computed on each call (a fresh graph, safe for gradient
  accumulation and gradient checkpointing).
- Otherwise, when no parameter of the module requires grad (a frozen adapter being served): computed
  once and cached until a parameter changes (its version counter moves, as load_state_dict does; writes
  through `.data` bypass it: call set_() or load_state_dict instead).
- Otherwise (trainable parameters, no_grad): computed on each call. A version-counter key cannot be
  trusted while training: fused optimizers (AdamW(fused=True), Trainer's default) do not bump it.
  ReftModel computes every R once per forward/generate call in one batch, so this costs one batched
  computation per call there.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..ops.orthonormal import orthonormalize, stereographic_premap

PARAMETRIZATIONS = ("stereographic", "cholesky_qr", "householder")

# id(module) -> R for the innermost open orthonormal_batch block; a ContextVar so that two threads (or
# two asyncio tasks) running two forwards never see each other's R.
_BATCHED: contextvars.ContextVar[dict] = contextvars.ContextVar("reft_kernels_orthonormal_batch", default={})


class _Columns(nn.Module):
    """pyreft's LowRankRotateLayer: a [dim, rank] weight with orthogonal init, for torch's
    orthogonal parametrization to wrap (kept so that the Householder option reproduces pyreft)."""

    def __init__(self, dim: int, rank: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, rank, device=device))
        nn.init.orthogonal_(self.weight)


class Orthonormal(nn.Module):
    """R [rank, dim] with orthonormal rows (fp32), a differentiable function of free parameters.

    Args:
        dim, rank: 1 <= rank <= dim.
        parametrization: "stereographic" (default): buffer `base` and parameter `delta`, both [rank, dim]
            (module docstring). "cholesky_qr": one parameter `weight` [rank, dim], R = Gram-Schmidt of its
            rows (reft_kernels.ops.orthonormalize). Both are batched and cached as the module docstring
            says. "householder": torch.nn.utils.parametrizations.orthogonal with default arguments on a
            [dim, rank] weight, exactly what pyreft uses (state: a [dim, rank] `original` and a
            [dim, dim] `base` buffer), for reproducing pyreft runs. Like pyreft it must not get weight
            decay (torch's map reads a sign diagonal that decay shrinks to 0, which zeroes R); it is
            computed per call, never batched.
        device: where the parameters live.
        backend: the orthonormalization backend (None: automatic; "triton"; "torch"; "cpp", which runs the
            torch reference, R having no C++ kernel: reft_kernels.backend).

    Initialisation as pyreft: torch.nn.init.orthogonal_ of a [dim, rank] matrix (so for one seed every
    parametrization starts from the same R).
    """

    def __init__(self, dim: int, rank: int, *, parametrization: str = "stereographic", device=None,
                 backend: Optional[str] = None):
        super().__init__()
        if not (isinstance(dim, int) and isinstance(rank, int) and 1 <= rank <= dim):
            raise ValueError(f"need integers 1 <= rank <= dim, got dim={dim!r}, rank={rank!r}")
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        self.dim, self.rank, self.parametrization, self.backend = dim, rank, parametrization, backend
        holder = _Columns(dim, rank, device=device)
        if parametrization == "cholesky_qr":
            self.weight = nn.Parameter(holder.weight.detach().t().contiguous())
        elif parametrization == "stereographic":
            self.register_buffer("base", holder.weight.detach().t().contiguous())
            self.delta = nn.Parameter(torch.zeros_like(self.base))
        else:
            self.householder = nn.utils.parametrizations.orthogonal(holder)
        self._cache: Optional[tuple] = None

    # -- what R is made from --------------------------------------------------------------------

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors R is made from: (base, delta), (weight,), or the Householder (original, base)."""
        if self.parametrization == "stereographic":
            return self.base, self.delta
        if self.parametrization == "cholesky_qr":
            return (self.weight,)
        weight = self.householder.parametrizations.weight
        return weight.original, weight[0].base

    def _state_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in self.inputs()) + (self.backend,)

    def premap(self) -> torch.Tensor:
        """The matrix orthonormalize() receives (stereographic and cholesky_qr)."""
        return _premap(self.parametrization, *self.inputs())

    def compute(self) -> torch.Tensor:
        """R computed now from the parameters (no batch, no cache)."""
        if self.parametrization == "householder":
            return self.householder.weight.t()
        return orthonormalize(self.premap(), backend=self.backend)

    def forward(self) -> torch.Tensor:
        """R [rank, dim] fp32 (see the module docstring for when it is computed)."""
        if torch.compiler.is_compiling():
            return self.compute()
        batched = _BATCHED.get().get(id(self))
        if batched is not None:
            if self._cache is not None and any(p.requires_grad for p in self.parameters()):
                # trained through a batch (ReftModel's calls): a cache from before must not outlive it once the
                # module is frozen again (fused optimizers do not move the version counter the key reads)
                self._cache = None
            return batched
        if any(p.requires_grad for p in self.parameters()):
            # Trainable: computed on every call, never cached. A version-counter key is not enough here:
            # fused optimizers (torch.optim.AdamW(fused=True), Trainer's default) update parameters without
            # bumping it, so a cached R would silently outlive training.
            self._cache = None
            if torch.is_grad_enabled():
                return self.compute()
            with torch.no_grad():
                return self.compute()
        key = self._state_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.compute())
        return self._cache[1]

    @torch.no_grad()
    def set_(self, R: torch.Tensor) -> "Orthonormal":
        """Makes the module return R ([rank, dim], rows orthonormal), e.g. to import a trained R.
        Householder: torch's right_inverse rebuilds the whole d x d base around R (pyreft's loader writes
        R into the first columns of the old base instead, which leaves base non-orthogonal)."""
        if tuple(R.shape) != (self.rank, self.dim):
            raise ValueError(f"R must be [{self.rank}, {self.dim}], got {tuple(R.shape)}")
        if self.parametrization == "cholesky_qr":
            self.weight.copy_(R)
        elif self.parametrization == "stereographic":
            self.base.copy_(orthonormalize(R.to(self.base), backend="torch"))  # exactly orthonormal base
            self.delta.zero_()
        else:
            self.householder.weight = R.t().to(self.householder.parametrizations.weight.original)
        self._cache = None
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, parametrization={self.parametrization}"


def _premap(parametrization: str, *inputs: torch.Tensor) -> torch.Tensor:
    """What orthonormalize() receives, from Orthonormal.inputs() of one module or stacked over several."""
    return stereographic_premap(*inputs) if parametrization == "stereographic" else inputs[0]


def _orthonormal_modules(roots: Iterable[Union[nn.Module, Iterable[nn.Module]]]) -> list[Orthonormal]:
    found, seen = [], set()
    for root in roots:
        mods = root.modules() if isinstance(root, nn.Module) else (m for x in root for m in x.modules())
        for m in mods:
            if isinstance(m, Orthonormal) and id(m) not in seen:
                seen.add(id(m))
                found.append(m)
    return found


def compute_batched(modules: list[Orthonormal]) -> dict[int, torch.Tensor]:
    """R for each module, id(module) -> R. Modules that share (parametrization, device, dim, rank,
    backend) are stacked and computed together: a few stacks, the premap's batched ops, two Triton
    launches forward; in the backward two launches, the premap's, and one gather of the R gradients
    (unbind's backward is a single stack). None of it grows with the number of modules. Householder
    modules are computed one by one (once each, where pyreft computes R twice per call)."""
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[Orthonormal]] = {}
    for m in modules:
        if m.parametrization == "householder":
            out[id(m)] = m.compute()
            continue
        p = m.inputs()[-1]  # the trained tensor: delta or weight
        groups.setdefault((m.parametrization, p.device, p.dtype, m.dim, m.rank, m.backend), []).append(m)
    for (parametrization, _, _, _, _, backend), group in groups.items():
        if len(group) == 1:
            out[id(group[0])] = group[0].compute()
            continue
        stacked = [torch.stack(ts) for ts in zip(*(m.inputs() for m in group))]
        Rs = orthonormalize(_premap(parametrization, *stacked), backend=backend).unbind(0)
        out.update({id(m): R for m, R in zip(group, Rs)})
    return out


@contextlib.contextmanager
def orthonormal_batch(*roots: Union[nn.Module, Iterable[nn.Module]]) -> Iterator[dict]:
    """Computes R for every Orthonormal module under the given modules (or lists of modules) at once;
    inside the block each of them returns its batched R. Blocks nest; the innermost wins."""
    modules = _orthonormal_modules(roots)
    batched = compute_batched(modules) if modules else {}
    token = _BATCHED.set({**_BATCHED.get(), **batched})
    try:
        yield batched
    finally:
        _BATCHED.reset(token)


def orthonormality_error(R: torch.Tensor) -> float:
    """max |R R^T - I| in float64: 0 for exactly orthonormal rows."""
    R64 = R.detach().double()
    eye = torch.eye(R64.shape[-2], dtype=torch.float64, device=R64.device)
    return (R64 @ R64.mT - eye).abs().max().item()


__all__ = ["Orthonormal", "PARAMETRIZATIONS", "compute_batched", "orthonormal_batch", "orthonormality_error"]
