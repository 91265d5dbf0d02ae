"""Tests of metakernels.batched_cg (metakernels/functional/cg.py) on every CPU backend of its vector step
(metakernels.cg_step: C++, reference, Triton interpreter).

Oracles: torch.linalg.solve for the solution, and a classic one-task-at-a-time CG written plainly below for
the iterates and the stopping points. Test matrices are built with a known spectrum, A = Q diag(eigs) Q^T, so
their condition numbers (and hence the tolerances) are known:

* Solution accuracy: stopping at ||r|| <= tol ||b|| bounds the forward error by
  ||x - x*|| / ||x*|| <= cond(A) ||r|| / ||b|| <= cond(A) tol; the rounding of float64 CG over P <= 12 steps
  adds ~cond * P * eps (1e-13 here). With cond <= 10 and tol = 1e-12 the bound is 1e-11; asserted: 1e-10.
* Iterates vs classic CG: the same float64 recurrence, the dot products summed in a different order (relative
  difference <= P * eps each); over k <= P steps with cond <= 10 that is amplified by at most a few orders of
  magnitude: 1e-12 relative to max|x| is asserted (measured differences: ~1e-15).
* negative_curvature="continue" (plain CG) on indefinite systems: the same comparison with the same loop, which
  then also steps through p^T A p < 0. Plain CG on an indefinite A has no minimisation property to damp rounding,
  and its rounding errors are amplified by ||p||^2 / |p^T A p| at each step; the systems here keep
  |p^T A p| / ||p||^2 above 0.05 (asserted with the loop; measured min 0.13), and the same bounds hold with a
  margin: iterates within 1.5e-13 of the loop's (bound 1e-12), P-step solutions within 3e-14 of
  torch.linalg.solve (bound 1e-10), measured on all three backends.
"""

from __future__ import annotations

import math

import pytest
import torch

import metakernels
from metakernels.functional.cg import CG_ACTIVE, CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE


@pytest.fixture(autouse=True)
def _every_backend(backend):
    """Every test runs with each CPU backend serving the fused vector step (metakernels.cg_step)."""
    yield


def spd_matrix(num_params: int, cond: float, seed: int, negative: int = 0) -> torch.Tensor:
    """Q diag(eigs) Q^T in float64, eigenvalues log-spaced in [1, cond]; the first `negative` ones negated."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(num_params, num_params, generator=gen, dtype=torch.float64))
    eigs = torch.logspace(0, math.log10(cond), num_params, dtype=torch.float64)
    eigs[:negative] = -eigs[:negative]
    return (q * eigs) @ q.T


def batch_matvec(mats: torch.Tensor, calls: list | None = None):
    """v [T, P] -> A_t v_t for a [T, P, P] stack (counts its calls when given a list)."""

    def matvec(v: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(v.clone())
        return torch.einsum("tij,tj->ti", mats.to(v.dtype), v)

    return matvec


def rhs(num_tasks: int, num_params: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks, num_params, generator=gen, dtype=torch.float64).to(dtype)


def classic_cg(
    A: torch.Tensor,
    b: torch.Tensor,
    max_iter: int,
    tol: float,
    bad_at: int | None = None,
    negative_curvature: str = "stop",
    curvatures: list | None = None,
):
    """Textbook CG on one system; returns (x, iterations, status). bad_at: the matvec call that returns NaN.
    negative_curvature="continue": plain CG (steps through p^T A p < 0, stops only on p^T A p == 0).
    curvatures: when given, receives p^T A p / p^T p of every step."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    threshold = tol**2 * torch.dot(b, b)
    if rs <= threshold:
        return x, 0, CG_CONVERGED
    for k in range(max_iter):
        Ap = A @ p
        if bad_at is not None and k == bad_at:
            Ap = torch.full_like(Ap, math.nan)
        pap = torch.dot(p, Ap)
        if not torch.isfinite(pap):
            return x, k, CG_NONFINITE
        if curvatures is not None:
            curvatures.append((pap / torch.dot(p, p)).item())
        if (pap <= 0) if negative_curvature == "stop" else (pap == 0):
            return x, k, CG_NEGATIVE_CURVATURE
        alpha = rs / pap
        x = x + alpha * p
        r = r - alpha * Ap
        rr = torch.dot(r, r)
        if rr <= threshold:
            return x, k + 1, CG_CONVERGED
        p = r + (rr / rs) * p
        rs = rr
    return x, max_iter, CG_ACTIVE


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-300), f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


