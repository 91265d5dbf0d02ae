"""Pure-PyTorch mirrors of every fused op, with the same signatures.

They are the test oracle, the CPU kernels when the C++ extension is absent, and the benchmark baseline.
Each is differentiable by plain autograd, so they also check the ops' hand-written gradients.
"""

from .inner_step import inner_step, inner_step_backward, inner_step_out
from .reptile_update import reptile_update

__all__ = ["inner_step", "inner_step_backward", "inner_step_out", "reptile_update"]
