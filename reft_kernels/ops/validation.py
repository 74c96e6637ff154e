"""Input checks for the ReFT edit ops: bad input becomes a TypeError or ValueError that names the
argument and what was expected, before any kernel runs.

Position values. Checking that every position lies in [-1, T) needs the values on the host. When
positions are on the CPU (the common case for Python callers) the check is free and always done.
When they are already on the GPU it would cost a device-to-host sync per call, so it is skipped unless
REFT_KERNELS_CHECK_POSITIONS=1 (or `check_positions=True` is passed); the kernels then treat any
out-of-range position like -1 (no edit), so a bad index can never touch memory outside hidden.
Inside torch.compile no value is checked (reading one would break the graph).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

CHECK_POSITIONS_ENV = "REFT_KERNELS_CHECK_POSITIONS"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
FUSED_BACKENDS = ("triton", "cpp")  # compute in fp32: no float64
PARAM_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _need_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _need_float(x: torch.Tensor, name: str, allowed) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have a dtype in {[str(d) for d in allowed]}, got {x.dtype}")


def _check_positions_shape(positions, B: int, batch_of: str) -> None:
    """positions: an int32/int64 tensor [B, P]."""
    _need_tensor(positions, "positions")
    if positions.dtype not in INDEX_DTYPES:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.dim() != 2 or positions.shape[0] != B:
        raise ValueError(f"positions must be [B, P] with B={B} ({batch_of}'s batch), got shape {tuple(positions.shape)}")


def _check_no_internal_overlap(hidden: torch.Tensor) -> None:
    if torch._debug_has_internal_overlap(hidden) == 1:
        raise ValueError(
            "hidden has overlapping memory (an expanded or stride-0 view); the edit is written in place, "
            "so pass a tensor whose elements are distinct (e.g. hidden.contiguous())"
        )


def check_hidden_is_tensor(hidden) -> None:
    _need_tensor(hidden, "hidden")


def check_hidden(hidden, backend: str) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, d], got shape {tuple(hidden.shape)}")
    allowed = KERNEL_DTYPES if backend in FUSED_BACKENDS else KERNEL_DTYPES + (torch.float64,)
    _need_float(hidden, "hidden", allowed)
    # (not traceable: under torch.compile this check runs in eager calls only)
    if not torch.compiler.is_compiling():
        _check_no_internal_overlap(hidden)
    if hidden.is_leaf and hidden.requires_grad:
        raise ValueError(
            "hidden is a leaf tensor that requires grad; the edit is written in place, which autograd "
            "forbids on leaves. Pass a non-leaf (e.g. hidden.clone())"
        )
    base = hidden._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(
            "hidden is a view of a leaf tensor that requires grad; the edit is written in place, which autograd "
            "forbids on views of leaves. Pass a non-leaf (e.g. hidden.clone())"
        )


def values_checked(positions: torch.Tensor, check_values: Optional[bool]) -> bool:
    """Whether position values are to be checked: check_values, where None means when they are on the CPU
    (free) or REFT_KERNELS_CHECK_POSITIONS=1; never while torch.compile traces (reading values would break
    the graph; the kernels mask bad positions)."""
    if torch.compiler.is_compiling():
        return False
    if check_values is None:
        return positions.device.type == "cpu" or os.environ.get(CHECK_POSITIONS_ENV) == "1"
    return bool(check_values)


def check_positions(positions, hidden: torch.Tensor, check_values: Optional[bool]) -> torch.Tensor:
    """Checks positions [B, P] and returns them on hidden's device."""
    B, T, _ = hidden.shape
    _check_positions_shape(positions, B, "hidden")
    if positions.device != hidden.device and positions.device.type != "cpu":
        raise ValueError(f"positions must be on the CPU or on hidden's device {hidden.device}, got {positions.device}")
    if values_checked(positions, check_values) and positions.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(positions))  # one op: this check runs on every CPU call
        if lo < -1 or hi >= T:
            raise ValueError(f"positions must lie in [-1, T) with T={T} (-1 = no edit), got values in [{lo}, {hi}]")
    if positions.device != hidden.device:
        positions = positions.to(hidden.device, non_blocking=True)
    return positions


