"""Triton kernels of metakernels::pcgrad and its stages (Gram, coefficients, combine).

Gram: each program strides over column blocks of BLOCK_C columns and accumulates one BT x BT tile of
G_s G_s^T: a tl.dot per block in the working precision (IEEE float32, not TF32: TF32 would cost ~1e-3
relative accuracy in K and flip projection decisions), added into a float64 accumulator, so each entry sums
at most BLOCK_C products in float32 before float64 takes over (the C++ kernel's scheme). The per-program
partial Grams are summed in float64 by torch (a [programs, T, T] tensor: small). float64 input takes no
tl.dot (float64 MMA did not compile in every case on an H200): a broadcast product on 16 x 16 tiles.

Coefficients: one program per task i runs the T-step recurrence on its row of W in float64 (rows are
independent), reading K alone: W[i] = e_i; for j in orders[i]: d = W[i] . K[j, :] (K is symmetric); if
d < 0 and K[j, j] + eps > 0: W[i, j] -= d / (K[j, j] + eps).

Combine: each program owns BLOCK_P columns and sums weights[i] * G[i, cols] over the tasks (1 instead of
weights[i] on the task-specific columns).

Validation on CUDA costs one host synchronisation per call: the orders' permutation flags and K's diagonal
(NaN/inf detection) come back together; the task-specific columns are checked on the [P] result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_floating, shape_str
from ..reference.pcgrad import (
    check_grads,
    check_gram_diagonal,
    check_options,
    check_out,
    check_shared_mask,
    check_weights,
    non_finite_task_message,
    non_finite_unshared_message,
)

BLOCK_C = 128  # columns per Gram block: the float32 chain length of each K entry before float64
BLOCK_C_FLOAT64 = 32  # float64 Gram blocks (no tl.dot: 16 x 16 x 32 products per step in registers)
BLOCK_P = 1024  # columns per combine program


def _gram_programs(num_blocks: int, device: torch.device) -> int:
    # A few programs per SM on a GPU (each loops over its blocks); the interpreter pays per program.
    if device.type == "cuda":
        return max(1, min(num_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(num_blocks, 4))


@triton.jit
def _gram_kernel(
    g_ptr,
    mask_ptr,
    partial_ptr,
    num_tasks,
    num_params,
    ld,
    num_blocks,
    num_programs,
    HAS_MASK: tl.constexpr,
    BT: tl.constexpr,
    BLOCK: tl.constexpr,
    TP: tl.constexpr,
):
    pid = tl.program_id(0)
    ta = tl.program_id(1)
    tb = tl.program_id(2)
    rows_a = ta * BT + tl.arange(0, BT)
    rows_b = tb * BT + tl.arange(0, BT)
    acc = tl.zeros([BT, BT], dtype=tl.float64)
    if tb >= ta:  # upper tiles only: the launcher mirrors them (K is symmetric by construction)
        for blk in range(pid, num_blocks, num_programs):
            cols = blk * BLOCK + tl.arange(0, BLOCK)
            in_cols = cols < num_params
            if HAS_MASK:
                in_cols = in_cols & (tl.load(mask_ptr + cols, mask=cols < num_params, other=0) != 0)
            a = tl.load(
                g_ptr + rows_a[:, None] * ld + cols[None, :],
                mask=(rows_a[:, None] < num_tasks) & in_cols[None, :],
                other=0.0,
            )
            b = tl.load(
                g_ptr + rows_b[:, None] * ld + cols[None, :],
                mask=(rows_b[:, None] < num_tasks) & in_cols[None, :],
                other=0.0,
            )
            if a.dtype == tl.float64:
                # No tl.dot for float64: on an H200 (Triton 3.6) the float64 MMA path failed to compile with a
                # column mask ("fp64 don't support largeK MMA") and ran out of shared memory with 64-row tiles.
                # Small tiles (BT = 16, BLOCK = 32: see _gram) as a broadcast product summed in registers.
                acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
            else:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
                acc += tl.dot(a, tl.trans(b), input_precision="ieee").to(tl.float64)
    out = partial_ptr + pid * TP * TP + rows_a[:, None] * TP + rows_b[None, :]
    tl.store(out, acc)


def _gram(g: torch.Tensor, shared_mask: torch.Tensor | None) -> torch.Tensor:
    """K [T, T] float64 of contiguous g over the shared columns."""
    num_tasks, num_params = g.shape
    if g.dtype == torch.float64:  # the broadcast product of the kernel: [BT, BT, BLOCK] values per program
        bt, block = 16, BLOCK_C_FLOAT64
    else:
        bt, block = max(16, min(64, triton.next_power_of_2(num_tasks))), BLOCK_C  # tl.dot needs tiles >= 16
    tiles = triton.cdiv(num_tasks, bt)
    tp = tiles * bt
    num_blocks = triton.cdiv(num_params, block)
    programs = _gram_programs(num_blocks, g.device)
    partial = torch.empty(programs, tp, tp, dtype=torch.float64, device=g.device)
    mask = shared_mask.contiguous().view(torch.uint8) if shared_mask is not None else g
    _gram_kernel[(programs, tiles, tiles)](
        g,
        mask,
        partial,
        num_tasks,
        num_params,
        num_params,
        num_blocks,
        programs,
        HAS_MASK=shared_mask is not None,
        BT=bt,
        BLOCK=block,
        TP=tp,
    )
    upper = torch.triu(partial.sum(0)[:num_tasks, :num_tasks])
    return upper + torch.triu(upper, 1).t()


@triton.jit
def _coefficients_kernel(
    k_ptr, orders_ptr, w_ptr, num_tasks, eps: tl.float64, INCLUDE_SELF: tl.constexpr, TP: tl.constexpr
):
    i = tl.program_id(0)
    idx = tl.arange(0, TP)
    valid = idx < num_tasks
    w = tl.where(idx == i, 1.0, 0.0).to(tl.float64)
    for s in range(num_tasks):
        j = tl.load(orders_ptr + i * num_tasks + s)
        k_row = tl.load(k_ptr + j * num_tasks + idx, mask=valid, other=0.0)  # K[j, :] = K[:, j]
        d = tl.sum(w * k_row, axis=0)
        denominator = tl.load(k_ptr + j * num_tasks + j) + eps
        positive = denominator > 0.0
        safe = tl.where(positive, denominator, 1.0)  # never 0/0, even in the unselected branch
        step = tl.where(positive, tl.where(d < 0.0, d / safe, 0.0), 0.0)
        if not INCLUDE_SELF:
            step = tl.where(j == i, 0.0, step)
        w = tl.where(idx == j, w - step, w)
    tl.store(w_ptr + i * num_tasks + idx, w, mask=valid)


def _coefficients(gram: torch.Tensor, orders: torch.Tensor, include_self: bool, eps: float) -> torch.Tensor:
    num_tasks = gram.shape[0]
    weights = torch.empty(num_tasks, num_tasks, dtype=torch.float64, device=gram.device)
    _coefficients_kernel[(num_tasks,)](
        gram.contiguous(),
        orders.contiguous(),
        weights,
        num_tasks,
        float(eps),
        INCLUDE_SELF=bool(include_self),
        TP=triton.next_power_of_2(num_tasks),
    )
    return weights


@triton.jit
def _combine_kernel(
    g_ptr, w_ptr, mask_ptr, out_ptr, num_tasks, num_params, ld, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_cols = cols < num_params
    first = tl.load(g_ptr + cols, mask=in_cols, other=0.0)
    acc_type = tl.float64 if first.dtype == tl.float64 else tl.float32
    if HAS_MASK:
        shared = tl.load(mask_ptr + cols, mask=in_cols, other=0) != 0
    acc = tl.zeros([BLOCK], dtype=acc_type)
    for i in range(num_tasks):
        w = tl.load(w_ptr + i).to(acc_type)
        row = tl.load(g_ptr + i * ld + cols, mask=in_cols, other=0.0).to(acc_type)
        if HAS_MASK:
            acc += tl.where(shared, w, 1.0).to(acc_type) * row
        else:
            acc += w * row
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=in_cols)


def _combine(g: torch.Tensor, weights: torch.Tensor, shared_mask: torch.Tensor | None, out: torch.Tensor) -> None:
    num_tasks, num_params = g.shape
    # The weights in the working precision (float64 for float64 grads, else float32), as the C++ kernel.
    w = weights.to(torch.float64 if g.dtype == torch.float64 else torch.float32).contiguous()
    mask = shared_mask.contiguous().view(torch.uint8) if shared_mask is not None else g
    _combine_kernel[(triton.cdiv(num_params, BLOCK_P),)](
        g, w, mask, out, num_tasks, num_params, num_params, HAS_MASK=shared_mask is not None, BLOCK=BLOCK_P
    )


def _check_orders_on_device(op: str, orders: torch.Tensor, num_tasks: int, device: torch.device) -> torch.Tensor:
    """Shape/dtype/device checks now; returns per-row permutation flags (float64, on the device) to read back
    together with K's diagonal (one synchronisation)."""
    if orders.dtype != torch.int64:
        raise TypeError(f"metakernels.{op}: orders must be an int64 tensor, got dtype {orders.dtype}")
    if orders.dim() != 2 or orders.shape[0] != num_tasks or orders.shape[1] != num_tasks:
        raise ValueError(
            f"metakernels.{op}: orders must be a [T, T] tensor with T = {num_tasks} (the tasks of grads), got shape "
            f"{shape_str(orders)}"
        )
    if orders.device != device:
        raise ValueError(f"metakernels.{op}: orders is on {orders.device} but grads is on {device}")
    expected = torch.arange(num_tasks, device=device)
    return (torch.sort(orders, dim=1).values == expected).all(1).to(torch.float64)


