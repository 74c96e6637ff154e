"""The mixed-adapter ReFT edit: many adapters at one site in one launch, each edited row with its own.

A server batches requests that want different adapters, and a trainer may train several adapters (one per
task) in one batch. Multi-LoRA serves this with stacked weights and a per-token adapter index (Punica's
SGMV/BGMV, vLLM's Triton LoRA ops); this module is the same for the ReFT family of ops/fused_edit.py.

The bank (AdapterBank): the parameters of A adapters at one site, stacked and zero padded to one rank r:
lift [A, r, d] (R or W2), weight [A, r, d] (W of the adapters with a linear source, zeros elsewhere; None
when none has one), bias [A, r], proj_bias [A, r] (NoReFT's b2, zeros elsewhere; None when none has one),
kinds [A] int32 (per-adapter type flags and activation, KIND_* below), ranks [A] int32 (each adapter's own
rank <= r), dropout [A] float32. Rows at and above an adapter's rank are never read by the kernels, so
adapters of different ranks share a bank exactly; an adapter of rank 0 is an empty slot and edits nothing.
Adapters of all six types and any supported activations mix in one bank.

For an edited row h with adapter a (L, W, b, pb its slices, k < ranks[a]):
    z = W h + b (source_linear) ; s = act(z) or b ; delta = s - (L h + pb) (subtract_proj) or s
    y = h + L^T delta ; out = dropout_a(y) (whole row, training only)
exactly ops/fused_edit.py's formula with that adapter's parameters.

Two layouts, one kernel family:
- batched (mixed_reft_edit, the Hugging Face layer's): hidden [B, T, d], positions [B, P] (-1 = empty
  slot), adapter_ids [B] (one per batch row) or [B, P] (one per slot);
- flat (mixed_reft_edit_flat, a server's): hidden [n_tokens, d], rows [N] (indices into n_tokens),
  adapter_ids [N]. The kernels see it as the batched layout with B = 1, T = n_tokens, P = N.
Semantics shared by every backend
- hidden is edited in place and returned; every row no slot edits stays bit-for-bit unchanged.
- A slot is empty when its position (row) is -1 or out of range, its adapter id is -1 or out of the bank's
  range, or its adapter has rank 0. A row named by several non-empty slots (of one batch row) is edited once,
  by the first of them, and its gradient counted once, as the single-adapter op does.
- Parameters may be fp32 while hidden is 16-bit: everything is computed in fp32; gradients come back in each
  bank tensor's dtype. Dropout (training only) uses each adapter's own probability and the single-adapter
  op's Philox masks, keyed by (seed, slot * d + column): the same seed drops the same elements on the triton
  and cpp backends, and as the single-adapter op at A = 1. The torch backend draws torch's own masks.
- Gradients for hidden and for every bank tensor (lift, weight, bias, proj_bias), deterministic (no atomics).

Launches (Triton): the forward is one launch whatever A is: persistent programs walk the edited rows in
their order, and a block of rows holding several adapters runs each adapter's parameters over the rows that
are its own (rows of one adapter should be contiguous for speed, as a server's batch and the batched layout
with one adapter per batch row are; a shuffled assignment is correct but reads each adapter's slice once per
block holding it). The flat layout without rows_unique first resolves duplicate rows on the device (a fill
and a claim kernel: owner[row] = the smallest slot naming it); with rows_unique=True it is one launch. The
backward sorts the edited slots by adapter on the device (torch.sort, no host sync) and reduces each
adapter's gradient over its run of rows without atomics: step 1 (d_delta per slot, the hidden gradient of
rows nobody edits), step 2 (chunks of the sorted slots x column blocks: the hidden gradient of edited rows
and each run's parameter sums, written straight to its adapter when the run lies in one chunk), and a fix-up
that adds the pieces of adapters cut by chunk boundaries in a fixed order (and zeros untouched adapters).

Bytes (Triton): the forward reads and writes the edited rows (and saves a copy of them when a gradient is
needed, unless recompute) and reads each adapter's slices once per block of rows holding that adapter;
the backward reads the incoming gradient twice and the saved rows once and writes the hidden gradient, as
the single-adapter op does, and writes every adapter's gradient once (zeros for adapters no row uses).

Different types in one call: runtime per-adapter flags in the same launch (each adapter run branches on
its own flags; a bank compiles in only what holds for all its adapters: the activation when they share
one, no weight term when none has a linear source, no subtraction when none subtracts). On the C++ kernels
one launch with runtime flags against one launch per type present: bench/bench_adapters.py (provider
mixed-per-type) measures both, README gives the figures; the single launch is kept.

The C++ CPU kernels are csrc/mixed_cpu.cpp (backend="cpp", reft_kernels_cpp::mixed_fwd / mixed_bwd /
mixed_edit), built by reft_kernels/extension.py with the single-adapter ones.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import backend as _backend
from . import activations as _acts
from . import validation as _v
from . import fused_edit as _fe
from .fused_edit import EditSpec, _cdiv, _next_pow2, _sms, owner_mask, r_pad

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

# kinds[a]: bit 0 source_linear, bit 1 subtract_proj, bits 8.. the activation code (activations.SUPPORTED;
# codes from EXTRA_ACT for ACT2FN names without a fused kernel, which only the torch backend runs)
KIND_SOURCE_LINEAR = 1
KIND_SUBTRACT_PROJ = 2
ACT_SHIFT = 8
EXTRA_ACT = 16  # first code of the names without a fused kernel (bank.extra_acts[code - EXTRA_ACT])


def kind_code(spec: EditSpec, extra_acts: Sequence[str] = ()) -> int:
    """kinds[a] for an adapter of this type (extra_acts: the bank's names without a fused kernel)."""
    code = _acts.SUPPORTED.get(spec.act)
    if code is None:
        code = EXTRA_ACT + list(extra_acts).index(spec.act)
    return (KIND_SOURCE_LINEAR if spec.source_linear else 0) | (KIND_SUBTRACT_PROJ if spec.subtract_proj else 0) | (
        code << ACT_SHIFT)


# ------------------------------------------------------------------------------------------------
# The bank
# ------------------------------------------------------------------------------------------------


@dataclass
class AdapterParams:
    """One adapter's parameters in reft_edit's terms: lift [r, d] (R or W2), weight [r, d] (W; None without a
    linear source), bias [r], proj_bias [r] (NoReFT's b2, or None), its type and activation (spec), and its
    dropout probability."""

    lift: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: torch.Tensor
    proj_bias: Optional[torch.Tensor] = None
    spec: EditSpec = field(default_factory=lambda: EditSpec(True, True, "identity"))
    dropout: float = 0.0

    def check(self, where: str = "adapter") -> int:
        """Checks shapes and flags; returns the rank."""
        _v._need_tensor(self.lift, f"{where} lift")
        if self.lift.dim() != 2 or self.lift.shape[0] < 1:
            raise ValueError(f"{where} lift must be [r, d] with r >= 1, got shape {tuple(self.lift.shape)}")
        r, d = self.lift.shape
        if self.spec.source_linear != (self.weight is not None):
            raise ValueError(f"{where}: weight must be given exactly when spec.source_linear (got "
                             f"source_linear={self.spec.source_linear}, weight={'None' if self.weight is None else 'a tensor'})")
        for name, x, shape in (("weight", self.weight, (r, d)), ("bias", self.bias, (r,)),
                               ("proj_bias", self.proj_bias, (r,))):
            if x is None:
                continue
            _v._need_tensor(x, f"{where} {name}")
            if tuple(x.shape) != shape:
                raise ValueError(f"{where} {name} must be {list(shape)} (lift is [r, d] = [{r}, {d}]), got shape "
                                 f"{tuple(x.shape)}")
        if self.proj_bias is not None and not self.spec.subtract_proj:
            raise ValueError(f"{where}: proj_bias needs spec.subtract_proj")
        _v.check_dropout(self.dropout)
        return r


def _common_spec(specs: Sequence[Optional[EditSpec]]) -> Optional[EditSpec]:
    """The one spec every non-empty slot shares, or None (they differ). All empty: LoReFT, identity."""
    live = {s for s in specs if s is not None}
    if not live:
        return EditSpec(True, True, "identity")
    return live.pop() if len(live) == 1 else None


# What every call derives from a bank's host metadata (the rank check, the largest dropout, the kernels'
# hints), computed once per version of it: specs / host_ranks / host_dropout are tuples, replaced whole when a
# slot changes, so a result holds while its tuples are the ones a bank holds. No per-call loop over the
# adapters: with the scan per call, a call on a serving bank took 26 -> 46 us from A = 8 to 512 (C++ op, 8
# rows, one thread); with this, 33 -> 36 us (same run conditions, a shared 2-core machine).
_DERIVED: dict = {}


def _derived(key: str, source: tuple, compute):
    """compute() for these metadata tuples (compared by identity; the entry keeps them alive, so their ids
    stay theirs). Bounded: cleared at 4096 entries."""
    k = (key, *map(id, source))
    hit = _DERIVED.get(k)
    if hit is not None and all(a is b for a, b in zip(hit[0], source)):
        return hit[1]
    value = compute()
    if len(_DERIVED) >= 4096:
        _DERIVED.clear()
    _DERIVED[k] = (source, value)
    return value


@dataclass
class AdapterBank:
    """The parameters of A adapters at one site, stacked (module docstring). Build one with stack_adapters
    (differentiable: training several adapters at once) or AdapterBank.empty + set_slot (a serving bank
    updated in place). Host-side metadata (specs, ranks, dropouts) mirrors the tensors so that calls never
    read the device."""

    lift: torch.Tensor  # [A, r, d]
    weight: Optional[torch.Tensor]  # [A, r, d] or None
    bias: torch.Tensor  # [A, r]
    proj_bias: Optional[torch.Tensor]  # [A, r] or None
    kinds: torch.Tensor  # [A] int32
    ranks: torch.Tensor  # [A] int32
    dropout: torch.Tensor  # [A] float32
    specs: tuple  # [A] EditSpec, or None for an empty slot
    host_ranks: tuple  # [A] int
    host_dropout: tuple  # [A] float
    extra_acts: tuple = ()  # activation names without a fused kernel (codes EXTRA_ACT + i)
    dynamic: bool = False  # types and activations read per adapter at run time, never compiled in (a serving
    #                        bank from AdapterBank.empty: a graph traced once stays right after set_slot)

    @property
    def num_adapters(self) -> int:
        return self.lift.shape[0]

    @property
    def rank(self) -> int:
        return self.lift.shape[1]

    @property
    def dim(self) -> int:
        return self.lift.shape[2]

    @property
    def spec(self) -> Optional[EditSpec]:
        """The type and activation every non-empty adapter shares (the kernels then compile it in), or None."""
        return _common_spec(self.specs)

    @property
    def max_dropout(self) -> float:
        return _derived("max_dropout", (self.host_dropout,), lambda: max(self.host_dropout, default=0.0))

    @property
    def fused(self) -> bool:
        """Whether the fused kernels run this bank (every activation has a kernel)."""
        return not self.extra_acts

    def tensors(self) -> tuple:
        return (self.lift, self.weight, self.bias, self.proj_bias)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AdapterBank":
        """The bank on another device, or with its float tensors in another dtype (kinds, ranks and dropout keep
        theirs); differentiable, like Tensor.to."""
        f = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        i = lambda t: t.to(device=device)  # noqa: E731
        return AdapterBank(f(self.lift), f(self.weight), f(self.bias), f(self.proj_bias), i(self.kinds), i(self.ranks),
                           i(self.dropout), self.specs, self.host_ranks, self.host_dropout, self.extra_acts, self.dynamic)

    def check(self) -> None:
        """The host metadata agrees with the tensors' shapes (the values themselves are set together by
        stack_adapters / set_slot)."""
        A, R = self.num_adapters, self.rank
        for name, meta in (("specs", self.specs), ("host_ranks", self.host_ranks), ("host_dropout", self.host_dropout)):
            if len(meta) != A:
                raise ValueError(f"the bank's {name} has {len(meta)} entries for A = {A} adapters")
        # scanned once per version of host_ranks (_derived): every call checks the bank
        bad = _derived(f"bad_rank_{R}", (self.host_ranks,),
                           lambda: next((r for r in self.host_ranks if not 0 <= r <= R), None))
        if bad is not None:
            raise ValueError(f"ranks must lie in [0, r] with r = {R} (the bank's rank), got {bad}")

    # -- a serving bank: allocated once, slots loaded and cleared in place ---------------------------

    @classmethod
    def empty(cls, num_adapters: int, rank: int, dim: int, *, weight: bool = True, proj_bias: bool = False,
              dtype: torch.dtype = torch.float32, device=None) -> "AdapterBank":
        """A bank of `num_adapters` empty slots (rank 0: they edit nothing) of rank up to `rank`, width `dim`.
        weight / proj_bias: whether adapters with a linear source / NoReFT's b2 can be loaded into it."""
        if not (isinstance(num_adapters, int) and isinstance(rank, int) and isinstance(dim, int)
                and num_adapters >= 1 and 1 <= rank <= dim):
            raise ValueError(f"need integers num_adapters >= 1 and 1 <= rank <= dim, got {num_adapters}, {rank}, {dim}")
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        A = num_adapters
        return cls(z(A, rank, dim), z(A, rank, dim) if weight else None, z(A, rank), z(A, rank) if proj_bias else None,
                   torch.zeros(A, dtype=torch.int32, device=device), torch.zeros(A, dtype=torch.int32, device=device),
                   torch.zeros(A, dtype=torch.float32, device=device), (None,) * A, (0,) * A, (0.0,) * A, (), True)

    def set_slot(self, i: int, params: AdapterParams) -> None:
        """Loads an adapter into slot i in place (no reallocation; no host sync). Its rank may be below the
        bank's; the rows above it are zeroed."""
        A, R, d = self.lift.shape
        if not 0 <= i < A:
            raise IndexError(f"slot {i} out of range for a bank of {A} adapters")
        ra = params.check(f"adapter for slot {i}")
        if ra > R or params.lift.shape[1] != d:
            raise ValueError(f"slot {i}: the adapter is [r, d] = {list(params.lift.shape)}, the bank holds r <= {R}, "
                             f"d = {d}")
        if params.weight is not None and self.weight is None:
            raise ValueError(f"slot {i}: the adapter has a weight (a linear source) but the bank was made with "
                             "weight=False")
        if params.proj_bias is not None and self.proj_bias is None:
            raise ValueError(f"slot {i}: the adapter has a proj_bias but the bank was made with proj_bias=False")
        extra = self.extra_acts
        if params.spec.act not in _acts.SUPPORTED and params.spec.act not in extra:
            extra = extra + (params.spec.act,)
        with torch.no_grad():
            for dst, src in ((self.lift, params.lift), (self.weight, params.weight)):
                if dst is not None:
                    dst[i, ra:].zero_()
                    if src is None:
                        dst[i, :ra].zero_()
                    else:
                        dst[i, :ra].copy_(src)
            for dst, src in ((self.bias, params.bias), (self.proj_bias, params.proj_bias)):
                if dst is not None:
                    dst[i].zero_()
                    if src is not None:
                        dst[i, :ra].copy_(src)
            self.kinds[i] = kind_code(params.spec, extra)
            self.ranks[i] = ra
            self.dropout[i] = float(params.dropout)
        self._set_meta(i, params.spec, ra, float(params.dropout), extra)

    def clear_slot(self, i: int) -> None:
        """Empties slot i in place (rank 0: ids naming it edit nothing) and zeroes its parameters."""
        if not 0 <= i < self.num_adapters:
            raise IndexError(f"slot {i} out of range for a bank of {self.num_adapters} adapters")
        with torch.no_grad():
            for t in self.tensors():
                if t is not None:
                    t[i].zero_()
            self.kinds[i] = 0
            self.ranks[i] = 0
            self.dropout[i] = 0.0
        self._set_meta(i, None, 0, 0.0, self.extra_acts)

    def _set_meta(self, i, spec, rank, dropout, extra):
        def put(t, v):
            return t[:i] + (v,) + t[i + 1:]

        self.specs, self.host_ranks, self.host_dropout = put(self.specs, spec), put(self.host_ranks, rank), put(
            self.host_dropout, dropout)
        self.extra_acts = extra


def stack_adapters(adapters: Sequence[AdapterParams], *, rank: Optional[int] = None) -> AdapterBank:
    """Stacks adapters into a bank, zero padding each to the largest rank (or `rank`). Differentiable: the
    padding and stacking are torch ops, so training several adapters in one batch sends each adapter's
    gradient to its own tensors. A bank tensor's dtype is the promotion of its adapters' dtypes; all
    adapters must share one width d and one device."""
    if len(adapters) == 0:
        raise ValueError("stack_adapters needs at least one adapter")
    ranks = [p.check(f"adapters[{k}]") for k, p in enumerate(adapters)]
    d = adapters[0].lift.shape[1]
    device = adapters[0].lift.device
    for k, p in enumerate(adapters):
        if p.lift.shape[1] != d:
            raise ValueError(f"adapters[{k}] has width d = {p.lift.shape[1]}, adapters[0] has d = {d}")
        for name, x in (("lift", p.lift), ("weight", p.weight), ("bias", p.bias), ("proj_bias", p.proj_bias)):
            if x is not None and x.device != device:
                raise ValueError(f"adapters[{k}] {name} is on {x.device}, adapters[0] on {device}")
    R = max(ranks) if rank is None else rank
    if R < max(ranks):
        raise ValueError(f"rank={rank} is below the largest adapter rank {max(ranks)}")
    extra = tuple(dict.fromkeys(p.spec.act for p in adapters if p.spec.act not in _acts.SUPPORTED))

    def dtype_of(xs):
        out = None
        for x in xs:
            if x is not None:
                out = x.dtype if out is None else torch.promote_types(out, x.dtype)
        return out

    def stack(xs, like_shape, dtype):
        rows = []
        for x, ra in zip(xs, ranks):
            if x is None:
                rows.append(torch.zeros((R,) + like_shape, dtype=dtype, device=device))
            else:
                pad = [0, 0] * (len(like_shape)) + [0, R - ra]
                rows.append(torch.nn.functional.pad(x.to(dtype), pad))
        return torch.stack(rows)

    lift = stack([p.lift for p in adapters], (d,), dtype_of(p.lift for p in adapters))
    has_w = any(p.weight is not None for p in adapters)
    weight = stack([p.weight for p in adapters], (d,), dtype_of(p.weight for p in adapters)) if has_w else None
    bias = stack([p.bias for p in adapters], (), dtype_of(p.bias for p in adapters))
    has_pb = any(p.proj_bias is not None for p in adapters)
    proj_bias = stack([p.proj_bias for p in adapters], (), dtype_of(p.proj_bias for p in adapters)) if has_pb else None
    kinds = torch.tensor([kind_code(p.spec, extra) for p in adapters], dtype=torch.int32, device=device)
    return AdapterBank(lift, weight, bias, proj_bias, kinds, torch.tensor(ranks, dtype=torch.int32, device=device),
                       torch.tensor([float(p.dropout) for p in adapters], dtype=torch.float32, device=device),
                       tuple(p.spec for p in adapters), tuple(ranks), tuple(float(p.dropout) for p in adapters), extra)


# ------------------------------------------------------------------------------------------------
# Reference (the torch backend, and the "plain torch gather/bmm/scatter" baseline of the benchmarks)
# ------------------------------------------------------------------------------------------------


def _batched_view(hidden, positions, adapter_ids):
    """(hidden [B, T, d], positions [B, P], adapter_ids [B, P]) of either layout (the flat one as B = 1)."""
    if hidden.dim() == 2:
        return hidden.unsqueeze(0), positions.unsqueeze(0), adapter_ids.unsqueeze(0)
    ids = adapter_ids if adapter_ids.dim() == 2 else adapter_ids[:, None].expand(-1, positions.shape[1])
    return hidden, positions, ids


def _act_by_code(code: int, extra_acts: Sequence[str]):
    if code >= EXTRA_ACT:
        return _acts.torch_fn(extra_acts[code - EXTRA_ACT])
    return _acts._TORCH[code]


def mixed_edit_reference(hidden: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor, bank: AdapterBank,
                         apply_dropout: bool) -> torch.Tensor:
    """The mixed edit written with PyTorch ops: gather each edited row's parameters, batched matmuls, scatter
    back. Autograd differentiates it. Edits hidden in place; either layout."""
    h3, pos, ids = _batched_view(hidden, positions.to(hidden.device), adapter_ids.to(hidden.device))
    B, T, d = h3.shape
    A, R = bank.num_adapters, bank.rank
    ids = ids.long()
    id_ok = (ids >= 0) & (ids < A)
    safe = torch.where(id_ok, ids, 0)
    live = id_ok & (bank.ranks.long()[safe] > 0)
    own = owner_mask(torch.where(live, pos.long(), -1), T)
    bi, pj = own.nonzero(as_tuple=True)  # a host sync on GPUs: the plain-torch path pays it
    ti = pos[bi, pj].long()
    a = ids[bi, pj]
    tensors = [t for t in bank.tensors() if t is not None] + [hidden]
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    u = h3[bi, ti].to(cdt)
    L = bank.lift.to(cdt)[a]  # [n, R, d]
    b = bank.bias.to(cdt)[a]
    kinds = bank.kinds[a]
    on = (torch.arange(R, device=hidden.device)[None, :] < bank.ranks[a][:, None].long()).to(cdt)
    source = b
    if bank.weight is not None:
        z = torch.einsum("nrd,nd->nr", bank.weight.to(cdt)[a], u) + b
        codes = kinds >> ACT_SHIFT
        s = z
        for code in sorted({kind_code(sp, bank.extra_acts) >> ACT_SHIFT for sp in bank.specs if sp is not None}):
            if code != 0:
                s = torch.where((codes == code)[:, None], _act_by_code(code, bank.extra_acts)(z), s)
        source = torch.where(((kinds & KIND_SOURCE_LINEAR) != 0)[:, None], s, b)
    proj = torch.einsum("nrd,nd->nr", L, u)
    if bank.proj_bias is not None:
        proj = proj + bank.proj_bias.to(cdt)[a]
    delta = (source - torch.where(((kinds & KIND_SUBTRACT_PROJ) != 0)[:, None], proj, 0.0)) * on
    y = u + torch.einsum("nr,nrd->nd", delta, L)
    if apply_dropout:
        p = bank.dropout.to(cdt)[a][:, None]
        y = torch.where(torch.rand_like(y) >= p, y / (1.0 - p), 0.0)
    h3.index_put_((bi, ti), y.to(hidden.dtype))
    return hidden


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if _backend.HAS_TRITON:
    _NOT_FOUND = tl.constexpr(2**30)

    @triton.jit
    def _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, j, mask, A):
        """The adapter of slot (i, j), or -1 when its id is out of [0, A) or names a rank-0 (empty) slot."""
        a = tl.load(IDS + i * stride_ib + j * stride_ip, mask=mask, other=-1).to(tl.int32)
        ok = mask & (a >= 0) & (a < A)
        rank = tl.load(RANKS + tl.where(ok, a, 0), mask=ok, other=0)
        return tl.where(ok & (rank > 0), a, -1)

    @triton.jit
    def _first_live_slot(
        POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS,
        i, t, limit, P, A,
        PER_SLOT_IDS: tl.constexpr,  # ids [B, P]; otherwise [B] (every slot of a row shares the row's adapter)
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """For each item: the smallest slot j < limit of row i that names position t and is not empty, or
        _NOT_FOUND. (With one adapter per batch row the row's adapter is checked by the caller.)"""
        first = tl.full((BLOCK_N,), _NOT_FOUND, tl.int32)
        for j0 in range(0, P, BLOCK_P):
            j = j0 + tl.arange(0, BLOCK_P)
            look = j[None, :] < limit[:, None]
            p = tl.load(POS + i[:, None] * stride_pb + j[None, :] * stride_pp, mask=look, other=-1)
            hit = look & (p.to(tl.int64) == t[:, None])
            if PER_SLOT_IDS:
                hit = hit & (_adapter_of(IDS, stride_ib, stride_ip, RANKS, i[:, None], j[None, :], hit, A) >= 0)
            first = tl.minimum(first, tl.min(tl.where(hit, j[None, :], _NOT_FOUND), axis=1))
        return first

    @triton.jit
    def _resolve(
        POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, OWNER,
        item, n_items, T, P, A,
        OWN_MODE: tl.constexpr,  # 0: scan the row's earlier slots (batched); 1: rows unique; 2: the OWNER table
        ROW_MAJOR: tl.constexpr,  # items are the rows of hidden (i * T + t); otherwise slots (i * P + j)
        PER_SLOT_IDS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Maps items to (batch row i, position t, slot n, adapter a, edited?): the slot that edits the row
        (ROW_MAJOR), or whether the slot edits its row (edit once, by the first non-empty slot)."""
        in_range = item < n_items
        N = P  # (the flat layout: one batch row, P = N slots)
        if OWN_MODE == 2:
            if ROW_MAJOR:
                t = item.to(tl.int64)
                i = t * 0
                slot = tl.load(OWNER + t, mask=in_range, other=N)
                edited = in_range & (slot < N)
                n = tl.where(edited, slot, 0).to(tl.int64)
                a = _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, n, edited, A)
            else:
                n = item.to(tl.int64)
                i = n * 0
                t = tl.load(POS + n * stride_pp, mask=in_range, other=-1).to(tl.int64)
                a = _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, n, in_range, A)
                valid = (a >= 0) & (t >= 0) & (t < T)
                owner = tl.load(OWNER + tl.where(valid, t, 0), mask=valid, other=-1)
                edited = valid & (owner == n)
        elif OWN_MODE == 1:
            n = item.to(tl.int64)
            i = n * 0
            t = tl.load(POS + n * stride_pp, mask=in_range, other=-1).to(tl.int64)
            a = _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, n, in_range, A)
            edited = (a >= 0) & (t >= 0) & (t < T)
        else:
            if ROW_MAJOR:
                i = (item // T).to(tl.int64)
                t = (item % T).to(tl.int64)
                first = _first_live_slot(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, i, t,
                                         tl.where(in_range, P, 0), P, A, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
                found = in_range & (first < P)
                j = tl.where(found, first, 0)
                n = i * P + j
                a = _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, j, found, A)
                edited = found & (a >= 0)
            else:
                n = item.to(tl.int64)
                i = n // P
                j = (n % P).to(tl.int32)
                t = tl.load(POS + i * stride_pb + j * stride_pp, mask=in_range, other=-1).to(tl.int64)
                a = _adapter_of(IDS, stride_ib, stride_ip, RANKS, i, j, in_range, A)
                valid = (a >= 0) & (t >= 0) & (t < T)
                first = _first_live_slot(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, i, t,
                                         tl.where(valid, j, 0), P, A, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
                edited = valid & (first == _NOT_FOUND)
        return i, t, n, tl.where(edited, a, -1), edited

    @triton.jit
    def _claim_rows_kernel(
        POS, stride_pp,  # rows [N]
        IDS, stride_ip,  # adapter ids [N]
        RANKS,  # [A] int32
        OWNER,  # [n_tokens] int32, filled with N: out, the smallest non-empty slot naming each row
        N, T, A,
        BLOCK: tl.constexpr,
    ):
        """The flat layout's duplicate resolution: OWNER[row] = min over the non-empty slots n naming row. An
        atomic minimum, whose result does not depend on the order the slots arrive in."""
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        t = tl.load(POS + n.to(tl.int64) * stride_pp, mask=ok, other=-1).to(tl.int64)
        a = _adapter_of(IDS, 0, stride_ip, RANKS, n * 0, n.to(tl.int64), ok, A)
        live = (a >= 0) & (t >= 0) & (t < T)
        tl.atomic_min(OWNER + tl.where(live, t, 0), n, mask=live)

    @triton.jit
    def _any(todo):
        return tl.max(todo.to(tl.int32), axis=0) > 0

    @triton.jit
    def _next_run(todo, a, A):
        """The smallest adapter a0 among the rows still to do, its rows (sel), and the rows left after them: the
        kernels take a block's adapters one at a time (rows in order hold one, or a few, adapters)."""
        a0 = tl.min(tl.where(todo, a, A), axis=0)
        sel = todo & (a == a0)
        return a0, sel, todo & (a != a0)

    @triton.jit
    def _kind(KINDS, a):
        """(source_linear, subtract_proj, activation code) of adapter a (a scalar or a vector), from kinds."""
        k = tl.load(KINDS + a)
        return (k & 1) != 0, (k & 2) != 0, k >> 8

    @triton.jit
    def _act_fwd_any(z, code, ACT: tl.constexpr):
        """act(z): the compile-time code ACT, or with ACT < 0 each row's own code (code [BLOCK_N, 1])."""
        if ACT >= 0:
            return _acts.act_fwd(z, ACT)
        out = z
        for c in tl.static_range(1, 8):
            out = tl.where(code == c, _acts.act_fwd(z, c), out)
        return out

    @triton.jit
    def _act_grad_any(z, code, ACT: tl.constexpr):
        if ACT >= 0:
            return _acts.act_grad(z, ACT)
        out = tl.full(z.shape, 1.0, tl.float32)
        for c in tl.static_range(1, 8):
            out = tl.where(code == c, _acts.act_grad(z, c), out)
        return out

    @triton.jit
    def _keep_scale_rows(x, n, cols, d, seed, p):
        """Dropout of x [BLOCK_N, BLOCK_D] at slots n with per-row probabilities p [BLOCK_N]: the single-adapter
        op's Philox mask (tl.rand(seed, n * d + col)); a row with p = 0 is returned unchanged."""
        keep = tl.rand(seed, n[:, None] * d + cols[None, :].to(tl.int64)) >= p[:, None]
        return tl.where(keep, x * (1.0 / (1.0 - p))[:, None], 0.0)

    @triton.jit
    def _delta_rows(acc_z, acc_q, a, own, rr, BIAS, PBIAS, KINDS, RANKS, R,
                    MAY_SP: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr):
        """(z, delta) [BLOCK_N, R_PAD] of each row from its projections acc_z = W h, acc_q = L h and its
        adapter's bias, type and activation; zero beyond each row's rank and for rows not edited."""
        a_safe = tl.where(own, a, 0).to(tl.int64)
        sl, sp, code = _kind(KINDS, a_safe)
        rank = tl.minimum(tl.load(RANKS + a_safe, mask=own, other=0), R)
        on = own[:, None] & (rr[None, :] < rank[:, None])
        b = tl.load(BIAS + a_safe[:, None] * R + rr[None, :], mask=on, other=0.0).to(tl.float32)
        z = acc_z + b
        if HAS_WEIGHT:
            s = tl.where(sl[:, None], _act_fwd_any(z, code[:, None], ACT), b)
        else:
            s = b
        q = acc_q
        if HAS_PROJ_BIAS:
            q = q + tl.load(PBIAS + a_safe[:, None] * R + rr[None, :], mask=on, other=0.0).to(tl.float32)
        if MAY_SP:
            delta = tl.where(sp[:, None], s - q, s)
        else:
            delta = s
        return tl.where(on, z, 0.0), tl.where(on, delta, 0.0)

    @triton.jit
    def _store_stats(STATS, n, item, N, own, z, delta, R_PAD: tl.constexpr):
        rr = tl.arange(0, R_PAD)
        sm = (item < N)[:, None] & (rr < R_PAD)[None, :]
        stat = STATS + n[:, None] * (2 * R_PAD) + rr[None, :]
        tl.store(stat, tl.where(own[:, None], z, 0.0), mask=sm)
        tl.store(stat + R_PAD, tl.where(own[:, None], delta, 0.0), mask=sm)

    @triton.jit
    def _mixed_fwd_rows_kernel(
        X, stride_xb, stride_xt, stride_xd,  # hidden [B, T, d] (flat: [1, n_tokens, d]); edited in place
        POS, stride_pb, stride_pp,  # positions [B, P] (flat: rows [1, N])
        IDS, stride_ib, stride_ip,  # adapter ids [B, P] or [B] (stride_ip = 0)
        OWNER,  # [n_tokens] int32 (OWN_MODE 2)
        L, W, BIAS, PBIAS,  # the bank, contiguous: lift / weight [A, R, d], bias / proj_bias [A, R]
        KINDS, RANKS, DROP,  # [A] int32, int32, float32
        SAVED,  # [N, d]: copy of the original rows (SAVE_ROWS)
        STATS,  # [N, 2, R_PAD] fp32: z and delta per slot (SAVE_STATS)
        T, P, N, d, R, A,
        iters,  # row blocks per program: the grid is persistent
        seed,
        MAY_SP: tl.constexpr,  # some adapter subtracts L h (+ pb): the kernel reads kinds for which
        ACT: tl.constexpr,  # the activation code every adapter shares, or -1: each adapter's own (kinds)
        HAS_WEIGHT: tl.constexpr,  # the bank has a weight (some adapter has a linear source; kinds says which)
        HAS_PROJ_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        SAVE_ROWS: tl.constexpr,
        SAVE_STATS: tl.constexpr,
        OWN_MODE: tl.constexpr,
        PER_SLOT_IDS: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,  # rows per step
        BLOCK_D: tl.constexpr,  # next power of two >= d: whole rows live in registers
        BLOCK_P: tl.constexpr,
    ):
        """Forward, row-resident (fused_edit._edit_fwd_rows_kernel with a bank): each step reads BLOCK_N rows
        once into registers; for each adapter among them (rows in order: usually one) its parameter rows run
        over the rows that are its own, one row of W / L at a time up to that adapter's rank."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        c_ok = cols < d
        cols64 = cols.to(tl.int64)
        rr = tl.arange(0, R_PAD)
        Rd = R.to(tl.int64) * d
        for it in range(0, iters):
            item = (pid + it * nprog) * BLOCK_N + tl.arange(0, BLOCK_N)
            i, t, n, a, own = _resolve(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, OWNER, item, N, T,
                                       P, A, OWN_MODE, False, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
            m = own[:, None] & c_ok[None, :]
            ptr = X + tl.where(own, i * stride_xb + t * stride_xt, 0)[:, None] + cols64[None, :] * stride_xd
            x_raw = tl.load(ptr, mask=m, other=0.0)
            if SAVE_ROWS:
                tl.store(SAVED + n[:, None] * d + cols64[None, :], x_raw, mask=(item < N)[:, None] & c_ok[None, :])
            x = x_raw.to(tl.float32)
            acc_z = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            acc_q = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            todo = own
            while _any(todo):
                a0, sel, todo = _next_run(todo, a, A)
                sl0, sp0, _c0 = _kind(KINDS, a0)
                r0 = tl.minimum(tl.load(RANKS + a0), R)
                base = a0.to(tl.int64) * Rd
                for k in range(0, r0):
                    hit = sel[:, None] & (rr[None, :] == k)
                    if HAS_WEIGHT:
                        if sl0:
                            wk = tl.load(W + base + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                            acc_z = tl.where(hit, tl.sum(x * wk[None, :], axis=1)[:, None], acc_z)
                    if MAY_SP:
                        if sp0:
                            lk = tl.load(L + base + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                            acc_q = tl.where(hit, tl.sum(x * lk[None, :], axis=1)[:, None], acc_q)
            z, delta = _delta_rows(acc_z, acc_q, a, own, rr, BIAS, PBIAS, KINDS, RANKS, R, MAY_SP, ACT,
                                   HAS_WEIGHT, HAS_PROJ_BIAS)
            y = x
            todo = own
            while _any(todo):
                a0, sel, todo = _next_run(todo, a, A)
                r0 = tl.minimum(tl.load(RANKS + a0), R)
                base = a0.to(tl.int64) * Rd
                for k in range(0, r0):
                    lk = tl.load(L + base + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                    dk = tl.sum(tl.where(sel[:, None] & (rr[None, :] == k), delta, 0.0), axis=1)
                    y += dk[:, None] * lk[None, :]
            if DROPOUT:
                p = tl.load(DROP + tl.where(own, a, 0), mask=own, other=0.0)
                y = _keep_scale_rows(y, n, cols, d, seed, p)
            tl.store(ptr, y.to(X.dtype.element_ty), mask=m)
            if SAVE_STATS:
                _store_stats(STATS, n, item, N, own, z, delta, R_PAD)

    @triton.jit
    def _mixed_fwd_kernel(
        X, stride_xb, stride_xt, stride_xd,
        POS, stride_pb, stride_pp,
        IDS, stride_ib, stride_ip,
        OWNER,
        L, W, BIAS, PBIAS,
        KINDS, RANKS, DROP,
        SAVED, STATS,
        T, P, N, d, R, A,
        seed,
        MAY_SP: tl.constexpr,
        ACT: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_PROJ_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        SAVE_ROWS: tl.constexpr,
        SAVE_STATS: tl.constexpr,
        OWN_MODE: tl.constexpr,
        PER_SLOT_IDS: tl.constexpr,
        R_PAD: tl.constexpr,  # the bank's r padded for tl.dot (>= 16)
        BLOCK_N: tl.constexpr,  # slots per program (>= 16)
        BLOCK_D: tl.constexpr,  # hidden columns per step
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Forward, tiles (fused_edit._edit_fwd_kernel with a bank): tl.dot over column blocks in two passes,
        each adapter among the block's rows in turn against the rows that are its own (the others masked)."""
        item = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        i, t, n, a, own = _resolve(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, OWNER, item, N, T, P,
                                   A, OWN_MODE, False, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
        row = tl.where(own, i * stride_xb + t * stride_xt, 0)
        rr = tl.arange(0, R_PAD)
        Rd = R.to(tl.int64) * d
        acc_z = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        acc_q = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        todo = own
        while _any(todo):  # pass 1: the projections, adapter by adapter
            a0, sel, todo = _next_run(todo, a, A)
            sl0, sp0, _c0 = _kind(KINDS, a0)
            pm_r = rr < tl.minimum(tl.load(RANKS + a0), R)
            base = a0.to(tl.int64) * Rd
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                c_ok = cols < d
                x = tl.load(X + row[:, None] + cols[None, :].to(tl.int64) * stride_xd, mask=sel[:, None] & c_ok[None, :],
                            other=0.0).to(tl.float32)
                pm = pm_r[:, None] & c_ok[None, :]
                if HAS_WEIGHT:
                    if sl0:
                        w = tl.load(W + base + rr[:, None] * d + cols[None, :], mask=pm, other=0.0).to(tl.float32)
                        acc_z = tl.dot(x, tl.trans(w), acc_z, input_precision=DOT_PRECISION)
                if MAY_SP:
                    if sp0:
                        lp = tl.load(L + base + rr[:, None] * d + cols[None, :], mask=pm, other=0.0).to(tl.float32)
                        acc_q = tl.dot(x, tl.trans(lp), acc_q, input_precision=DOT_PRECISION)
        z, delta = _delta_rows(acc_z, acc_q, a, own, rr, BIAS, PBIAS, KINDS, RANKS, R, MAY_SP, ACT,
                               HAS_WEIGHT, HAS_PROJ_BIAS)
        if SAVE_STATS:
            _store_stats(STATS, n, item, N, own, z, delta, R_PAD)
        if DROPOUT:
            p = tl.load(DROP + tl.where(own, a, 0), mask=own, other=0.0)
        for d0 in range(0, d, BLOCK_D):  # pass 2: y = h + delta L, each adapter's rows through its own L
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            m = own[:, None] & c_ok[None, :]
            ptr = X + row[:, None] + cols[None, :].to(tl.int64) * stride_xd
            x_raw = tl.load(ptr, mask=m, other=0.0)
            y = x_raw.to(tl.float32)
            todo = own
            while _any(todo):
                a0, sel, todo = _next_run(todo, a, A)
                pm_r = rr < tl.minimum(tl.load(RANKS + a0), R)
                lc = tl.load(L + a0.to(tl.int64) * Rd + rr[:, None] * d + cols[None, :], mask=pm_r[:, None] & c_ok[None, :],
                             other=0.0).to(tl.float32)
                y = tl.dot(tl.where(sel[:, None], delta, 0.0), lc, y, input_precision=DOT_PRECISION)
            if DROPOUT:
                y = _keep_scale_rows(y, n, cols, d, seed, p)
            tl.store(ptr, y.to(X.dtype.element_ty), mask=m)
            if SAVE_ROWS:
                tl.store(SAVED + n[:, None] * d + cols[None, :], x_raw, mask=(item < N)[:, None] & c_ok[None, :])

    @triton.jit
    def _store_d_delta(acc, STATS, SCRATCH, KEYS, n, a, edited, rr, KINDS, RANKS, R, ACT: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, R_PAD: tl.constexpr):
        """Backward step 1's output per edited slot: d_delta = L g', dz = d_delta * act'(z) (d_delta for a
        bias source), and the slot's adapter (the sort key of step 2)."""
        a_safe = tl.where(edited, a, 0)
        rank = tl.minimum(tl.load(RANKS + a_safe, mask=edited, other=0), R)
        sm = edited[:, None] & (rr[None, :] < rank[:, None])
        d_delta = tl.where(sm, acc, 0.0)
        if HAS_WEIGHT:
            sl, _sp, code = _kind(KINDS, a_safe)
            z = tl.load(STATS + n[:, None] * (2 * R_PAD) + rr[None, :], mask=sm, other=0.0)
            dz = tl.where(sl[:, None], d_delta * _act_grad_any(z, code[:, None], ACT), d_delta)
        else:
            dz = d_delta
        scratch = SCRATCH + n[:, None] * (2 * R_PAD) + rr[None, :]
        full = edited[:, None] & (rr < R_PAD)[None, :]
        tl.store(scratch, d_delta, mask=full)
        tl.store(scratch + R_PAD, dz, mask=full)
        tl.store(KEYS + n, a, mask=edited)

    @triton.jit
    def _mixed_bwd_project_rows_kernel(
        DY, stride_gb, stride_gt, stride_gd,  # incoming gradient [B, T, d]
        DX, stride_db, stride_dt, stride_dd,  # hidden gradient [B, T, d] (WRITE_DX: rows nobody edits)
        POS, stride_pb, stride_pp,
        IDS, stride_ib, stride_ip,
        OWNER,
        L, KINDS, RANKS, DROP,
        STATS,  # [N, 2, R_PAD] fp32 from the forward: z, delta
        SCRATCH,  # [N, 2, R_PAD] fp32 out: d_delta, dz
        KEYS,  # [N] int32 out: each edited slot's adapter (filled with A beforehand)
        T, P, N, d, R, A, n_items,
        iters,
        seed,
        MAY_SP: tl.constexpr,
        ACT: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        DROPOUT: tl.constexpr,
        OWN_MODE: tl.constexpr,
        PER_SLOT_IDS: tl.constexpr,
        ROW_MAJOR: tl.constexpr,  # items are every row of hidden (WRITE_DX) or the N slots
        WRITE_DX: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= d
        BLOCK_P: tl.constexpr,
    ):
        """Backward step 1, row-resident: reduce each edited row's gradient to d_delta against its adapter's
        lift; copy the gradient of rows nobody edits into the hidden gradient (bit for bit)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        c_ok = cols < d
        cols64 = cols.to(tl.int64)
        rr = tl.arange(0, R_PAD)
        Rd = R.to(tl.int64) * d
        for it in range(0, iters):
            item = (pid + it * nprog) * BLOCK_N + tl.arange(0, BLOCK_N)
            i, t, n, a, edited = _resolve(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, OWNER, item,
                                          n_items, T, P, A, OWN_MODE, ROW_MAJOR, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
            if ROW_MAJOR:
                live = item < n_items
            else:
                live = edited
            g_raw = tl.load(DY + (i * stride_gb + t * stride_gt)[:, None] + cols64[None, :] * stride_gd,
                            mask=live[:, None] & c_ok[None, :], other=0.0)
            if WRITE_DX:
                pas = live & ~edited
                tl.store(DX + (i * stride_db + t * stride_dt)[:, None] + cols64[None, :] * stride_dd, g_raw,
                         mask=pas[:, None] & c_ok[None, :])
            g = tl.where(edited[:, None], g_raw.to(tl.float32), 0.0)
            if DROPOUT:
                p = tl.load(DROP + tl.where(edited, a, 0), mask=edited, other=0.0)
                g = _keep_scale_rows(g, n, cols, d, seed, p)
            acc = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            todo = edited
            while _any(todo):
                a0, sel, todo = _next_run(todo, a, A)
                r0 = tl.minimum(tl.load(RANKS + a0), R)
                base = a0.to(tl.int64) * Rd
                for k in range(0, r0):
                    lk = tl.load(L + base + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                    acc = tl.where(sel[:, None] & (rr[None, :] == k), tl.sum(g * lk[None, :], axis=1)[:, None], acc)
            _store_d_delta(acc, STATS, SCRATCH, KEYS, n, a, edited, rr, KINDS, RANKS, R, ACT, HAS_WEIGHT,
                           R_PAD)

    @triton.jit
    def _mixed_bwd_project_kernel(
        DY, stride_gb, stride_gt, stride_gd,
        DX, stride_db, stride_dt, stride_dd,
        POS, stride_pb, stride_pp,
        IDS, stride_ib, stride_ip,
        OWNER,
        L, KINDS, RANKS, DROP,
        STATS, SCRATCH, KEYS,
        T, P, N, d, R, A, n_items,
        seed,
        MAY_SP: tl.constexpr,
        ACT: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        DROPOUT: tl.constexpr,
        OWN_MODE: tl.constexpr,
        PER_SLOT_IDS: tl.constexpr,
        ROW_MAJOR: tl.constexpr,
        WRITE_DX: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Backward step 1, tiles: the same over column blocks with tl.dot, adapter by adapter."""
        item = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        i, t, n, a, edited = _resolve(POS, stride_pb, stride_pp, IDS, stride_ib, stride_ip, RANKS, OWNER, item,
                                      n_items, T, P, A, OWN_MODE, ROW_MAJOR, PER_SLOT_IDS, BLOCK_N, BLOCK_P)
        if ROW_MAJOR:
            live = item < n_items
        else:
            live = edited
        rr = tl.arange(0, R_PAD)
        Rd = R.to(tl.int64) * d
        grow = i * stride_gb + t * stride_gt
        if DROPOUT:
            p = tl.load(DROP + tl.where(edited, a, 0), mask=edited, other=0.0)
        acc = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            g_raw = tl.load(DY + grow[:, None] + cols[None, :].to(tl.int64) * stride_gd, mask=live[:, None] & c_ok[None, :],
                            other=0.0)
            if WRITE_DX:
                pas = live & ~edited
                tl.store(DX + (i * stride_db + t * stride_dt)[:, None] + cols[None, :].to(tl.int64) * stride_dd, g_raw,
                         mask=pas[:, None] & c_ok[None, :])
            g = tl.where(edited[:, None], g_raw.to(tl.float32), 0.0)
            if DROPOUT:
                g = _keep_scale_rows(g, n, cols, d, seed, p)
            todo = edited
            while _any(todo):
                a0, sel, todo = _next_run(todo, a, A)
                pm_r = rr < tl.minimum(tl.load(RANKS + a0), R)
                lc = tl.load(L + a0.to(tl.int64) * Rd + rr[:, None] * d + cols[None, :], mask=pm_r[:, None] & c_ok[None, :],
                             other=0.0).to(tl.float32)
                acc = tl.dot(tl.where(sel[:, None], g, 0.0), tl.trans(lc), acc, input_precision=DOT_PRECISION)
        _store_d_delta(acc, STATS, SCRATCH, KEYS, n, a, edited, rr, KINDS, RANKS, R, ACT, HAS_WEIGHT,
                       R_PAD)

    @triton.jit
    def _mixed_bwd_main_kernel(
        DY, stride_gb, stride_gt, stride_gd,  # incoming gradient [B, T, d]
        DX, stride_db, stride_dt, stride_dd,  # hidden gradient [B, T, d] (WRITE_DX: the edited rows)
        U, stride_ub, stride_ut, stride_ud,  # saved rows [N, d] (stride_ub = d per slot) or, RECOMPUTE, the output
        POS, stride_pb, stride_pp,
        L, W, KINDS, RANKS, DROP,
        STATS, SCRATCH,
        ORDER,  # [N] int32: the slots sorted by adapter (edited ones first, by adapter; stable)
        SORTED_KEYS,  # [N] int32: their adapters (A for slots that edit nothing)
        OFFSETS,  # [A + 1] int32: adapter a's slots are ORDER[OFFSETS[a] : OFFSETS[a + 1]]
        G_L, G_W, G_B, G_PB,  # the bank's gradients, fp32: [A, R, d], [A, R, d], [A, R], [A, R]
        PART,  # [n_chunks, 2, M] fp32: the pieces of adapters cut by a chunk boundary
        T, P, d, R, A, M, chunk,  # chunk: sorted slots per chunk
        seed,
        MAY_SP: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_PROJ_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        RECOMPUTE: tl.constexpr,  # rebuild the original rows as y - delta L from the output
        WRITE_DX: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Backward step 2. Program (chunk c, column block) walks sorted slots [c * chunk, (c + 1) * chunk), one
        adapter's run at a time: writes the hidden gradient of those rows in its column block and sums the
        run's parameter gradients in registers, then writes them to the adapter (its rows all in this chunk)
        or to PART[c, 0] (the adapter began in an earlier chunk) or PART[c, 1] (it goes on in a later one)."""
        c = tl.program_id(0)
        cblk = tl.program_id(1)
        cols = cblk * BLOCK_D + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        cols64 = cols.to(tl.int64)
        rr = tl.arange(0, R_PAD)
        Rd = R.to(tl.int64) * d
        E = tl.load(OFFSETS + A)
        lo = c * chunk
        hi = tl.minimum(lo + chunk, E)
        pos = lo
        while pos < hi:
            a0 = tl.load(SORTED_KEYS + pos)
            start = tl.load(OFFSETS + a0)
            end = tl.load(OFFSETS + a0 + 1)
            run_end = tl.minimum(hi, end)
            sl0, sp0, _c0 = _kind(KINDS, a0)
            r_ok = rr < tl.minimum(tl.load(RANKS + a0), R)
            pm = r_ok[:, None] & c_ok[None, :]
            base = a0.to(tl.int64) * Rd
            lc = tl.load(L + base + rr[:, None] * d + cols[None, :], mask=pm, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                # (the mask compared to 0, not `pm & sl0`: Triton 3.9's interpreter types the scalar comparison
                # sl0 as int32, and an int32 mask is refused by tl.load)
                wc = tl.load(W + base + rr[:, None] * d + cols[None, :], mask=(pm & sl0) != 0,
                             other=0.0).to(tl.float32)
            if DROPOUT:
                p0 = tl.load(DROP + a0)
            acc_l = tl.zeros((R_PAD, BLOCK_D), tl.float32)
            acc_w = tl.zeros((R_PAD, BLOCK_D), tl.float32)
            acc_b = tl.zeros((R_PAD,), tl.float32)
            acc_pb = tl.zeros((R_PAD,), tl.float32)
            for j0 in range(pos, run_end, BLOCK_N):
                idx = j0 + tl.arange(0, BLOCK_N)
                on = idx < run_end
                n = tl.load(ORDER + idx, mask=on, other=0).to(tl.int64)
                i = n // P
                t = tl.load(POS + i * stride_pb + (n % P) * stride_pp, mask=on, other=0).to(tl.int64)
                em = on[:, None] & c_ok[None, :]
                g = tl.load(DY + (i * stride_gb + t * stride_gt)[:, None] + cols64[None, :] * stride_gd, mask=em,
                            other=0.0).to(tl.float32)
                if DROPOUT:
                    g = _keep_scale_rows(g, n, cols, d, seed, tl.where(on, p0, 0.0))
                delta, d_delta, dz, delta_t, d_delta_t, dz_t = _fe._slot_stats(STATS, SCRATCH, n, on, r_ok, R_PAD)
                if RECOMPUTE:
                    y = tl.load(U + (i * stride_ub + t * stride_ut)[:, None] + cols64[None, :] * stride_ud, mask=em,
                                other=0.0)
                    u = tl.dot(-delta, lc, y.to(tl.float32), input_precision=DOT_PRECISION)
                else:
                    u = tl.load(U + n[:, None] * stride_ub + cols64[None, :] * stride_ud, mask=em, other=0.0).to(tl.float32)
                if WRITE_DX:
                    dx = g
                    if MAY_SP:
                        if sp0:
                            dx = tl.dot(-d_delta, lc, dx, input_precision=DOT_PRECISION)
                    if HAS_WEIGHT:
                        if sl0:
                            dx = tl.dot(dz, wc, dx, input_precision=DOT_PRECISION)
                    tl.store(DX + (i * stride_db + t * stride_dt)[:, None] + cols64[None, :] * stride_dd,
                             dx.to(DX.dtype.element_ty), mask=em)
                acc_l = tl.dot(delta_t, g, acc_l, input_precision=DOT_PRECISION)
                if MAY_SP:
                    if sp0:
                        acc_l = tl.dot(-d_delta_t, u, acc_l, input_precision=DOT_PRECISION)
                if HAS_WEIGHT:
                    if sl0:
                        acc_w = tl.dot(dz_t, u, acc_w, input_precision=DOT_PRECISION)
                acc_b += tl.sum(dz, axis=0)
                acc_pb -= tl.sum(tl.where(sp0, d_delta, 0.0), axis=0)
            # the run's sums: the adapter's gradient, or a piece of it
            first_cblk = cblk == 0
            mat = rr[:, None] * d + cols[None, :]
            full = (rr < R)[:, None] & c_ok[None, :]
            if start < lo:
                piece = PART + (c.to(tl.int64) * 2) * M.to(tl.int64)
                _store_grads(piece, piece + Rd, piece + 2 * Rd, piece + 2 * Rd + R, mat, full, rr, R, first_cblk,
                             acc_l, acc_w, acc_b, acc_pb, HAS_WEIGHT, HAS_PROJ_BIAS)
            elif end > lo + chunk:
                piece = PART + (c.to(tl.int64) * 2 + 1) * M.to(tl.int64)
                _store_grads(piece, piece + Rd, piece + 2 * Rd, piece + 2 * Rd + R, mat, full, rr, R, first_cblk,
                             acc_l, acc_w, acc_b, acc_pb, HAS_WEIGHT, HAS_PROJ_BIAS)
            else:
                ab = a0.to(tl.int64)
                _store_grads(G_L + ab * Rd, G_W + ab * Rd, G_B + ab * R, G_PB + ab * R, mat, full, rr, R, first_cblk,
                             acc_l, acc_w, acc_b, acc_pb, HAS_WEIGHT, HAS_PROJ_BIAS)
            pos = run_end

    @triton.jit
    def _store_grads(GL, GW, GB, GPB, mat, full, rr, R, first_cblk, acc_l, acc_w, acc_b, acc_pb,
                     HAS_WEIGHT: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr):
        """One adapter's (or piece's) gradients of one column block: lift and weight rows [R, BLOCK_D] (zero
        beyond its rank), and, from column block 0, the bias sums."""
        tl.store(GL + mat, acc_l, mask=full)
        if HAS_WEIGHT:
            tl.store(GW + mat, acc_w, mask=full)
        # A branch on the scalar, not a mask `(rr < R) & first_cblk`: Triton 3.9's interpreter types the scalar
        # comparison first_cblk as int32, and that mask reaches tl.store as int32 ("mask has unsupported dtype").
        if first_cblk:
            tl.store(GB + rr, acc_b, mask=rr < R)
            if HAS_PROJ_BIAS:
                tl.store(GPB + rr, acc_pb, mask=rr < R)

    @triton.jit
    def _mixed_bwd_fixup_kernel(
        OFFSETS,  # [A + 1] int32
        G_L, G_W, G_B, G_PB,  # the bank's gradients
        PART,  # [n_chunks, 2, M]
        d, R, A, M, chunk,
        HAS_WEIGHT: tl.constexpr,
        HAS_PROJ_BIAS: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Backward step 3, program (adapter, column block): an adapter no row used gets zero gradients; one
        whose sorted slots span chunks c0 < c1 gets PART[c0, 1] + PART[c0 + 1, 0] + ... + PART[c1, 0], added
        in that order (deterministic); the others step 2 wrote already."""
        a = tl.program_id(0)
        cblk = tl.program_id(1)
        start = tl.load(OFFSETS + a)
        end = tl.load(OFFSETS + a + 1)
        c0 = start // chunk
        c1 = (end - 1) // chunk
        if (end == start) | (c1 > c0):
            cols = cblk * BLOCK_D + tl.arange(0, BLOCK_D)
            rr = tl.arange(0, R_PAD)
            Rd = R.to(tl.int64) * d
            mat = rr[:, None] * d + cols[None, :]
            full = (rr < R)[:, None] & (cols < d)[None, :]
            acc_l = tl.zeros((R_PAD, BLOCK_D), tl.float32)
            acc_w = tl.zeros((R_PAD, BLOCK_D), tl.float32)
            acc_b = tl.zeros((R_PAD,), tl.float32)
            acc_pb = tl.zeros((R_PAD,), tl.float32)
            if end > start:
                M64 = M.to(tl.int64)
                for c in range(c0, c1 + 1):
                    piece = PART + (c * 2 + tl.where(c == c0, 1, 0)) * M64
                    acc_l += tl.load(piece + mat, mask=full, other=0.0)
                    if HAS_WEIGHT:
                        acc_w += tl.load(piece + Rd + mat, mask=full, other=0.0)
                    acc_b += tl.load(piece + 2 * Rd + rr, mask=rr < R, other=0.0)
                    if HAS_PROJ_BIAS:
                        acc_pb += tl.load(piece + 2 * Rd + R + rr, mask=rr < R, other=0.0)
            ab = a.to(tl.int64)
            _store_grads(G_L + ab * Rd, G_W + ab * Rd, G_B + ab * R, G_PB + ab * R, mat, full, rr, R, cblk == 0,
                         acc_l, acc_w, acc_b, acc_pb, HAS_WEIGHT, HAS_PROJ_BIAS)


# ------------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ------------------------------------------------------------------------------------------------

# The row-resident kernels keep whole rows in registers beside each row's adapter state: up to d = 8192 they
# compile for sm_90 without register spills; at 16384 they spill with any warp count tried (8, 16, 32), so
# the tile kernels take over there (the single-adapter op's limit is 16384).
ROWS_MAX_D = 8192


@dataclass(frozen=True)
class LaunchConfig(_fe.LaunchConfig):
    """fused_edit.LaunchConfig, plus the backward step 1's own tiles (0: step 2's, bwd_block_d / bwd_warps)."""

    step1_block_d: int = 0
    step1_warps: int = 0


@functools.lru_cache(maxsize=4096)
def gpu_launch_config(d: int, r: int, P: int) -> LaunchConfig:
    """Blocks for a GPU: the single-adapter op's (fused_edit.gpu_launch_config), with the tiles shrunk to what
    compiles for sm_90 without register spills (ptxas -v, tests/compile_sm90.py; the mixed kernels carry each
    row's adapter, rank and type, and the tiles the single-adapter op takes spill here: its forward tiles
    64 x 128 by 160-2832 bytes, its backward step 2 at 16 x 256 by 3-8 KB). Swept at d = 4096, fp32 and bf16,
    the generic variant (types and activation per adapter, dropout): forward tiles 32 x 64 (16 x 64 from
    r_pad = 64), 8 warps; backward step 1 (tiles) 16 x 256 (16 x 64 from r_pad = 64), 4 warps; step 2 column
    blocks of 64 / 32 / 16 for r_pad 16 / 32 / 64, 8 warps.

    The register allocation differs between Triton releases: under Triton 3.9 (what pip gives today) the
    backward step 1's generic variant spills 220-568 bytes at 16 x 256 / 4 warps (and 340 at 16 x 64 for
    r_pad = 64), and the row-resident step 1 at d = 8192 spills 24-32 bytes at 8 warps, none of which spill
    under 3.6. Swept again under 3.9 (block_d 32-256 x 4 / 8 warps): step 1 takes 16 x 128 with 8 warps
    (16 x 64, 8 warps from r_pad = 64) and the row-resident kernels 16 warps from d = 8192, spill-free
    there; the 3.6 choices spill under 3.9 and the reverse. So the tiles follow the installed release
    (3.7 and 3.8, never compiled here, take 3.9's). Not timed: the GPU figures are owed
    (bench/bench_adapters.py produces them on a GPU)."""
    base = _fe.gpu_launch_config(d, r, P)
    rp = r_pad(r)
    dp = _next_pow2(d)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields.update(
        rows=base.rows and dp <= ROWS_MAX_D, rows_warps=8 if dp >= 1024 else 4,
        fwd_block_n=32 if rp <= 32 else 16, fwd_block_d=max(16, min(64, dp)), fwd_warps=8, fwd_stages=3,
        bwd_block_n=16, bwd_block_d=max(16, min(64 * 16 // rp, dp)), bwd_warps=8, bwd_stages=3,
        step1_block_d=max(16, min(256 if rp <= 32 else 64, dp)), step1_warps=4)
    if _NEWER_PTXAS_TILES:
        fields.update(rows_warps=16 if dp >= 8192 else fields["rows_warps"],
                      step1_block_d=max(16, min(128 if rp <= 32 else 64, dp)), step1_warps=8)
    return LaunchConfig(**fields)


def _triton_release() -> tuple[int, int]:
    if not _backend.HAS_TRITON:
        return (0, 0)
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return major, minor


# Which tile table gpu_launch_config takes (its docstring says why the Triton release matters).
_NEWER_PTXAS_TILES = _triton_release() >= (3, 7)


def launch_config(hidden: torch.Tensor, r: int, P: int) -> _fe.LaunchConfig:
    """Default blocks for hidden's device (the CPU interpreter's are the single-adapter op's)."""
    if hidden.is_cuda:
        return gpu_launch_config(hidden.shape[-1], r, P)
    return _fe._cpu_launch_config(hidden.shape[-1], r, P)



@dataclass(frozen=True)
class _Call:
    """One call's geometry in the batched form: hidden [B, T, d] strides, positions [B, P], ids strides."""

    B: int
    T: int
    P: int
    d: int
    hs: tuple
    ps: tuple
    ids: tuple
    per_slot_ids: bool
    flat: bool

    @property
    def N(self):
        return self.B * self.P


def _geometry(x: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor) -> _Call:
    if x.dim() == 2:  # flat: [1, n_tokens, d], rows [1, N], ids [1, N]
        return _Call(1, x.shape[0], positions.shape[0], x.shape[1], (0, x.stride(0), x.stride(1)),
                     (0, positions.stride(0)), (0, adapter_ids.stride(0)), True, True)
    per_slot = adapter_ids.dim() == 2
    return _Call(x.shape[0], x.shape[1], positions.shape[1], x.shape[2], x.stride(), positions.stride(),
                 adapter_ids.stride() if per_slot else (adapter_ids.stride(0), 0), per_slot, False)


def _bank_args(lift, weight, bias, proj_bias):
    """Contiguous bank tensors, with placeholder pointers for the absent ones."""
    lift = lift.contiguous()
    bias = bias.contiguous()
    return lift, (weight.contiguous() if weight is not None else lift), bias, (
        proj_bias.contiguous() if proj_bias is not None else bias)


def _claim(g: _Call, positions, adapter_ids, ranks, A) -> torch.Tensor:
    """owner [n_tokens] int32: the smallest non-empty slot naming each row (N where none does); two launches."""
    owner = torch.full((g.T,), g.N, dtype=torch.int32, device=positions.device)
    if g.N > 0:
        block = 1024
        _claim_rows_kernel[(_cdiv(g.N, block),)](positions, g.ps[1], adapter_ids, g.ids[1], ranks, owner, g.N, g.T, A,
                                                  BLOCK=block)
    return owner


def _own_mode(g: _Call, rows_unique: bool) -> int:
    return 0 if not g.flat else (1 if rows_unique else 2)


def mixed_fwd_triton(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, act: int,
                     may_subtract: bool, apply_dropout: bool, seed: int, save: int, rows_unique: bool,
                     config: Optional[_fe.LaunchConfig] = None):
    """Runs the forward (one launch; the flat layout without rows_unique adds a fill and a claim kernel).
    save: 0 nothing, 1 per-slot stats, 2 stats and the original rows. Returns (saved rows [N, d] or None,
    stats [N, 2, R_PAD] fp32 or None)."""
    g = _geometry(hidden, positions, adapter_ids)
    A, R, d = lift.shape
    rp = r_pad(R)
    N = g.N
    saved = torch.empty((N, d), dtype=hidden.dtype, device=hidden.device) if save >= 2 else None
    stats = torch.empty((N, 2, rp), dtype=torch.float32, device=hidden.device) if save >= 1 else None
    if N == 0 or d == 0:
        return saved, stats
    mode = _own_mode(g, rows_unique)
    kinds, ranks, dropout = kinds.contiguous(), ranks.contiguous(), dropout.contiguous()  # (indexed by adapter)
    owner = _claim(g, positions, adapter_ids, ranks, A) if mode == 2 else kinds
    L, W, b, pb = _bank_args(lift, weight, bias, proj_bias)
    cfg = config or launch_config(hidden, R, g.P)
    flags = dict(MAY_SP=may_subtract, ACT=act, HAS_WEIGHT=weight is not None, HAS_PROJ_BIAS=proj_bias is not None,
                 DROPOUT=apply_dropout, SAVE_ROWS=save >= 2, SAVE_STATS=save >= 1, OWN_MODE=mode,
                 PER_SLOT_IDS=g.per_slot_ids, R_PAD=rp, BLOCK_P=cfg.block_p)
    args = (hidden, *g.hs, positions, *g.ps, adapter_ids, *g.ids, owner, L, W, b, pb, kinds, ranks, dropout,
            saved if saved is not None else hidden, stats if stats is not None else dropout)
    if _fe._use_rows(cfg, N, hidden.device):
        block_n, programs, iters = _fe._persistent_grid(N, cfg.rows_block_n, cfg.rows_per_sm, hidden.device)
        _mixed_fwd_rows_kernel[(programs,)](*args, g.T, g.P, N, d, R, A, iters, seed, BLOCK_N=block_n,
                                            BLOCK_D=_next_pow2(d), num_warps=cfg.rows_warps, **flags)
    else:
        _mixed_fwd_kernel[(_cdiv(N, cfg.fwd_block_n),)](
            *args, g.T, g.P, N, d, R, A, seed, BLOCK_N=cfg.fwd_block_n, BLOCK_D=cfg.fwd_block_d,
            DOT_PRECISION=_fe._dot_precision(hidden), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **flags)
    return saved, stats


def mixed_bwd_triton(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_proj_bias: bool, kinds,
                     ranks, dropout, act: int, may_subtract: bool, apply_dropout: bool, seed: int,
                     need_grad_hidden: bool, config: Optional[_fe.LaunchConfig] = None):
    """Runs the backward: (the flat layout's claim,) step 1, the sort of the edited slots by adapter (torch.sort
    and searchsorted on the device), step 2 and the fix-up. rows: the saved rows [N, d], or None with output =
    the op's output (recompute). Returns (hidden gradient or None, then the bank's fp32 gradients: lift
    [A, R, d], weight [A, R, d] or None, bias [A, R], proj_bias [A, R] or None)."""
    g = _geometry(grad_out, positions, adapter_ids)
    A, R, d = lift.shape
    rp = r_pad(R)
    N = g.N
    dev = grad_out.device
    f32 = dict(dtype=torch.float32, device=dev)
    grad_hidden = torch.empty_like(grad_out, memory_format=torch.contiguous_format) if need_grad_hidden else None
    gl = torch.empty((A, R, d), **f32)
    gw = torch.empty((A, R, d), **f32) if weight is not None else None
    gb = torch.empty((A, R), **f32)
    gpb = torch.empty((A, R), **f32) if has_proj_bias else None
    if N == 0 or g.B * g.T == 0 or d == 0:
        if need_grad_hidden:
            grad_hidden.copy_(grad_out)
        for t in (gl, gw, gb, gpb):
            if t is not None:
                t.zero_()
        return grad_hidden, gl, gw, gb, gpb
    cfg = config or launch_config(grad_out, R, g.P)
    mode = 2 if g.flat else 0
    kinds, ranks, dropout = kinds.contiguous(), ranks.contiguous(), dropout.contiguous()  # (indexed by adapter)
    stats = stats.contiguous()  # [N, 2, R_PAD], indexed by slot
    owner = _claim(g, positions, adapter_ids, ranks, A) if mode == 2 else kinds
    L = lift.contiguous()
    W = weight.contiguous() if weight is not None else L
    row_major = need_grad_hidden
    n_items = g.B * g.T if row_major else N
    scratch = torch.empty((N, 2, rp), **f32)
    keys = torch.full((N,), A, dtype=torch.int32, device=dev)
    dx = grad_hidden if need_grad_hidden else grad_out
    dxs = dx.stride() if dx.dim() == 3 else (0, *dx.stride())
    common = (grad_out, *g.hs, dx, *dxs, positions, *g.ps, adapter_ids, *g.ids, owner, L, kinds, ranks, dropout, stats,
              scratch, keys, g.T, g.P, N, d, R, A, n_items)
    flags = dict(MAY_SP=may_subtract, ACT=act, HAS_WEIGHT=weight is not None, DROPOUT=apply_dropout, OWN_MODE=mode,
                 PER_SLOT_IDS=g.per_slot_ids, ROW_MAJOR=row_major, WRITE_DX=need_grad_hidden, R_PAD=rp,
                 BLOCK_P=cfg.block_p)
    if _fe._use_rows(cfg, N, dev):
        block_n, programs, iters = _fe._persistent_grid(n_items, cfg.rows_block_n, cfg.rows_per_sm, dev)
        _mixed_bwd_project_rows_kernel[(programs,)](*common, iters, seed, BLOCK_N=block_n, BLOCK_D=_next_pow2(d),
                                                    num_warps=cfg.rows_warps, **flags)
    else:
        _mixed_bwd_project_kernel[(_cdiv(n_items, cfg.bwd_block_n),)](
            *common, seed, BLOCK_N=cfg.bwd_block_n, BLOCK_D=getattr(cfg, "step1_block_d", 0) or cfg.bwd_block_d,
            DOT_PRECISION=_fe._dot_precision(grad_out), num_warps=getattr(cfg, "step1_warps", 0) or cfg.bwd_warps,
            num_stages=cfg.bwd_stages, **flags)
    # the edited slots by adapter (stable: slot order within an adapter), no host sync
    sorted_keys, order = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(A + 1, dtype=torch.int32, device=dev), out_int32=True)
    n_cblk = _cdiv(d, cfg.bwd_block_d)
    target = cfg.bwd_programs or 4 * _sms(dev)
    chunk = max(cfg.bwd_block_n, _cdiv(N, max(1, _cdiv(target, n_cblk))))
    n_chunks = _cdiv(N, chunk)
    M = 2 * R * d + 2 * R
    part = torch.empty((n_chunks, 2, M), **f32)
    recompute = rows is None
    u = output if recompute else rows
    if recompute:
        u_strides = u.stride() if u.dim() == 3 else (0, *u.stride())
    else:
        u_strides = (u.stride(0), 0, u.stride(1))  # the saved rows [N, d], read through their strides
    gw_ptr, gpb_ptr = (gw if gw is not None else gl), (gpb if gpb is not None else gb)
    _mixed_bwd_main_kernel[(n_chunks, n_cblk)](
        grad_out, *g.hs, dx, *dxs, u, *u_strides, positions, *g.ps, L, W, kinds, ranks, dropout, stats, scratch,
        order, sorted_keys, offsets, gl, gw_ptr, gb, gpb_ptr, part, g.T, g.P, d, R, A, M, chunk, seed,
        MAY_SP=may_subtract, HAS_WEIGHT=weight is not None, HAS_PROJ_BIAS=has_proj_bias, DROPOUT=apply_dropout,
        RECOMPUTE=recompute, WRITE_DX=need_grad_hidden, R_PAD=rp, BLOCK_N=cfg.bwd_block_n, BLOCK_D=cfg.bwd_block_d,
        DOT_PRECISION=_fe._dot_precision(grad_out), num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    _mixed_bwd_fixup_kernel[(A, n_cblk)](offsets, gl, gw_ptr, gb, gpb_ptr, part, d, R, A, M, chunk,
                                         HAS_WEIGHT=weight is not None, HAS_PROJ_BIAS=has_proj_bias, R_PAD=rp,
                                         BLOCK_D=cfg.bwd_block_d, num_warps=cfg.bwd_warps)
    return grad_hidden, gl, gw, gb, gpb


# ------------------------------------------------------------------------------------------------
# Registered ops: torch.compile sees them as opaque calls with known mutation and output shapes. The C++
# ops (csrc/mixed_cpu.cpp) have the same schemas. act and may_subtract are hints the public functions take
# from the bank's host metadata (the shared activation code or -1; whether any adapter subtracts): the
# kernels compile them in, so they must agree with kinds (the C++ ops check that; a wrong hint on a GPU gives
# wrong numbers, never an access outside the tensors).
# ------------------------------------------------------------------------------------------------


def _check_op_inputs(x, x_name, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, act,
                     real: bool) -> int:
    """The registered Triton ops' own checks, in the public functions' words (validation.py): shapes, dtypes,
    devices, the act hint; values are not read (no host sync; the kernels treat out-of-range positions, rows
    and ids as empty slots and clamp ranks to the bank's r). real: a call with data (not a fake), where
    hidden's internal overlap can be checked. Returns N (the slots)."""
    _v._need_tensor(x, x_name)
    if x.dim() not in (2, 3):
        raise ValueError(f"{x_name} must be [B, T, d] (batched) or [n_tokens, d] (flat), got shape {tuple(x.shape)}")
    _v._need_kernel_float(x, x_name)
    _v.check_triton_device(x, x_name)
    if real and x_name == "hidden":
        _v._check_no_internal_overlap(x)
    flat = x.dim() == 2
    pos_name = "rows (positions)" if flat else "positions"
    for name, t in ((pos_name, positions), ("adapter_ids", adapter_ids)):
        _v._need_tensor(t, name)
        if t.dtype not in _v.INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        _v._need_on(t, name, x, x_name)
    if flat:
        if positions.dim() != 1:
            raise ValueError(f"with {x_name} [n_tokens, d] (the flat layout) the rows (positions) must be [N], got "
                             f"shape {tuple(positions.shape)}")
        if tuple(adapter_ids.shape) != tuple(positions.shape):
            raise ValueError(f"adapter_ids must be [N] = {list(positions.shape)} (one per row), got shape "
                             f"{tuple(adapter_ids.shape)}")
        N = positions.shape[0]
    else:
        B = x.shape[0]
        _v._check_positions_shape(positions, B, x_name)
        if tuple(adapter_ids.shape) not in ((B,), tuple(positions.shape)):
            raise ValueError(f"adapter_ids must be [B] = [{B}] (one per batch row) or [B, P] = {list(positions.shape)} "
                             f"(one per slot), got shape {tuple(adapter_ids.shape)}")
        N = B * positions.shape[1]
    _v.check_bank(lift, weight, bias, proj_bias, kinds, ranks, dropout, x, dtypes=_v.KERNEL_DTYPES)
    if not -1 <= act <= 7:
        raise ValueError(f"act must be -1 (each adapter's own, from kinds) or a fused activation code in [0, 7], "
                         f"got {act}")
    return N


@torch.library.custom_op("reft_kernels::mixed_fwd", mutates_args={"hidden"})
def mixed_fwd_op(hidden: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor, lift: torch.Tensor,
                 weight: Optional[torch.Tensor], bias: torch.Tensor, proj_bias: Optional[torch.Tensor],
                 kinds: torch.Tensor, ranks: torch.Tensor, dropout: torch.Tensor, act: int, may_subtract: bool,
                 apply_dropout: bool, seed: int, save: int, rows_unique: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused mixed forward: edits hidden in place; returns (saved rows, per-slot stats) for the backward. Validates
    its arguments; whatever shares memory with hidden (positions, ids, a bank tensor) is read from a copy."""
    _check_op_inputs(hidden, "hidden", positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, act,
                     real=True)
    _v.check_save(save)
    positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout = _v.own_copies(
        hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout)
    saved, stats = mixed_fwd_triton(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks,
                                    dropout, act, may_subtract, apply_dropout, seed, save, rows_unique)
    return (saved if saved is not None else hidden.new_empty((0,)),
            stats if stats is not None else hidden.new_empty((0,), dtype=torch.float32))


@mixed_fwd_op.register_fake
def _(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, act, may_subtract,
      apply_dropout, seed, save, rows_unique):
    N = _check_op_inputs(hidden, "hidden", positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout,
                         act, real=False)
    _v.check_save(save)
    saved = hidden.new_empty((N, hidden.shape[-1]) if save >= 2 else (0,))
    stats = hidden.new_empty((N, 2, r_pad(lift.shape[1])) if save >= 1 else (0,), dtype=torch.float32)
    return saved, stats


@torch.library.custom_op("reft_kernels::mixed_bwd", mutates_args=())
def mixed_bwd_op(grad_out: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor,
                 rows: Optional[torch.Tensor], output: Optional[torch.Tensor], stats: torch.Tensor, lift: torch.Tensor,
                 weight: Optional[torch.Tensor], has_proj_bias: bool, kinds: torch.Tensor, ranks: torch.Tensor,
                 dropout: torch.Tensor, act: int, may_subtract: bool, apply_dropout: bool, seed: int,
                 need_grad_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused mixed backward: (hidden gradient or empty, then the bank's fp32 gradients: lift, weight or empty,
    bias, proj_bias or empty). Validates its arguments, the saved tensors included (their shapes index memory by
    slot)."""
    _check_bwd_op(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, kinds, ranks, dropout, act)
    out = mixed_bwd_triton(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_proj_bias, kinds,
                           ranks, dropout, act, may_subtract, apply_dropout, seed, need_grad_hidden)
    empty = grad_out.new_empty((0,), dtype=torch.float32)
    return (out[0] if out[0] is not None else grad_out.new_empty((0,)),
            *(t if t is not None else empty for t in out[1:]))


def _check_bwd_op(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, kinds, ranks, dropout, act):
    N = _check_op_inputs(grad_out, "grad_out", positions, adapter_ids, lift, weight, None, None, kinds, ranks, dropout,
                         act, real=False)
    _v.check_op_saved(rows, output, stats, grad_out, N, r_pad(lift.shape[1]), op="mixed")


@mixed_bwd_op.register_fake
def _(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_proj_bias, kinds, ranks, dropout, act,
      may_subtract, apply_dropout, seed, need_grad_hidden):
    _check_bwd_op(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, kinds, ranks, dropout, act)
    A, R, d = lift.shape
    f = dict(dtype=torch.float32)
    return (grad_out.new_empty(grad_out.shape if need_grad_hidden else (0,)), grad_out.new_empty((A, R, d), **f),
            grad_out.new_empty((A, R, d) if weight is not None else (0,), **f), grad_out.new_empty((A, R), **f),
            grad_out.new_empty((A, R) if has_proj_bias else (0,), **f))


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


def _fwd(impl, hidden, positions, adapter_ids, bank_args, hints, apply_dropout, seed, save, rows_unique):
    """Forward through a registered op (C++ always; Triton while torch.compile traces), or straight to the
    Triton launcher in eager calls (the dispatcher round trip of a Python custom op costs tens of
    microseconds: see fused_edit._fwd). Returns (saved rows or None, stats or None)."""
    compiling = torch.compiler.is_compiling()
    if impl == "cpp" or compiling:
        op = torch.ops.reft_kernels_cpp.mixed_fwd if impl == "cpp" else torch.ops.reft_kernels.mixed_fwd
        saved, stats = op.default(hidden, positions, adapter_ids, *bank_args, *hints, apply_dropout, seed, save,
                                  rows_unique)
        if impl == "cpp" and not compiling:
            torch.autograd.graph.increment_version(hidden)  # C++ ops without an autograd kernel do not bump it
        return (saved if save >= 2 else None), (stats if save >= 1 else None)
    out = mixed_fwd_triton(hidden, positions, adapter_ids, *bank_args, *hints, apply_dropout, seed, save, rows_unique)
    torch.autograd.graph.increment_version(hidden)  # what the registered op's declared mutation records
    return out


def _bwd(impl, grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_pb, meta, hints,
         apply_dropout, seed, need_dx):
    if impl == "cpp" or torch.compiler.is_compiling():
        op = torch.ops.reft_kernels_cpp.mixed_bwd if impl == "cpp" else torch.ops.reft_kernels.mixed_bwd
        out = op.default(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_pb, *meta, *hints,
                         apply_dropout, seed, need_dx)
        return tuple(t if want else None for t, want in zip(out, (need_dx, True, weight is not None, True, has_pb)))
    return mixed_bwd_triton(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_pb, *meta, *hints,
                            apply_dropout, seed, need_dx)


def _cast(grad, like, wanted):
    if not wanted or grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


class MixedEditFunction(torch.autograd.Function):
    """Autograd for the in-place mixed edit (fused_edit.EditFunction's pattern: the registered ops mutate
    hidden, so the formula lives here, with ctx.mark_dirty; Dynamo traces it)."""

    @staticmethod
    def forward(ctx, hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, act,
                may_subtract, apply_dropout, seed, recompute, rows_unique, impl):
        recompute = recompute and not apply_dropout
        hints = (act, may_subtract)
        rows, stats = _fwd(impl, hidden, positions, adapter_ids,
                           (lift, weight, bias, proj_bias, kinds, ranks, dropout), hints, apply_dropout, seed,
                           1 if recompute else 2, rows_unique)
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(positions, adapter_ids, None if recompute else rows, stats, lift, weight, bias,
                              proj_bias, kinds, ranks, dropout, hidden if recompute else None)
        ctx.hints, ctx.apply_dropout, ctx.seed, ctx.impl = hints, apply_dropout, seed, impl
        return hidden

    @staticmethod
    def backward(ctx, grad_out):
        positions, ids, rows, stats, lift, weight, bias, proj_bias, kinds, ranks, dropout, output = ctx.saved_tensors
        need = ctx.needs_input_grad
        gh, gl, gw, gb, gpb = _bwd(ctx.impl, grad_out, positions, ids, rows, output, stats, lift, weight,
                                   proj_bias is not None, (kinds, ranks, dropout), ctx.hints, ctx.apply_dropout,
                                   ctx.seed, need[0])
        return (gh if need[0] else None, None, None, _cast(gl, lift, need[3]), _cast(gw, weight, need[4]),
                _cast(gb, bias, need[5]), _cast(gpb, proj_bias, need[6])) + (None,) * 10


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

FUSED = ("triton", "cpp")
_warned_fallback: set = set()


def _hints(bank: AdapterBank) -> tuple[int, bool]:
    """(the activation code every non-empty adapter shares or -1, whether any subtracts L h); a dynamic bank
    (a serving bank) always (-1, True): read per adapter at run time."""
    if bank.dynamic:
        return -1, True

    def compute():
        live = [s for s in bank.specs if s is not None]
        acts = {s.act for s in live}
        act = _acts.SUPPORTED[acts.pop()] if len(acts) == 1 and bank.fused else (0 if not acts else -1)
        return act, any(s.subtract_proj for s in live)

    return _derived("hints", (bank.specs, bank.extra_acts), compute)


def _own_copies(hidden, positions, adapter_ids, bank: AdapterBank):
    """positions, adapter_ids and the bank, each tensor replaced by a clone where it shares memory with hidden
    (validation.own_copies: differentiable, so a bank tensor's gradient reaches what it viewed): the edit reads
    them as they were before it wrote hidden, and so does the backward."""
    tensors = (positions, adapter_ids, bank.lift, bank.weight, bank.bias, bank.proj_bias, bank.kinds, bank.ranks,
               bank.dropout)
    owned = _v.own_copies(hidden, *tensors)
    if all(a is b for a, b in zip(tensors[2:], owned[2:])):
        return owned[0], owned[1], bank
    lift, weight, bias, proj_bias, kinds, ranks, dropout = owned[2:]
    return owned[0], owned[1], dataclasses.replace(bank, lift=lift, weight=weight, bias=bias, proj_bias=proj_bias,
                                                   kinds=kinds, ranks=ranks, dropout=dropout)


def _run(hidden, positions, adapter_ids, bank, *, flat, rows_unique, training, backend, recompute, check_indices):
    _v.check_hidden_is_tensor(hidden)
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"bank must be an AdapterBank (stack_adapters or AdapterBank.empty), got {type(bank).__name__}")
    requested = backend
    chosen = _backend.resolve(backend, hidden)
    has_f64 = any(t is not None and t.dtype == torch.float64 for t in (hidden, *bank.tensors()))
    if chosen == "cpp" and requested is None and has_f64:
        chosen = "torch"  # the fused kernels compute in fp32; float64 asks for the reference
    if chosen in FUSED and not bank.fused:
        if requested in FUSED:
            _acts.kernel_code(bank.extra_acts[0])  # raises with the list of supported names
        if bank.extra_acts not in _warned_fallback:
            _warned_fallback.add(bank.extra_acts)
            warnings.warn(f"act {bank.extra_acts} has no fused kernel; running the torch reference backend",
                          stacklevel=3)
        chosen = "torch"
    if chosen == "cpp" and not hidden.is_cpu:
        raise ValueError(f"backend='cpp' runs the mixed edit on CPU tensors; hidden is on {hidden.device} (use "
                         "backend='triton')")
    if flat:
        _v.check_tokens(hidden, chosen)
    else:
        _v.check_hidden(hidden, chosen)
    compiling = torch.compiler.is_compiling()
    cpp_eager = chosen == "cpp" and not compiling
    if flat:
        positions = _v.check_rows(positions, hidden, False if cpp_eager else check_indices)
    else:
        positions = _v.check_positions(positions, hidden, False if cpp_eager else check_indices)
    adapter_ids = _v.check_adapter_ids(adapter_ids, positions, hidden, bank.num_adapters, flat,
                                       False if cpp_eager else check_indices)
    check_in_op = cpp_eager and _v.values_checked(positions, check_indices)
    _v.check_bank(bank.lift, bank.weight, bank.bias, bank.proj_bias, bank.kinds, bank.ranks, bank.dropout, hidden)
    bank.check()
    apply_dropout = bool(training) and bank.max_dropout > 0
    if not cpp_eager and not compiling:  # (the C++ op does this itself; compiled graphs: the registered op)
        positions, adapter_ids, bank = _own_copies(hidden, positions, adapter_ids, bank)
    if chosen == "torch":
        return mixed_edit_reference(hidden, positions, adapter_ids, bank, apply_dropout)
    if has_f64:
        raise TypeError(f"the bank or hidden is float64; backend={chosen!r} computes in fp32. Use backend='torch' "
                        "for float64")
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if apply_dropout else 0
    tensors = bank.tensors()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(
        t is not None and t.requires_grad for t in tensors))
    if cpp_eager:
        # one C++ op with its autograd formula in C++ (csrc/mixed_cpu.cpp); torch.compile traces
        # MixedEditFunction below instead
        return torch.ops.reft_kernels_cpp.mixed_edit.default(
            hidden, positions, adapter_ids, *tensors, bank.kinds, bank.ranks, bank.dropout, apply_dropout, seed,
            recompute, check_in_op)
    act, may_sp = _hints(bank)
    if needs_grad:
        return MixedEditFunction.apply(hidden, positions, adapter_ids, *tensors, bank.kinds, bank.ranks, bank.dropout,
                                       act, may_sp, apply_dropout, seed, recompute, rows_unique, chosen)
    _fwd(chosen, hidden, positions, adapter_ids, (*tensors, bank.kinds, bank.ranks, bank.dropout), (act, may_sp),
         apply_dropout, seed, 0, rows_unique)
    return hidden


def mixed_reft_edit(hidden: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor, bank: AdapterBank, *,
                    training: bool = False, backend: Optional[str] = None, recompute: bool = False,
                    check_positions: Optional[bool] = None) -> torch.Tensor:
    """The mixed-adapter edit, batched layout (module docstring): each edited row gets its own adapter's edit.

    Args:
        hidden: [B, T, d] fp32, fp16 or bf16 (fp64 with backend="torch"), any strides. Edited in place and
            returned; rows no slot edits stay bit-for-bit unchanged. Must not be a leaf that requires grad.
        positions: [B, P] int32/int64 on the CPU or hidden's device; -1 = empty slot.
        adapter_ids: [B] (one adapter per batch row) or [B, P] (one per slot), int32/int64, on the CPU or
            hidden's device; -1 = no edit. Values are indices into the bank.
        bank: the AdapterBank (stack_adapters, or AdapterBank.empty + set_slot), on hidden's device.
        training: apply each adapter's dropout (pyreft's: the whole edited row, training only).
        backend: "triton", "cpp", "torch" or None (reft_kernels.backend).
        recompute: keep no copy of the edited rows for the backward (see reft_edit).
        check_positions: check position and adapter id values (None: when they are on the CPU, where it is
            free; device tensors are not read, to avoid a sync, and out-of-range values edit nothing).

    Differentiable with respect to hidden and every bank tensor (lift, weight, bias, proj_bias).
    """
    return _run(hidden, positions, adapter_ids, bank, flat=False, rows_unique=False, training=training,
                backend=backend, recompute=recompute, check_indices=check_positions)


def mixed_reft_edit_flat(hidden: torch.Tensor, rows: torch.Tensor, adapter_ids: torch.Tensor, bank: AdapterBank, *,
                         rows_unique: bool = False, training: bool = False, backend: Optional[str] = None,
                         recompute: bool = False, check_rows: Optional[bool] = None) -> torch.Tensor:
    """The mixed-adapter edit, flat (server) layout: hidden [n_tokens, d], rows [N] (indices into n_tokens, -1 =
    empty slot), adapter_ids [N] (-1 = no edit). A row named twice is edited once, by the first non-empty slot
    naming it. rows_unique=True is a caller's promise that no row is named twice (a server builds rows unique
    by construction): the Triton backend then skips the duplicate resolution (two launches); if the promise
    is broken the result of the duplicated rows is unspecified, never outside hidden. Everything else as
    mixed_reft_edit (check_rows plays check_positions' part)."""
    return _run(hidden, rows, adapter_ids, bank, flat=True, rows_unique=rows_unique, training=training,
                backend=backend, recompute=recompute, check_indices=check_rows)
