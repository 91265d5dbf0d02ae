"""Reference of metakernels::cg_step: one conjugate-gradient iteration of T independent systems, in place.

Per task t whose status is CG_ACTIVE, given Ap = A_t p (computed by the caller):

    if rs <= threshold:             status = CG_CONVERGED            (no step; the residual is already small)
    if rs is not finite:            status = CG_NONFINITE            (no step)
    pAp = p . Ap                                                     (float64 accumulation)
    if pAp is not finite:           status = CG_NONFINITE            (no step: the matvec produced inf/NaN)
    stop_on_negative_curvature=True (default):
      elif pAp <= 0:                status = CG_NEGATIVE_CURVATURE   (no step: A_t is not positive definite along p)
    stop_on_negative_curvature=False (plain CG, the rule of imaml_dev's and TorchOpt's CG):
      elif pAp == 0:                status = CG_NEGATIVE_CURVATURE   (no step: breakdown, alpha would be infinite)
      (pAp < 0 steps like pAp > 0, with a negative alpha)
    alpha = rs / pAp, rounded to the working dtype; not finite -> CG_NONFINITE (no step)
    r -= alpha Ap;  rr = r . r                                       (float64 accumulation)
    if rr is not finite:            status = CG_NONFINITE            (x, rs, iterations keep their values; r is spent)
    else (the step is accepted):
        x += alpha p;  iterations += 1;  beta = rr / rs;  rs = rr
        if rr <= threshold:         status = CG_CONVERGED
        if beta (working dtype) is finite: p = r + beta p   else status = CG_NONFINITE (unless converged)

A stopped task (any status other than CG_ACTIVE) is left untouched by later calls, so its x is the iterate it
stopped at and never NaN (alpha and p are finite whenever x is updated), in either mode. With
stop_on_negative_curvature=False on an indefinite A_t the iterates no longer minimise 1/2 x^T A x - b^T x, but the
residuals stay mutually orthogonal, so without a breakdown (pAp == 0) plain CG still reaches A_t^-1 b in at most P
steps of exact arithmetic. threshold is on r^T r, i.e. the
squared residual norm (batched_cg passes (tol * ||b_t||)^2).

Elementwise arithmetic is in the working dtype (alpha and beta rounded to it once), dot products in float64:
the C++ and Triton kernels do the same, so they agree with this oracle up to the rounding of a*b+c (fused or
not) and the order of the float64 sums. No boolean indexing or .item(): nothing here synchronises a device.
"""

from __future__ import annotations

import torch

from .._validation import check_cg_step_args

CG_ACTIVE, CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE = 0, 1, 2, 3


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
    check_cg_step_args(x, r, p, Ap, rs, status, iterations, threshold, stop_on_negative_curvature)
    dtype = x.dtype

    def code(value: int) -> torch.Tensor:
        return torch.full_like(status, value)

    active = status == CG_ACTIVE
    rs_finite = torch.isfinite(rs)
    converged_before = active & rs_finite & (rs <= threshold)
    nonfinite_before = active & ~rs_finite
    active = active & rs_finite & ~converged_before

    pap = (p.to(torch.float64) * Ap.to(torch.float64)).sum(1)
    pap_finite = torch.isfinite(pap)
    breakdown = ~(pap > 0) if stop_on_negative_curvature else pap == 0  # the task stops here, without a step
    negative = active & pap_finite & breakdown
    usable = active & pap_finite & ~breakdown
    alpha = torch.where(usable, rs / torch.where(usable, pap, 1.0), 0.0).to(dtype)
    step = usable & torch.isfinite(alpha)
    nonfinite = active & ~negative & ~step

    r.copy_(torch.where(step[:, None], r - alpha[:, None] * Ap, r))
    rr = (r.to(torch.float64) ** 2).sum(1)
    accept = step & torch.isfinite(rr)
    nonfinite = nonfinite | (step & ~accept)
    beta = torch.where(accept, rr / torch.where(accept, rs, 1.0), 0.0).to(dtype)
    x.copy_(torch.where(accept[:, None], x + alpha[:, None] * p, x))
    converged = accept & (rr <= threshold)
    turn = accept & torch.isfinite(beta)
    nonfinite = nonfinite | (accept & ~turn & ~converged)
    p.copy_(torch.where(turn[:, None], r + beta[:, None] * p, p))
    iterations.add_(accept.to(iterations.dtype))
    rs.copy_(torch.where(accept, rr, rs))

    new_status = torch.where(converged_before | converged, code(CG_CONVERGED), status)
    new_status = torch.where(negative, code(CG_NEGATIVE_CURVATURE), new_status)
    new_status = torch.where(nonfinite_before | nonfinite, code(CG_NONFINITE), new_status)
    status.copy_(new_status)
