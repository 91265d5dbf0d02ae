"""The learners' per-task losses: they live in metakernels.functional.losses, below the learners, because the
functional layer (hvp) needs them too; this module keeps the learners' imports unchanged."""

from ..functional.losses import LossFn, per_task_losses, standard_loss

__all__ = ["LossFn", "per_task_losses", "standard_loss"]
