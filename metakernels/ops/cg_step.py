"""metakernels::cg_step: one conjugate-gradient iteration of T independent systems, fused and in place.

Given Ap = A_t p_t for every task (computed by the caller between calls), updates x, r, p and the per-task
state rs = r.r, status and iterations of every task still active: alpha = rs / p.Ap, x += alpha p,
r -= alpha Ap, beta = r.r / rs, p = r + beta p, with per-task convergence (rs <= threshold), negative-curvature
(p.Ap <= 0; with stop_on_negative_curvature=False only the breakdown p.Ap == 0, and p.Ap < 0 steps as plain CG
does) and non-finite stops. The exact rules are in metakernels/reference/cg_step.py; batched CG
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
    "Tensor(f!) iterations, Tensor threshold, bool stop_on_negative_curvature=True) -> ()"
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
    stop_on_negative_curvature: bool = True,
) -> None:
    """One CG iteration of every active task, in place.

    Args:
        x, r, p: [T, P] contiguous float32/float64 iterate, residual and search direction (updated).
        Ap: [T, P] A_t p_t, same dtype (any strides).
        rs: [T] float64 r.r of each task (updated).
        status: [T] int32: CG_ACTIVE tasks step, any other code is left alone (updated).
        iterations: [T] int64 steps taken per task (updated).
        threshold: [T] float64 convergence threshold on r.r ((tol * ||b_t||)^2).
        stop_on_negative_curvature: True (default): a task with p.Ap <= 0 stops there (status
            CG_NEGATIVE_CURVATURE, no step). False: plain CG, a task steps whenever p.Ap is finite and nonzero
            (alpha = rs / p.Ap may be negative); only p.Ap == 0 (breakdown) stops it with CG_NEGATIVE_CURVATURE.

    Raises:
        ValueError / TypeError: shapes, dtypes, devices, non-contiguous or overlapping buffers, a non-bool
            stop_on_negative_curvature (naming the argument).
    """
    if not isinstance(stop_on_negative_curvature, bool):  # the schema would accept 0/1 silently as well
        raise TypeError(
            "metakernels.cg_step: stop_on_negative_curvature must be a bool, got "
            f"{type(stop_on_negative_curvature).__name__}"
        )
    _CG_STEP(x, r, p, Ap, rs, status, iterations, threshold, stop_on_negative_curvature)


@torch.library.register_fake("metakernels::cg_step")
def _cg_step_fake(x, r, p, Ap, rs, status, iterations, threshold, stop_on_negative_curvature=True):
    return None  # every result is written into the mutated arguments; the rule changes no shape
