"""metakernels: compiled-kernel accelerated meta-gradients for PyTorch.

Import torch before the compiled extension so one OpenMP runtime (torch's libgomp) is loaded.
"""

import torch  # noqa: F401  (must precede metakernels._C)

from ._backend import cpu_backend, extension_available, extension_error
from .functional import ParameterLayout, TaskParams, task_batched_call
from .learners import ANIL, FOMAML, MAML, MAMLPlusPlus, MetaSGD, MultiTaskBaseline, Reptile
from .ops import inner_step, pcgrad, reptile_meta_gradient, reptile_update

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ANIL",
    "FOMAML",
    "MAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "MultiTaskBaseline",
    "ParameterLayout",
    "Reptile",
    "TaskParams",
    "task_batched_call",
    "cpu_backend",
    "extension_available",
    "extension_error",
    "inner_step",
    "pcgrad",
    "reptile_meta_gradient",
    "reptile_update",
]
