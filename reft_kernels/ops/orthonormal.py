"""Orthonormalization of low-rank projections: reference, Triton kernels, launchers, registered ops,
autograd, public function. One file, top to bottom.

The map (Cholesky-QR). A [r, d] with full row rank, any scale:

    G = A A^T          (r x r, the Gram matrix)
    G = C C^T          (C lower triangular, positive diagonal: the Cholesky factor)
    Q = C^-1 A         (rows orthonormal: Q Q^T = C^-1 G C^-T = I)

Q is the Q factor of the QR decomposition of A^T with a positive diagonal, i.e. Gram-Schmidt on the rows
of A. It is invariant to scaling A, so weight decay on A cannot collapse Q (pyreft's Householder
parametrization returns an exactly zero R after one AdamW step with weight decay, see
../shared/notes/reft-semantics.md), and no d x d buffer is needed (pyreft keeps 64 MiB per
intervention at d = 4096).

The gradient. With N = gQ Q^T (r x r) and K = sym(N) = tril(N, -1) + tril(N, -1)^T + diag(N):

    gA = C^-T (gQ - K Q)

(derivation: dQ = C^-1 dA - X Q with X = C^-1 dC lower triangular and X + X^T = S + S^T, S = C^-1 dA Q^T;
then <gQ, dQ> = <C^-T gQ, dA> - <sym(N), S> = <C^-T (gQ - sym(N) Q), dA>.) tests/test_orthonormal.py
checks it against finite differences in float64 and against torch's own QR gradient.

Precision. The Gram matrix is accumulated in fp32 per block of columns and summed across blocks in
fp64; the r x r Cholesky factorization and triangular inverse run in fp64 (a few hundred flops). The
orthonormality error ||Q Q^T - I|| then stays near fp32 rounding (~1e-7 at d = 4096) instead of the
kappa(A)^2 * 1e-7 of an all-fp32 Cholesky-QR.

Batching. The kernels take a stack A [L, r, d] (one entry per intervention) and run in two launches
forward and two backward whatever L is: each program owns one (matrix, column block) pair; the first
launch writes partial r x r products per block, the second sums them in a fixed order (deterministic),
factorizes, and writes its column block of the result. Every program of a matrix redoes the tiny
factorization, which is cheaper than a third launch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import backend as _backend
from .fused_edit import _cdiv, _next_pow2, r_pad

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

# The Triton path keeps r x r tiles of R_PAD x R_PAD fp64 values in registers; above this rank the
# reference (torch.linalg in fp64) runs instead. ReFT ranks are 1 to 32 in practice.
MAX_TRITON_RANK = 64


# ------------------------------------------------------------------------------------------------
# Reference (the torch backend): torch.linalg in float64, differentiated by autograd
# ------------------------------------------------------------------------------------------------


def stereographic_premap(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The matrix the default parametrization orthonormalizes: row by row, the inverse stereographic
    projection of delta's component orthogonal to base (B, orthonormal rows) onto the sphere around B:

        P = delta - (delta B^T) B,   A_i = (1 - |P_i|^2) B_i + 2 P_i

    A row moves by the angle 2 atan(|P_i|) away from B_i, the angle-per-parameter profile of torch's
    Householder map (so Adam takes the same angular steps as in pyreft: bench/reference convergence),
    where orthonormalizing B + P directly gives atan(|P_i|), half the rate at the start and a rate that
    decays as the parameter grows. delta = 0 gives A = B. [..., r, d], any float dtype; batched.
    """
    perp = delta - (delta @ base.mT) @ base
    s2 = (perp * perp).sum(-1, keepdim=True)
    return (1.0 - s2) * base + 2.0 * perp


