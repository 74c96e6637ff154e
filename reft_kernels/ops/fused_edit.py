"""The fused ReFT edit: reference, Triton kernels, launchers, registered ops, autograd, public function.

One computation covers the ReFT family. For a hidden row h (d wide) at an edited position:

    z     = W h + b                     (SOURCE_LINEAR; otherwise there is no W and the source is b)
    s     = act(z)                      (or s = b)
    delta = s - (L h + pb)              (SUBTRACT_PROJ, pb only with HAS_PROJ_BIAS; otherwise delta = s)
    y     = h + L^T delta
    out   = dropout(y)                  (the whole row, only when training, as pyreft does)

with L the lift matrix [r, d]. LoReFT: L = R, source act(Wh + b), subtract. DiReFT (the paper's, pyreft's
NodireftIntervention): L = W2, source act(W1 h + b), no subtraction.

The same contract has a C++ CPU implementation, csrc/edit_cpu.cpp (backend="cpp", registered from C++ as
reft_kernels_cpp::edit_fwd / edit_bwd / edit; reft_kernels/extension.py builds and loads it).

Semantics shared by every backend
- hidden [B, T, d] is edited in place and returned; positions [B, P] name the rows, -1 = empty slot.
- A row named twice in one batch row is edited once, by its first slot, and its gradient counted once
  (pyreft edits once but multiplies the gradient by the count).
- Parameters may be fp32 while hidden is 16-bit: everything is computed in fp32 (pyreft runs Wh + b in
  W's dtype), the row is written back in hidden's dtype, gradients come back in each parameter's dtype.

What the Triton backend moves (the byte floor the benchmarks report; N = edited rows, item = d * itemsize)
- forward: reads and writes the N edited rows, and when a gradient is needed writes a copy of the
  original rows for the backward (recompute=True skips that copy: the backward rebuilds them as
  y - L^T delta from the op's output, which must then stay unmodified until backward).
- backward: reads the incoming gradient at the N rows twice (once for d_delta = L g, then with the rest),
  reads the saved rows (or the output), writes the hidden gradient. The hidden gradient is a new tensor:
  rows that were not edited are copied through (2 * (B*T - N) rows), because writing into the incoming
  gradient in place corrupts it whenever autograd shares it with another branch (a residual add hands
  the same tensor to both of its inputs).
- parameter gradients are reduced without atomics: per-program partial sums, then one fixed-order sum,
  so two runs give bitwise equal gradients.

Kernels (launch_config picks; figures: H100, d = 4096, r = 4, bf16, bench/reference/h100-61fe9a1)
- forward, one launch: row-resident (_edit_fwd_rows_kernel) while there are few rows per SM and r <= 16:
  whole rows in registers, persistent programs, 9.2 us for N = 64 under graph replay against 95 us for the
  tile kernel, whose 16+ rows per program walk the columns serially; tiles (_edit_fwd_kernel) beyond:
  tl.dot over column blocks in two passes (projections, then lift and write), 1638 us at N = 131072.
- backward, three launches: step 1 reduces each gradient row to d_delta (row-resident or tiles, same
  rule); step 2 (_edit_bwd_main_kernel) streams rows through column blocks, writing the hidden gradient
  and keeping parameter partial sums in registers per (row group, column block); then the partial sums
  are added in a fixed order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backend as _backend
from .. import extension as _extension
from . import activations as _acts
from . import validation as _v

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl


@dataclass(frozen=True)
class EditSpec:
    """Which terms of the family formula are on (see the module docstring)."""

    source_linear: bool  # source = act(W h + b); False: source = b
    subtract_proj: bool  # delta -= L h (+ pb)
    act: str  # a transformers ACT2FN name ("identity" for none)

    def __post_init__(self):
        if not self.source_linear and self.act != "identity":
            raise ValueError("an activation needs a linear source (W h + b)")


# ------------------------------------------------------------------------------------------------
# Reference (the torch backend, and the "naive PyTorch" baseline of the benchmarks)
# ------------------------------------------------------------------------------------------------


def owner_mask(positions: torch.Tensor, T: int) -> torch.Tensor:
    """[B, P] bool: slot (i, j) edits row positions[i, j], i.e. the position lies in [0, T) and no
    earlier slot of batch row i names the same position."""
    pos = positions.long()
    valid = (pos >= 0) & (pos < T)
    if pos.shape[1] <= 1:
        return valid
    # first occurrences via a stable sort: O(P log P) memory-light, unlike a [B, P, P] comparison
    sorted_pos, order = torch.sort(pos, dim=1, stable=True)
    first_sorted = torch.ones_like(sorted_pos, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_pos[:, 1:] != sorted_pos[:, :-1]
    first = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)
    return valid & first


def edit_reference(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    spec: EditSpec,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """The edit written with PyTorch ops; autograd differentiates it. Edits hidden in place."""
    B, T, d = hidden.shape
    own = owner_mask(positions.to(hidden.device), T)
    bi, pj = own.nonzero(as_tuple=True)  # a host sync on GPUs: the naive path pays it, like pyreft
    ti = positions.to(hidden.device)[bi, pj].long()
    params = [p for p in (lift, weight, bias, proj_bias) if p is not None]
    cdt = torch.float64 if any(p.dtype == torch.float64 for p in params + [hidden]) else torch.float32
    u = hidden[bi, ti].to(cdt)
    L = lift.to(cdt)
    if spec.source_linear:
        source = _acts.torch_fn(spec.act)(u @ weight.to(cdt).t() + bias.to(cdt))
    else:
        source = bias.to(cdt).expand(u.shape[0], -1)
    delta = source
    if spec.subtract_proj:
        proj = u @ L.t()
        if proj_bias is not None:
            proj = proj + proj_bias.to(cdt)
        delta = source - proj
    y = u + delta @ L
    if training and dropout > 0:
        y = torch.nn.functional.dropout(y, p=dropout, training=True)
    hidden.index_put_((bi, ti), y.to(hidden.dtype))
    return hidden


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if _backend.HAS_TRITON:
    _NOT_FOUND = tl.constexpr(2**30)

    @triton.jit
    def _first_slot(
        POS,  # positions [B, P]
        stride_pb,  # positions.stride(0)
        stride_pp,  # positions.stride(1)
        i,  # [BLOCK_N] int64: batch row of each item
        t,  # [BLOCK_N] int64: the position to look for (>= 0)
        limit,  # [BLOCK_N] int32: only slots j < limit are searched
        P,  # slots per batch row
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,  # slots compared per step
    ):
        """For each item: the smallest slot j < limit with positions[i, j] == t, or _NOT_FOUND."""
        first = tl.full((BLOCK_N,), _NOT_FOUND, tl.int32)
        for j0 in range(0, P, BLOCK_P):
            j = j0 + tl.arange(0, BLOCK_P)
            look = j[None, :] < limit[:, None]
            p = tl.load(POS + i[:, None] * stride_pb + j[None, :] * stride_pp, mask=look, other=-1)
            hit = look & (p.to(tl.int64) == t[:, None])
            first = tl.minimum(first, tl.min(tl.where(hit, j[None, :], _NOT_FOUND), axis=1))
        return first

    @triton.jit
    def _resolve_items(
        POS, stride_pb, stride_pp,  # positions [B, P]
        item,  # [BLOCK_N] int32 item ids: rows of hidden (ROW_MAJOR) or slots
        n_items, T, P,
        ROW_MAJOR: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Maps items to (batch row i, position t, owning slot n, edited?).

        ROW_MAJOR: item = i * T + t, edited when some slot of row i names t; n is the first such slot.
        Otherwise item = slot n = i * P + j, edited when positions[i, j] is in range and no earlier
        slot of row i names the same position (edit once, count once).
        """
        in_range = item < n_items
        if ROW_MAJOR:
            i = (item // T).to(tl.int64)
            t = (item % T).to(tl.int64)
            first = _first_slot(POS, stride_pb, stride_pp, i, t, tl.where(in_range, P, 0), P, BLOCK_N, BLOCK_P)
            edited = in_range & (first < P)
            n = i * P + tl.where(edited, first, 0)
        else:
            n = item.to(tl.int64)
            i = n // P
            j = (n % P).to(tl.int32)
            t = tl.load(POS + i * stride_pb + j * stride_pp, mask=in_range, other=-1).to(tl.int64)
            valid = in_range & (t >= 0) & (t < T)
            first = _first_slot(POS, stride_pb, stride_pp, i, t, tl.where(valid, j, 0), P, BLOCK_N, BLOCK_P)
            edited = valid & (first == _NOT_FOUND)
        return i, t, n, edited

    @triton.jit
    def _keep_scale(x, n, cols, d, seed, p_drop):
        """Dropout of x [BLOCK_N, BLOCK_D] at slots n and columns cols: Philox keyed by (seed, n*d + col),
        so the backward regenerates the forward's mask without storing it."""
        keep = tl.rand(seed, n[:, None] * d + cols[None, :].to(tl.int64)) >= p_drop
        return tl.where(keep, x * (1.0 / (1.0 - p_drop)), 0.0)

    @triton.jit
    def _edit_fwd_kernel(
        X, stride_xb, stride_xt, stride_xd,  # hidden [B, T, d]; edited rows are overwritten in place
        POS, stride_pb, stride_pp,  # positions [B, P] int32/int64; -1 (or out of range) = empty slot
        L, stride_l0, stride_l1,  # lift [r, d]: the edit is L^T delta (R for LoReFT, W2 for DiReFT)
        W, stride_w0, stride_w1,  # source weight [r, d] (SOURCE_LINEAR)
        BIAS,  # source bias [r], contiguous
        PBIAS,  # projection bias [r], contiguous (HAS_PROJ_BIAS)
        SAVED,  # [N, d] contiguous: copy of the original edited rows (SAVE_ROWS)
        STATS,  # [N, 2, R_PAD] fp32: z = W h + b and delta per slot (SAVE_STATS)
        T, P, N, d, r,  # sizes; N = B * P slots
        seed, p_drop,  # dropout Philox seed and probability (DROPOUT)
        SOURCE_LINEAR: tl.constexpr,  # source = act(W h + b); else the constant b
        SUBTRACT_PROJ: tl.constexpr,  # delta -= L h (+ PBIAS)
        HAS_PROJ_BIAS: tl.constexpr,
        ACT: tl.constexpr,  # activation code (activations.SUPPORTED)
        DROPOUT: tl.constexpr,
        SAVE_ROWS: tl.constexpr,
        SAVE_STATS: tl.constexpr,
        R_PAD: tl.constexpr,  # r padded to a power of two >= 16 (tl.dot's smallest K and N)
        BLOCK_N: tl.constexpr,  # slots per program (>= 16: tl.dot's smallest M)
        BLOCK_D: tl.constexpr,  # hidden columns per step
        BLOCK_P: tl.constexpr,  # slots compared per step of the duplicate scan
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 hidden; "tf32" for 16-bit (exact for their mantissas)
        EVICT_KEEP: tl.constexpr,  # L2 policy of pass 1's reads ("evict_last": pass 2 reads the rows again)
        EVICT_STREAM: tl.constexpr,  # L2 policy of data touched once ("evict_first")
    ):
        item = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        i, t, n, own = _resolve_items(POS, stride_pb, stride_pp, item, N, T, P, False, BLOCK_N, BLOCK_P)
        row = tl.where(own, i * stride_xb + t * stride_xt, 0)
        rr = tl.arange(0, R_PAD)
        r_ok = rr < r

        # pass 1: the r-wide projections, accumulated in fp32 over column blocks
        acc_z = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        acc_q = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            m = own[:, None] & c_ok[None, :]
            x = tl.load(
                X + row[:, None] + cols[None, :].to(tl.int64) * stride_xd, mask=m, other=0.0, eviction_policy=EVICT_KEEP
            ).to(tl.float32)
            pm = r_ok[:, None] & c_ok[None, :]
            if SOURCE_LINEAR:
                w = tl.load(W + rr[:, None] * stride_w0 + cols[None, :] * stride_w1, mask=pm, other=0.0).to(tl.float32)
                acc_z = tl.dot(x, tl.trans(w), acc_z, input_precision=DOT_PRECISION)
            if SUBTRACT_PROJ:
                lp = tl.load(L + rr[:, None] * stride_l0 + cols[None, :] * stride_l1, mask=pm, other=0.0).to(tl.float32)
                acc_q = tl.dot(x, tl.trans(lp), acc_q, input_precision=DOT_PRECISION)

        b = tl.load(BIAS + rr, mask=r_ok, other=0.0).to(tl.float32)
        z = acc_z + b[None, :]
        if SOURCE_LINEAR:
            delta = _acts.act_fwd(z, ACT)
        else:
            delta = z  # acc_z is zero: the source is the bias itself
        if SUBTRACT_PROJ:
            delta = delta - acc_q
            if HAS_PROJ_BIAS:
                delta = delta - tl.load(PBIAS + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        delta = tl.where(r_ok[None, :], delta, 0.0)  # act(0) may be non-zero in the padding columns
        if SAVE_STATS:
            # every slot's stats are written (zeros where nothing is edited): the op's outputs are defined
            sm = (item < N)[:, None] & (rr < R_PAD)[None, :]
            stat = STATS + n[:, None] * (2 * R_PAD) + rr[None, :]
            tl.store(stat, tl.where(own[:, None] & r_ok[None, :], z, 0.0), mask=sm)
            tl.store(stat + R_PAD, tl.where(own[:, None], delta, 0.0), mask=sm)

        # pass 2: y = h + delta L, written in place (the rows come back from L2: this program just read them)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            m = own[:, None] & c_ok[None, :]
            ptr = X + row[:, None] + cols[None, :].to(tl.int64) * stride_xd
            x_raw = tl.load(ptr, mask=m, other=0.0, eviction_policy=EVICT_STREAM)
            lc = tl.load(
                L + rr[:, None] * stride_l0 + cols[None, :] * stride_l1, mask=r_ok[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            y = tl.dot(delta, lc, x_raw.to(tl.float32), input_precision=DOT_PRECISION)
            if DROPOUT:
                y = _keep_scale(y, n, cols, d, seed, p_drop)
            tl.store(ptr, y.to(X.dtype.element_ty), mask=m, eviction_policy=EVICT_STREAM)
            if SAVE_ROWS:  # rows of empty or duplicate slots are saved as zeros (x_raw's masked value)
                tl.store(SAVED + n[:, None] * d + cols[None, :], x_raw, mask=(item < N)[:, None] & c_ok[None, :],
                         eviction_policy=EVICT_STREAM)

    @triton.jit
    def _edit_fwd_rows_kernel(
        X, stride_xb, stride_xt, stride_xd,  # hidden [B, T, d]; edited rows are overwritten in place
        POS, stride_pb, stride_pp,  # positions [B, P]
        L,  # lift [r, d], contiguous
        W,  # source weight [r, d], contiguous (SOURCE_LINEAR)
        BIAS,  # source bias [r]
        PBIAS,  # projection bias [r] (HAS_PROJ_BIAS)
        SAVED,  # [N, d]: copy of the original edited rows (SAVE_ROWS)
        STATS,  # [N, 2, R_PAD] fp32: z and delta per slot (SAVE_STATS)
        T, P, N, d, r,
        iters,  # row blocks per program: the grid is persistent
        seed, p_drop,
        SOURCE_LINEAR: tl.constexpr,
        SUBTRACT_PROJ: tl.constexpr,
        HAS_PROJ_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        DROPOUT: tl.constexpr,
        SAVE_ROWS: tl.constexpr,
        SAVE_STATS: tl.constexpr,
        R_PAD: tl.constexpr,  # width of the stats rows (shared layout with the tile kernels)
        BLOCK_N: tl.constexpr,  # rows per step
        BLOCK_D: tl.constexpr,  # next power of two >= d: whole rows live in registers
        BLOCK_P: tl.constexpr,
    ):
        """Forward for small r: each row is read from memory once and kept in registers while the r
        projections and the lift run over it, one parameter row at a time. The parameter rows are
        re-read for every row block, from L1/L2 (r * d * 4 bytes each). Persistent grid."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        c_ok = cols < d
        cols64 = cols.to(tl.int64)
        rr = tl.arange(0, R_PAD)
        r_ok = rr < r
        b = tl.load(BIAS + rr, mask=r_ok, other=0.0).to(tl.float32)
        for it in range(0, iters):
            item = (pid + it * nprog) * BLOCK_N + tl.arange(0, BLOCK_N)
            i, t, n, own = _resolve_items(POS, stride_pb, stride_pp, item, N, T, P, False, BLOCK_N, BLOCK_P)
            m = own[:, None] & c_ok[None, :]
            ptr = X + tl.where(own, i * stride_xb + t * stride_xt, 0)[:, None] + cols64[None, :] * stride_xd
            x_raw = tl.load(ptr, mask=m, other=0.0)
            if SAVE_ROWS:
                tl.store(SAVED + n[:, None] * d + cols64[None, :], x_raw, mask=(item < N)[:, None] & c_ok[None, :])
            x = x_raw.to(tl.float32)
            acc_z = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            acc_q = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            for k in range(0, r):
                sel = rr[None, :] == k
                if SOURCE_LINEAR:
                    wk = tl.load(W + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                    acc_z = tl.where(sel, tl.sum(x * wk[None, :], axis=1)[:, None], acc_z)
                if SUBTRACT_PROJ:
                    lk = tl.load(L + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                    acc_q = tl.where(sel, tl.sum(x * lk[None, :], axis=1)[:, None], acc_q)
            z = acc_z + b[None, :]
            if SOURCE_LINEAR:
                delta = _acts.act_fwd(z, ACT)
            else:
                delta = z
            if SUBTRACT_PROJ:
                delta = delta - acc_q
                if HAS_PROJ_BIAS:
                    delta = delta - tl.load(PBIAS + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
            delta = tl.where(r_ok[None, :], delta, 0.0)
            y = x
            for k in range(0, r):
                lk = tl.load(L + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                dk = tl.sum(tl.where(rr[None, :] == k, delta, 0.0), axis=1)
                y += dk[:, None] * lk[None, :]
            if DROPOUT:
                y = _keep_scale(y, n, cols, d, seed, p_drop)
            tl.store(ptr, y.to(X.dtype.element_ty), mask=m)
            if SAVE_STATS:
                sm = (item < N)[:, None] & (rr < R_PAD)[None, :]
                stat = STATS + n[:, None] * (2 * R_PAD) + rr[None, :]
                tl.store(stat, tl.where(own[:, None] & r_ok[None, :], z, 0.0), mask=sm)
                tl.store(stat + R_PAD, tl.where(own[:, None], delta, 0.0), mask=sm)

    @triton.jit
    def _edit_bwd_project_kernel(
        DY, stride_gb, stride_gt, stride_gd,  # incoming gradient [B, T, d]
        POS, stride_pb, stride_pp,  # positions [B, P]
        L, stride_l0, stride_l1,  # lift [r, d]
        STATS,  # [N, 2, R_PAD] fp32 from the forward: z, delta
        SCRATCH,  # [N, 2, R_PAD] fp32 out: d_delta = L g', dz = d_delta * act'(z)
        ITEM_SLOT,  # [n_items] int32 out: the slot that edits each item, -1 if none
        T, P, N, d, r, n_items,
        seed, p_drop,
        SOURCE_LINEAR: tl.constexpr,
        ACT: tl.constexpr,
        DROPOUT: tl.constexpr,
        ROW_MAJOR: tl.constexpr,  # items are all B*T rows (the hidden gradient is wanted) or the N slots
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Backward, step 1 of 2: resolve items to slots and reduce the incoming gradient of each edited
        row to the r-wide d_delta, which step 2 needs before it can stream a row."""
        item = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        i, t, n, edited = _resolve_items(POS, stride_pb, stride_pp, item, n_items, T, P, ROW_MAJOR, BLOCK_N, BLOCK_P)
        tl.store(ITEM_SLOT + item, tl.where(edited, n, -1).to(tl.int32), mask=item < n_items)
        row = tl.where(edited, i * stride_gb + t * stride_gt, 0)
        rr = tl.arange(0, R_PAD)
        r_ok = rr < r
        acc = tl.zeros((BLOCK_N, R_PAD), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            g = tl.load(
                DY + row[:, None] + cols[None, :].to(tl.int64) * stride_gd, mask=edited[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            if DROPOUT:
                g = _keep_scale(g, n, cols, d, seed, p_drop)
            lc = tl.load(
                L + rr[:, None] * stride_l0 + cols[None, :] * stride_l1, mask=r_ok[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            acc = tl.dot(g, tl.trans(lc), acc, input_precision=DOT_PRECISION)
        _store_d_delta(acc, STATS, SCRATCH, n, edited, rr, r_ok, SOURCE_LINEAR, ACT, R_PAD)

    @triton.jit
    def _store_d_delta(acc, STATS, SCRATCH, n, edited, rr, r_ok, SOURCE_LINEAR: tl.constexpr, ACT: tl.constexpr,
                       R_PAD: tl.constexpr):
        """Backward step 1's output per edited slot: d_delta = L g' and dz = d_delta * act'(z)."""
        sm = edited[:, None] & r_ok[None, :]
        d_delta = tl.where(sm, acc, 0.0)
        if SOURCE_LINEAR:
            z = tl.load(STATS + n[:, None] * (2 * R_PAD) + rr[None, :], mask=sm, other=0.0)
            dz = d_delta * _acts.act_grad(z, ACT)
        else:
            dz = d_delta  # the source is the bias: its gradient is d_delta
        scratch = SCRATCH + n[:, None] * (2 * R_PAD) + rr[None, :]
        tl.store(scratch, d_delta, mask=sm)
        tl.store(scratch + R_PAD, dz, mask=sm)

    @triton.jit
    def _edit_bwd_project_rows_kernel(
        DY, stride_gb, stride_gt, stride_gd,  # incoming gradient [B, T, d]
        POS, stride_pb, stride_pp,  # positions [B, P]
        L,  # lift [r, d], contiguous
        STATS,  # [N, 2, R_PAD] fp32 from the forward: z, delta
        SCRATCH,  # [N, 2, R_PAD] fp32 out: d_delta, dz
        ITEM_SLOT,  # [n_items] int32 out: the slot that edits each item, -1 if none
        T, P, N, d, r, n_items,
        iters,  # item blocks per program: the grid is persistent
        seed, p_drop,
        SOURCE_LINEAR: tl.constexpr,
        ACT: tl.constexpr,
        DROPOUT: tl.constexpr,
        ROW_MAJOR: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= d
        BLOCK_P: tl.constexpr,
    ):
        """Backward step 1 for small r: each gradient row is read once into registers and reduced
        against the r lift rows in turn (see _edit_fwd_rows_kernel)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        c_ok = cols < d
        rr = tl.arange(0, R_PAD)
        r_ok = rr < r
        for it in range(0, iters):
            item = (pid + it * nprog) * BLOCK_N + tl.arange(0, BLOCK_N)
            i, t, n, edited = _resolve_items(POS, stride_pb, stride_pp, item, n_items, T, P, ROW_MAJOR, BLOCK_N, BLOCK_P)
            tl.store(ITEM_SLOT + item, tl.where(edited, n, -1).to(tl.int32), mask=item < n_items)
            row = tl.where(edited, i * stride_gb + t * stride_gt, 0)
            g = tl.load(
                DY + row[:, None] + cols[None, :].to(tl.int64) * stride_gd, mask=edited[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            if DROPOUT:
                g = _keep_scale(g, n, cols, d, seed, p_drop)
            acc = tl.zeros((BLOCK_N, R_PAD), tl.float32)
            for k in range(0, r):
                lk = tl.load(L + k * d + cols, mask=c_ok, other=0.0).to(tl.float32)
                acc = tl.where(rr[None, :] == k, tl.sum(g * lk[None, :], axis=1)[:, None], acc)
            _store_d_delta(acc, STATS, SCRATCH, n, edited, rr, r_ok, SOURCE_LINEAR, ACT, R_PAD)

    @triton.jit
    def _edit_bwd_main_kernel(
        DY, stride_gb, stride_gt, stride_gd,  # incoming gradient [B, T, d]
        DX, stride_db, stride_dt, stride_dd,  # hidden gradient out [B, T, d] (WRITE_DX)
        U, stride_ub, stride_ut, stride_ud,  # saved rows [N, d] (stride_ub = d per slot) or, RECOMPUTE, the output [B, T, d]
        POS, stride_pb, stride_pp,  # positions [B, P]
        L, stride_l0, stride_l1,  # lift [r, d]
        W, stride_w0, stride_w1,  # source weight [r, d] (SOURCE_LINEAR)
        STATS,  # [N, 2, R_PAD] fp32: z, delta
        SCRATCH,  # [N, 2, R_PAD] fp32: d_delta, dz (from step 1)
        ITEM_SLOT,  # [n_items] int32 (from step 1)
        PART,  # [n_groups, M] fp32 out: this group's partial parameter gradients
        T, P, d, r, n_items, M, blocks_per_group,
        seed, p_drop,
        SOURCE_LINEAR: tl.constexpr,
        SUBTRACT_PROJ: tl.constexpr,
        HAS_PROJ_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        RECOMPUTE: tl.constexpr,  # rebuild the original rows as y - delta L from the output
        ROW_MAJOR: tl.constexpr,
        WRITE_DX: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Backward, step 2 of 2. Program (group, column block) streams its group's rows through one
        column block: writes the hidden gradient there (edited rows computed, others copied through)
        and keeps the parameter-gradient partial sums of that column block in registers for the whole
        group, so partials are written once per program and reduced without atomics."""
        grp = tl.program_id(0)
        cblk = tl.program_id(1)
        cols = cblk * BLOCK_D + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        cols64 = cols.to(tl.int64)
        rr = tl.arange(0, R_PAD)
        r_ok = rr < r
        pm = r_ok[:, None] & c_ok[None, :]
        # this program's parameter column blocks stay in registers for all its rows
        lc = tl.load(L + rr[:, None] * stride_l0 + cols[None, :] * stride_l1, mask=pm, other=0.0).to(tl.float32)
        if SOURCE_LINEAR:
            wc = tl.load(W + rr[:, None] * stride_w0 + cols[None, :] * stride_w1, mask=pm, other=0.0).to(tl.float32)
        acc_l = tl.zeros((R_PAD, BLOCK_D), tl.float32)
        acc_w = tl.zeros((R_PAD, BLOCK_D), tl.float32)
        acc_b = tl.zeros((R_PAD,), tl.float32)
        acc_pb = tl.zeros((R_PAD,), tl.float32)

        for k in range(0, blocks_per_group):
            item = (grp * blocks_per_group + k) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_range = item < n_items
            slot = tl.load(ITEM_SLOT + item, mask=in_range, other=-1)
            edited = slot >= 0
            n = tl.where(edited, slot, 0).to(tl.int64)
            if ROW_MAJOR:
                i = (item // T).to(tl.int64)
                t = (item % T).to(tl.int64)
            else:
                i = n // P
                t = tl.load(POS + i * stride_pb + (n % P) * stride_pp, mask=edited, other=0).to(tl.int64)
            if WRITE_DX and ROW_MAJOR:
                live = in_range  # every row of the hidden gradient is written
            else:
                live = edited
            em = edited[:, None] & c_ok[None, :]
            lm = live[:, None] & c_ok[None, :]
            g_raw = tl.load(DY + (i * stride_gb + t * stride_gt)[:, None] + cols64[None, :] * stride_gd, mask=lm, other=0.0,
                            eviction_policy="evict_first")
            g = g_raw.to(tl.float32)
            if DROPOUT:
                g = _keep_scale(g, n, cols, d, seed, p_drop)
            delta, d_delta, dz, delta_t, d_delta_t, dz_t = _slot_stats(STATS, SCRATCH, n, edited, r_ok, R_PAD)
            if SOURCE_LINEAR or SUBTRACT_PROJ:
                if RECOMPUTE:
                    y = tl.load(U + (i * stride_ub + t * stride_ut)[:, None] + cols64[None, :] * stride_ud, mask=em, other=0.0)
                    u = tl.dot(-delta, lc, y.to(tl.float32), input_precision=DOT_PRECISION)
                else:
                    u = tl.load(U + n[:, None] * stride_ub + cols64[None, :] * stride_ud, mask=em, other=0.0).to(tl.float32)
            if WRITE_DX:
                dx = g
                if SUBTRACT_PROJ:
                    dx = tl.dot(-d_delta, lc, dx, input_precision=DOT_PRECISION)
                if SOURCE_LINEAR:
                    dx = tl.dot(dz, wc, dx, input_precision=DOT_PRECISION)
                # rows nobody edited pass through bit for bit
                dx = tl.where(edited[:, None], dx.to(DX.dtype.element_ty), g_raw)
                tl.store(DX + (i * stride_db + t * stride_dt)[:, None] + cols64[None, :] * stride_dd, dx, mask=lm,
                         eviction_policy="evict_first")
            # parameter gradients; rows that are not edited have delta = d_delta = dz = 0
            acc_l = tl.dot(delta_t, g, acc_l, input_precision=DOT_PRECISION)
            if SUBTRACT_PROJ:
                acc_l = tl.dot(-d_delta_t, u, acc_l, input_precision=DOT_PRECISION)
            if SOURCE_LINEAR:
                acc_w = tl.dot(dz_t, u, acc_w, input_precision=DOT_PRECISION)
            acc_b += tl.sum(dz, axis=0)
            acc_pb -= tl.sum(d_delta, axis=0)

        part = PART + grp.to(tl.int64) * M
        mat = rr[:, None] * d + cols[None, :]
        tl.store(part + mat, acc_l, mask=pm)
        n_mats = 1
        if SOURCE_LINEAR:
            tl.store(part + r * d + mat, acc_w, mask=pm)
            n_mats = 2
        first_cblk = cblk == 0  # the bias sums do not depend on the column block: one program stores them
        tl.store(part + n_mats * r * d + rr, acc_b, mask=r_ok & first_cblk)
        if HAS_PROJ_BIAS:
            tl.store(part + n_mats * r * d + r + rr, acc_pb, mask=r_ok & first_cblk)

    @triton.jit
    def _slot_stats(STATS, SCRATCH, n, rows, r_ok, R_PAD: tl.constexpr):
        """Backward step 2's r-vectors of slots n (where rows): delta (the forward's stats), d_delta and dz
        (step 1's scratch), each [BLOCK_N, R_PAD] and transposed [R_PAD, BLOCK_N]; the transposes are loaded
        again (L1 hits) rather than tl.trans'd through shared memory."""
        rr = tl.arange(0, R_PAD)
        sm = rows[:, None] & r_ok[None, :]
        st = n[:, None] * (2 * R_PAD) + rr[None, :]
        smt = r_ok[:, None] & rows[None, :]
        stt = n[None, :] * (2 * R_PAD) + rr[:, None]
        return (tl.load(STATS + st + R_PAD, mask=sm, other=0.0), tl.load(SCRATCH + st, mask=sm, other=0.0),
                tl.load(SCRATCH + st + R_PAD, mask=sm, other=0.0), tl.load(STATS + stt + R_PAD, mask=smt, other=0.0),
                tl.load(SCRATCH + stt, mask=smt, other=0.0), tl.load(SCRATCH + stt + R_PAD, mask=smt, other=0.0))

    @triton.jit
    def _sum_partials_kernel(
        PART,  # [n_parts, M] fp32
        OUT,  # [M] fp32
        n_parts, M,
        BLOCK: tl.constexpr,
    ):
        """OUT = PART.sum(0) in a fixed order (deterministic; no atomics)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M
        acc = tl.zeros((BLOCK,), tl.float32)
        for g in range(0, n_parts):
            acc += tl.load(PART + g * M + offs, mask=ok, other=0.0)
        tl.store(OUT + offs, acc, mask=ok)


# ------------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a @triton.jit function, and calling it on the host costs ~8 us
    return -(-a // b)


def r_pad(r: int) -> int:
    """r padded for tl.dot: a power of two, at least 16. Also the width of the per-slot stats rows."""
    return max(16, _next_pow2(r))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The row-resident kernels keep whole rows in registers and loop over r; above these the tile kernels
# (tl.dot over column blocks) take over.
ROWS_MAX_R = 16
ROWS_MAX_D = 16384


@dataclass(frozen=True)
class LaunchConfig:
    """Block shapes and warps per kernel family. `launch_config` chooses them; tests and the tuning sweep
    (bench/bench_ops.py tune) pass their own. Defaults are the GPU's for r <= 32."""

    # row-resident kernels (forward, backward step 1): whole rows in registers, small r, small N
    rows: bool = False
    rows_block_n: int = 4  # rows per step (halved for small N so the work spreads over the SMs)
    rows_warps: int = 8
    rows_per_sm: int = 2  # persistent programs per SM
    rows_max_per_sm: int = 16  # edited rows per SM up to which the row-resident kernels run
    # tile forward: tl.dot over column blocks, two passes over each row block
    fwd_block_n: int = 64
    fwd_block_d: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    l2_hints: bool = True  # keep pass-1 rows in L2 for pass 2, stream everything else
    # backward: step 1 (tile variant) and step 2
    bwd_block_n: int = 16
    bwd_block_d: int = 256
    bwd_warps: int = 4
    bwd_stages: int = 3
    bwd_programs: int = 0  # step 2 target number of programs (0 = 4 per SM)
    block_p: int = 16  # slots compared per step of the duplicate scan


@functools.lru_cache(maxsize=4096)
def gpu_launch_config(d: int, r: int, P: int) -> LaunchConfig:
    """Blocks for a GPU, from the H100 sweep in bench/reference/h100-61fe9a1 (d = 4096, r = 4, bf16): row-resident
    kernels up to 16 rows per SM (9.4 us vs 46 us for the tiles at N = 64 under graph replay; tiles win
    from N = 16384), forward tiles 64 x 128 with 8 warps and 3 stages, backward 16 x 256 with 4 warps and
    3 stages (2157 us at N = 131072, against 3030 us for 16 x 128 with 2 stages). Register use of the
    tile kernels grows with R_PAD * BLOCK_D, so their column blocks shrink as r grows."""
    rp = r_pad(r)
    dp = _next_pow2(d)
    shrink = 1 if rp <= 32 else (2 if rp <= 64 else 4)  # column blocks for larger r
    return LaunchConfig(
        rows=r <= ROWS_MAX_R and dp <= ROWS_MAX_D,
        rows_block_n=max(1, min(4, 8192 // dp)),
        rows_warps=8 if dp >= 1024 else 4,
        fwd_block_d=max(16, min(128 // shrink, dp)),
        bwd_block_d=max(16, min(256 // (2 * shrink) if shrink > 1 else 256, dp)),
        block_p=min(32, max(16, _next_pow2(P))),
    )


@functools.lru_cache(maxsize=4096)
def _cpu_launch_config(d: int, r: int, P: int) -> LaunchConfig:
    # Under the CPU interpreter every Triton op costs Python time: fewer, larger steps.
    dp = _next_pow2(d)
    big = max(16, min(512, dp))
    return LaunchConfig(
        rows=r <= ROWS_MAX_R and dp <= ROWS_MAX_D, rows_block_n=16, rows_warps=4,
        fwd_block_n=16, fwd_block_d=big, bwd_block_d=big, bwd_programs=4, block_p=min(32, max(16, _next_pow2(P))),
    )


def launch_config(hidden: torch.Tensor, r: int, P: int) -> LaunchConfig:
    """Default blocks for hidden's device."""
    if hidden.is_cuda:
        return gpu_launch_config(hidden.shape[-1], r, P)
    return _cpu_launch_config(hidden.shape[-1], r, P)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so persistent loops run several steps in tests
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _use_rows(cfg: LaunchConfig, n_rows: int, device: torch.device) -> bool:
    """Row-resident kernels while there are few edited rows per SM (they spread even a few rows over
    the SMs); the tile kernels beyond, where their pipelined column loop keeps more bytes in flight."""
    return cfg.rows and n_rows <= cfg.rows_max_per_sm * _sms(device)


def _persistent_grid(n_items: int, block_n: int, per_sm: int, device: torch.device) -> tuple[int, int, int]:
    """(rows per step, programs, steps per program) for a persistent row-resident launch. Small N gets
    fewer rows per step so that the work still spreads over the SMs."""
    sms = _sms(device)
    while block_n > 1 and _cdiv(n_items, block_n) < sms:
        block_n //= 2
    n_blocks = _cdiv(n_items, block_n)
    programs = max(1, min(n_blocks, sms * per_sm))
    return block_n, programs, _cdiv(n_blocks, programs)


def _dot_precision(hidden: torch.Tensor) -> str:
    return "ieee" if hidden.dtype == torch.float32 else "tf32"


def _grad_layout(spec: EditSpec, has_proj_bias: bool) -> tuple[int, int]:
    """(number of [r, d] gradient blocks, number of [r] gradient blocks) in the flat partial layout:
    [d_lift, d_weight?] then [d_bias, d_proj_bias?]."""
    n_mats = 2 if spec.source_linear else 1
    n_vecs = 2 if has_proj_bias else 1
    return n_mats, n_vecs


def edit_fwd_triton(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    spec: EditSpec,
    dropout: float,
    seed: int,
    save: int,
    config: Optional[LaunchConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernel (one launch). save: 0 nothing, 1 per-slot stats, 2 stats and the original
    rows. Returns (saved rows [N, d] or None, stats [N, 2, R_PAD] fp32 or None)."""
    B, T, d = hidden.shape
    P = positions.shape[1]
    N = B * P
    r = lift.shape[0]
    rp = r_pad(r)
    saved = torch.empty((N, d), dtype=hidden.dtype, device=hidden.device) if save >= 2 else None
    stats = torch.empty((N, 2, rp), dtype=torch.float32, device=hidden.device) if save >= 1 else None
    if N == 0:
        return saved, stats
    cfg = config or launch_config(hidden, r, P)
    w = weight if weight is not None else lift  # placeholder pointers for what a variant does not use
    pb = proj_bias if proj_bias is not None else bias
    saved_ptr = saved if saved is not None else hidden
    stats_ptr = stats if stats is not None else bias
    flags = dict(
        SOURCE_LINEAR=spec.source_linear, SUBTRACT_PROJ=spec.subtract_proj, HAS_PROJ_BIAS=proj_bias is not None,
        ACT=_acts.kernel_code(spec.act), DROPOUT=dropout > 0, SAVE_ROWS=save >= 2, SAVE_STATS=save >= 1,
        R_PAD=rp, BLOCK_P=cfg.block_p,
    )
    if _use_rows(cfg, N, hidden.device):
        block_n, programs, iters = _persistent_grid(N, cfg.rows_block_n, cfg.rows_per_sm, hidden.device)
        _edit_fwd_rows_kernel[(programs,)](
            hidden, *hidden.stride(),
            positions, *positions.stride(),
            lift.contiguous(), w.contiguous(), bias, pb, saved_ptr, stats_ptr,
            T, P, N, d, r, iters,
            seed, dropout,
            BLOCK_N=block_n, BLOCK_D=_next_pow2(d), num_warps=cfg.rows_warps, **flags,
        )
        return saved, stats
    _edit_fwd_kernel[(_cdiv(N, cfg.fwd_block_n),)](
        hidden, *hidden.stride(),
        positions, *positions.stride(),
        lift, *lift.stride(),
        w, *w.stride(),
        bias, pb, saved_ptr, stats_ptr,
        T, P, N, d, r,
        seed, dropout,
        BLOCK_N=cfg.fwd_block_n, BLOCK_D=cfg.fwd_block_d, DOT_PRECISION=_dot_precision(hidden),
        EVICT_KEEP="evict_last" if cfg.l2_hints else "", EVICT_STREAM="evict_first" if cfg.l2_hints else "",
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **flags,
    )
    return saved, stats


def edit_bwd_triton(
    grad_out: torch.Tensor,
    positions: torch.Tensor,
    rows: Optional[torch.Tensor],
    output: Optional[torch.Tensor],
    stats: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    spec: EditSpec,
    has_proj_bias: bool,
    dropout: float,
    seed: int,
    need_grad_hidden: bool,
    config: Optional[LaunchConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the backward (step 1, step 2, and the partial-sum reduction: three launches).

    rows: the saved original rows [N, d], or None with output = the op's output [B, T, d] (recompute).
    Returns (hidden gradient [B, T, d] in grad_out's dtype or None, flat fp32 parameter gradients laid
    out as _grad_layout says)."""
    B, T, d = grad_out.shape
    P = positions.shape[1]
    N = B * P
    r = lift.shape[0]
    rp = r_pad(r)
    n_mats, n_vecs = _grad_layout(spec, has_proj_bias)
    M = n_mats * r * d + n_vecs * r
    dev = grad_out.device
    grad_hidden = torch.empty((B, T, d), dtype=grad_out.dtype, device=dev) if need_grad_hidden else None
    if N == 0 or B * T == 0:
        if need_grad_hidden:
            grad_hidden.copy_(grad_out)
        return grad_hidden, torch.zeros(M, dtype=torch.float32, device=dev)
    cfg = config or launch_config(grad_out, r, P)
    row_major = need_grad_hidden
    n_items = B * T if row_major else N
    n_blocks = _cdiv(n_items, cfg.bwd_block_n)
    n_cblk = _cdiv(d, cfg.bwd_block_d)
    target = cfg.bwd_programs or 4 * _sms(dev)
    n_groups = max(1, min(n_blocks, _cdiv(target, n_cblk)))
    blocks_per_group = _cdiv(n_blocks, n_groups)
    n_groups = _cdiv(n_blocks, blocks_per_group)
    # The gradients get their own allocation (p.grad keeps it); the rest shares one workspace, since
    # each allocation costs host time: [partials | step-1 scratch | slot map]. With one group the
    # partial sums are the result.
    grads = torch.empty(M, dtype=torch.float32, device=dev)
    n_part = 0 if n_groups == 1 else n_groups * M
    n_scratch = N * 2 * rp
    work = torch.empty(n_part + n_scratch + n_items, dtype=torch.float32, device=dev)
    part = grads if n_groups == 1 else work[:n_part]
    scratch = work[n_part : n_part + n_scratch]
    item_slot = work[n_part + n_scratch :].view(torch.int32)
    act = _acts.kernel_code(spec.act)
    if _use_rows(cfg, N, dev):
        block_n, programs, iters = _persistent_grid(n_items, cfg.rows_block_n, cfg.rows_per_sm, dev)
        _edit_bwd_project_rows_kernel[(programs,)](
            grad_out, *grad_out.stride(),
            positions, *positions.stride(),
            lift.contiguous(), stats, scratch, item_slot,
            T, P, N, d, r, n_items, iters,
            seed, dropout,
            SOURCE_LINEAR=spec.source_linear, ACT=act, DROPOUT=dropout > 0, ROW_MAJOR=row_major,
            R_PAD=rp, BLOCK_N=block_n, BLOCK_D=_next_pow2(d), BLOCK_P=cfg.block_p, num_warps=cfg.rows_warps,
        )
    else:
        _edit_bwd_project_kernel[(_cdiv(n_items, cfg.bwd_block_n),)](
            grad_out, *grad_out.stride(),
            positions, *positions.stride(),
            lift, *lift.stride(),
            stats, scratch, item_slot,
            T, P, N, d, r, n_items,
            seed, dropout,
            SOURCE_LINEAR=spec.source_linear, ACT=act, DROPOUT=dropout > 0, ROW_MAJOR=row_major,
            R_PAD=rp, BLOCK_N=cfg.bwd_block_n, BLOCK_D=cfg.bwd_block_d, BLOCK_P=cfg.block_p,
            DOT_PRECISION=_dot_precision(grad_out), num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages,
        )
    recompute = rows is None
    u = output if recompute else rows
    u_strides = output.stride() if recompute else (d, 0, 1)
    w = weight if weight is not None else lift
    dx = grad_hidden if need_grad_hidden else grad_out  # placeholder pointer when not written
    _edit_bwd_main_kernel[(n_groups, n_cblk)](
        grad_out, *grad_out.stride(),
        dx, *(dx.stride() if need_grad_hidden else (0, 0, 0)),
        u, *u_strides,
        positions, *positions.stride(),
        lift, *lift.stride(),
        w, *w.stride(),
        stats, scratch, item_slot, part,
        T, P, d, r, n_items, M, blocks_per_group,
        seed, dropout,
        SOURCE_LINEAR=spec.source_linear,
        SUBTRACT_PROJ=spec.subtract_proj,
        HAS_PROJ_BIAS=has_proj_bias,
        DROPOUT=dropout > 0,
        RECOMPUTE=recompute,
        ROW_MAJOR=row_major,
        WRITE_DX=need_grad_hidden,
        R_PAD=rp, BLOCK_N=cfg.bwd_block_n, BLOCK_D=cfg.bwd_block_d, DOT_PRECISION=_dot_precision(grad_out),
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages,
    )
    if n_groups == 1:
        return grad_hidden, grads
    block = 1024
    _sum_partials_kernel[(_cdiv(M, block),)](part, grads, n_groups, M, BLOCK=block)
    return grad_hidden, grads


# ------------------------------------------------------------------------------------------------
# Registered ops: torch.compile sees them as opaque calls with known mutation and output shapes.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("reft_kernels::edit_fwd", mutates_args={"hidden"})
def edit_fwd_op(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    source_linear: bool,
    subtract_proj: bool,
    act: str,
    dropout: float,
    seed: int,
    save: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: edits hidden in place; returns (saved rows, per-slot stats) for the backward."""
    spec = _spec(source_linear, subtract_proj, act)
    saved, stats = edit_fwd_triton(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, save)
    # a custom op returns fresh tensors: 0-element ones stand for what was not computed
    return (saved if saved is not None else hidden.new_empty((0,)),
            stats if stats is not None else hidden.new_empty((0,), dtype=torch.float32))


@edit_fwd_op.register_fake
def _(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout, seed, save):
    N = hidden.shape[0] * positions.shape[1]
    saved = hidden.new_empty((N, hidden.shape[-1]) if save >= 2 else (0,))
    stats = hidden.new_empty((N, 2, r_pad(lift.shape[0])) if save >= 1 else (0,), dtype=torch.float32)
    return saved, stats


@torch.library.custom_op("reft_kernels::edit_bwd", mutates_args=())
def edit_bwd_op(
    grad_out: torch.Tensor,
    positions: torch.Tensor,
    rows: Optional[torch.Tensor],
    output: Optional[torch.Tensor],
    stats: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    source_linear: bool,
    subtract_proj: bool,
    has_proj_bias: bool,
    act: str,
    dropout: float,
    seed: int,
    need_grad_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (hidden gradient or empty, flat fp32 parameter gradients)."""
    spec = _spec(source_linear, subtract_proj, act)
    grad_hidden, grads = edit_bwd_triton(
        grad_out, positions, rows, output, stats, lift, weight, spec, has_proj_bias, dropout, seed, need_grad_hidden
    )
    return grad_hidden if grad_hidden is not None else grad_out.new_empty((0,)), grads


@edit_bwd_op.register_fake
def _(grad_out, positions, rows, output, stats, lift, weight, source_linear, subtract_proj, has_proj_bias, act,
      dropout, seed, need_grad_hidden):
    r, d = lift.shape
    n_mats, n_vecs = _grad_layout(_spec(source_linear, subtract_proj, act), has_proj_bias)
    grad_hidden = grad_out.new_empty(grad_out.shape if need_grad_hidden else (0,))
    return grad_hidden, grad_out.new_empty((n_mats * r * d + n_vecs * r,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


def _fwd(hidden, positions, lift, weight, bias, proj_bias, spec: EditSpec, dropout, seed, save, impl="triton"):
    """Forward through a registered op when torch.compile traces, else straight to the implementation: the
    dispatcher round trip of a Python custom op costs tens of microseconds per call (bench/ measures it),
    which is the whole budget of a small edit. impl: "triton" (reft_kernels::edit_fwd, launcher) or "cpp"
    (reft_kernels_cpp::edit_fwd, the C++ CPU kernel; a C++-registered op costs a few microseconds to call,
    so eager calls go through the dispatcher too). Returns (saved rows or None, stats or None)."""
    args = (hidden, positions, lift, weight, bias, proj_bias, spec.source_linear, spec.subtract_proj, spec.act,
            dropout, seed, save)
    compiling = torch.compiler.is_compiling()
    if impl == "cpp" or compiling:
        op = torch.ops.reft_kernels_cpp.edit_fwd if impl == "cpp" else torch.ops.reft_kernels.edit_fwd
        saved, stats = op.default(*args)
        if impl == "cpp" and not compiling:
            torch.autograd.graph.increment_version(hidden)  # C++ ops without an autograd kernel do not bump it
        return (saved if save >= 2 else None), (stats if save >= 1 else None)
    out = edit_fwd_triton(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, save)
    torch.autograd.graph.increment_version(hidden)  # what the registered op's declared mutation records
    return out


def _bwd(grad_out, positions, rows, output, stats, lift, weight, spec: EditSpec, has_proj_bias, dropout, seed, need_dx,
         impl="triton"):
    if impl == "cpp" or torch.compiler.is_compiling():
        op = torch.ops.reft_kernels_cpp.edit_bwd if impl == "cpp" else torch.ops.reft_kernels.edit_bwd
        grad_hidden, grads = op.default(
            grad_out, positions, rows, output, stats, lift, weight, spec.source_linear, spec.subtract_proj,
            has_proj_bias, spec.act, dropout, seed, need_dx,
        )
        return (grad_hidden if need_dx else None), grads
    return edit_bwd_triton(grad_out, positions, rows, output, stats, lift, weight, spec, has_proj_bias, dropout, seed, need_dx)


def _split_grads(flat: torch.Tensor, spec: EditSpec, r: int, d: int, has_proj_bias: bool):
    """Views of the flat gradient buffer: d_lift, d_weight (or None), d_bias, d_proj_bias (or None)."""
    n_mats, n_vecs = _grad_layout(spec, has_proj_bias)
    parts = flat.split([r * d] * n_mats + [r] * n_vecs)
    d_lift = parts[0].view(r, d)
    d_weight = parts[1].view(r, d) if spec.source_linear else None
    d_bias = parts[n_mats]
    d_proj_bias = parts[n_mats + 1] if has_proj_bias else None
    return d_lift, d_weight, d_bias, d_proj_bias


def _cast(grad: Optional[torch.Tensor], like: Optional[torch.Tensor], wanted: bool):
    if not wanted or grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


class EditFunction(torch.autograd.Function):
    """Autograd for the in-place fused edit, used when a gradient is needed. The registered ops cannot
    carry the autograd formula themselves (torch.library.register_autograd refuses ops that mutate an
    input), so this Function wraps them and declares the in-place write with ctx.mark_dirty; Dynamo
    traces it."""

    @staticmethod
    def forward(ctx, hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, recompute, impl):
        recompute = recompute and dropout == 0.0
        rows, stats = _fwd(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, 1 if recompute else 2,
                           impl)
        ctx.mark_dirty(hidden)
        ctx.save_for_backward(positions, None if recompute else rows, stats, lift, weight, bias, proj_bias,
                              hidden if recompute else None)
        ctx.spec, ctx.dropout, ctx.seed, ctx.recompute, ctx.impl = spec, dropout, seed, recompute, impl
        return hidden

    @staticmethod
    def backward(ctx, grad_out):
        positions, rows, stats, lift, weight, bias, proj_bias, output = ctx.saved_tensors
        spec = ctx.spec
        need = ctx.needs_input_grad
        has_pb = proj_bias is not None
        grad_hidden, flat = _bwd(grad_out, positions, rows, output, stats, lift, weight, spec, has_pb, ctx.dropout,
                                 ctx.seed, need[0], ctx.impl)
        d_lift, d_weight, d_bias, d_proj_bias = _split_grads(flat, spec, lift.shape[0], lift.shape[1], has_pb)
        return (
            grad_hidden if need[0] else None,
            None,
            _cast(d_lift, lift, need[2]),
            _cast(d_weight, weight, need[3]),
            _cast(d_bias, bias, need[4]),
            _cast(d_proj_bias, proj_bias, need[5]),
            None, None, None, None, None,
        )


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

_warned_fallback: set[str] = set()
FUSED = ("triton", "cpp")  # the backends with fused kernels (fp32 compute, activations.SUPPORTED)


def _has_float64(*tensors) -> bool:
    for x in tensors:  # (a loop: this runs on every automatic CPU call)
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _spec(source_linear: bool, subtract_proj: bool, act: str) -> EditSpec:
    return EditSpec(source_linear=source_linear, subtract_proj=subtract_proj, act=act)


def reft_edit(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    lift: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: torch.Tensor,
    proj_bias: Optional[torch.Tensor] = None,
    *,
    source_linear: bool = True,
    subtract_proj: bool = True,
    act: Optional[str] = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    recompute: bool = False,
    check_positions: Optional[bool] = None,
    names: tuple[str, str, str, str] = ("lift", "weight", "bias", "proj_bias"),
) -> torch.Tensor:
    """The general ReFT edit (module docstring); loreft and direft are named cases of it.

    names: how the caller's documentation spells lift, weight, bias and proj_bias, for error messages.
    recompute: keep no copy of the edited rows for the backward; rebuild them from the output instead
    (saves N*d elements of memory and one write per row). The returned tensor must then not be edited in
    place before backward (autograd raises if it is; a second edit of the same tensor does that). Ignored
    while dropout is active, since dropped elements cannot be rebuilt.
    check_positions: None checks position values when they are on the CPU (free) and skips the check for
    device tensors (it would sync); True or False forces it (see validation.py).
    """
    act = _acts.canonical(act)
    spec = _spec(source_linear, subtract_proj, act)
    requested = backend
    _v.check_hidden_is_tensor(hidden)
    chosen = _backend.resolve(backend, hidden)
    has_f64 = _has_float64(hidden, lift, weight, bias, proj_bias)
    if chosen == "cpp" and requested is None and has_f64:
        chosen = "torch"  # the automatic choice: the fused kernels compute in fp32, float64 asks for the reference
    if chosen in FUSED and act not in _acts.SUPPORTED:
        if requested in FUSED:
            _acts.kernel_code(act)  # raises with the list of supported names
        if act not in _warned_fallback:
            _warned_fallback.add(act)
            import warnings

            warnings.warn(f"act={act!r} has no fused kernel; running the torch reference backend", stacklevel=3)
        chosen = "torch"
    _v.check_hidden(hidden, chosen)
    compiling = torch.compiler.is_compiling()
    if chosen == "cpp" and hidden.is_cuda and compiling:
        chosen = "triton"  # the CUDA host path serves eager calls; compiled graphs take the Triton ops
    # eager C++ calls check the position values inside the op, in the pass that maps slots to rows
    cpp_eager = chosen == "cpp" and not compiling
    positions = _v.check_positions(positions, hidden, False if cpp_eager else check_positions)
    check_in_op = cpp_eager and _v.values_checked(positions, check_positions)
    lift_name, weight_name, bias_name, proj_bias_name = names
    if source_linear:
        r = _v.check_matrix(weight, weight_name, hidden, None)
        _v.check_matrix(lift, lift_name, hidden, r)
    else:
        if weight is not None:
            raise ValueError(f"{weight_name} must be None when the source is the bias alone")
        r = _v.check_matrix(lift, lift_name, hidden, None)
    _v.check_vector(bias, bias_name, hidden, r)
    if proj_bias is not None:
        if not subtract_proj:
            raise ValueError(f"{proj_bias_name} needs subtract_proj=True")
        _v.check_vector(proj_bias, proj_bias_name, hidden, r)
    dropout = _v.check_dropout(dropout)
    if not training:
        dropout = 0.0

    if chosen == "torch":
        return edit_reference(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, training)

    if has_f64:  # (check_hidden refused a float64 hidden for the fused backends: a parameter is)
        for name, x in ((lift_name, lift), (weight_name, weight), (bias_name, bias), (proj_bias_name, proj_bias)):
            if x is not None and x.dtype == torch.float64:
                raise TypeError(f"{name} is float64; backend={chosen!r} computes in fp32. Use backend='torch' for float64")
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout > 0 else 0
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or lift.requires_grad or bias.requires_grad
        or (weight is not None and weight.requires_grad) or (proj_bias is not None and proj_bias.requires_grad)
    )
    if (requested is None and chosen == "triton" and hidden.is_cuda and not compiling and not needs_grad
            and dropout == 0.0 and _extension.cuda_host_enabled() and _extension.cuda_available()):
        cpp_eager = True  # REFT_KERNELS_CUDA_HOST=1: eager inference on CUDA takes the C++-launched kernel
    if cpp_eager:
        if hidden.is_cuda and (needs_grad or dropout > 0):
            raise ValueError("backend='cpp' on CUDA tensors runs the forward without gradients or dropout (the CUDA "
                             "host path, csrc/edit_cuda.cu); use backend='triton' to train")
        # eager: one C++ op (csrc/): on the CPU with its autograd formula registered in C++, no Python
        # autograd.Function on the way in or out; on CUDA a kernel launched from C++. torch.compile traces
        # EditFunction below instead
        return torch.ops.reft_kernels_cpp.edit.default(
            hidden, positions, lift, weight, bias, proj_bias, spec.source_linear, spec.subtract_proj, spec.act,
            dropout, seed, recompute, check_in_op,
        )
    if needs_grad:
        return EditFunction.apply(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, recompute, chosen)
    _fwd(hidden, positions, lift, weight, bias, proj_bias, spec, dropout, seed, 0, chosen)  # inference: nothing saved
    return hidden


def loreft(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    R: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    *,
    act: Optional[str] = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    recompute: bool = False,
    check_positions: Optional[bool] = None,
) -> torch.Tensor:
    """LoReFT at the given positions: every edited row h becomes Φ(h) = h + Rᵀ(act(W h + b) − R h).

    Args:
        hidden: [B, T, d] fp32, fp16 or bf16, any strides (fp64 too with backend="torch"). Edited in place
            and returned; every row not named by positions stays bit-for-bit unchanged.
        positions: [B, P] int32 or int64, on the CPU or on hidden's device. positions[i, j] = t edits
            hidden[i, t]; -1 leaves the slot empty. A position named twice in a row is edited once and its
            gradient counted once (pyreft multiplies that gradient by the count).
        R: [r, d], rows orthonormal (keeping them so is the caller's job), 1 <= r <= d.
        W: [r, d]; b: [r]. Parameters may be fp32 while hidden is 16-bit: the math runs in fp32.
        act: None (identity) or a transformers ACT2FN name. The fused kernels support
            activations.SUPPORTED (relu, gelu, gelu_new, silu, tanh, sigmoid, ...); with backend=None any
            other name runs the torch backend (with a one-time warning), with backend="triton"/"cpp" it raises.
        dropout, training: pyreft's dropout, applied to the whole output row at edited positions and only
            when training. The fused kernels regenerate the mask in the backward from a seed drawn from
            torch's CPU generator (torch.manual_seed makes runs repeatable).
        backend: "triton", "cpp", "torch" or None (see reft_kernels.backend).
        recompute, check_positions: see reft_edit.

    Differentiable with respect to hidden, R, W and b.
    """
    return reft_edit(
        hidden, positions, R, W, b, None, source_linear=True, subtract_proj=True, act=act, dropout=dropout,
        training=training, backend=backend, recompute=recompute, check_positions=check_positions,
        names=("R", "W", "b", "proj_bias"),
    )


def direft(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    W1: torch.Tensor,
    b: torch.Tensor,
    W2: torch.Tensor,
    *,
    act: Optional[str] = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    recompute: bool = False,
    check_positions: Optional[bool] = None,
) -> torch.Tensor:
    """DiReFT (the paper's; pyreft's NodireftIntervention): Φ(h) = h + W2ᵀ act(W1 h + b).

    W1, W2: [r, d] (free, no orthonormality); b: [r]. Everything else as in loreft.
    """
    return reft_edit(
        hidden, positions, W2, W1, b, None, source_linear=True, subtract_proj=False, act=act, dropout=dropout,
        training=training, backend=backend, recompute=recompute, check_positions=check_positions,
        names=("W2", "W1", "b", "proj_bias"),
    )
