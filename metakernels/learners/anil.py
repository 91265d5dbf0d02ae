"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): the inner loop adapts only the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.batched_call import task_batched_call
from .base import LossFn
from .maml import MAML


class ANIL(MAML):
    """MAML whose inner loop adapts only the head's parameters; the body is meta-learned, not adapted.

    Args:
        head: name of the head submodule (dotted path); default: the model's last child.
        Others: see MAML.

    When the model is an nn.Sequential whose last child is the head, the body's features are computed
    once per batch (per task, with per-task BatchNorm statistics) instead of once per inner step.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        loss_fn: LossFn = F.mse_loss,
        head: str | None = None,
        **kwargs,
    ):
        children = list(model.named_children())
        if head is None:
            if not children:
                raise ValueError("metakernels.ANIL: the model has no submodules; pass head=<submodule name>")
            head = children[-1][0]
        try:
            model.get_submodule(head)
        except AttributeError as exc:
            raise ValueError(f"metakernels.ANIL: head {head!r} is not a submodule of the model") from exc
        prefix = head + "."
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         loss_fn=loss_fn, adapt_filter=lambda name, _: name.startswith(prefix), **kwargs)
        self.head = head
        self._split = isinstance(model, nn.Sequential) and children and children[-1][0] == head
        if self._split:
            self._body = nn.Sequential(*[m for _, m in children[:-1]])
            self._head_module = children[-1][1]
            # Head parameter names relative to the head module, in layout order.
            self._head_names = [s.name[len(prefix):] for s in self.layout]

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        if not self._split:
            return x
        return task_batched_call(self._body, None, x)

    def forward_tasks(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self._split:
            return super().forward_tasks(flat, x)
        views = self.layout.views(flat)
        head_params = {rel: views[s.name] for rel, s in zip(self._head_names, self.layout, strict=False)}
        return task_batched_call(self._head_module, head_params, x)