# --- solutions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_params", [1, 2, 7, 12])
def test_solves_spd_systems_like_linalg_solve(num_params):
    T = 4
    mats = torch.stack([spd_matrix(num_params, 10.0, seed=t) for t in range(T)])
    b = rhs(T, num_params, seed=100)
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=num_params, tol=1e-12)
    expected = torch.linalg.solve(mats, b)
    for t in range(T):
        assert_close_rel(res.x[t], expected[t], 1e-10, f"task {t}")
    assert res.status.tolist() == [CG_CONVERGED] * T, res.summary()
    assert (res.iterations <= num_params).all() and (res.iterations >= 1).all()
    assert (res.relative_residual <= 1e-12).all()
    # The recurrence's residual is the true residual b - A x up to rounding (float64, well conditioned).
    true_residual = (b - batch_matvec(mats)(res.x)).norm(dim=1)
    assert (true_residual <= 1e-11 * b.norm(dim=1)).all()
    assert res.x.dtype == b.dtype and res.x.is_contiguous()


def test_imaml_system():
    """(I + H / lambda) x = v with an indefinite H whose eigenvalues exceed -lambda: SPD, solved exactly."""
    T, P, lam = 3, 9, 2.0
    hessians = torch.stack([spd_matrix(P, 1.5, seed=10 + t, negative=3) for t in range(T)])  # |eig| in [1, 1.5]
    mats = torch.eye(P, dtype=torch.float64) + hessians / lam  # eigenvalues in [0.25, 1.75]: cond 7
    v = rhs(T, P, seed=11)
    res = metakernels.batched_cg(batch_matvec(mats), v, max_iter=P, tol=1e-12)
    expected = torch.linalg.solve(mats, v)
    for t in range(T):
        assert_close_rel(res.x[t], expected[t], 1e-10, f"task {t}")


def test_float32_against_float64_solve():
    """float32 CG: the attainable accuracy is ~c * P * cond * eps32 (recurrence drift); 10 * P * cond * eps."""
    T, P, cond = 3, 8, 10.0
    mats = torch.stack([spd_matrix(P, cond, seed=20 + t) for t in range(T)])
    b = rhs(T, P, seed=21)
    res = metakernels.batched_cg(batch_matvec(mats), b.float(), max_iter=2 * P, tol=1e-6)
    expected = torch.linalg.solve(mats, b)
    assert res.x.dtype == torch.float32
    for t in range(T):
        assert_close_rel(res.x[t].double(), expected[t], 10 * P * cond * torch.finfo(torch.float32).eps, f"task {t}")


@pytest.mark.parametrize("max_iter", [0, 1, 2, 3, 5, 8])
def test_iterates_match_classic_cg(max_iter):
    T, P = 3, 8
    mats = torch.stack([spd_matrix(P, 10.0, seed=30 + t) for t in range(T)])
    b = rhs(T, P, seed=31)
    calls: list = []
    res = metakernels.batched_cg(batch_matvec(mats, calls), b, max_iter=max_iter, tol=0.0)
    assert len(calls) == max_iter  # exactly one matvec per iteration, none extra
    for t in range(T):
        x, iters, status = classic_cg(mats[t], b[t], max_iter, 0.0)
        assert_close_rel(res.x[t], x, 1e-12, f"task {t} after {max_iter} iterations")
        assert res.iterations[t].item() == iters
        assert res.status[t].item() == status
        if max_iter:
            assert res.residual_norm[t].item() == pytest.approx((b[t] - mats[t] @ res.x[t]).norm().item(), rel=1e-8)


# --- stopping ----------------------------------------------------------------------------------------------


