"""metakernels::reptile_update: Reptile's outer interpolation in one pass over the [T, P] batch.

    theta_new = theta + epsilon * (mean_t fast_weights[t] - theta)

Linear in both inputs, so its autograd (registered here, in torch ops) is differentiable to any order.
"""

from __future__ import annotations

import torch

from ._library import LIBRARY

LIBRARY.define("reptile_update(Tensor theta, Tensor fast_weights, float epsilon) -> Tensor")

_REPTILE_UPDATE = torch.ops.metakernels.reptile_update.default


def reptile_update(theta: torch.Tensor, fast_weights: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Reptile's outer step theta + epsilon * (mean_t fast_weights[t] - theta), fused.

    Args:
        theta: [P] current meta-parameters (flattened, in TaskParams layout order).
        fast_weights: [T, P] adapted weights of T tasks.
        epsilon: outer step size (1 moves theta to the task mean; serial Reptile calls this with T = 1).

    Returns:
        [P] new meta-parameters.
    """
    return _REPTILE_UPDATE(theta, fast_weights, float(epsilon))


def reptile_meta_gradient(theta: torch.Tensor, fast_weights: torch.Tensor) -> torch.Tensor:
    """theta - mean_t fast_weights[t]: the Reptile direction as a gradient, for any torch.optim optimizer.

    With plain SGD at learning rate epsilon, ``theta - lr * grad`` is exactly reptile_update(theta, fast, epsilon).
    """
    return theta - _REPTILE_UPDATE(theta, fast_weights, 1.0)


@torch.library.register_fake("metakernels::reptile_update")
def _reptile_update_fake(theta, fast_weights, epsilon):
    return theta.new_empty(theta.shape)


def _setup_context(ctx, inputs, output) -> None:
    theta, fast_weights, epsilon = inputs
    ctx.epsilon, ctx.num_tasks, ctx.fast_shape = epsilon, fast_weights.shape[0], fast_weights.shape


def _backward(ctx, grad_out):
    d_theta = (1.0 - ctx.epsilon) * grad_out if ctx.needs_input_grad[0] else None
    d_fast = None
    if ctx.needs_input_grad[1]:
        d_fast = (ctx.epsilon / ctx.num_tasks * grad_out).unsqueeze(0).expand(ctx.fast_shape)
    return d_theta, d_fast, None


torch.library.register_autograd("metakernels::reptile_update", _backward, setup_context=_setup_context)
