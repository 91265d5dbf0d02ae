"""Triton kernel of metakernels::reptile_update: theta + epsilon * (mean_t fast_weights[t] - theta)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_reptile_update_args

BLOCK = 1024


@triton.jit
def _reptile_update_kernel(
    theta_ptr, fast_ptr, out_ptr, num_tasks, num_params, epsilon_arg: tl.float64, BLOCK_SIZE: tl.constexpr
):
    # epsilon is declared float64 and rounded once to the working type, as in the C++ kernel (an unannotated
    # Python float would be an fp32 argument: float64 inputs would lose ~1e-8 relative accuracy).
    cols = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < num_params
    th = tl.load(theta_ptr + cols, mask=mask, other=0.0)
    acc_type = tl.float64 if th.dtype == tl.float64 else tl.float32
    th = th.to(acc_type)
    epsilon = tl.full([], epsilon_arg, tl.float64).to(acc_type)
    total = tl.zeros([BLOCK_SIZE], dtype=acc_type)
    for task in range(num_tasks):
        total += tl.load(fast_ptr + task * num_params + cols, mask=mask, other=0.0).to(acc_type)
    mean = total / num_tasks
    tl.store(out_ptr + cols, (th + epsilon * (mean - th)).to(out_ptr.dtype.element_ty), mask=mask)


def reptile_update(theta: torch.Tensor, fast_weights: torch.Tensor, epsilon: float) -> torch.Tensor:
    check_reptile_update_args(theta, fast_weights, epsilon)
    theta, fast_weights = theta.contiguous(), fast_weights.contiguous()
    out = torch.empty_like(theta)
    num_tasks, num_params = fast_weights.shape
    _reptile_update_kernel[(triton.cdiv(num_params, BLOCK),)](
        theta, fast_weights, out, num_tasks, num_params, float(epsilon), BLOCK_SIZE=BLOCK
    )
    return out