def test_negative_curvature_stops_at_the_classic_iterate():
    """Indefinite A (two negative eigenvalues): CG runs until some p^T A p <= 0 and stops there, flagged."""
    T, P = 3, 10
    mats = torch.stack(
        [
            spd_matrix(P, 10.0, seed=40),
            spd_matrix(P, 10.0, seed=41, negative=2),
            spd_matrix(P, 10.0, seed=42, negative=1),
        ]
    )
    b = rhs(T, P, seed=43)
    b[1] = b[1].abs()  # (chosen so task 1 takes steps before meeting negative curvature; checked below)
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=2 * P, tol=1e-12)
    stops = []
    for t in range(T):
        x, iters, status = classic_cg(mats[t], b[t], 2 * P, 1e-12)
        stops.append((iters, status))
        assert res.status[t].item() == status, res.summary()
        assert res.iterations[t].item() == iters
        assert torch.isfinite(res.x[t]).all()
        assert_close_rel(res.x[t], x, 1e-12, f"task {t}")
    assert stops[0][1] == CG_CONVERGED
    assert stops[1][1] == CG_NEGATIVE_CURVATURE and stops[1][0] >= 1, stops  # stopped after taking steps
    assert stops[2][1] == CG_NEGATIVE_CURVATURE, stops
    assert "negative_curvature" in res.summary()


@pytest.mark.parametrize("mode", ["stop", "continue"])
def test_zero_curvature_at_the_start(mode):
    """p^T A p = 0 exactly on the first step (A = diag(1, -1), b = (1, 1)): x = 0, flagged, never NaN. Under
    "continue" too: plain CG breaks down there (its step length would be infinite)."""
    mats = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))[None]
    b = torch.ones(1, 2, dtype=torch.float64)
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=3, negative_curvature=mode)
    assert res.status.tolist() == [CG_NEGATIVE_CURVATURE]
    assert res.iterations.tolist() == [0]
    assert torch.equal(res.x, torch.zeros_like(b))
    assert res.relative_residual.tolist() == [1.0]


# --- plain CG (negative_curvature="continue") ----------------------------------------------------------------


def indefinite_batch(T: int, P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T nonsingular indefinite systems (|eigenvalues| in [1, 10], a third of them negative) with right-hand
    sides on which plain CG meets p^T A p < 0 but never comes near a breakdown (checked by the callers)."""
    mats = torch.stack([spd_matrix(P, 10.0, seed=seed + t, negative=max(1, P // 3)) for t in range(T)])
    return mats, rhs(T, P, seed=seed + 100)


@pytest.mark.parametrize("max_iter", [1, 2, 3, 5, 8])
def test_continue_iterates_match_plain_cg(max_iter):
    """Plain CG through negative curvature: the textbook loop's iterates, iteration counts and statuses."""
    T, P = 3, 8
    mats, b = indefinite_batch(T, P, seed=200)
    calls: list = []
    res = metakernels.batched_cg(
        batch_matvec(mats, calls), b, max_iter=max_iter, tol=0.0, negative_curvature="continue"
    )
    assert len(calls) == max_iter
    met_negative = False
    for t in range(T):
        curvatures: list = []
        x, iters, status = classic_cg(
            mats[t], b[t], max_iter, 0.0, negative_curvature="continue", curvatures=curvatures
        )
        assert min(abs(c) for c in curvatures) > 0.05, curvatures  # far from a breakdown (see the module docstring)
        met_negative |= min(curvatures) < 0
        assert_close_rel(res.x[t], x, 1e-12, f"task {t} after {max_iter} iterations")
        assert res.iterations[t].item() == iters == max_iter
        assert res.status[t].item() == status == CG_ACTIVE
        assert res.residual_norm[t].item() == pytest.approx((b[t] - mats[t] @ res.x[t]).norm().item(), rel=1e-8)
    if max_iter >= 2:
        assert met_negative  # the comparison is not vacuous: some step had p^T A p < 0
    stopped = metakernels.batched_cg(batch_matvec(mats), b, max_iter=max_iter, tol=0.0)
    if met_negative:
        assert (stopped.status == CG_NEGATIVE_CURVATURE).any()  # and there the stop rule parts from plain CG
        assert not torch.allclose(stopped.x, res.x)


def test_continue_solves_indefinite_systems_like_linalg_solve():
    """Without a breakdown, plain CG's residuals stay orthogonal, so P iterations solve a nonsingular indefinite
    system (cond 10: the forward-error bound of the module docstring, 1e-10). The stop rule does not get there."""
    T, P = 4, 9
    mats, b = indefinite_batch(T, P, seed=300)
    for t in range(T):
        curvatures: list = []
        classic_cg(mats[t], b[t], P, 1e-12, negative_curvature="continue", curvatures=curvatures)
        assert min(curvatures) < 0 and min(abs(c) for c in curvatures) > 0.05, curvatures
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1e-12, negative_curvature="continue")
    expected = torch.linalg.solve(mats, b)
    assert res.status.tolist() == [CG_CONVERGED] * T, res.summary()
    for t in range(T):
        assert_close_rel(res.x[t], expected[t], 1e-10, f"task {t}")
    true_residual = (b - batch_matvec(mats)(res.x)).norm(dim=1)
    assert (true_residual <= 1e-10 * b.norm(dim=1)).all()
    stopped = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1e-12)
    assert (stopped.status == CG_NEGATIVE_CURVATURE).all(), stopped.summary()
    assert ((stopped.x - expected).abs().amax(1) > 1e-3 * expected.abs().amax(1)).all()


