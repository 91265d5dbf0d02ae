"""High-level meta-learners (nn.Modules): the MAML family and Reptile."""

from .anil import ANIL
from .base import GradientLearner, per_task_losses
from .maml import FOMAML, MAML, MultiTaskBaseline
from .maml_plus_plus import MAMLPlusPlus, multi_step_loss_weights
from .meta_sgd import MetaSGD
from .reptile import Reptile

__all__ = [
    "ANIL",
    "FOMAML",
    "GradientLearner",
    "MAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "MultiTaskBaseline",
    "Reptile",
    "multi_step_loss_weights",
    "per_task_losses",
]
