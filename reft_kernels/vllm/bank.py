"""SiteBank: the slots of one (site, pass) of a server, over the mixed-adapter op's AdapterBank.

A serving bank is allocated once and updated in place per slot (AdapterBank.set_slot / clear_slot); when an
adapter needs more slots, a higher rank, or a weight / proj_bias tensor the bank was made without, a bigger
bank is allocated and the live slots are written into it (loading an adapter is rare; editing is per step).
The bank's tensors are read by the plugin's registered op at run time, never traced into a compiled graph,
so a reallocation needs no recompilation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .mixed_op import AdapterBank, AdapterParams


class SiteBank:
    """Slots of one (site, pass): add(params) -> slot, clear(slot); `bank` is what the edit reads."""

    def __init__(self, dim: int, device: torch.device, capacity: int = 4):
        self.dim = dim
        self.device = torch.device(device)
        self.params: list[Optional[AdapterParams]] = [None] * capacity
        self.bank: Optional[AdapterBank] = None

    @property
    def live(self) -> int:
        return sum(p is not None for p in self.params)

    def add(self, params: AdapterParams) -> int:
        try:
            slot = self.params.index(None)
        except ValueError:
            slot = len(self.params)
            self.params.extend([None] * len(self.params))  # double the capacity
        self.params[slot] = params
        bank = self.bank
        if (bank is None or bank.num_adapters < len(self.params) or bank.rank < params.lift.shape[0]
                or (params.weight is not None and bank.weight is None)
                or (params.proj_bias is not None and bank.proj_bias is None)):
            self._reallocate()
        else:
            bank.set_slot(slot, params)
        return slot

    def clear(self, slot: int) -> None:
        self.params[slot] = None
        if self.bank is not None:
            self.bank.clear_slot(slot)

    def _reallocate(self) -> None:
        live = [(i, p) for i, p in enumerate(self.params) if p is not None]
        rank = max(p.lift.shape[0] for _, p in live)
        if self.bank is not None:
            rank = max(rank, self.bank.rank)
        self.bank = AdapterBank.empty(len(self.params), rank, self.dim,
                                      weight=any(p.weight is not None for _, p in live),
                                      proj_bias=any(p.proj_bias is not None for _, p in live),
                                      dtype=torch.float32, device=self.device)
        for i, p in live:
            self.bank.set_slot(i, p)


__all__ = ["SiteBank"]
