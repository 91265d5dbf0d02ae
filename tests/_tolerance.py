"""Error bounds for comparing a kernel with its reference, derived from rounding-error analysis.

Every bound is elementwise and scaled by the magnitudes of the terms that were rounded, not by the size
of the result: an inner step can cancel (theta ~ lr * u) and a reduction can sum to ~0, and a bound
relative to the result would then be either meaningless or falsely tight.

Two implementations of the same formula in the same working precision (unit roundoff u = eps / 2) differ
because the C++ kernel is compiled with -march=native and may contract a*b + c into one fused
multiply-add (one rounding instead of two), the Triton interpreter evaluates in numpy, and torch's
reference rounds after every op. Each of the k roundings of an evaluation contributes at most u times a
term bounded by `scale` (the sum of the absolute values of every term, computed exactly enough in
float64), so each result is within k*u*scale of the exact value and two results are within
k*eps*scale of each other (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3).

Reductions (d_lr; a shared theta0's gradient; Reptile's task mean) sum n products. Recursive
summation of n terms in working precision errs by at most gamma_(n-1) * sum|terms|, gamma_n = n*u/(1-n*u)
(Higham (4.4)); torch's float32 sums (cascade sums, index_add's sequential adds) and the Triton per-column
float32 sums are within that, the C++ kernel accumulates in double (well within it). This deterministic
bound grows like n; the typical error grows like sqrt(n)*u*sum|terms|, so the bound is loose for large n
but never wrong.

bf16/half: every backend computes in float32 and rounds once to the storage type. If the float32
values differ by d, the stored values differ by at most d + eps_storage*(|expected| + d) (each
round-to-nearest moves a value by at most half an ulp, and an ulp is at most eps_storage*|x|).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Roundings in one evaluation of the inner-step formula theta - L*(g + prox*(theta - theta0) + wd*theta):
# theta-theta0, prox*(.), wd*theta, two additions, L*u, the final subtraction, plus the rounding of
# prox+wd in the backward's contraction factor: 8 at most. Two implementations: 2 * 8 * u = 8 * eps.
ELEMENTWISE_ROUNDINGS = 8


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in (float32 for bf16/half)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(math_dtype(dtype)).eps / 2


def storage_rounding(dtype: torch.dtype, expected: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Adds the effect of the final rounding to a low-precision storage type (see module docstring)."""
    if dtype not in LOW_PRECISION:
        return tol
    return tol + torch.finfo(dtype).eps * (expected.double().abs() + tol)


def tolerance(
    dtype: torch.dtype,
    expected: torch.Tensor,
    scale: torch.Tensor | float = 0.0,
    sums: tuple[tuple[torch.Tensor, torch.Tensor | int], ...] = (),
) -> torch.Tensor:
    """Bound on |kernel - reference| for a result built from elementwise terms and sums.

    Args:
        dtype: the storage dtype of the inputs and the result.
        expected: the reference result (for the final storage rounding of bf16/half).
        scale: sum of the absolute values of the elementwise terms (float64): 2 * 8 * u * scale.
        sums: (abs_sum, count) per reduction feeding the result: count terms, each up to the elementwise
            bound, whose absolute values sum to abs_sum: 2 * gamma_(count + 8) * abs_sum.
    """
    u = unit_roundoff(dtype)
    tol = 2 * ELEMENTWISE_ROUNDINGS * u * torch.as_tensor(scale, dtype=torch.float64)
    for abs_sum, count in sums:
        n = torch.as_tensor(count, dtype=torch.float64) + ELEMENTWISE_ROUNDINGS
        tol = tol + 2 * n * u / (1 - n * u) * abs_sum
    return storage_rounding(dtype, expected, tol)


def elementwise_tol(dtype: torch.dtype, scale: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Bound for an elementwise result whose terms sum in absolute value to `scale` (float64)."""
    return tolerance(dtype, expected, scale=scale)


def reduction_tol(dtype: torch.dtype, abs_sum: torch.Tensor, count: torch.Tensor | int, expected: torch.Tensor):
    """Bound for a sum of `count` terms whose absolute values (each up to the elementwise bound) sum to abs_sum."""
    return tolerance(dtype, expected, sums=((abs_sum, count),))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Asserts equal shape and dtype and |actual - expected| <= tol elementwise (compared in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.double(), expected.double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(e)
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{what}: non-finite values {a}"
    err = (a - e).abs()
    excess = err - tol
    if (excess > 0).any():
        i = int(excess.reshape(-1).argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), e.shape)) if e.dim() else ()
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{what}: {bad} of {e.numel()} elements out of tolerance; worst at {idx}: actual "
            f"{a.reshape(-1)[i].item()!r}, expected {e.reshape(-1)[i].item()!r}, error {err.reshape(-1)[i].item():.3e} "
            f"> tol {tol.reshape(-1)[i].item():.3e}"
        )
