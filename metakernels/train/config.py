"""The configuration of a sinusoid meta-training run, and the learner each algorithm name stands for."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.nn.functional as F
from torch import nn

from ..learners import ANIL, FOMAML, MAML, GradientLearner, MAMLPlusPlus, MetaSGD, MultiTaskBaseline, Reptile

ALGORITHMS = ("maml", "fomaml", "metasgd", "maml++", "anil", "reptile", "multitask")

#: Inner steps when --inner-steps is not given. MAML's sinusoid experiment trains with one step (Finn et al.
#: 2017, section 5.1), and so do Meta-SGD and the MAML-family variants here; Reptile needs several SGD steps
#: for its update to differ from joint training (with one step it is the multi-task gradient, up to scale);
#: the multi-task baseline has no inner loop.
DEFAULT_INNER_STEPS = {"maml": 1, "fomaml": 1, "metasgd": 1, "maml++": 1, "anil": 1, "reptile": 5, "multitask": 0}

#: Fields that do not change what training computes: a run may be resumed with other values of these.
#: (Bitwise-identical resumption additionally assumes the same thread count and machine: the float reductions
#: inside a GEMM may split differently with another number of threads.)
RESUMABLE_CHANGES = frozenset({"iterations", "checkpoint_every", "threads", "heldout_tasks", "heldout_seed",
                               "eval_steps", "plot_tasks"})


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint and in metrics.json).

    Defaults are the MAML paper's sinusoid setup: K = 10 support and 10 query points per task, 25 tasks per
    meta-batch, inner lr 0.01, Adam at 1e-3, 70,000 meta-iterations; evaluation after 1 and 10 inner steps on
    600 held-out tasks.
    """

    algorithm: str = "maml"
    task: str = "sinusoid"
    iterations: int = 70_000
    inner_steps: int | None = None  # None: DEFAULT_INNER_STEPS[algorithm]
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    first_order: bool = False
    k_shot: int = 10
    k_query: int = 10
    meta_batch: int = 25
    hidden: tuple[int, ...] = (40, 40)
    seed: int = 0
    # MAML++ multi-step-loss annealing: epoch = iteration // epoch_length, annealed over annealing_epochs.
    epoch_length: int = 500
    annealing_epochs: int = 10
    checkpoint_every: int = 1000
    log_every: int = 100
    threads: int = 1
    heldout_tasks: int = 600
    heldout_seed: int = 1
    eval_steps: tuple[int, ...] = field(default_factory=lambda: tuple(range(11)))
    plot_tasks: int = 4

    def __post_init__(self) -> None:
        if self.inner_steps is None and self.algorithm in DEFAULT_INNER_STEPS:
            self.inner_steps = DEFAULT_INNER_STEPS[self.algorithm]
        self.hidden = tuple(int(h) for h in self.hidden)
        self.eval_steps = tuple(sorted({int(s) for s in self.eval_steps}))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        if self.task != "sinusoid":
            raise ValueError(f"task must be 'sinusoid' (the only task so far); got {self.task!r}")
        positive = ("iterations", "k_shot", "k_query", "meta_batch", "epoch_length", "annealing_epochs",
                    "checkpoint_every", "log_every", "threads", "heldout_tasks")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0; got {self.inner_steps!r}")
        if self.algorithm == "multitask" and self.inner_steps != 0:
            raise ValueError(f"the multitask baseline has no inner loop: inner_steps must be 0; got {self.inner_steps}")
        if self.algorithm != "multitask" and self.inner_steps < 1:
            raise ValueError(f"{self.algorithm} needs inner_steps >= 1; got {self.inner_steps}")
        if not math.isfinite(self.inner_lr):
            raise ValueError(f"inner_lr must be finite; got {self.inner_lr}")
        if not (math.isfinite(self.outer_lr) and self.outer_lr > 0):
            raise ValueError(f"outer_lr must be finite and > 0; got {self.outer_lr}")
        if self.first_order and self.algorithm in ("reptile", "multitask", "fomaml"):
            raise ValueError(f"first_order does not apply to {self.algorithm} (already first order or no inner loop)")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be one or more widths >= 1; got {self.hidden}")
        if not self.eval_steps or self.eval_steps[0] < 0:
            raise ValueError(f"eval_steps must be integers >= 0; got {self.eval_steps}")
        if self.plot_tasks < 0:
            raise ValueError(f"plot_tasks must be >= 0; got {self.plot_tasks}")
        if self.plot_tasks > self.heldout_tasks:
            raise ValueError(f"plot_tasks ({self.plot_tasks}) exceeds heldout_tasks ({self.heldout_tasks})")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples), so the dict survives torch.load(weights_only=True) and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration fields {unknown}")
        return cls(**data)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that differ and that matter for training: {name: (self's value, other's value)}."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]}


def build_learner(config: TrainConfig, model: nn.Module) -> GradientLearner:
    """The learner ``config.algorithm`` names, around ``model``, with an MSE loss."""
    a, lr, k, fo = config.algorithm, config.inner_lr, config.inner_steps, config.first_order
    loss = F.mse_loss
    if a == "maml":
        return MAML(model, inner_lr=lr, inner_steps=k, first_order=fo, loss_fn=loss)
    if a == "fomaml":
        return FOMAML(model, inner_lr=lr, inner_steps=k, loss_fn=loss)
    if a == "metasgd":
        return MetaSGD(model, inner_lr=lr, inner_steps=k, first_order=fo, loss_fn=loss)
    if a == "maml++":
        return MAMLPlusPlus(model, inner_lr=lr, inner_steps=k, first_order=fo, loss_fn=loss,
                            annealing_epochs=config.annealing_epochs)
    if a == "anil":
        return ANIL(model, inner_lr=lr, inner_steps=k, first_order=fo, loss_fn=loss)
    if a == "reptile":
        return Reptile(model, inner_lr=lr, inner_steps=k, loss_fn=loss)
    if a == "multitask":
        return MultiTaskBaseline(model, loss_fn=loss)
    raise ValueError(f"unknown algorithm {a!r}")
