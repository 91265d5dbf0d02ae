"""Hessian Frobenius penalty: a Hutchinson estimate of ||H_t||_F^2 for every task, differentiable.

    penalty_t = (1/K) sum_k ||H_t v_k||^2,     v_k in {-1, +1}^P Rademacher,   H_t = Hessian of L_t at params_t

Why this estimates ||H||_F^2: ||H v||^2 = v^T H^2 v (H symmetric), and for a Rademacher v, E[v v^T] = I, so
E[v^T A v] = tr(A); with A = H^2, tr(H^2) = ||H||_F^2. Unbiased for any K >= 1.

Exactness: v_i^2 = 1, so v^T A v = tr(A) + sum_{i != j} A_ij v_i v_j. When A = H^2 is diagonal (H diagonal, e.g. a
quadratic with a diagonal Hessian) the cross terms vanish and a single probe returns ||H||_F^2 exactly.

Variance (the bound the statistical test uses): for Rademacher v and symmetric A,
Var(v^T A v) = 2 sum_{i != j} A_ij^2 = 2 (||A||_F^2 - sum_i A_ii^2), so the K-probe mean has that divided by K.
(Gaussian probes would give 2 ||A||_F^2: Rademacher is never worse, Hutchinson 1990.)

Differentiable: each H v is computed with create_graph=True (when grad is enabled), so the penalty is a
training term: its gradient in the parameters (and, inside a learner, through the inner loop to the
meta-parameters) involves third derivatives of the loss, which every fused layer op supports (their
backward passes are built from differentiable ops).

The probes are drawn as ``2 * torch.randint(0, 2, (probes, T, P), generator=generator) - 1`` (one call, in
that shape, on params' device), so a caller that seeds ``generator`` (or torch's global generator when it
is None) can reproduce them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .hvp import hvp
from .task_params import TaskParams


def rademacher_probes(
    probes: int,
    num_tasks: int,
    num_params: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[probes, T, P] independent +-1 entries, each with probability 1/2 (the recipe the module docstring gives)."""
    bits = torch.randint(0, 2, (probes, num_tasks, num_params), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def hessian_penalty(
    model: nn.Module,
    params: torch.Tensor | TaskParams,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    probes: int = 1,
    generator: torch.Generator | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Per-task Hutchinson estimates of the squared Frobenius norm of the loss Hessian.

    Args:
        model: the network (its parameters not in ``params`` are shared by all tasks).
        params: [T, P] fast weights (the model's parameters that require grad, in registration order) or
            TaskParams (any layout, e.g. a learner's adapted subset).
        x: [T, N, ...] inputs; y: [T, N, ...] targets.
        loss_fn: loss(pred [N, ...], target [N, ...]) -> scalar, applied to each task.
        probes: number K >= 1 of Rademacher probes per task (variance falls as 1/K).
        generator: torch.Generator for the probes (on params' device); None: torch's global generator.
        fused: let hvp use the fused layer kernels where it recognises the model (default; same result).

    Returns:
        [T] tensor, entry t = (1/K) sum_k ||H_t v_k||^2, an unbiased estimate of ||H_t||_F^2; differentiable in
        params (and in the model's other parameters, x and y where the loss depends on them) when grad is enabled.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"metakernels.hessian_penalty: probes must be an integer >= 1, got {probes!r}")
    flat = params.flat if isinstance(params, TaskParams) else params
    if not isinstance(flat, torch.Tensor) or flat.dim() != 2:
        raise ValueError("metakernels.hessian_penalty: params must be a [T, P] tensor or TaskParams")
    if not flat.is_floating_point():
        raise TypeError(f"metakernels.hessian_penalty: params must be floating point, got {flat.dtype}")
    num_tasks, num_params = flat.shape
    v = rademacher_probes(probes, num_tasks, num_params, dtype=flat.dtype, device=flat.device, generator=generator)
    create_graph = torch.is_grad_enabled()
    total = flat.new_zeros(num_tasks)
    # One HVP per probe (not the K probes stacked as K*T tasks): memory stays that of one HVP graph, and the
    # default K = 1 is a single call either way.
    for k in range(probes):
        hv = hvp(model, params, x, y, v[k], loss_fn=loss_fn, create_graph=create_graph, fused=fused)
        total = total + hv.square().sum(1)
    return total / probes
