"""metakernels: compiled-kernel accelerated meta-gradients for PyTorch.

Import torch before the compiled extension so one OpenMP runtime (torch's libgomp) is loaded.
"""

import torch  # noqa: F401  (must precede metakernels._C)

from . import distributed  # noqa: F401  (metakernels.distributed.pcgrad after `import metakernels`)
from ._backend import cpu_backend, extension_available, extension_error
from .compat import PCGrad
from .functional import CGResult, ParameterLayout, TaskParams, batched_cg, hessian_penalty, task_batched_call
from .functional.hvp import hvp, hvp_operator
from .learners import (
    ANIL,
    FOMAML,
    MAML,
    MAMLPlusPlus,
    MetaPCGrad,
    MetaSGD,
    MultiTaskBaseline,
    Reptile,
    ShrinkageIMAML,
    iMAML,
    meta_pcgrad_backward,
)
from .ops import conv_block, inner_step, mlp_loss_grad, pcgrad, reptile_meta_gradient, reptile_update, task_linear

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ANIL",
    "FOMAML",
    "MAML",
    "MAMLPlusPlus",
    "MetaPCGrad",
    "MetaSGD",
    "MultiTaskBaseline",
    "PCGrad",
    "ParameterLayout",
    "Reptile",
    "ShrinkageIMAML",
    "iMAML",
    "TaskParams",
    "CGResult",
    "batched_cg",
    "task_batched_call",
    "hvp",
    "hvp_operator",
    "hessian_penalty",
    "cpu_backend",
    "extension_available",
    "extension_error",
    "conv_block",
    "inner_step",
    "mlp_loss_grad",
    "task_linear",
    "meta_pcgrad_backward",
    "pcgrad",
    "reptile_meta_gradient",
    "reptile_update",
]