def check_matrix(x, name: str, hidden: torch.Tensor, r: Optional[int]) -> int:
    """Checks a [r, d] parameter; returns r."""
    _need_tensor(x, name)
    d = hidden.shape[-1]
    if x.dim() != 2 or x.shape[1] != d or (r is not None and x.shape[0] != r):
        want = f"[{r if r is not None else 'r'}, {d}]"
        raise ValueError(f"{name} must be {want} (d = hidden.shape[-1]), got shape {tuple(x.shape)}")
    if not 1 <= x.shape[0] <= d:
        raise ValueError(f"{name} must have 1 <= r <= d={d} rows, got r={x.shape[0]}")
    _need_float(x, name, PARAM_DTYPES)
    if x.device != hidden.device:
        raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {x.device}")
    return x.shape[0]


def check_vector(x, name: str, hidden: torch.Tensor, r: int) -> None:
    _need_tensor(x, name)
    if x.shape != (r,):
        raise ValueError(f"{name} must be [{r}] (r), got shape {tuple(x.shape)}")
    _need_float(x, name, PARAM_DTYPES)
    if x.device != hidden.device:
        raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {x.device}")


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    return float(dropout)


# ------------------------------------------------------------------------------------------------
# The mixed-adapter op (ops/mixed_edit.py): the flat layout's hidden and rows, adapter ids, the bank
# ------------------------------------------------------------------------------------------------


def check_tokens(hidden, backend: str) -> None:
    """hidden [n_tokens, d] of the flat layout, checked as check_hidden checks [B, T, d]."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [n_tokens, d] (the flat layout), got shape {tuple(hidden.shape)}")
    if hidden.is_leaf and hidden.requires_grad:  # (checked here: the view below is no leaf)
        raise ValueError("hidden is a leaf tensor that requires grad; the edit is written in place, which autograd "
                         "forbids on leaves. Pass a non-leaf (e.g. hidden.clone())")
    check_hidden(hidden[None], backend)


def _check_index_values(x: torch.Tensor, name: str, lo_ok: int, hi: int, what: str) -> None:
    if x.numel() > 0:
        lo, top = (int(v) for v in torch.aminmax(x))
        if lo < lo_ok or top >= hi:
            raise ValueError(f"{name} must lie in [-1, {what}) with {what}={hi} (-1 = no edit), got values in [{lo}, {top}]")


def check_rows(rows, hidden: torch.Tensor, check_values: Optional[bool]) -> torch.Tensor:
    """The flat layout's rows [N] (indices into hidden's n_tokens, -1 = empty slot); returns them on hidden's
    device."""
    _need_tensor(rows, "rows")
    if rows.dtype not in INDEX_DTYPES:
        raise TypeError(f"rows must be int32 or int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be [N] (indices into hidden's n_tokens), got shape {tuple(rows.shape)}")
    if rows.device != hidden.device and rows.device.type != "cpu":
        raise ValueError(f"rows must be on the CPU or on hidden's device {hidden.device}, got {rows.device}")
    if values_checked(rows, check_values):
        _check_index_values(rows, "rows", -1, hidden.shape[0], "n_tokens")
    return rows.to(hidden.device, non_blocking=True) if rows.device != hidden.device else rows


def check_adapter_ids(ids, positions: torch.Tensor, hidden: torch.Tensor, num_adapters: int, flat: bool,
                      check_values: Optional[bool]) -> torch.Tensor:
    """adapter_ids: [N] for the flat layout, [B] or [B, P] for the batched one (positions [B, P]); values in
    [-1, A). Returns them on hidden's device."""
    _need_tensor(ids, "adapter_ids")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"adapter_ids must be int32 or int64, got {ids.dtype}")
    if flat:
        if tuple(ids.shape) != tuple(positions.shape):
            raise ValueError(f"adapter_ids must be [N] = {list(positions.shape)} (one per row), got shape "
                             f"{tuple(ids.shape)}")
    elif tuple(ids.shape) not in ((positions.shape[0],), tuple(positions.shape)):
        raise ValueError(f"adapter_ids must be [B] = [{positions.shape[0]}] (one per batch row) or [B, P] = "
                         f"{list(positions.shape)} (one per slot), got shape {tuple(ids.shape)}")
    if ids.device != hidden.device and ids.device.type != "cpu":
        raise ValueError(f"adapter_ids must be on the CPU or on hidden's device {hidden.device}, got {ids.device}")
    if values_checked(ids, check_values):
        _check_index_values(ids, "adapter_ids", -1, num_adapters, "A")
    return ids.to(hidden.device, non_blocking=True) if ids.device != hidden.device else ids


