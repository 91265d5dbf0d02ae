"""Triton kernels of metakernels::inner_step and inner_step_backward (math: metakernels/ops/inner_step.py).

Segmented rates are expanded to one rate per column by the launcher ([P], negligible next to [T, P]),
so the kernels know two rate modes: one scalar read from device memory (no host sync) or per column.
All arithmetic is in float32 (float64 for float64 inputs); bf16/half are upcast on load.

prox and weight_decay are declared float64 and rounded once to the working type inside the kernels, as the
C++ kernels do: an unannotated Python float is an fp32 kernel argument (and the interpreter folds the sum of
two of them in fp32), which cost float64 inputs ~1e-9 relative accuracy (a 0.1 decay rounds by 1.5e-9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_inner_step_args, check_inner_step_backward_args, check_inner_step_out
from ..reference.inner_step import segment_ids

BLOCK = 1024

THETA0_NONE, THETA0_SHARED, THETA0_PER_TASK = 0, 1, 2


@triton.jit
def _inner_step_forward_kernel(
    theta_ptr, grad_ptr, theta0_ptr, rate_ptr, out_ptr, num_params, prox_arg: tl.float64, weight_decay_arg: tl.float64,
    THETA0_MODE: tl.constexpr, PER_COLUMN_RATE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    task = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < num_params
    at = task * num_params + cols
    th = tl.load(theta_ptr + at, mask=mask, other=0.0)
    acc_type = tl.float64 if th.dtype == tl.float64 else tl.float32
    th = th.to(acc_type)
    prox = tl.full([], prox_arg, tl.float64).to(acc_type)
    weight_decay = tl.full([], weight_decay_arg, tl.float64).to(acc_type)
    u = tl.load(grad_ptr + at, mask=mask, other=0.0).to(acc_type) + weight_decay * th
    if THETA0_MODE == 1:
        u += prox * (th - tl.load(theta0_ptr + cols, mask=mask, other=0.0).to(acc_type))
    if THETA0_MODE == 2:
        u += prox * (th - tl.load(theta0_ptr + at, mask=mask, other=0.0).to(acc_type))
    if PER_COLUMN_RATE:
        rate = tl.load(rate_ptr + cols, mask=mask, other=0.0).to(acc_type)
    else:
        rate = tl.load(rate_ptr).to(acc_type)
    tl.store(out_ptr + at, (th - rate * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inner_step_backward_kernel(
    grad_out_ptr, theta_ptr, grad_ptr, theta0_ptr, rate_ptr,
    d_theta_ptr, d_grad_ptr, d_rate_col_ptr, d_theta0_ptr,
    num_tasks, num_params, prox_arg: tl.float64, weight_decay_arg: tl.float64,
    THETA0_MODE: tl.constexpr, PER_COLUMN_RATE: tl.constexpr,
    WANT_THETA: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_RATE: tl.constexpr, WANT_THETA0: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program owns a block of columns and walks all tasks, so the column sums (the rate gradient
    # per column, a shared theta0's gradient) need no atomics.
    cols = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < num_params
    probe = tl.load(theta_ptr + cols, mask=mask, other=0.0)
    acc_type = tl.float64 if probe.dtype == tl.float64 else tl.float32
    prox = tl.full([], prox_arg, tl.float64).to(acc_type)
    weight_decay = tl.full([], weight_decay_arg, tl.float64).to(acc_type)
    if PER_COLUMN_RATE:
        rate = tl.load(rate_ptr + cols, mask=mask, other=0.0).to(acc_type)
    else:
        rate = tl.load(rate_ptr).to(acc_type)
    contraction = prox + weight_decay
    rate_sum = tl.zeros([BLOCK_SIZE], dtype=acc_type)
    theta0_sum = tl.zeros([BLOCK_SIZE], dtype=acc_type)
    for task in range(num_tasks):
        at = task * num_params + cols
        go = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(acc_type)
        if WANT_THETA:
            tl.store(d_theta_ptr + at, (go * (1.0 - rate * contraction)).to(d_theta_ptr.dtype.element_ty), mask=mask)
        if WANT_GRAD:
            tl.store(d_grad_ptr + at, (-rate * go).to(d_grad_ptr.dtype.element_ty), mask=mask)
        if WANT_RATE:
            th = tl.load(theta_ptr + at, mask=mask, other=0.0).to(acc_type)
            u = tl.load(grad_ptr + at, mask=mask, other=0.0).to(acc_type) + weight_decay * th
            if THETA0_MODE == 1:
                u += prox * (th - tl.load(theta0_ptr + cols, mask=mask, other=0.0).to(acc_type))
            if THETA0_MODE == 2:
                u += prox * (th - tl.load(theta0_ptr + at, mask=mask, other=0.0).to(acc_type))
            rate_sum += go * u
        if WANT_THETA0:
            if THETA0_MODE == 2:
                tl.store(d_theta0_ptr + at, (prox * rate * go).to(d_theta0_ptr.dtype.element_ty), mask=mask)
            else:
                theta0_sum += prox * rate * go
    if WANT_RATE:
        tl.store(d_rate_col_ptr + cols, -rate_sum, mask=mask)
    if WANT_THETA0 and THETA0_MODE == 1:
        tl.store(d_theta0_ptr + cols, theta0_sum.to(d_theta0_ptr.dtype.element_ty), mask=mask)


def _rate_and_theta0(theta, lr, segment_offsets, theta0, mode):
    if mode == "segmented":
        rate = lr.contiguous()[segment_ids(segment_offsets, theta.shape[1])]
    else:
        rate = lr.contiguous().reshape(-1)
    if theta0 is None:
        return rate, theta, THETA0_NONE  # theta as a dummy pointer the kernel never reads
    return rate, theta0.contiguous(), (THETA0_PER_TASK if theta0.dim() == 2 else THETA0_SHARED)


def inner_step(theta, grad, lr, segment_offsets=None, theta0=None, prox=0.0, weight_decay=0.0):
    out = torch.empty(theta.shape, dtype=theta.dtype, device=theta.device)
    _launch_forward(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out)
    return out


def inner_step_out(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out):
    check_inner_step_out(theta, out)
    _launch_forward(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out)


def _launch_forward(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out):
    mode = check_inner_step_args(theta, grad, lr, segment_offsets, theta0, prox, weight_decay)
    theta, grad = theta.contiguous(), grad.contiguous()
    rate, theta0_arg, theta0_mode = _rate_and_theta0(theta, lr, segment_offsets, theta0, mode)
    num_tasks, num_params = theta.shape
    grid = (num_tasks, triton.cdiv(num_params, BLOCK))
    _inner_step_forward_kernel[grid](
        theta, grad, theta0_arg, rate, out, num_params, float(prox), float(weight_decay),
        THETA0_MODE=theta0_mode, PER_COLUMN_RATE=mode != "scalar", BLOCK_SIZE=BLOCK,
    )


def inner_step_backward(grad_out, theta, grad, lr, segment_offsets, theta0, prox, weight_decay, output_mask):
    mode = check_inner_step_args(theta, grad, lr, segment_offsets, theta0, prox, weight_decay)
    check_inner_step_backward_args(grad_out, theta, output_mask)
    grad_out, theta, grad = grad_out.contiguous(), theta.contiguous(), grad.contiguous()
    rate, theta0_arg, theta0_mode = _rate_and_theta0(theta, lr, segment_offsets, theta0, mode)
    want_theta, want_grad, want_rate = bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])
    want_theta0 = bool(output_mask[3]) and theta0 is not None

    def empty() -> torch.Tensor:  # one per masked output: the op's outputs must not alias each other
        return theta.new_empty(0)

    d_theta = torch.empty_like(theta) if want_theta else empty()
    d_grad = torch.empty_like(theta) if want_grad else empty()
    acc_dtype = torch.float64 if theta.dtype == torch.float64 else torch.float32
    d_rate_col = torch.empty(theta.shape[1], dtype=acc_dtype, device=theta.device) if want_rate else empty()
    d_theta0 = torch.empty_like(theta0_arg) if want_theta0 else empty()
    num_tasks, num_params = theta.shape
    _inner_step_backward_kernel[(triton.cdiv(num_params, BLOCK),)](
        grad_out, theta, grad, theta0_arg, rate, d_theta if want_theta else theta, d_grad if want_grad else theta,
        d_rate_col if want_rate else rate, d_theta0 if want_theta0 else theta,
        num_tasks, num_params, float(prox), float(weight_decay),
        THETA0_MODE=theta0_mode, PER_COLUMN_RATE=mode != "scalar", WANT_THETA=want_theta, WANT_GRAD=want_grad,
        WANT_RATE=want_rate, WANT_THETA0=want_theta0, BLOCK_SIZE=BLOCK,
    )
    if want_rate:
        if mode == "scalar":
            d_lr = d_rate_col.sum().to(theta.dtype)
        elif mode == "per_coordinate":
            d_lr = d_rate_col.to(theta.dtype)
        else:
            ids = segment_ids(segment_offsets, num_params)
            d_lr = torch.zeros(lr.shape, dtype=acc_dtype, device=theta.device).index_add_(0, ids, d_rate_col)
            d_lr = d_lr.to(theta.dtype)
    else:
        d_lr = empty()
    return d_theta, d_grad, d_lr, d_theta0
