"""The thin op API: one Python function per fused op (schema, fake kernel, autograd in its module)."""

from .cg_step import cg_step
from .conv_block import conv_block
from .inner_step import inner_step
from .mlp_loss_grad import mlp_loss_grad
from .pcgrad import pcgrad, pcgrad_coefficients, pcgrad_combine, pcgrad_gram
from .reptile_update import reptile_meta_gradient, reptile_update
from .task_linear import task_linear

# Op names as registered under torch.ops.metakernels, for the backend registry, the profiler and tests.
OP_NAMES = ("inner_step", "inner_step_backward", "inner_step_out", "reptile_update", "pcgrad", "pcgrad_out",
            "conv_block", "conv_block_backward", "task_linear", "task_linear_backward", "mlp_loss_grad",
            "mlp_loss_grad_backward", "cg_step")

__all__ = ["cg_step", "conv_block", "inner_step", "mlp_loss_grad", "pcgrad", "pcgrad_coefficients", "pcgrad_combine",
           "pcgrad_gram", "task_linear", "reptile_update", "reptile_meta_gradient", "OP_NAMES"]