def orthonormalize_reference(A: torch.Tensor) -> torch.Tensor:
    """Q = C^-1 A with C C^T = A A^T, for A [..., r, d]; computed in float64, returned in A's dtype."""
    A64 = A.double()
    C = torch.linalg.cholesky(A64 @ A64.mT)
    return torch.linalg.solve_triangular(C, A64, upper=False).to(A.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

if _backend.HAS_TRITON:

    @triton.jit
    def _sum_partials(
        PART,  # [L, S, R_PAD, R_PAD] fp32 partial r x r products
        mat,  # which matrix of the stack
        S,  # column blocks per matrix
        R_PAD: tl.constexpr,
    ):
        """The r x r product of one matrix: its S partials summed in fp64, in a fixed order."""
        i = tl.arange(0, R_PAD)[:, None]
        j = tl.arange(0, R_PAD)[None, :]
        base = PART + mat.to(tl.int64) * S * R_PAD * R_PAD
        acc = tl.zeros([R_PAD, R_PAD], dtype=tl.float64)
        for s in range(0, S):
            acc += tl.load(base + s * R_PAD * R_PAD + i * R_PAD + j).to(tl.float64)
        return acc

    @triton.jit
    def _cholesky_inverse(
        G,  # [R_PAD, R_PAD] fp64, symmetric positive definite in its leading r x r block
        r,  # rank
        R_PAD: tl.constexpr,
    ):
        """C^-1 for the lower Cholesky factor C of G (fp64); identity on the padding block. Column-by-
        column (outer product) factorization, then forward substitution row by row, r steps each (a
        runtime bound: padded steps would be wasted work). Register tiles have no dynamic indexing, so
        rows and columns are picked out with masked sums."""
        idx = tl.arange(0, R_PAD)
        i = idx[:, None]
        j = idx[None, :]
        eye_pad = tl.where((i == j) & (i >= r), 1.0, 0.0).to(tl.float64)
        C = eye_pad
        for k in range(0, r):
            g_col = tl.sum(tl.where(j == k, G, 0.0), axis=1)  # G[:, k]
            g_kk = tl.sum(tl.where(idx == k, g_col, 0.0), axis=0)
            c_col = tl.where(idx >= k, g_col / tl.sqrt(g_kk), 0.0)  # column k of C
            C = tl.where(j == k, c_col[:, None], C)
            G = G - c_col[:, None] * c_col[None, :]  # Schur complement: what is left to factorize
        X = eye_pad
        for k in range(0, r):
            c_row = tl.sum(tl.where(i == k, C, 0.0), axis=0)  # C[k, :]
            c_kk = tl.sum(tl.where(idx == k, c_row, 0.0), axis=0)
            done = tl.sum(c_row[:, None] * X, axis=0)  # sum over m < k of C[k, m] X[m, :] (X[k:r] is 0)
            x_row = (tl.where(idx == k, 1.0, 0.0) - done) / c_kk
            X = tl.where(i == k, x_row[None, :], X)
        return X

    @triton.jit
    def _column_block(mat, blk, c, r, d, COLS: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr):
        """Offsets and mask of the [R_PAD, BLOCK_D] tile at column c of program blk's columns, matrix mat."""
        rows = tl.arange(0, R_PAD)
        cols = blk * COLS + c + tl.arange(0, BLOCK_D)
        offs = mat.to(tl.int64) * r * d + rows[:, None] * d + cols[None, :]
        return offs, (rows[:, None] < r) & (cols[None, :] < d)

    @triton.jit
    def _gram_partial_kernel(
        A,  # [L, r, d] fp32, contiguous: the stack of matrices
        B,  # [L, r, d] fp32, contiguous: second operand (A itself for the Gram matrix, Q for gQ Q^T)
        PART,  # [L, S, R_PAD, R_PAD] fp32 out: per-block partial A B^T
        r,  # rank
        d,  # width
        S,  # column blocks per matrix
        COLS: tl.constexpr,  # columns per program (a multiple of BLOCK_D)
        BLOCK_D: tl.constexpr,  # columns per tl.dot
        R_PAD: tl.constexpr,  # r padded to a power of two >= 16 (tl.dot's minimum)
    ):
        """Partial r x r products A[:, block] B[:, block]^T, one program per (matrix, column block)."""
        mat = tl.program_id(0)
        blk = tl.program_id(1)
        acc = tl.zeros([R_PAD, R_PAD], dtype=tl.float32)
        for c in range(0, COLS, BLOCK_D):
            offs, m = _column_block(mat, blk, c, r, d, COLS, BLOCK_D, R_PAD)
            a = tl.load(A + offs, mask=m, other=0.0)
            b = tl.load(B + offs, mask=m, other=0.0)
            # ieee: tf32 would leave 1e-3 errors in the Gram matrix, i.e. in the orthonormality
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        i = tl.arange(0, R_PAD)[:, None]
        j = tl.arange(0, R_PAD)[None, :]
        tl.store(PART + (mat.to(tl.int64) * S + blk) * R_PAD * R_PAD + i * R_PAD + j, acc)

    @triton.jit
    def _cholqr_apply_kernel(
        A,  # [L, r, d] fp32, contiguous
        PART,  # [L, S, R_PAD, R_PAD] fp32: partial Gram matrices from _gram_partial_kernel
        Q,  # [L, r, d] fp32 out: orthonormal rows
        CINV,  # [L, R_PAD, R_PAD] fp32 out: C^-1 (written by each matrix's first program), for the backward
        r,  # rank
        d,  # width
        S,  # column blocks per matrix
        COLS: tl.constexpr,  # columns per program
        BLOCK_D: tl.constexpr,  # columns per tl.dot
        R_PAD: tl.constexpr,  # padded rank
    ):
        """Q[:, block] = C^-1 A[:, block], after summing the Gram partials and factorizing (fp64)."""
        mat = tl.program_id(0)
        blk = tl.program_id(1)
        x = _cholesky_inverse(_sum_partials(PART, mat, S, R_PAD), r, R_PAD)
        i = tl.arange(0, R_PAD)[:, None]
        j = tl.arange(0, R_PAD)[None, :]
        x32 = x.to(tl.float32)
        tl.store(CINV + mat.to(tl.int64) * R_PAD * R_PAD + i * R_PAD + j, x32,
                 mask=(i >= 0) & (j >= 0) & (blk == 0))
        for c in range(0, COLS, BLOCK_D):
            offs, m = _column_block(mat, blk, c, r, d, COLS, BLOCK_D, R_PAD)
            a = tl.load(A + offs, mask=m, other=0.0)
            tl.store(Q + offs, tl.dot(x32, a, input_precision="ieee"), mask=m)

    @triton.jit
    def _cholqr_grad_kernel(
        GQ,  # [L, r, d] fp32, contiguous: gradient with respect to Q
        Q,  # [L, r, d] fp32, contiguous: the forward's output
        PART,  # [L, S, R_PAD, R_PAD] fp32: partial gQ Q^T from _gram_partial_kernel
        CINV,  # [L, R_PAD, R_PAD] fp32: C^-1 from the forward
        GA,  # [L, r, d] fp32 out: gradient with respect to A
        r,  # rank
        d,  # width
        S,  # column blocks per matrix
        COLS: tl.constexpr,  # columns per program
        BLOCK_D: tl.constexpr,  # columns per tl.dot
        R_PAD: tl.constexpr,  # padded rank
    ):
        """GA[:, block] = C^-T (gQ - sym(N) Q)[:, block], N = gQ Q^T (module docstring)."""
        mat = tl.program_id(0)
        blk = tl.program_id(1)
        i = tl.arange(0, R_PAD)[:, None]
        j = tl.arange(0, R_PAD)[None, :]
        n = _sum_partials(PART, mat, S, R_PAD).to(tl.float32)
        k_sym = tl.where(i > j, n, tl.where(i < j, tl.trans(n), n))
        cinv_t = tl.trans(tl.load(CINV + mat.to(tl.int64) * R_PAD * R_PAD + i * R_PAD + j))
        for c in range(0, COLS, BLOCK_D):
            offs, m = _column_block(mat, blk, c, r, d, COLS, BLOCK_D, R_PAD)
            gq = tl.load(GQ + offs, mask=m, other=0.0)
            q = tl.load(Q + offs, mask=m, other=0.0)
            inner = gq - tl.dot(k_sym, q, input_precision="ieee")
            tl.store(GA + offs, tl.dot(cinv_t, inner, input_precision="ieee"), mask=m)


# ------------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def launch_blocks(d: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_D, COLS): columns per tl.dot and per program. On a GPU 512 columns per program give
    L * d / 512 programs (256 for 32 matrices at d = 4096), each reading 32 KiB: enough programs to
    spread over the SMs, few enough partials to sum. Under the CPU interpreter each Triton op costs
    Python time, so a few wide blocks."""
    dp = _next_pow2(d)
    if on_gpu:
        block_d = min(128, max(16, dp))
        return block_d, max(block_d, min(512, dp))
    block_d = min(1024, max(16, dp))
    return block_d, block_d


def launch_warps(rp: int, factorizes: bool) -> int:
    """Warps per program: 4, or 8 for the kernels that hold the fp64 R_PAD x R_PAD tiles of the
    factorization when R_PAD > 32 (more threads to spread those registers over)."""
    return 8 if factorizes and rp > 32 else 4


def orthonormalize_fwd_triton(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [L, r, d] fp32 contiguous -> (Q [L, r, d], C^-1 [L, R_PAD, R_PAD]). Two launches."""
    L, r, d = A.shape
    rp = r_pad(r)
    block_d, cols = launch_blocks(d, A.is_cuda)
    S = _cdiv(d, cols)
    part = torch.empty((L, S, rp, rp), device=A.device, dtype=torch.float32)
    Q = torch.empty_like(A)
    cinv = torch.empty((L, rp, rp), device=A.device, dtype=torch.float32)
    _gram_partial_kernel[(L, S)](A, A, part, r, d, S, COLS=cols, BLOCK_D=block_d, R_PAD=rp,
                                 num_warps=launch_warps(rp, False))
    _cholqr_apply_kernel[(L, S)](A, part, Q, cinv, r, d, S, COLS=cols, BLOCK_D=block_d, R_PAD=rp,
                                 num_warps=launch_warps(rp, True))
    return Q, cinv


def orthonormalize_bwd_triton(grad_q: torch.Tensor, Q: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to A [L, r, d] (fp32). Two launches."""
    L, r, d = Q.shape
    rp = r_pad(r)
    block_d, cols = launch_blocks(d, Q.is_cuda)
    S = _cdiv(d, cols)
    grad_q = grad_q.float().contiguous()
    part = torch.empty((L, S, rp, rp), device=Q.device, dtype=torch.float32)
    grad_a = torch.empty_like(Q)
    _gram_partial_kernel[(L, S)](grad_q, Q, part, r, d, S, COLS=cols, BLOCK_D=block_d, R_PAD=rp,
                                 num_warps=launch_warps(rp, False))
    _cholqr_grad_kernel[(L, S)](grad_q, Q, part, cinv, grad_a, r, d, S, COLS=cols, BLOCK_D=block_d, R_PAD=rp,
                                num_warps=launch_warps(rp, True))
    return grad_a


# ------------------------------------------------------------------------------------------------
# Registered ops (what torch.compile sees)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("reft_kernels::orthonormalize_fwd", mutates_args=())
def orthonormalize_fwd_op(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky-QR of A [L, r, d] fp32: (Q, C^-1 padded to [L, R_PAD, R_PAD])."""
    return orthonormalize_fwd_triton(A)


@orthonormalize_fwd_op.register_fake
def _(A):
    L, r, _ = A.shape
    rp = r_pad(r)
    return torch.empty_like(A), A.new_empty((L, rp, rp))


@torch.library.custom_op("reft_kernels::orthonormalize_bwd", mutates_args=())
def orthonormalize_bwd_op(grad_q: torch.Tensor, Q: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
    """Gradient of the batched Cholesky-QR with respect to A."""
    return orthonormalize_bwd_triton(grad_q, Q, cinv)


@orthonormalize_bwd_op.register_fake
def _(grad_q, Q, cinv):
    return torch.empty_like(Q)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


class OrthonormalizeFunction(torch.autograd.Function):
    """Autograd for the batched Triton Cholesky-QR. Eager calls go straight to the launchers (the
    dispatcher round trip of a Python custom op costs tens of microseconds, see fused_edit.py); under
    torch.compile the registered ops run."""

    @staticmethod
    def forward(ctx, A):
        if torch.compiler.is_compiling():
            Q, cinv = torch.ops.reft_kernels.orthonormalize_fwd(A)
        else:
            Q, cinv = orthonormalize_fwd_triton(A)
        ctx.save_for_backward(Q, cinv)
        return Q

    @staticmethod
    def backward(ctx, grad_q):
        Q, cinv = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return torch.ops.reft_kernels.orthonormalize_bwd(grad_q, Q, cinv)
        return orthonormalize_bwd_triton(grad_q, Q, cinv)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def check_stack(A, name: str = "A") -> None:
    """A must be a float tensor [r, d] or [L, r, d] with 1 <= r <= d."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() not in (2, 3):
        raise ValueError(f"{name} must be [r, d] or [L, r, d], got shape {tuple(A.shape)}")
    if not A.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {A.dtype}")
    r, d = A.shape[-2:]
    if not 1 <= r <= d or A.numel() == 0:
        raise ValueError(f"{name} must have 1 <= r <= d (r rows of width d), got shape {tuple(A.shape)}")


def orthonormalize(A: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """The matrix with orthonormal rows that Gram-Schmidt gives from the rows of A (Cholesky-QR).

    Args:
        A: [r, d] or a stack [L, r, d], full row rank (rank-deficient or zero rows give NaN), any scale.
            The Triton backend takes fp32 (pyreft keeps R in fp32); the torch backend any float dtype.
        backend: "triton", "torch" or None (reft_kernels.backend); "cpp" runs the torch backend (there is no
            C++ kernel for this r x d op). Ranks above MAX_TRITON_RANK run the torch backend when backend is
            None.

    Returns Q with A's shape and dtype, rows orthonormal, differentiable with respect to A.
    Triton: two launches forward and two backward for the whole stack, whatever L is.
    """
    check_stack(A)
    chosen = _backend.resolve(backend, A, has_cpp=False)  # r x d: no C++ kernel pays off
    if chosen == "triton" and A.shape[-2] > MAX_TRITON_RANK:
        if backend == "triton":
            raise ValueError(f"backend='triton' orthonormalizes ranks up to {MAX_TRITON_RANK}, got r = {A.shape[-2]}; "
                             "use backend='torch'")
        chosen = "torch"
    if chosen == "torch":
        return orthonormalize_reference(A)
    if A.dtype != torch.float32:
        raise TypeError(f"A must be float32 for backend='triton', got {A.dtype} (backend='torch' takes any float)")
    stack = A if A.dim() == 3 else A.unsqueeze(0)
    stack = stack.contiguous()
    if torch.is_grad_enabled() and stack.requires_grad:
        Q = OrthonormalizeFunction.apply(stack)
    else:
        Q = orthonormalize_fwd_triton(stack)[0]
    return Q if A.dim() == 3 else Q.squeeze(0)