def check_bank(lift, weight, bias, proj_bias, kinds, ranks, dropout, hidden: torch.Tensor,
               dtypes=PARAM_DTYPES) -> None:
    """The bank's tensors agree with each other and with hidden: lift and weight [A, r, d] with hidden's d,
    bias and proj_bias [A, r] (float, in `dtypes`), kinds and ranks [A] int32, dropout [A] float32, all on
    hidden's device (weight, bias and proj_bias may be None: the backward has no bias)."""
    d = hidden.shape[-1]
    _need_tensor(lift, "lift")
    if lift.dim() != 3 or lift.shape[2] != d or lift.shape[0] < 1 or lift.shape[1] < 1:
        raise ValueError(f"the bank's lift must be [A, r, d] with d = {d} (hidden's), A >= 1 and r >= 1, got shape "
                         f"{tuple(lift.shape)}")
    A, R, _ = lift.shape
    for name, x, shape in (("weight", weight, (A, R, d)), ("bias", bias, (A, R)), ("proj_bias", proj_bias, (A, R))):
        if x is None:
            continue
        _need_tensor(x, name)
        if tuple(x.shape) != shape:
            raise ValueError(f"the bank's {name} must be {list(shape)} (lift is {list(lift.shape)}), got shape "
                             f"{tuple(x.shape)}")
    for name, x, dt in (("kinds", kinds, torch.int32), ("ranks", ranks, torch.int32), ("dropout", dropout, torch.float32)):
        _need_tensor(x, name)
        if tuple(x.shape) != (A,):
            raise ValueError(f"the bank's {name} must be [A] = [{A}], got shape {tuple(x.shape)}")
        if x.dtype != dt:
            raise TypeError(f"the bank's {name} must be {dt}, got {x.dtype}")
    for name, x in (("lift", lift), ("weight", weight), ("bias", bias), ("proj_bias", proj_bias)):
        if x is not None:
            _need_float(x, f"the bank's {name}", dtypes)
    for name, x in (("lift", lift), ("weight", weight), ("bias", bias), ("proj_bias", proj_bias), ("kinds", kinds),
                    ("ranks", ranks), ("dropout", dropout)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"the bank's {name} must be on hidden's device {hidden.device}, got {x.device} "
                             "(bank.to(device) moves a bank)")
# Aliasing: a parameter that shares memory with hidden
# ------------------------------------------------------------------------------------------------


def _extent(x: torch.Tensor) -> int:
    """Bytes from x's first element to the end of its last (torch strides are non-negative)."""
    if x.is_contiguous():
        return x.numel() * x.element_size()
    last = 0
    for n, s in zip(x.shape, x.stride()):
        last += (n - 1) * s
    return (last + 1) * x.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b share bytes: their address ranges intersect (no host sync; addresses rather than
    storage identity, so two storages over one buffer count too). A strided pair can intersect in range
    without sharing an element: the callers then only copy a parameter that did not need it."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _extent(b) and b0 < a0 + _extent(a)