@pytest.mark.parametrize("mode", ["stop", "continue"])
def test_zero_direction_breakdown(mode):
    """A direction A maps to zero (A = diag(0, 2, 3), b = e_0: p^T A p = 0 exactly on the first step): a
    flagged stop at x = 0 under either rule, never NaN; the other tasks of the batch are unaffected."""
    mats = torch.stack([torch.diag(torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64)), spd_matrix(3, 10.0, seed=5)])
    b = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=4, tol=1e-12, negative_curvature=mode)
    assert res.status.tolist() == [CG_NEGATIVE_CURVATURE, CG_CONVERGED], res.summary()
    assert res.iterations[0].item() == 0 and torch.equal(res.x[0], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(res.x).all() and torch.isfinite(res.residual_norm).all()
    assert_close_rel(res.x[1], torch.linalg.solve(mats[1], b[1]), 1e-10, "task 1")


def test_continue_breakdown_after_steps():
    """Plain CG breaking down after a step: A = diag(1, 0) (a zero direction), b = (1, 1). Step 0: p^T A p = 1,
    alpha = 2, x = (2, 2), r = (-1, 1), beta = 1, p = (0, 2): in A's null space, p^T A p = 0 exactly (every
    number dyadic, so exact in floating point too). The task stops with its one-step iterate, flagged, finite;
    the textbook loop agrees. The stop rule stops at the same place (0 <= 0)."""
    mats = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))[None]
    b = torch.ones(1, 2, dtype=torch.float64)
    x, iters, status = classic_cg(mats[0], b[0], 5, 0.0, negative_curvature="continue")
    assert (iters, status) == (1, CG_NEGATIVE_CURVATURE) and x.tolist() == [2.0, 2.0]
    for mode in ("continue", "stop"):
        res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=5, tol=0.0, negative_curvature=mode)
        assert res.status.tolist() == [CG_NEGATIVE_CURVATURE] and res.iterations.tolist() == [1]
        assert res.x.tolist() == [[2.0, 2.0]] and torch.isfinite(res.residual_norm).all()


def test_zero_right_hand_side():
    T, P = 3, 5
    mats = torch.stack([spd_matrix(P, 10.0, seed=50 + t) for t in range(T)])
    b = rhs(T, P, seed=51)
    b[1] = 0.0
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1e-12)
    assert torch.equal(res.x[1], torch.zeros(P, dtype=torch.float64))
    assert res.status[1].item() == CG_CONVERGED and res.iterations[1].item() == 0
    assert res.residual_norm[1].item() == 0.0 and res.relative_residual[1].item() == 0.0
    expected = torch.linalg.solve(mats, b)
    for t in (0, 2):
        assert_close_rel(res.x[t], expected[t], 1e-10, f"task {t}")
    everything_zero = metakernels.batched_cg(batch_matvec(mats), torch.zeros_like(b), max_iter=2)
    assert torch.equal(everything_zero.x, torch.zeros_like(b))
    assert everything_zero.status.tolist() == [CG_CONVERGED] * T


