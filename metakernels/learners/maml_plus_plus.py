"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019): learned per-layer per-step
inner learning rates (LSLR) and the multi-step loss (MSL) with annealed per-step weights.

Only these two of MAML++'s changes live here; its per-step BatchNorm statistics and cosine-annealed
outer learning rate are left to the model and the outer optimizer's scheduler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientLearner, LossFn, Rate


def multi_step_loss_weights(inner_steps: int, epoch: int, annealing_epochs: int) -> list[float]:
    """Per-step query-loss weights of MAML++'s multi-step loss at a given epoch.

    As described by Antoniou et al. (2019): all k weights start at 1/k; every epoch the k - 1 non-final
    weights decay linearly by 1/(k * annealing_epochs) down to a floor of 0.03/k, and the final weight
    grows by (k - 1) times that amount up to 1 - (k - 1) * 0.03/k, so that after ``annealing_epochs``
    epochs the loss is (almost) the final step's alone.
    """
    if inner_steps < 1:
        return []
    k = inner_steps
    decay = 1.0 / k / max(annealing_epochs, 1)
    floor = 0.03 / k
    weights = [max(1.0 / k - epoch * decay, floor) for _ in range(k - 1)]
    weights.append(min(1.0 / k + epoch * (k - 1) * decay, 1.0 - (k - 1) * floor))
    return weights


class MAMLPlusPlus(GradientLearner):
    """MAML with learned per-layer, per-step inner rates (LSLR) and the annealed multi-step loss.

    Args:
        inner_lr: initial value of every rate.
        inner_steps: k; the rates are the parameter ``inner_lrs`` of shape [k, S], S = adapted tensors.
            ``adapt(..., steps=m)`` with m > k reuses the last row of rates for the steps beyond k.
        multi_step_loss: use the multi-step loss (anneal with ``set_epoch``); False: final-step loss only.
        annealing_epochs: epochs over which the multi-step weights anneal to the final step.
        Others: see MAML / GradientLearner.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn = F.mse_loss,
        multi_step_loss: bool = True,
        annealing_epochs: int = 10,
        **kwargs,
    ):
        super().__init__(model, inner_steps=inner_steps, loss_fn=loss_fn, first_order=first_order, **kwargs)
        ref = self._reference_param()
        self.inner_lrs = nn.Parameter(
            torch.full((inner_steps, self.layout.num_segments), float(inner_lr), dtype=ref.dtype, device=ref.device)
        )
        self.multi_step_loss = multi_step_loss
        self.annealing_epochs = annealing_epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that anneals the multi-step loss weights."""
        self.epoch = int(epoch)

    def get_extra_state(self) -> dict:  # the annealing epoch travels with state_dict (checkpoints)
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def inner_rate(self, step: int) -> Rate:
        # Adapting for more steps than were meta-trained (e.g. evaluating a 1-step model after 10 steps)
        # reuses the last learned step's rates: there is no learned rate for those steps.
        row = min(step, self.inner_lrs.shape[0] - 1)
        return self.inner_lrs[row], self.layout.segment_offsets(self.inner_lrs.device)

    def step_loss_weights(self) -> list[float] | None:
        if not self.multi_step_loss or not self.training:
            return None
        return multi_step_loss_weights(self.inner_steps, self.epoch, self.annealing_epochs)
