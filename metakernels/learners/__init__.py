"""High-level meta-learners (nn.Modules): the MAML family and Reptile."""

from .anil import ANIL
from .base import GradientLearner, per_task_losses
from .imaml import iMAML
from .maml import FOMAML, MAML, MultiTaskBaseline
from .maml_plus_plus import MAMLPlusPlus, multi_step_loss_weights
from .meta_pcgrad import MetaPCGrad, meta_pcgrad_backward
from .meta_sgd import MetaSGD
from .reptile import Reptile
from .shrinkage import ShrinkageIMAML

__all__ = [
    "ANIL",
    "FOMAML",
    "GradientLearner",
    "MAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "MetaPCGrad",
    "MultiTaskBaseline",
    "Reptile",
    "ShrinkageIMAML",
    "iMAML",
    "meta_pcgrad_backward",
    "multi_step_loss_weights",
    "per_task_losses",
]