def test_converged_task_is_frozen_while_others_continue():
    """Task 0 (A = 3 I) converges in one iteration; task 1 needs P. Task 0's state never changes afterwards."""
    P = 9
    mats = torch.stack([3.0 * torch.eye(P, dtype=torch.float64), spd_matrix(P, 10.0, seed=60)])
    b = rhs(2, P, seed=61)
    first = metakernels.batched_cg(batch_matvec(mats), b, max_iter=1, tol=1e-12)
    full = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1e-12)
    assert first.status.tolist() == [CG_CONVERGED, CG_ACTIVE]
    assert full.status.tolist() == [CG_CONVERGED, CG_CONVERGED]
    assert full.iterations[0].item() == 1 and full.iterations[1].item() > 1
    assert torch.equal(full.x[0], first.x[0]) and torch.equal(full.residual_norm[0], first.residual_norm[0])
    assert_close_rel(full.x[0], b[0] / 3.0, 1e-15, "task 0")
    assert_close_rel(full.x[1], torch.linalg.solve(mats[1], b[1]), 1e-10, "task 1")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_matvec_output_is_flagged(bad):
    """The matvec returns inf/NaN for task 1 on its third call: task 1 stops at its 2-iteration iterate."""
    T, P = 3, 8
    mats = torch.stack([spd_matrix(P, 10.0, seed=70 + t) for t in range(T)])
    b = rhs(T, P, seed=71)
    count = [0]
    inner = batch_matvec(mats)

    def matvec(v):
        out = inner(v)
        count[0] += 1
        if count[0] == 3:
            out[1, 2] = bad
        return out

    res = metakernels.batched_cg(matvec, b, max_iter=P, tol=1e-12)
    assert res.status.tolist() == [CG_CONVERGED, CG_NONFINITE, CG_CONVERGED], res.summary()
    assert torch.isfinite(res.x).all() and torch.isfinite(res.residual_norm).all()
    x, iters, status = classic_cg(mats[1], b[1], P, 1e-12, bad_at=2)
    assert (iters, status) == (2, CG_NONFINITE)
    assert res.iterations[1].item() == 2
    assert_close_rel(res.x[1], x, 1e-12, "task 1")
    expected = torch.linalg.solve(mats, b)
    for t in (0, 2):
        assert_close_rel(res.x[t], expected[t], 1e-10, f"task {t}")


def test_nonfinite_right_hand_side():
    T, P = 2, 4
    mats = torch.stack([spd_matrix(P, 10.0, seed=80 + t) for t in range(T)])
    b = rhs(T, P, seed=81)
    b[0, 1] = math.inf
    seen: list = []
    res = metakernels.batched_cg(batch_matvec(mats, seen), b, max_iter=P, tol=1e-12)
    assert res.status.tolist() == [CG_NONFINITE, CG_CONVERGED]
    assert torch.equal(res.x[0], torch.zeros(P, dtype=torch.float64)) and res.iterations[0].item() == 0
    assert all(torch.isfinite(v).all() for v in seen)  # the matvec never sees the bad task's inf
    assert_close_rel(res.x[1], torch.linalg.solve(mats[1], b[1]), 1e-10, "task 1")


def test_max_iter_zero_and_tolerance():
    T, P = 2, 6
    mats = torch.stack([spd_matrix(P, 10.0, seed=90 + t) for t in range(T)])
    b = rhs(T, P, seed=91)
    res = metakernels.batched_cg(batch_matvec(mats), b, max_iter=0)
    assert torch.equal(res.x, torch.zeros_like(b)) and res.status.tolist() == [CG_ACTIVE] * T
    assert res.relative_residual.tolist() == [1.0, 1.0]
    loose = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1e-2)
    assert loose.status.tolist() == [CG_CONVERGED] * T
    assert (loose.relative_residual <= 1e-2).all()
    assert (loose.iterations < P).all()  # a loose tolerance stops early (checked: cond 10, P 6)
    trivially = metakernels.batched_cg(batch_matvec(mats), b, max_iter=P, tol=1.0)
    assert trivially.status.tolist() == [CG_CONVERGED] * T and trivially.iterations.tolist() == [0, 0]


def test_matvec_returning_its_argument():
    """A matvec may return p itself (A = I): batched_cg copies it for the in-place step; x = b in one step."""
    b = rhs(2, 5, seed=4)
    res = metakernels.batched_cg(lambda v: v, b, max_iter=3)
    assert res.status.tolist() == [CG_CONVERGED] * 2 and res.iterations.tolist() == [1, 1]
    assert_close_rel(res.x, b, 1e-15, "x")


