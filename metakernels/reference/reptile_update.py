"""Reference of metakernels::reptile_update: theta + epsilon * (mean_t fast_weights[t] - theta)."""

from __future__ import annotations

import torch

from .._validation import check_reptile_update_args


def reptile_update(theta: torch.Tensor, fast_weights: torch.Tensor, epsilon: float) -> torch.Tensor:
    check_reptile_update_args(theta, fast_weights, epsilon)
    dtype = theta.dtype
    # The C++ kernel accumulates the task mean in float64 (Triton: in float32 or float64); the oracle in float64.
    mean = fast_weights.to(torch.float64).mean(0)
    math = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    th = theta.to(math)
    return (th + epsilon * (mean.to(math) - th)).to(dtype).contiguous()
