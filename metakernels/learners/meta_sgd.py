"""Meta-SGD (Li et al. 2017): a learned inner learning rate per coordinate, meta-learned with the weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientLearner, LossFn, Rate


class MetaSGD(GradientLearner):
    """Inner update phi = theta - alpha * grad with alpha a learned [P] vector (one rate per weight).

    Args:
        inner_lr: initial value of every rate.
        Others: see MAML / GradientLearner.

    The rates are the parameter ``inner_lrs`` ([P], in TaskParams layout order; ``rates_by_name()``
    gives them per parameter tensor): a torch.optim optimizer over learner.parameters() learns them.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss_fn: LossFn = F.mse_loss,
        **kwargs,
    ):
        super().__init__(model, inner_steps=inner_steps, loss_fn=loss_fn, first_order=first_order, **kwargs)
        ref = self._reference_param()
        self.inner_lrs = nn.Parameter(torch.full((self.layout.num_params,), float(inner_lr), dtype=ref.dtype,
                                                 device=ref.device))

    def inner_rate(self, step: int) -> Rate:
        return self.inner_lrs, None

    def rates_by_name(self) -> dict[str, torch.Tensor]:
        return {s.name: self.inner_lrs[s.offset : s.offset + s.numel].view(s.shape) for s in self.layout}