def test_summary():
    T, P = 3, 4
    mats = torch.stack([spd_matrix(P, 10.0, seed=1), spd_matrix(P, 10.0, seed=2), -torch.eye(P, dtype=torch.float64)])
    b = rhs(T, P, seed=3)
    line = metakernels.batched_cg(batch_matvec(mats), b, max_iter=1, tol=1e-12).summary()
    assert line.startswith("batched_cg: 3 tasks: ")
    assert "2 max_iter" in line and "1 negative_curvature" in line and "max relative residual" in line


# --- bad input ---------------------------------------------------------------------------------------------


def _identity(v):
    return v.clone()


BAD_CG = {
    "b_1d": (lambda: (_identity, torch.ones(4), {"max_iter": 2}), ValueError, r"b must be a 2-D \[T, P\]"),
    "b_3d": (lambda: (_identity, torch.ones(2, 3, 4), {"max_iter": 2}), ValueError, r"b must be a 2-D \[T, P\]"),
    "b_empty": (lambda: (_identity, torch.ones(0, 4), {"max_iter": 2}), ValueError, r"b is an empty task batch"),
    "b_no_params": (lambda: (_identity, torch.ones(2, 0), {"max_iter": 2}), ValueError, r"b has no parameters"),
    "b_integer": (
        lambda: (_identity, torch.ones(2, 3, dtype=torch.int64), {"max_iter": 2}),
        TypeError,
        "b must be a float32 or float64",
    ),
    "b_not_tensor": (lambda: (_identity, [[1.0]], {"max_iter": 2}), TypeError, "b must be a tensor"),
    "max_iter_negative": (lambda: (_identity, torch.ones(2, 3), {"max_iter": -1}), ValueError, "max_iter must be"),
    "max_iter_float": (lambda: (_identity, torch.ones(2, 3), {"max_iter": 2.0}), ValueError, "max_iter must be"),
    "tol_negative": (
        lambda: (_identity, torch.ones(2, 3), {"max_iter": 2, "tol": -1e-3}),
        ValueError,
        "tol must be a finite number >= 0",
    ),
    "tol_nan": (
        lambda: (_identity, torch.ones(2, 3), {"max_iter": 2, "tol": math.nan}),
        ValueError,
        "tol must be a finite number >= 0",
    ),
    "negative_curvature_unknown": (
        lambda: (_identity, torch.ones(2, 3), {"max_iter": 2, "negative_curvature": "plain"}),
        ValueError,
        r"negative_curvature must be one of \('stop', 'continue'\), got 'plain'",
    ),
    "negative_curvature_bool": (
        lambda: (_identity, torch.ones(2, 3), {"max_iter": 2, "negative_curvature": False}),
        ValueError,
        "negative_curvature must be one of",
    ),
    "matvec_not_callable": (lambda: (3, torch.ones(2, 3), {"max_iter": 2}), TypeError, "matvec must be callable"),
    "matvec_wrong_shape": (
        lambda: (lambda v: v[:, :2], torch.ones(2, 3), {"max_iter": 2}),
        ValueError,
        r"matvec must return a \[T, P\] tensor of b's shape \[2, 3\], got \[2, 2\]",
    ),
    "matvec_transposed": (
        lambda: (lambda v: v.t(), torch.ones(2, 3), {"max_iter": 2}),
        ValueError,
        "matvec must return",
    ),
    "matvec_dtype": (
        lambda: (lambda v: v.double(), torch.ones(2, 3), {"max_iter": 2}),
        TypeError,
        "matvec returned dtype torch.float64",
    ),
    "matvec_not_tensor": (
        lambda: (lambda v: v.tolist(), torch.ones(2, 3), {"max_iter": 2}),
        TypeError,
        "matvec must return a tensor",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CG))
def test_bad_input_raises_naming_the_argument(name):
    build, error, match = BAD_CG[name]
    matvec, b, kwargs = build()
    with pytest.raises(error, match=match):
        metakernels.batched_cg(matvec, b, **kwargs)


def test_max_iter_is_keyword_only():
    with pytest.raises(TypeError):
        metakernels.batched_cg(_identity, torch.ones(2, 3), 3)  # type: ignore[misc]