def _raise_bad_row(op: str, orders: torch.Tensor, row_ok: list[float], num_tasks: int) -> None:
    for i, ok in enumerate(row_ok):
        if not ok:
            row = orders[i].tolist()
            raise ValueError(
                f"metakernels.{op}: orders row {i} must be a permutation of 0..T-1 (T = {num_tasks}), got {row}"
            )


def _pcgrad_into(grads, orders, shared_mask, include_self, reduction, eps, out) -> torch.Tensor:
    op = "pcgrad"
    num_tasks = grads.shape[0]
    row_flags = _check_orders_on_device(op, orders, num_tasks, grads.device)
    check_shared_mask(op, shared_mask, grads)
    check_options(op, reduction, eps)
    g = grads.contiguous()  # the interpreter ignores strides; on CUDA a strided view is copied once
    gram = _gram(g, shared_mask)
    host = torch.cat([row_flags, torch.diagonal(gram)]).tolist()  # the one synchronisation
    _raise_bad_row(op, orders, host[:num_tasks], num_tasks)
    for task, value in enumerate(host[num_tasks:]):
        if not (value == value and abs(value) != float("inf")):
            raise ValueError(non_finite_task_message(op, task, value))
    weights = _coefficients(gram, orders, include_self, eps)
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    _combine(g, weights.sum(0) * scale, shared_mask, out)
    if shared_mask is not None and not bool(torch.isfinite(out[~shared_mask]).all()):
        raise ValueError(non_finite_unshared_message(op))
    return weights


