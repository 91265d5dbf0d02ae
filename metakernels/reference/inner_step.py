"""Reference of metakernels::inner_step: theta' = theta - L * (grad + prox*(theta - theta0) + weight_decay*theta).

L is the learning rate broadcast to [T, P]: a 0-dim scalar, a [P] per-coordinate rate (Meta-SGD), or an
[S] table whose entry s applies to columns [segment_offsets[s], segment_offsets[s+1]) (one segment per
parameter tensor: MAML++'s per-layer rates). bf16/half inputs are computed in float32 and rounded once,
as the fused kernels do.
"""

from __future__ import annotations

import torch

from .._validation import check_inner_step_args, check_inner_step_backward_args, check_inner_step_out


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def segment_ids(segment_offsets: torch.Tensor, num_params: int) -> torch.Tensor:
    """[P] int64 tensor: the segment of each column."""
    counts = segment_offsets[1:] - segment_offsets[:-1]
    ids = torch.arange(counts.numel(), device=segment_offsets.device)
    return torch.repeat_interleave(ids, counts, output_size=num_params)


def expand_rate(lr: torch.Tensor, segment_offsets: torch.Tensor | None, num_params: int) -> torch.Tensor:
    """The rate as a tensor broadcastable against [T, P] (differentiable in lr)."""
    if segment_offsets is None:
        return lr  # 0-dim or [P]: broadcasts as is
    return lr[segment_ids(segment_offsets, num_params)]


def reduce_to_rate(x: torch.Tensor, lr: torch.Tensor, segment_offsets: torch.Tensor | None) -> torch.Tensor:
    """Sums a [T, P] tensor back to the shape of lr: the adjoint of expand_rate (differentiable)."""
    if segment_offsets is None:
        return x.sum() if lr.dim() == 0 else x.sum(0)
    columns = x.sum(0)
    ids = segment_ids(segment_offsets, x.shape[1])
    return torch.zeros(lr.shape, dtype=x.dtype, device=x.device).index_add(0, ids, columns)


def update_direction(
    theta: torch.Tensor, grad: torch.Tensor, theta0: torch.Tensor | None, prox: float, weight_decay: float
) -> torch.Tensor:
    """u = grad + prox*(theta - theta0) + weight_decay*theta, the vector the rate multiplies."""
    u = grad + weight_decay * theta
    if theta0 is not None:
        u = u + prox * (theta - theta0)
    return u


def inner_step(
    theta: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    segment_offsets: torch.Tensor | None = None,
    theta0: torch.Tensor | None = None,
    prox: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    check_inner_step_args(theta, grad, lr, segment_offsets, theta0, prox, weight_decay)
    dtype = theta.dtype
    math = _math_dtype(dtype)
    th, g, r = theta.to(math), grad.to(math), lr.to(math)
    t0 = None if theta0 is None else theta0.to(math)
    rate = expand_rate(r, segment_offsets, theta.shape[1])
    out = th - rate * update_direction(th, g, t0, prox, weight_decay)
    return out.to(dtype).contiguous()


def inner_step_out(
    theta: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    segment_offsets: torch.Tensor | None,
    theta0: torch.Tensor | None,
    prox: float,
    weight_decay: float,
    out: torch.Tensor,
) -> None:
    check_inner_step_out(theta, out)
    out.copy_(inner_step(theta, grad, lr, segment_offsets, theta0, prox, weight_decay))


def inner_step_backward(
    grad_out: torch.Tensor,
    theta: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    segment_offsets: torch.Tensor | None,
    theta0: torch.Tensor | None,
    prox: float,
    weight_decay: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_theta, d_grad, d_lr, d_theta0); an output whose mask entry is False is an empty [0] tensor."""
    check_inner_step_args(theta, grad, lr, segment_offsets, theta0, prox, weight_decay)
    check_inner_step_backward_args(grad_out, theta, output_mask)
    dtype = theta.dtype
    math = _math_dtype(dtype)
    go, th, g, r = grad_out.to(math), theta.to(math), grad.to(math), lr.to(math)
    t0 = None if theta0 is None else theta0.to(math)
    rate = expand_rate(r, segment_offsets, theta.shape[1])

    def empty() -> torch.Tensor:
        # A fresh [0] tensor per masked output: outputs of one op call must not alias each other (the schema
        # promises four distinct tensors; opcheck's schema test checks it).
        return theta.new_empty(0)

    d_theta = (go * (1 - rate * (prox + weight_decay))).to(dtype).contiguous() if output_mask[0] else empty()
    d_grad = (-rate * go).to(dtype).contiguous() if output_mask[1] else empty()
    if output_mask[2]:
        d_lr = (-reduce_to_rate(go * update_direction(th, g, t0, prox, weight_decay), r, segment_offsets)).to(dtype)
    else:
        d_lr = empty()
    if output_mask[3] and t0 is not None:
        d_t0 = prox * rate * go
        d_theta0 = (d_t0.sum(0) if t0.dim() == 1 else d_t0).to(dtype).contiguous()
    else:
        d_theta0 = empty()
    return d_theta, d_grad, d_lr, d_theta0
