"""How one forward/generate call runs its adapters: a plan says, per hooked site, which edits run in which
order, and where each finds its locations and parameters (integration/model.py's hooks apply it).

- One adapter, or several composed (set_adapter([a, b])): Plan. At each site the interventions of a, then
  those of b, each with the single-adapter op (reft_kernels.reft_edit through the module), in place: where
  both edit a site the result is Φ_b(Φ_a(h)), the sequential application. The call's locations are the
  adapters' locations one after the other: [B, n_a + n_b, P].
- A mixed batch (adapter_names=[...], one name per row, "__base__" for none): MixedPlan. Per site and
  intervention slot (slot j: the j-th intervention an adapter has at that site; one slot per site unless an
  adapter edits a site twice, e.g. share_weights=False) ONE mixed-op launch for the whole batch whatever the
  mix: reft_kernels.mixed_reft_edit with the bank of the batch's adapters that have that slot and a bank
  index per row. The positions [S, B, P] and bank indices [S, B] of all S slots are gathered on the device
  once per call from the rows' adapter indices (MixedPlan.gather: two index ops, no host sync); a site's
  hook slices them. There is no Python loop over rows or adapters at a site.
- Banks (MixedEdit.bank): stacked from the modules (reft_kernels.stack_adapters). When no parameter of the
  batch's adapters requires grad, a site's bank is built once and reused by later calls until a tensor of
  one of them changes (checked once per call, MixedPlan.cache_key: each tensor's storage, version counter,
  dtype and device) or the adapters are added or removed (the ReftModel drops its plans). Under no_grad
  with trainable adapters a bank lives for one call; with autograd on it is built at the site on every
  forward (differentiable: each adapter's gradient reaches its own parameters; gradient checkpointing's
  recomputation builds its own, as it computes its own R).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..modules.interventions import ReftIntervention
from ..ops.mixed_edit import AdapterBank, mixed_reft_edit, stack_adapters
from .adapters import Adapter


class SingleEdit:
    """One intervention of one adapter at a site: locations[index] of the call ([B, P])."""

    __slots__ = ("index", "module")

    def __init__(self, index: int, module: ReftIntervention):
        self.index, self.module = index, module

    def apply(self, hidden, locations, state, owner):
        return self.module(hidden, locations[self.index])


class MixedEdit:
    """Slot `index` of a mixed plan at a site: one mixed-op launch over the whole batch, with the bank of the
    adapters that have this slot (members: (adapter, its intervention index) per bank row)."""

    __slots__ = ("index", "members", "cached")

    def __init__(self, index: int, members: list[tuple[Adapter, int]]):
        self.index, self.members = index, members
        self.cached: Optional[tuple[Any, AdapterBank]] = None  # (key, bank): one object, swapped atomically

    def bank(self, key) -> AdapterBank:
        """The bank: reused while `key` (the call's cache key; None: never) is the one it was built under."""
        if key is None:
            return stack_adapters([a.params(i) for a, i in self.members])
        cached = self.cached
        if cached is not None and cached[0] is key:
            return cached[1]
        with torch.no_grad():
            bank = stack_adapters([a.params(i) for a, i in self.members])
        self.cached = (key, bank)
        return bank

    def apply(self, hidden, locations, state, owner):
        return mixed_reft_edit(hidden, locations[self.index], state.ids_for(hidden.shape[0])[self.index],
                               self.bank(state.bank_key), training=owner.training, backend=owner.backend)


class Plan:
    """Per site, the edits of a call configuration, in order; `adapters` in the order of the call."""

    mixed = False

    def __init__(self, adapters: Sequence[Adapter]):
        self.adapters = tuple(adapters)
        self.sites: dict[tuple[int, str], tuple] = {}
        offset = 0
        for a in self.adapters:
            for site, indices in a.sites.items():
                self.sites[site] = self.sites.get(site, ()) + tuple(SingleEdit(offset + i, a.modules[i])
                                                                    for i in indices)
            offset += a.num_interventions
        self.num_locations = offset


class MixedPlan:
    """A mixed batch over `adapters` (module docstring): S slots, and per slot two small tables indexed by
    a row's adapter (index into adapters; len(adapters) for "__base__"): the intervention whose locations the
    row uses (-1: none) and its row in the slot's bank (-1: no edit)."""

    mixed = True

    def __init__(self, adapters: Sequence[Adapter]):
        self.adapters = tuple(adapters)
        self.index = {a.name: u for u, a in enumerate(self.adapters)}
        self.num_locations = max(a.num_interventions for a in self.adapters)  # n of a mixed batch's locations
        U = len(self.adapters)
        order: list[tuple[int, str]] = []
        for a in self.adapters:
            order += [s for s in a.sites if s not in order]
        interv, banks, self.sites = [], [], {}
        for site in order:
            slots = max(len(a.sites.get(site, ())) for a in self.adapters)
            edits = []
            for j in range(slots):
                members, iv_row, bank_row = [], [-1] * (U + 1), [-1] * (U + 1)
                for u, a in enumerate(self.adapters):
                    indices = a.sites.get(site, ())
                    if len(indices) > j:
                        iv_row[u], bank_row[u] = indices[j], len(members)
                        members.append((a, indices[j]))
                edits.append(MixedEdit(len(interv), members))
                interv.append(iv_row)
                banks.append(bank_row)
            self.sites[site] = tuple(edits)
        self._tables = torch.tensor([interv, banks], dtype=torch.long)  # [2, S, U + 1]
        self._on: dict = {}
        self.fingerprint: Optional[tuple] = None
        self.frozen_key: Optional[object] = None

    def tables(self, device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self._tables.to(device)
        return t

    def cache_key(self) -> Optional[object]:
        """The key the banks of a call are cached under (MixedEdit.bank): a persistent one while no parameter of
        these adapters requires grad and none changed since the last call (checked here, once per call), one
        for this call alone under no_grad, None (build at every site) with autograd on and trainable adapters."""
        if any(a.requires_grad() for a in self.adapters):
            return None if torch.is_grad_enabled() else object()
        fingerprint = tuple(a.fingerprint() for a in self.adapters)
        if fingerprint != self.fingerprint or self.frozen_key is None:
            self.fingerprint, self.frozen_key = fingerprint, object()
        return self.frozen_key

    def gather(self, rows: torch.Tensor, locations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B] (each row's adapter index, len(adapters) for "__base__") and the rows' locations
        [B, num_locations, P] -> the slots' positions [S, B, P] (-1: no edit) and bank indices [S, B]: two index
        ops on the device, no host sync."""
        tables = self.tables(rows.device)
        interv, bank = tables[0][:, rows], tables[1][:, rows]  # [S, B]
        B = rows.shape[0]
        positions = locations[torch.arange(B, device=rows.device)[None, :], interv.clamp(min=0)]  # [S, B, P]
        return torch.where(interv[..., None] >= 0, positions, -1), bank


def pad_cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Location tensors [..., P_i] joined along `dim`, their last dimension padded with -1 to the largest."""
    P = max(p.shape[-1] for p in parts)
    parts = [torch.nn.functional.pad(p, (0, P - p.shape[-1]), value=-1) for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def scheme_rows(adapters: Sequence[Adapter], rows: list[int], attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Locations [B, n, P] of a mixed batch from each row's adapter's position scheme (rows[b]: index into
    adapters, len(adapters) for "__base__", whose entries are not read): one scheme computation per distinct
    (scheme, share_weights, n_interventions) among the adapters, one gather."""
    schemes: dict[tuple, int] = {}
    parts, which = [], []
    for a in adapters:
        key = (a.config.positions, a.config.share_weights, a.num_interventions)
        if key not in schemes:
            schemes[key] = len(parts)
            locs = a.locations(attention_mask)
            parts.append(torch.nn.functional.pad(locs, (0, 0, 0, n - locs.shape[1]), value=-1))
        which.append(schemes[key])
    if len(parts) == 1:
        return parts[0]
    stacked = pad_cat([p[None] for p in parts], 0)  # [K, B, n, P]
    pick = torch.tensor([which[u] if u < len(adapters) else 0 for u in rows]).to(stacked.device, non_blocking=True)
    return stacked[pick, torch.arange(len(rows), device=stacked.device)]


__all__ = ["MixedEdit", "MixedPlan", "Plan", "SingleEdit", "pad_cat", "scheme_rows"]
