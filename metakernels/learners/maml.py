"""MAML (Finn et al. 2017), first-order MAML, and the multi-task baseline (no inner loop)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .base import GradientLearner, LossFn, Rate


class MAML(GradientLearner):
    """Model-Agnostic Meta-Learning with a fixed scalar inner learning rate (any sign).

    Args:
        model: the network to meta-learn.
        inner_lr: inner-loop step size alpha (negative values allowed).
        inner_steps: inner gradient steps k.
        first_order: FOMAML (ignore second-order terms) when True.
        loss_fn: per-task loss, e.g. F.mse_loss or F.cross_entropy.
        weight_decay, nonfinite, adapt_filter: see GradientLearner.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn = F.mse_loss,
        **kwargs,
    ):
        super().__init__(model, inner_steps=inner_steps, loss_fn=loss_fn, first_order=first_order, **kwargs)
        if not math.isfinite(inner_lr):
            raise ValueError(f"{self._who}: inner_lr must be finite, got {inner_lr}")
        self.inner_lr = float(inner_lr)

    def inner_rate(self, step: int) -> Rate:
        return self.inner_lr, None


class FOMAML(MAML):
    """First-order MAML: MAML with the inner gradients treated as constants."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, loss_fn: LossFn = F.mse_loss,
                 **kwargs):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True, loss_fn=loss_fn,
                         **kwargs)


class MultiTaskBaseline(MAML):
    """Joint training on all tasks with no adaptation (k = 0): the usual baseline for MAML."""

    def __init__(self, model: nn.Module, loss_fn: LossFn = F.mse_loss, **kwargs):
        super().__init__(model, inner_lr=0.0, inner_steps=0, loss_fn=loss_fn, **kwargs)
