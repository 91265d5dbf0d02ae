"""Reptile (Nichol, Achiam & Schulman 2018): move the meta-parameters toward the adapted weights.

The inner loop is k steps of SGD on each task's support set, with no graph kept. Batched Reptile moves
theta by epsilon * (mean_t phi_t - theta) in one fused pass (reptile_update); serial Reptile does so task
after task. meta_loss returns a surrogate whose gradient is theta - mean_t phi_t, so a torch.optim
optimizer at learning rate epsilon performs batched Reptile (plain SGD: exactly).
(The paper's inner loop uses Adam; this one uses plain SGD, like most re-implementations.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reptile_update import reptile_meta_gradient, reptile_update
from ._inputs import check_pair
from .base import GradientLearner, LossFn, Rate, per_task_losses


class Reptile(GradientLearner):
    """Reptile with a plain-SGD inner loop.

    Args:
        model: the network.
        inner_lr: inner SGD step size.
        inner_steps: inner steps k per task.
        loss_fn: per-task loss.
        nonfinite, weight_decay, adapt_filter: see GradientLearner.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, loss_fn: LossFn = F.mse_loss,
                 **kwargs):
        super().__init__(model, inner_steps=inner_steps, loss_fn=loss_fn, first_order=True, **kwargs)
        if not math.isfinite(inner_lr):
            raise ValueError(f"{self._who}: inner_lr must be finite, got {inner_lr}")
        self.inner_lr = float(inner_lr)

    def inner_rate(self, step: int) -> Rate:
        return self.inner_lr, None

    def _adapted(self, xs: torch.Tensor, ys: torch.Tensor, tracker) -> torch.Tensor:
        with torch.no_grad():  # Reptile never differentiates through its inner loop
            return self._adapt(self.prepare_inputs(xs), ys, self.inner_steps, False, tracker)

    def _meta_loss(self, xs, ys, xq, yq, tracker) -> torch.Tensor:
        fast = self._adapted(xs, ys, tracker)
        theta = self.layout.flatten_module(self.model)
        direction = reptile_meta_gradient(theta.detach(), fast)
        surrogate = (theta * direction).sum()
        with torch.no_grad():
            query = per_task_losses(self.loss_fn, self.forward_tasks(fast, self.prepare_inputs(xq)), yq)
        if tracker is not None:
            tracker.record("query loss", query)
        # Value: the post-adaptation query loss; gradient: the Reptile direction theta - mean_t phi_t.
        return query.mean() + (surrogate - surrogate.detach())

    @torch.no_grad()
    def batched_step(self, xs: torch.Tensor, ys: torch.Tensor, epsilon: float) -> None:
        """theta <- theta + epsilon * (mean_t phi_t - theta), in place, with one fused reptile_update."""
        check_pair(self._who, xs, ys, self._reference_param())
        fast = self._adapted(xs, ys, None)
        self._check_finite(fast)
        theta = self.layout.flatten_module(self.model)
        self.layout.write_to_module(self.model, reptile_update(theta, fast, epsilon))

    @torch.no_grad()
    def serial_step(self, xs: torch.Tensor, ys: torch.Tensor, epsilon: float) -> None:
        """The original serial Reptile: for each task in turn, adapt from the current theta and move
        theta <- theta + epsilon * (phi_t - theta)."""
        check_pair(self._who, xs, ys, self._reference_param())
        for t in range(xs.shape[0]):
            fast = self._adapted(xs[t : t + 1], ys[t : t + 1], None)
            self._check_finite(fast)
            theta = self.layout.flatten_module(self.model)
            self.layout.write_to_module(self.model, reptile_update(theta, fast, epsilon))

    def _check_finite(self, fast: torch.Tensor) -> None:
        # The update is in place: refuse it rather than write NaN into the model (no lost training state).
        if not bool(torch.isfinite(fast).all()):
            raise FloatingPointError(f"{self._who}: adapted weights contain NaN/inf; the model was not updated")
