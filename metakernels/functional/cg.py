"""Batched conjugate gradient: T independent symmetric systems A_t x_t = b_t solved in lockstep.

One matvec (all tasks at once, e.g. the Hessian-vector products of iMAML) and one fused vector step
(metakernels.cg_step: x += alpha p, r -= alpha Ap, p = r + beta p and both dot products, in place) per
iteration; per-task step sizes, convergence and stopping, and no host synchronisation inside the loop (the
iteration count decides how long it runs; converged or stopped tasks simply stop changing).

Stopping rules per task (status codes):
    CG_CONVERGED           ||r|| <= tol * ||b||  (also b = 0: x = 0)
    CG_NEGATIVE_CURVATURE  negative_curvature="stop" (default): p^T A p <= 0, A_t is not positive definite along p
                           (ReLU/tanh Hessians are indefinite); the task keeps the iterate it had (every step taken
                           so far, each along a direction of positive curvature, decreased 1/2 x^T A x - b^T x).
                           negative_curvature="continue": only p^T A p == 0 exactly (breakdown: the step length
                           rs / p^T A p would be infinite); the task keeps the iterate it had
    CG_NONFINITE           b, a dot product or the matvec output is inf/NaN; the task keeps its last finite iterate
    CG_ACTIVE              (at the end) max_iter iterations were not enough

negative_curvature="continue" is plain CG, as imaml_dev's utils.cg_solve and TorchOpt's linear_solve.solve_cg run
it: a step with p^T A p < 0 is taken with a negative step length. On an indefinite A_t the iterates then no longer
minimise 1/2 x^T A x - b^T x, but the residuals stay mutually orthogonal, so (barring a breakdown) CG still
reaches A_t^-1 b in at most P iterations of exact arithmetic; after fewer it is whatever the recurrence gives,
which is what code ported from those libraries computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.cg_step import cg_step as _cg_step
from ..reference.cg_step import CG_ACTIVE, CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE

__all__ = ["CG_ACTIVE", "CG_CONVERGED", "CG_NEGATIVE_CURVATURE", "CG_NONFINITE", "CGResult", "batched_cg"]

NEGATIVE_CURVATURE_MODES = ("stop", "continue")

STATUS_NAMES = {
    CG_ACTIVE: "max_iter",
    CG_CONVERGED: "converged",
    CG_NEGATIVE_CURVATURE: "negative_curvature",
    CG_NONFINITE: "nonfinite",
}


@dataclass
class CGResult:
    """What batched_cg returns; every field is per task.

    Attributes:
        x: [T, P] the iterate where each task stopped (never NaN).
        iterations: [T] int64, CG iterations each task performed (accepted steps).
        residual_norm: [T] float64, ||r|| of the CG recurrence at the returned iterate.
        relative_residual: [T] float64, residual_norm / ||b|| (0 where b = 0).
        status: [T] int32, CG_ACTIVE (hit max_iter), CG_CONVERGED, CG_NEGATIVE_CURVATURE or CG_NONFINITE.
    """

    x: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    relative_residual: torch.Tensor
    status: torch.Tensor

    def summary(self) -> str:
        """One line: tasks per status, iteration range and the largest relative residual (reads the device)."""
        counts = torch.bincount(self.status.to(torch.int64).cpu(), minlength=4).tolist()
        parts = [f"{counts[code]} {STATUS_NAMES[code]}" for code in STATUS_NAMES if counts[code]]
        iters = self.iterations.cpu()
        rel = self.relative_residual.cpu()
        return (
            f"batched_cg: {self.status.numel()} tasks: {', '.join(parts)}; iterations {int(iters.min())}.."
            f"{int(iters.max())}; max relative residual {float(rel.max()):.3g}"
        )


def _check_matvec_output(out: object, b: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"metakernels.batched_cg: matvec must return a tensor, got {type(out).__name__}")
    if out.shape != b.shape:
        raise ValueError(
            f"metakernels.batched_cg: matvec must return a [T, P] tensor of b's shape {list(b.shape)}, "
            f"got {list(out.shape)}"
        )
    if out.dtype != b.dtype:
        raise TypeError(f"metakernels.batched_cg: matvec returned dtype {out.dtype} but b has dtype {b.dtype}")
    if out.device != b.device:
        raise ValueError(f"metakernels.batched_cg: matvec returned a tensor on {out.device} but b is on {b.device}")
    return out


def batched_cg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    max_iter: int,
    tol: float = 1e-10,
    negative_curvature: str = "stop",
) -> CGResult:
    """Solves A_t x_t = b_t for all T tasks by conjugate gradient, in lockstep, from x_0 = 0.

    Args:
        matvec: v [T, P] -> [A_1 v_1; ...; A_T v_T] [T, P], each A_t symmetric (e.g. I + H_t / lambda). Called
            exactly max_iter times (on every task, stopped ones included: no host synchronisation decides to
            skip a call). Its output is not differentiated through.
        b: [T, P] right-hand sides, float32 or float64.
        max_iter: the number of iterations (>= 0); with tol = 1e-10 it decides unless a task converges.
        tol: relative residual tolerance: a task stops when ||r_t|| <= tol * ||b_t||. 0 runs every iteration.
        negative_curvature: "stop" (default) stops a task on p^T A p <= 0 and keeps its iterate; "continue" runs
            plain CG through p^T A p < 0 (imaml_dev's and TorchOpt's CG) and stops a task only on p^T A p == 0.

    Returns:
        A CGResult; x is [T, P] contiguous in b's dtype.

    Raises:
        ValueError / TypeError: b not a non-empty floating [T, P] tensor, max_iter < 0, tol < 0 or not finite,
            negative_curvature not "stop" or "continue", matvec returning a wrong shape, dtype or device (naming
            the argument).
    """
    if not callable(matvec):
        raise TypeError(f"metakernels.batched_cg: matvec must be callable, got {type(matvec).__name__}")
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"metakernels.batched_cg: b must be a tensor, got {type(b).__name__}")
    if b.dim() != 2:
        raise ValueError(f"metakernels.batched_cg: b must be a 2-D [T, P] tensor, got shape {list(b.shape)}")
    if b.shape[0] == 0:
        raise ValueError("metakernels.batched_cg: b is an empty task batch (T = 0)")
    if b.shape[1] == 0:
        raise ValueError("metakernels.batched_cg: b has no parameters (P = 0)")
    if b.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"metakernels.batched_cg: b must be a float32 or float64 tensor, got dtype {b.dtype}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"metakernels.batched_cg: max_iter must be an integer >= 0, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"metakernels.batched_cg: tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(negative_curvature, str) or negative_curvature not in NEGATIVE_CURVATURE_MODES:
        raise ValueError(
            f"metakernels.batched_cg: negative_curvature must be one of {NEGATIVE_CURVATURE_MODES}, "
            f"got {negative_curvature!r}"
        )
    stop_on_negative_curvature = negative_curvature == "stop"

    with torch.no_grad():
        b = b.detach()
        num_tasks = b.shape[0]
        x = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
        b_norm2 = (b.to(torch.float64) ** 2).sum(1)
        rs = b_norm2.clone()
        threshold = (float(tol) ** 2) * b_norm2  # on r^T r
        # Tasks that need no step (b = 0, or tol >= 1: ||b|| is already small enough) are converged and tasks with
        # a non-finite b stop before the first matvec; their r and p are zero so the matvec never sees inf/NaN.
        finite = torch.isfinite(rs)
        status = torch.where(finite, torch.where(rs <= threshold, CG_CONVERGED, CG_ACTIVE), CG_NONFINITE)
        status = status.to(torch.int32)
        r = torch.where(finite[:, None], b, 0.0).contiguous()
        p = r.clone()
        iterations = torch.zeros(num_tasks, dtype=torch.int64, device=b.device)
        own = {t.untyped_storage().data_ptr() for t in (x, r, p)}
        for _ in range(max_iter):
            Ap = _check_matvec_output(matvec(p), b)
            if Ap.untyped_storage().data_ptr() in own:  # e.g. the identity returning p itself: cg_step needs a copy
                Ap = Ap.clone()
            # fused, in place, no host sync
            _cg_step(x, r, p, Ap.detach(), rs, status, iterations, threshold, stop_on_negative_curvature)
        residual_norm = rs.sqrt()
        b_norm = b_norm2.sqrt()
        relative = torch.where(b_norm > 0, residual_norm / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    return CGResult(x=x, iterations=iterations, residual_norm=residual_norm, relative_residual=relative, status=status)