def own_copies(hidden: torch.Tensor, *params: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The parameters, each replaced by a clone where it shares memory with hidden (README, Semantics): the
    edit writes hidden's rows in place and must read its parameters as they were. The clone is
    differentiable, so a parameter's gradient flows through it to what it viewed. A parameter that starts
    past hidden's last byte (the common case) costs one data_ptr() and a comparison."""
    if hidden.numel() == 0:
        return params
    h0 = hidden.data_ptr()
    h1 = h0 + _extent(hidden)
    out = []
    for p in params:
        if p is not None:
            p0 = p.data_ptr()
            if p0 < h1 and (p0 >= h0 or p0 + _extent(p) > h0) and p.numel() > 0:
                p = p.clone()
        out.append(p)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# The registered ops' own checks (reft_kernels::edit_fwd / edit_bwd / orthonormalize_*): torch.compile graphs
# and other libraries call them without the public functions, so each validates what it is given. They
# run in the op (and, where no value is read, in its fake at trace time), never on the eager path that the
# public functions have already checked.
# ------------------------------------------------------------------------------------------------


def check_triton_device(x: torch.Tensor, name: str) -> None:
    """x is a CUDA tensor, or a CPU tensor under the Triton interpreter."""
    from .. import backend

    if x.device.type not in ("cuda", "meta") and not (x.device.type == "cpu" and backend.INTERPRET):
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels (CPU tensors need "
                         f"TRITON_INTERPRET=1 set before reft_kernels is imported), got {x.device}")


def _need_kernel_float(x: torch.Tensor, name: str) -> None:
    _need_float(x, name, KERNEL_DTYPES)


def _need_on(x: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {x.device}")


def check_op_rows(x, name: str, positions, real: bool) -> tuple[int, int, int, int]:
    """hidden or grad_out [B, T, d] and positions [B, P] of a registered edit op; returns (B, T, d, P).
    real: a call with data (not a fake), where hidden's internal overlap can be checked."""
    _need_tensor(x, name)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, d], got shape {tuple(x.shape)}")
    _need_kernel_float(x, name)
    check_triton_device(x, name)
    if real and name == "hidden":
        _check_no_internal_overlap(x)
    B, T, d = x.shape
    _check_positions_shape(positions, B, name)
    _need_on(positions, "positions", x, name)
    return B, T, d, positions.shape[1]


def check_op_params(x: torch.Tensor, lift, weight, source_linear: bool, subtract_proj: bool, has_proj_bias: bool,
                    act: str, dropout) -> int:
    """lift [r, d] (1 <= r <= d), weight [r, d] exactly when source_linear, the flags, act and dropout of a
    registered edit op; returns r."""
    from .activations import kernel_code

    r = check_matrix(lift, "lift", x, None)
    _need_kernel_float(lift, "lift")
    if source_linear:
        if weight is None:
            raise ValueError(f"weight must be [r, d] = [{r}, {x.shape[-1]}] when source_linear, got None")
        check_matrix(weight, "weight", x, r)
        _need_kernel_float(weight, "weight")
    elif weight is not None:
        raise ValueError("weight must be None when the source is the bias alone (source_linear=False)")
    if has_proj_bias and not subtract_proj:
        raise ValueError("proj_bias needs subtract_proj=True")
    kernel_code(act)
    check_dropout(dropout)
    return r


def check_op_vector(x, name: str, hidden: torch.Tensor, r: int) -> None:
    check_vector(x, name, hidden, r)
    _need_kernel_float(x, name)


def check_op_saved(rows, output, stats, grad_out: torch.Tensor, N: int, r_pad: int, op: str = "edit") -> None:
    """What edit_bwd (op="mixed": mixed_bwd) reads by slot: stats [N, 2, r_pad] fp32 and the saved rows [N, d] or
    the forward's output (recompute, grad_out's shape), with exactly the forward's shapes."""
    _need_tensor(stats, "stats")
    if tuple(stats.shape) != (N, 2, r_pad) or stats.dtype != torch.float32:
        raise ValueError(f"stats must be [N, 2, r_pad] = [{N}, 2, {r_pad}] float32 ({op}_fwd's output with save >= 1), "
                         f"got {tuple(stats.shape)} {stats.dtype}")
    _need_on(stats, "stats", grad_out, "grad_out")
    if rows is not None:
        d = grad_out.shape[2]
        if tuple(rows.shape) != (N, d) or rows.dtype != grad_out.dtype:
            raise ValueError(f"rows must be [N, d] = [{N}, {d}] in grad_out's dtype {grad_out.dtype}, got "
                             f"{tuple(rows.shape)} {rows.dtype}")
        _need_on(rows, "rows", grad_out, "grad_out")
    elif output is None:
        raise ValueError(f"{op}_bwd needs the saved rows [N, d] or the op's output (recompute) of grad_out's shape")
    else:
        if output.shape != grad_out.shape or output.dtype != grad_out.dtype:
            raise ValueError(f"output must be grad_out's shape {list(grad_out.shape)} and dtype {grad_out.dtype}, "
                             f"got {tuple(output.shape)} {output.dtype}")
        _need_on(output, "output", grad_out, "grad_out")


def check_save(save) -> None:
    if save not in (0, 1, 2):
        raise ValueError(f"save must be 0 (nothing), 1 (stats) or 2 (stats and rows), got {save}")
