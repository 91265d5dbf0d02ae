"""The thin op API: one Python function per fused op (schema, fake kernel, autograd in its module)."""

from .inner_step import inner_step
from .pcgrad import pcgrad, pcgrad_coefficients, pcgrad_combine, pcgrad_gram
from .reptile_update import reptile_meta_gradient, reptile_update

# Op names as registered under torch.ops.metakernels, for the backend registry, the profiler and tests.
OP_NAMES = ("inner_step", "inner_step_backward", "inner_step_out", "reptile_update", "pcgrad", "pcgrad_out")

__all__ = ["inner_step", "pcgrad", "reptile_update", "reptile_meta_gradient", "OP_NAMES"]
