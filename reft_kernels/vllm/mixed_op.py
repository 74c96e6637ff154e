"""The mixed-adapter edit the vLLM plugin calls: the one place it comes from.

INTERIM. Issue 15's op (reft_kernels.ops.mixed_edit: AdapterBank, AdapterParams, mixed_reft_edit_flat; the
interface in /work/team/MIXED_API.md) is being written on another branch. Until it is merged, this module
holds a small stand-in with the same names, fields and semantics, so that switching to the real op is this
file becoming

    from ..ops.mixed_edit import AdapterBank, AdapterParams, mixed_reft_edit_flat

The stand-in's bank keeps the slots in stacked tensors exactly as the real one (lift [A, r, d], weight, bias,
proj_bias, with each slot's rank, zero padded); its edit runs today's single-adapter op (reft_edit) once per
adapter present in the call, on that adapter's rows. That is one launch per adapter instead of one per call,
and a host sync on a GPU (it reads the ids): correct, not fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..ops.fused_edit import EditSpec, reft_edit


@dataclass
class AdapterParams:
    """One adapter's parameters: lift [r, d] (R or W2), weight [r, d] (W; None without a linear source),
    bias [r], proj_bias [r] (NoReFT's b2, or None), its type and activation, dropout."""

    lift: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: torch.Tensor
    proj_bias: Optional[torch.Tensor] = None
    spec: EditSpec = field(default_factory=lambda: EditSpec(True, True, "identity"))
    dropout: float = 0.0


@dataclass
class AdapterBank:
    """A serving bank of A slots at one site: lift [A, r, d], weight [A, r, d] or None, bias [A, r], proj_bias
    [A, r] or None; specs / host_ranks: each slot's type (None: empty) and rank (0: empty)."""

    lift: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: torch.Tensor
    proj_bias: Optional[torch.Tensor]
    specs: tuple
    host_ranks: tuple

    @property
    def num_adapters(self) -> int:
        return self.lift.shape[0]

    @property
    def rank(self) -> int:
        return self.lift.shape[1]

    @property
    def dim(self) -> int:
        return self.lift.shape[2]

    @classmethod
    def empty(cls, num_adapters: int, rank: int, dim: int, *, weight: bool = True, proj_bias: bool = False,
              dtype: torch.dtype = torch.float32, device=None) -> "AdapterBank":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        A = num_adapters
        return cls(z(A, rank, dim), z(A, rank, dim) if weight else None, z(A, rank), z(A, rank) if proj_bias else None,
                   (None,) * A, (0,) * A)

    def set_slot(self, i: int, params: AdapterParams) -> None:
        r, d = params.lift.shape
        if r > self.rank or d != self.dim:
            raise ValueError(f"slot {i}: the adapter is [r, d] = {[r, d]}, the bank holds r <= {self.rank}, d = {self.dim}")
        if (params.weight is not None and self.weight is None) or (params.proj_bias is not None and self.proj_bias is None):
            raise ValueError(f"slot {i}: the bank was made without room for this adapter's weight or proj_bias")
        self.clear_slot(i)
        with torch.no_grad():
            self.lift[i, :r].copy_(params.lift)
            if params.weight is not None:
                self.weight[i, :r].copy_(params.weight)
            self.bias[i, :r].copy_(params.bias)
            if params.proj_bias is not None:
                self.proj_bias[i, :r].copy_(params.proj_bias)
        self.specs = self.specs[:i] + (params.spec,) + self.specs[i + 1:]
        self.host_ranks = self.host_ranks[:i] + (r,) + self.host_ranks[i + 1:]

    def clear_slot(self, i: int) -> None:
        with torch.no_grad():
            for t in (self.lift, self.weight, self.bias, self.proj_bias):
                if t is not None:
                    t[i].zero_()
        self.specs = self.specs[:i] + (None,) + self.specs[i + 1:]
        self.host_ranks = self.host_ranks[:i] + (0,) + self.host_ranks[i + 1:]


def mixed_reft_edit_flat(hidden: torch.Tensor, rows: torch.Tensor, adapter_ids: torch.Tensor, bank: AdapterBank, *,
                         rows_unique: bool = False, training: bool = False, backend: Optional[str] = None,
                         **_ignored) -> torch.Tensor:
    """hidden [n_tokens, d] edited in place at rows [N] with adapter_ids [N] (-1 or out of range: no edit); a
    row named twice is edited once, by its first slot. INTERIM: one reft_edit call per adapter present."""
    if hidden.dim() != 2 or rows.dim() != 1 or adapter_ids.shape != rows.shape:
        raise ValueError(f"need hidden [n_tokens, d], rows [N], adapter_ids [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(rows.shape)}, {tuple(adapter_ids.shape)}")
    ids = adapter_ids.cpu().numpy()
    rows_np = rows.cpu().numpy()
    keep = (ids >= 0) & (ids < bank.num_adapters) & (rows_np >= 0) & (rows_np < hidden.shape[0])
    if not rows_unique:
        first = np.zeros_like(keep)
        first[np.unique(np.where(keep, rows_np, -1), return_index=True)[1]] = True
        keep &= first
    view = hidden.unsqueeze(0)
    for a in np.unique(ids[keep]):
        spec, r = bank.specs[a], bank.host_ranks[a]
        if spec is None or r == 0:
            continue
        sel = torch.from_numpy(rows_np[keep & (ids == a)]).to(hidden.device).view(1, -1)
        reft_edit(view, sel, bank.lift[a, :r], bank.weight[a, :r] if spec.source_linear else None, bank.bias[a, :r],
                  bank.proj_bias[a, :r] if (spec.subtract_proj and bank.proj_bias is not None) else None,
                  source_linear=spec.source_linear, subtract_proj=spec.subtract_proj, act=spec.act,
                  training=training, backend=backend)
    return hidden


__all__ = ["AdapterBank", "AdapterParams", "mixed_reft_edit_flat"]
