"""A meta-loss whose gradient was computed eagerly: loss.backward() hands each parameter its precomputed slice.

iMAML (implicit gradient by CG) and second-order MAML by reverse Hessian-vector products
(learners/_hvp_route.py) compute d(meta-loss)/d(theta) themselves, without an autograd graph through the
inner loop; this Function makes ``loss.backward()`` accumulate it into ``model.parameters()`` like any loss.
"""

from __future__ import annotations

import torch

from ..functional.task_params import ParameterLayout


class PrecomputedGradient(torch.autograd.Function):
    """value (detached) -> value; backward gives each parameter grad_output * its slice of ``direction`` [P]."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, direction: torch.Tensor, layout: ParameterLayout, *params: torch.Tensor):
        ctx.direction, ctx.layout = direction, layout
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a derivative of the meta-gradient was asked for
            raise RuntimeError(
                "metakernels: this meta-loss's gradient was computed eagerly (iMAML's implicit solve, or "
                "meta_gradient='hvp' for second-order MAML) and cannot be differentiated again; for derivatives "
                "of the MAML meta-gradient construct the learner with meta_gradient='unroll'"
            )
        direction = ctx.direction * grad_output
        grads = [direction[s.offset : s.offset + s.numel].view(s.shape) for s in ctx.layout.specs]
        return None, None, None, *grads
