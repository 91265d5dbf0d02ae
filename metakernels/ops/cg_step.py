"""metakernels::cg_step: one conjugate-gradient iteration of T independent systems, fused and in place.

Given Ap = A_t p_t for every task (computed by the caller between calls), updates x, r, p and the per-task
state rs = r.r, status and iterations of every task still active: alpha = rs / p.Ap, x += alpha p,
r -= alpha Ap, beta = r.r / rs, p = r + beta p, with per-task convergence (rs <= threshold), negative-curvature
(p.Ap <= 0) and non-finite stops. The exact rules are in metakernels/reference/cg_step.py; batched CG
(metakernels.batched_cg) is the interface most code wants.

A mutating op with no autograd (CG's iterates are not differentiated through) and no output: every result is
written into its arguments, so there are no allocations per iteration and nothing is read back to the host.
"""

from __future__ import annotations

import torch

from ..reference.cg_step import CG_ACTIVE, CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE
from ._library import LIBRARY

__all__ = ["CG_ACTIVE", "CG_CONVERGED", "CG_NEGATIVE_CURVATURE", "CG_NONFINITE", "cg_step"]

LIBRARY.define(
    "cg_step(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Ap, Tensor(d!) rs, Tensor(e!) status, "
    "Tensor(f!) iterations, Tensor threshold) -> ()"
)

_CG_STEP = torch.ops.metakernels.cg_step.default


def cg_step(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    rs: torch.Tensor,
    status: torch.Tensor,
    iterations: torch.Tensor,
    threshold: torch.Tensor,
) -> None:
    """One CG iteration of every active task, in place.

    Args:
        x, r, p: [T, P] contiguous float32/float64 iterate, residual and search direction (updated).
        Ap: [T, P] A_t p_t, same dtype (any strides).
        rs: [T] float64 r.r of each task (updated).
        status: [T] int32: CG_ACTIVE tasks step, any other code is left alone (updated).
        iterations: [T] int64 steps taken per task (updated).
        threshold: [T] float64 convergence threshold on r.r ((tol * ||b_t||)^2).

    Raises:
        ValueError / TypeError: shapes, dtypes, devices, non-contiguous or overlapping buffers (naming the
            argument).
    """
    _CG_STEP(x, r, p, Ap, rs, status, iterations, threshold)


@torch.library.register_fake("metakernels::cg_step")
def _cg_step_fake(x, r, p, Ap, rs, status, iterations, threshold):
    return None