def pcgrad(grads, orders, shared_mask, include_self, reduction, eps):
    check_grads("pcgrad", grads)
    out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    weights = _pcgrad_into(grads, orders, shared_mask, include_self, reduction, eps, out)
    return out, weights


def pcgrad_out(grads, orders, shared_mask, include_self, reduction, eps, out):
    check_out(grads, out)
    return _pcgrad_into(grads, orders, shared_mask, include_self, reduction, eps, out)


# --- stages ----------------------------------------------------------------------------------------------------


def pcgrad_gram(grads, shared_mask):
    op = "pcgrad_gram"
    check_grads(op, grads)
    check_shared_mask(op, shared_mask, grads)
    return _gram(grads.contiguous(), shared_mask)


def pcgrad_coefficients(gram, orders, include_self, eps):
    op = "pcgrad_coefficients"
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(
            f"metakernels.{op}: gram must be a square [T, T] tensor with T >= 1, got shape {shape_str(gram)}"
        )
    if gram.dtype != torch.float64:
        raise TypeError(f"metakernels.{op}: gram must be a float64 tensor, got dtype {gram.dtype}")
    num_tasks = gram.shape[0]
    row_flags = _check_orders_on_device(op, orders, num_tasks, gram.device)
    check_options(op, "sum", eps)
    _raise_bad_row(op, orders, row_flags.tolist(), num_tasks)
    check_gram_diagonal(op, "gram", gram)
    return _coefficients(gram, orders, include_self, eps)


def pcgrad_combine(grads, weights, shared_mask):
    op = "pcgrad_combine"
    check_grads(op, grads)
    check_shared_mask(op, shared_mask, grads)
    check_weights(op, weights, grads)
    check_floating(op, "weights", weights)
    out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    _combine(grads.contiguous(), weights, shared_mask, out)
    return out
