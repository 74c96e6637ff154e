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
- Banks. When no parameter of the batch's adapters requires grad (a frozen or served model), every mixed
  batch reads SharedBanks: per site and slot one bank of every adapter of the model, built once and reused
  by any later mix, until a tensor of one of the batch's adapters changes (checked once per call: each
  tensor's storage, version counter, dtype and device) or adapters are added, deleted or loaded. With
  trainable adapters the batch's own bank is stacked from its adapters' modules at the site: once per call
  under no_grad, on every forward with autograd (differentiable: each adapter's gradient reaches its own
  parameters; gradient checkpointing's recomputation builds its own, as it computes its own R).
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
    """Slot `index` of a mixed plan at a site: one mixed-op launch over the whole batch. members: (adapter,
    its intervention index) of the batch's adapters that have this slot, the rows of a bank built for the
    batch; key: (site, slot), the slot's bank in SharedBanks (every adapter of the model)."""

    __slots__ = ("index", "members", "key", "cached")

    def __init__(self, index: int, members: list[tuple[Adapter, int]], key: tuple):
        self.index, self.members, self.key = index, members, key
        self.cached: Optional[tuple[Any, AdapterBank]] = None  # (call token, bank): one object, swapped atomically

    def batch_bank(self, token) -> AdapterBank:
        """A bank of the batch's adapters: built here with autograd (token None: differentiable, every
        forward), or once per call under no_grad (token: the call's)."""
        if token is None:
            return stack_adapters([a.params(i) for a, i in self.members])
        cached = self.cached
        if cached is not None and cached[0] is token:
            return cached[1]
        with torch.no_grad():
            bank = stack_adapters([a.params(i) for a, i in self.members])
        self.cached = (token, bank)
        return bank

    def apply(self, hidden, locations, state, owner):
        banks = state.banks
        bank = banks.bank(self.key) if isinstance(banks, SharedBanks) else self.batch_bank(banks)
        return mixed_reft_edit(hidden, locations[self.index], state.ids_for(hidden.shape[0])[self.index], bank,
                               training=owner.training, backend=owner.backend)


_UNSEEN = object()


class SharedBanks:
    """Per site and slot, one bank of EVERY adapter of the model that has that slot, built once (lazily, at a
    site's first use) and shared by all mixed batches whose adapters are frozen: a batch reads the rows of its
    own adapters, whatever the mix, so no bank is built per mix. Memory: one stacked copy of the adapters'
    parameters (zero padded to each slot's largest rank).

    Staleness: validate(batch adapters), once per call, compares each batch adapter's fingerprint (its
    tensors' storage, version counter, dtype, device) with the one recorded when the banks were dropped last;
    any difference drops every bank (rebuilt at their next use) and records every adapter's fingerprint anew.
    An adapter that was trainable then, or has been trainable in any call since (forget: ReftModel reports
    every call's trainable adapters), is recorded as never matching, since fused optimizers update
    parameters without moving the version counter: its rows are rebuilt before a frozen batch reads them.
    A ReftModel drops its SharedBanks when adapters are added, deleted or loaded (load_state_dict)."""

    def __init__(self, adapters: Sequence[Adapter]):
        self.adapters = tuple(adapters)
        self.members: dict[tuple, list[tuple[Adapter, int]]] = {}
        for a in self.adapters:
            for site, indices in a.sites.items():
                for j, i in enumerate(indices):
                    self.members.setdefault((site, j), []).append((a, i))
        self.rows = {key: {a.name: k for k, (a, _) in enumerate(m)} for key, m in self.members.items()}
        self.banks: dict[tuple, AdapterBank] = {}
        self.recorded: dict[str, Any] = {}

    def validate(self, adapters: Sequence[Adapter]) -> None:
        if all(self.recorded.get(a.name, _UNSEEN) == a.fingerprint() for a in adapters):
            return
        self.banks = {}
        self.recorded = {a.name: None if a.requires_grad() else a.fingerprint() for a in self.adapters}

    def forget(self, names: Sequence[str]) -> None:
        """These adapters are trainable in a call: their rows are not trusted again until rebuilt (an optimizer
        step after this call may leave the version counters where they are)."""
        for name in names:
            self.recorded[name] = None

    def bank(self, key: tuple) -> AdapterBank:
        bank = self.banks.get(key)
        if bank is None:
            # ordinary tensors even inside torch.inference_mode(): a later call with autograd may reuse them
            with torch.inference_mode(False), torch.no_grad():
                bank = stack_adapters([a.params(i) for a, i in self.members[key]])
            self.banks[key] = bank
        return bank


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
    """A mixed batch over `adapters` (module docstring): S slots (the sites and slots these adapters edit),
    and per slot three small tables indexed by a row's adapter (index into adapters; len(adapters) for
    "__base__"): the intervention whose locations the row uses (-1: none), and its row in the slot's bank,
    the batch's own (built for the call) or the shared one (SharedBanks), -1: no edit."""

    mixed = True

    def __init__(self, adapters: Sequence[Adapter], shared: SharedBanks):
        self.adapters = tuple(adapters)
        self.index = {a.name: u for u, a in enumerate(self.adapters)}
        self.num_locations = max(a.num_interventions for a in self.adapters)  # n of a mixed batch's locations
        U = len(self.adapters)
        order: list[tuple[int, str]] = []
        for a in self.adapters:
            order += [s for s in a.sites if s not in order]
        interv, own, common, self.sites = [], [], [], {}
        for site in order:
            slots = max(len(a.sites.get(site, ())) for a in self.adapters)
            edits = []
            for j in range(slots):
                members, iv_row, own_row, common_row = [], [-1] * (U + 1), [-1] * (U + 1), [-1] * (U + 1)
                for u, a in enumerate(self.adapters):
                    indices = a.sites.get(site, ())
                    if len(indices) > j:
                        iv_row[u], own_row[u] = indices[j], len(members)
                        common_row[u] = shared.rows[(site, j)][a.name]
                        members.append((a, indices[j]))
                edits.append(MixedEdit(len(interv), members, (site, j)))
                interv.append(iv_row)
                own.append(own_row)
                common.append(common_row)
            self.sites[site] = tuple(edits)
        self._tables = torch.tensor([interv, own, common], dtype=torch.long)  # [3, S, U + 1]
        self._on: dict = {}

    def tables(self, device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            with torch.inference_mode(False):
                t = self._on[device] = self._tables.to(device)
        return t

    def gather(self, rows: torch.Tensor, locations: torch.Tensor, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B] (each row's adapter index, len(adapters) for "__base__") and the rows' locations
        [B, num_locations, P] -> the slots' positions [S, B, P] (-1: no edit) and bank rows [S, B] (of the
        shared banks or of the batch's own): two index ops on the device, no host sync."""
        tables = self.tables(rows.device)
        interv, bank = tables[0][:, rows], tables[2 if shared else 1][:, rows]  # [S, B]
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


__all__ = ["MixedEdit", "MixedPlan", "Plan", "SharedBanks", "SingleEdit", "pad_cat", "scheme_rows"]
