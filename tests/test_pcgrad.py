"""Tests of metakernels.pcgrad (ops pcgrad, pcgrad_out) and its stage ops on every CPU backend.

Oracle: the classic per-pair loop (metakernels.reference.pcgrad, vector form: it never forms the Gram) run in
float64 on the same gradients and the same orders. It tracks the coefficients W alongside the vectors, so both
outputs are checked.

float64: every result within 1e-10 of the oracle, relative to the magnitudes it is built from (the issue's
bound). The two computations round differently (~1e-16), and a projection decision d < 0 taken with d within
rounding of 0 may differ; PCGrad is continuous in d (the projection d / ||g_j||^2 vanishes as d -> 0), so such
a flip moves W by ~1e-16 relative, far inside 1e-10.

float32 (and bf16, computed in float32): the bound is derived per case (tolerances(), below).
 - Each projection test d = g_i' . g_j and each denominator ||g_j||^2 + eps are computed with an error of at
   most rho times the magnitudes they are made of: |dd| <= rho * sum_k |W_ik| ||g_k|| ||g_j||, |dn| <= rho
   ||g_j||^2, rho = gamma_n, n = the longest float32 chain (128 for the C++ and Triton Gram kernels, which add
   blocks of 128 products per lane/block in float64; P for the float32 vector loop's dot products) plus 2T + 2
   roundings of the vector loop's projections.
 - With every decision taken as in the oracle, W is a smooth function of these perturbations: its first-order
   sensitivities are computed exactly by autograd (torch.func.jacrev) over the float64 coefficient recurrence
   with the decisions frozen, and the bound is twice the first-order one (the second-order terms are
   O(rho^2 * sensitivity^2), here < 1e-3 of the first-order ones).
 - The update adds the combine's rounding, gamma_T + 2(T + 1) u of sum_k (sum_i |W_ik|) |g_k| per column, and
   the final rounding to the storage type.
 - Decisions near 0 can flip under rounding: the float32 tests assert (deterministic cases) or assume
   (hypothesis) that every decision is robust: |d| > 4 x its own error bound (or d is exactly 0 with a zero
   bound: a zero-gradient task). The inputs are random Gaussians (cosines ~ 1/sqrt(P)), and the special
   float32 cases are built so that no later test sees a projected-to-zero vector (exactly opposite
   gradients with T = 2).
"""

from __future__ import annotations

import math
import os
import random
import warnings

import pytest
import torch
from _inputs import LAYOUTS_2D, SIZES, with_layout
from hypothesis import assume, given
from hypothesis import strategies as st

import metakernels
from metakernels.reference import pcgrad as RP

OPS = torch.ops.metakernels
REQUIRE_PEERS = os.environ.get("METAKERNELS_REQUIRE_PEERS") == "1"
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
F64_REL = 1e-10


# --- inputs ----------------------------------------------------------------------------------------------------


def make_grads(num_tasks: int, num_params: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks, num_params, generator=gen, dtype=torch.float64).to(dtype)


def make_orders(num_tasks: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.stack([torch.randperm(num_tasks, generator=gen) for _ in range(num_tasks)])


def make_mask(num_params: int, seed: int = 0, kind: str = "random") -> torch.Tensor:
    if kind == "all":
        return torch.ones(num_params, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(num_params, dtype=torch.bool)
    if kind == "heads":  # a shared trunk, then task heads: two long runs
        mask = torch.zeros(num_params, dtype=torch.bool)
        mask[: max(1, (2 * num_params) // 3)] = True
        return mask
    gen = torch.Generator().manual_seed(seed + 777)
    return torch.rand(num_params, generator=gen) < 0.7


# --- tolerances ------------------------------------------------------------------------------------------------


def _gamma(n: float, u: float) -> float:
    return n * u / (1 - n * u)


def _chain_length(backend: str, num_shared: int) -> int:
    """The longest float32 summation chain of a Gram entry / dot product on this backend."""
    return max(1, num_shared) if backend == "reference" else 128


def _recurrence(k, rows, include_self, eps, delta, eta, decisions):
    """Float64 coefficient recurrence with additive perturbations of every test d and denominator, the
    decisions frozen (decisions is None: decide and record). Returns (W, d per step, W row per step)."""
    num_tasks = k.shape[0]
    eye = torch.eye(num_tasks, dtype=torch.float64)
    out_rows, ds, trail = [], [], []
    record = decisions is None
    taken = [] if record else decisions
    s = 0
    for i in range(num_tasks):
        w = eye[i]
        for j in rows[i]:
            if j == i and not include_self:
                continue
            trail.append(w)
            d = w @ k[:, j] + delta[s]
            denominator = k[j, j] + eps + eta[s]
            if record:
                taken.append(bool(d < 0) and bool(denominator > 0))
            if taken[s]:
                w = w - (d / denominator) * eye[j]
            ds.append(d)
            s += 1
        out_rows.append(w)
    return torch.stack(out_rows), torch.stack(ds) if ds else torch.zeros(0, dtype=torch.float64), trail, taken


def tolerances(grads, orders, mask, include_self, reduction, eps, backend):
    """(expected update, expected W, tol_update, tol_W, robust) for a float32/bf16 computation; see the module
    docstring. Everything in float64."""
    g = grads.double()
    expected_u, expected_w = RP.pcgrad(g, orders, mask, include_self, reduction, eps)
    num_tasks = g.shape[0]
    shared = g if mask is None else g[:, mask]
    k = shared @ shared.t()
    norms = shared.norm(dim=1)
    rows = orders.tolist()
    u = torch.finfo(torch.float32).eps / 2
    rho = _gamma(_chain_length(backend, shared.shape[1]) + 2 * num_tasks + 2, u)
    steps = sum(1 for i in range(num_tasks) for j in rows[i] if j != i or include_self)
    zero = torch.zeros(steps, dtype=torch.float64)
    w_base, d_base, trail, decisions = _recurrence(k, rows, include_self, eps, zero, zero, None)
    # Error bounds of each step's d and denominator (the trail holds W[i] before each step).
    js = [j for i in range(num_tasks) for j in rows[i] if j != i or include_self]
    bound_d = (
        torch.stack([rho * (w.abs() * norms).sum() * norms[j] for w, j in zip(trail, js, strict=True)])
        if steps
        else zero
    )
    bound_n = torch.stack([rho * norms[j] ** 2 for j in js]) if steps else zero
    if steps:

        def fn(delta, eta):
            w, d, _, _ = _recurrence(k, rows, include_self, eps, delta, eta, decisions)
            return w, d

        (jw_d, jw_n), (jd_d, jd_n) = torch.func.jacrev(fn, argnums=(0, 1))(zero, zero)
        tol_w = 2 * (jw_d.abs() @ bound_d + jw_n.abs() @ bound_n)
        err_d = jd_d.abs() @ bound_d + jd_n.abs() @ bound_n
        robust = bool(((d_base.abs() > 4 * err_d) | (err_d == 0)).all())
    else:
        tol_w = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        robust = True
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    tol_c = scale * tol_w.sum(0)
    weight_abs = scale * w_base.abs().sum(0)
    combine = _gamma(num_tasks, u) + 2 * (num_tasks + 1) * u
    tol_shared = tol_c @ g.abs() + combine * (weight_abs @ g.abs())
    tol_plain = _gamma(num_tasks, u) * g.abs().sum(0)
    tol_u = tol_shared if mask is None else torch.where(mask, tol_shared, tol_plain)
    storage = torch.finfo(grads.dtype).eps if grads.dtype != torch.float64 else 0.0
    tol_u = tol_u + storage * (expected_u.abs() + tol_u)
    return expected_u, expected_w, tol_u, tol_w, robust


def assert_within(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    excess = err - tol
    if (excess > 0).any():
        i = int(excess.reshape(-1).argmax())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {err.numel()} out of tolerance; worst at flat index {i}: actual "
            f"{actual.reshape(-1)[i].item()!r}, expected {expected.reshape(-1)[i].item()!r}, error "
            f"{err.reshape(-1)[i].item():.3e} > tol {tol.reshape(-1)[i].item():.3e}"
        )


def check(grads, orders, mask=None, include_self=False, reduction="sum", eps=0.0, backend="cpp", require_robust=True):
    """Runs metakernels.pcgrad and checks both outputs against the float64 per-pair loop."""
    update, weights = metakernels.pcgrad(
        grads,
        orders=orders,
        shared_mask=mask,
        include_self=include_self,
        reduction=reduction,
        eps=eps,
        return_coefficients=True,
    )
    assert update.dtype == grads.dtype and update.shape == (grads.shape[1],) and update.is_contiguous()
    assert weights.dtype == torch.float64 and weights.shape == (grads.shape[0],) * 2
    if grads.dtype == torch.float64:
        expected_u, expected_w = RP.pcgrad(grads, orders, mask, include_self, reduction, eps)
        scale = 1.0 / grads.shape[0] if reduction == "mean" else 1.0
        magnitude = (scale * expected_w.abs().sum(0)) @ grads.abs() + grads.abs().sum(0)
        assert_within(update, expected_u, F64_REL * magnitude, "update (float64)")
        assert_within(weights, expected_w, F64_REL * (1 + expected_w.abs()), "coefficients (float64)")
        return update, weights
    expected_u, expected_w, tol_u, tol_w, robust = tolerances(
        grads, orders, mask, include_self, reduction, eps, backend
    )
    if require_robust:
        assert robust, "test case has a projection decision within rounding of 0 (construct a robust case)"
    assert_within(weights, expected_w, tol_w, f"coefficients ({grads.dtype})")
    assert_within(update, expected_u.to(grads.dtype).double(), tol_u, f"update ({grads.dtype})")
    return update, weights


# --- agreement with the per-pair loop --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_matches_per_pair_loop(backend, dtype, reduction, include_self, num_tasks):
    grads = make_grads(num_tasks, 37, dtype, seed=num_tasks)
    check(grads, make_orders(num_tasks, seed=1), None, include_self, reduction, 0.0, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mask_kind", ["random", "heads", "all", "none"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_shared_mask(backend, dtype, mask_kind, reduction):
    grads = make_grads(6, 53, dtype, seed=3)
    mask = make_mask(53, seed=4, kind=mask_kind)
    update, weights = check(grads, make_orders(6, seed=5), mask, False, reduction, 0.0, backend)
    # Task-specific columns: the plain sum of the task gradients, whatever the reduction.
    plain = grads.double().sum(0)
    torch.testing.assert_close(update[~mask].double(), plain[~mask], rtol=1e-6, atol=1e-6)
    if mask_kind == "all":
        torch.testing.assert_close(
            update, metakernels.pcgrad(grads, orders=make_orders(6, seed=5), reduction=reduction)
        )
    if mask_kind == "none":
        assert torch.equal(weights, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [1e-8, 0.5, 3.0])
def test_eps(backend, dtype, eps):
    grads = make_grads(4, 29, dtype, seed=6)
    check(grads, make_orders(4, seed=7), None, False, "sum", eps, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_single_task_is_its_gradient(backend, dtype):
    for num_params in (1, 13):
        grads = make_grads(1, num_params, dtype, seed=8)
        for include_self in (False, True):
            for reduction in ("sum", "mean"):
                update, weights = metakernels.pcgrad(
                    grads, include_self=include_self, reduction=reduction, return_coefficients=True
                )
                assert torch.equal(update, grads[0])
                assert torch.equal(weights, torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("include_self", [False, True])
def test_zero_gradient_task(backend, dtype, include_self):
    """A zero task projects nothing and is never projected onto (no 0/0, no NaN)."""
    grads = make_grads(4, 23, dtype, seed=9)
    grads[2] = 0
    _, weights = check(grads, make_orders(4, seed=10), None, include_self, "sum", 0.0, backend)
    expected_column = torch.zeros(4, dtype=torch.float64)
    expected_column[2] = 1.0
    assert torch.equal(weights[:, 2], expected_column)
    assert torch.equal(weights[2], expected_column)


def test_all_zero_gradients(backend):
    grads = torch.zeros(3, 7)
    update, weights = metakernels.pcgrad(grads, return_coefficients=True)
    assert torch.equal(update, torch.zeros(7)) and torch.equal(weights, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_duplicate_gradients_do_not_conflict(backend, dtype):
    grads = make_grads(3, 31, dtype, seed=11)
    grads[1] = grads[0]
    _, weights = check(grads, make_orders(3, seed=12), None, False, "sum", 0.0, backend)
    assert weights[0, 1] == 0 and weights[1, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_exactly_opposite_gradients_cancel(backend, dtype):
    grads = make_grads(2, 41, dtype, seed=13)
    grads[1] = -grads[0]
    update, weights = check(grads, make_orders(2, seed=14), None, False, "sum", 0.0, backend)
    tol = 8 * torch.finfo(dtype).eps * grads.abs().sum(0).double()
    assert_within(update, torch.zeros(41, dtype=torch.float64), tol, "opposite gradients: update")


def test_exactly_opposite_among_others_float64(backend):
    grads = make_grads(5, 19, torch.float64, seed=15)
    grads[3] = -grads[1]
    check(grads, make_orders(5, seed=16), None, False, "mean", 0.0, backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_all_conflicting(backend, dtype):
    """Simplex directions: every pair conflicts (g_i . g_j = -1/T relative), so every first test projects."""
    num_tasks, num_params = 5, 17
    base = torch.eye(num_tasks, num_params, dtype=torch.float64)
    simplex = base - base.mean(0)
    noise = make_grads(num_tasks, num_params, torch.float64, seed=17) * 0.01
    grads = (simplex + noise).to(dtype)
    g = grads.double()
    k = g @ g.t()
    assert (k - torch.diag(torch.diag(k)) < 0).sum() == num_tasks * (num_tasks - 1)
    _, weights = check(grads, make_orders(num_tasks, seed=18), None, False, "sum", 0.0, backend)
    assert (weights - torch.diag(torch.diag(weights)) > 0).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_no_conflict_is_the_plain_sum(backend, dtype):
    grads = (make_grads(6, 43, torch.float64, seed=19).abs() + 0.1).to(dtype)
    update, weights = check(grads, make_orders(6, seed=20), None, False, "sum", 0.0, backend)
    assert torch.equal(weights, torch.eye(6, dtype=torch.float64))
    mean, _ = check(grads, make_orders(6, seed=20), None, False, "mean", 0.0, backend)
    tol = 4 * 6 * torch.finfo(dtype).eps * grads.double().abs().sum(0)
    assert_within(update, grads.double().sum(0), tol, "no conflict: sum")
    assert_within(mean, grads.double().mean(0), tol, "no conflict: mean")


@pytest.mark.parametrize("layout", LAYOUTS_2D)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_non_contiguous_grads(backend, layout, dtype):
    grads = make_grads(4, 47, dtype, seed=21)
    orders = make_orders(4, seed=22)
    mask = make_mask(47, seed=23)
    expected = metakernels.pcgrad(grads, orders=orders, shared_mask=mask)
    strided = with_layout(grads, layout)
    assert torch.equal(strided, grads)
    check(strided, orders, mask, False, "sum", 0.0, backend)
    torch.testing.assert_close(metakernels.pcgrad(strided, orders=orders, shared_mask=mask), expected, rtol=0, atol=0)
    # A strided mask, and expanded (stride 0) rows: every task the same gradient, no conflict.
    strided_mask = with_layout(mask, "column_step") if layout == "column_step" else mask
    assert torch.equal(metakernels.pcgrad(grads, orders=orders, shared_mask=strided_mask), expected)
    same = grads[0].expand(4, 47)
    torch.testing.assert_close(metakernels.pcgrad(same), 4 * grads[0], rtol=1e-6, atol=1e-6)


def test_out_buffer(backend):
    grads = make_grads(5, 61, torch.float32, seed=24)
    orders = make_orders(5, seed=25)
    out = torch.full((61,), float("nan"))
    update, weights = metakernels.pcgrad(grads, orders=orders, out=out, return_coefficients=True)
    assert update is out
    expected, expected_w = metakernels.pcgrad(grads, orders=orders, return_coefficients=True)
    assert torch.equal(out, expected) and torch.equal(weights, expected_w)
    with pytest.raises(RuntimeError, match="out= is not differentiable"):
        metakernels.pcgrad(grads.requires_grad_(), out=out)


# --- orders ------------------------------------------------------------------------------------------------------


def test_generator_orders_are_randperm_row_by_row(backend):
    grads = make_grads(6, 33, torch.float64, seed=26)
    gen = torch.Generator().manual_seed(42)
    update = metakernels.pcgrad(grads, generator=gen)
    gen = torch.Generator().manual_seed(42)
    orders = torch.stack([torch.randperm(6, generator=gen) for _ in range(6)])
    assert torch.equal(update, metakernels.pcgrad(grads, orders=orders))
    # The global generator when neither is given (what TorchJD draws).
    torch.manual_seed(7)
    a = metakernels.pcgrad(grads)
    torch.manual_seed(7)
    orders = torch.stack([torch.randperm(6) for _ in range(6)])
    assert torch.equal(a, metakernels.pcgrad(grads, orders=orders))


def test_orders_change_the_result(backend):
    """Order matters (that is why it is an argument): two different orders, two different updates."""
    grads = make_grads(4, 9, torch.float64, seed=27)
    forward = torch.arange(4).repeat(4, 1)
    backward = forward.flip(1)
    assert not torch.allclose(metakernels.pcgrad(grads, orders=forward), metakernels.pcgrad(grads, orders=backward))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_orders_of_other_integer_dtypes(backend, dtype):
    grads = make_grads(3, 8, torch.float64, seed=28)
    orders = make_orders(3, seed=29)
    assert torch.equal(metakernels.pcgrad(grads, orders=orders.to(dtype)), metakernels.pcgrad(grads, orders=orders))


# --- stages --------------------------------------------------------------------------------------------------------


def _stage(backend: str, name: str):
    """The stage as the backend's kernel: the op (C++ or reference) or the Triton function (interpreter)."""
    if backend == "triton":
        from metakernels.triton import pcgrad as triton_pcgrad

        return getattr(triton_pcgrad, name)
    return getattr(metakernels.ops, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mask_kind", [None, "random", "heads"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 300), (9, 1031), (48, 300), (64, 1031)], ids=str)
def test_gram_stage(backend, dtype, mask_kind, shape):
    """K within gamma_n of sum_c |g_a,c g_b,c| of the exact Gram (n: the backend's float32 chain)."""
    num_tasks, num_params = shape
    grads = make_grads(num_tasks, num_params, dtype, seed=30)
    mask = None if mask_kind is None else make_mask(num_params, seed=31, kind=mask_kind)
    gram = _stage(backend, "pcgrad_gram")(grads, mask)
    g = grads.double() if mask is None else grads.double()[:, mask]
    exact = g @ g.t()
    u = torch.finfo(dtype).eps / 2
    tol = _gamma(_chain_length(backend, g.shape[1]) + 2, u) * (g.abs() @ g.abs().t())
    assert gram.dtype == torch.float64
    assert_within(gram, exact, tol, "gram")
    assert torch.equal(gram, gram.t())


def test_many_tasks(backend):
    """T = 64 (the C++ Gram's packed 16 x 16 panel path for float32) and T = 50 (the tile path), float64."""
    # T = 50 exercises the C++ tile path's edge groups; the Triton kernels treat both alike (and the
    # interpreter pays ~10 s per T = 64 recurrence).
    cases = ((64, 517),) if backend == "triton" else ((64, 517), (50, 131))
    for num_tasks, num_params in cases:
        grads = make_grads(num_tasks, num_params, torch.float64, seed=num_tasks)
        check(grads, make_orders(num_tasks, seed=1), None, False, "sum", 0.0, backend)


def test_many_tasks_float32_is_its_stages(backend):
    """float32, T = 64: the update and W are those of the backend's own float32 Gram K~ pushed through the
    exact (float64) recurrence and combine: W within 1e-12 of recurrence(K~), the update within the combine's
    rounding bound gamma_(T+2) sum_k |c_k| |g_k|. K~ itself is checked against the exact Gram by
    test_gram_stage (T = 48, 64). The reference's float32 path is the per-pair loop, which has no Gram: its
    float32 agreement is covered by the sensitivity-bounded tests at T <= 8."""
    if backend == "reference":
        return
    num_tasks, num_params = 64, 517
    grads = make_grads(num_tasks, num_params, torch.float32, seed=64)
    orders = make_orders(num_tasks, seed=1)
    update, weights = metakernels.pcgrad(grads, orders=orders, return_coefficients=True)
    gram = _stage(backend, "pcgrad_gram")(grads, None)
    expected_w = RP.coefficient_recurrence(gram, orders.tolist(), False, 0.0)
    torch.testing.assert_close(weights, expected_w, rtol=1e-12, atol=1e-12)
    coef = expected_w.sum(0)
    expected_u = coef @ grads.double()
    u = torch.finfo(torch.float32).eps / 2
    tol = _gamma(num_tasks + 2, u) * (coef.abs() @ grads.double().abs()) + 2 * u * expected_u.abs()
    assert_within(update, expected_u, tol, "update (float32, T = 64)")


def test_coefficients_stage(backend):
    grads = make_grads(7, 40, torch.float64, seed=32)
    orders = make_orders(7, seed=33)
    gram = grads @ grads.t()
    for include_self in (False, True):
        for eps in (0.0, 0.3):
            weights = _stage(backend, "pcgrad_coefficients")(gram, orders, include_self, eps)
            expected = RP.coefficient_recurrence(gram, orders.tolist(), include_self, eps)
            torch.testing.assert_close(weights, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_combine_stage(backend, dtype, mask_kind):
    grads = make_grads(6, 1031, dtype, seed=34)
    mask = None if mask_kind is None else make_mask(1031, seed=35)
    weights = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(36))
    out = _stage(backend, "pcgrad_combine")(grads, weights, mask)
    g = grads.double()
    exact = weights @ g if mask is None else torch.where(mask, weights @ g, g.sum(0))
    u = torch.finfo(dtype).eps / 2
    tol = _gamma(6 + 2, u) * ((weights.abs() + 1) @ g.abs()) + 2 * u * exact.abs()
    assert_within(out, exact, tol, "combine")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stages_compose_to_the_op(backend, reduction):
    """gram -> coefficients -> combine (what a distributed PCGrad runs, with an all-reduce of K between)."""
    grads = make_grads(5, 77, torch.float64, seed=37)
    orders = make_orders(5, seed=38)
    mask = make_mask(77, seed=39)
    gram = metakernels.ops.pcgrad_gram(grads, mask)
    # Two shards of columns: the Grams of the shards add up to the Gram (the all-reduce).
    sharded = metakernels.ops.pcgrad_gram(grads[:, :40], mask[:40]) + metakernels.ops.pcgrad_gram(
        grads[:, 40:], mask[40:]
    )
    torch.testing.assert_close(sharded, gram, rtol=1e-13, atol=1e-13)
    weights = metakernels.ops.pcgrad_coefficients(gram, orders)
    scale = 1.0 / 5 if reduction == "mean" else 1.0
    update = metakernels.ops.pcgrad_combine(grads, weights.sum(0) * scale, mask)
    expected, expected_w = metakernels.pcgrad(
        grads, orders=orders, shared_mask=mask, reduction=reduction, return_coefficients=True
    )
    torch.testing.assert_close(weights, expected_w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12)


# --- registration: opcheck, autograd ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(backend, dtype, with_mask):
    grads = make_grads(3, 11, dtype, seed=40)
    orders = make_orders(3, seed=41)
    mask = make_mask(11, seed=42) if with_mask else None
    torch.library.opcheck(OPS.pcgrad.default, (grads, orders, mask, False, "sum", 0.0))
    torch.library.opcheck(
        OPS.pcgrad_out.default, (grads, orders, mask, True, "mean", 0.1, torch.empty(11, dtype=dtype))
    )
    torch.library.opcheck(OPS.pcgrad_gram.default, (grads, mask))
    torch.library.opcheck(OPS.pcgrad_coefficients.default, (grads.double() @ grads.double().t(), orders, False, 0.0))
    torch.library.opcheck(OPS.pcgrad_combine.default, (grads, torch.ones(3, dtype=torch.float64), mask))
    # With inputs that require grad: the autograd registration is checked (its backward raises, see below).
    grads.requires_grad_()
    torch.library.opcheck(
        OPS.pcgrad.default,
        (grads, orders, mask, False, "sum", 0.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_differentiating_through_raises(backend):
    grads = make_grads(3, 7, torch.float64, seed=43).requires_grad_()
    update = metakernels.pcgrad(grads)
    assert update.requires_grad
    with pytest.raises(RuntimeError, match="metakernels.pcgrad is not differentiable"):
        update.sum().backward()
    gram = metakernels.ops.pcgrad_gram(grads)
    with pytest.raises(RuntimeError, match="metakernels.pcgrad_gram is not differentiable"):
        gram.sum().backward()
    # Detached gradients (the normal use) give a result that does not require grad.
    assert not metakernels.pcgrad(grads.detach()).requires_grad


def test_torch_compile_matches_eager(backend):
    grads = make_grads(4, 21, torch.float64, seed=44)
    orders = make_orders(4, seed=45)

    def fn(g, o):
        return metakernels.pcgrad(g, orders=o, return_coefficients=True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(grads, orders), fn(grads, orders), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# --- threads -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_threads(backend, restore_threads, dtype):
    """8 x 20011: the C++ Gram and combine split the columns over the threads (above 32768 elements). The
    other backends thread inside torch or not at all; they run a smaller batch (the float32 loop's error
    bound grows with P: gamma_P relative, 1.2e-3 at P = 20011, too loose for robust decisions)."""
    num_params = 20011 if backend == "cpp" else 1031
    grads = make_grads(8, num_params, dtype, seed=46)
    orders = make_orders(8, seed=47)
    mask = make_mask(num_params, seed=48, kind="heads")
    results = {}
    for threads in (2, 1) if backend != "triton" else (2,):  # the interpreter ignores torch's thread count
        torch.set_num_threads(threads)
        results[threads] = check(grads, orders, mask, False, "sum", 0.0, backend)[0]
    if backend == "cpp":
        # The C++ Gram cuts the columns into chunks that do not depend on the thread count and adds their
        # partial Grams in chunk order; the combine writes each column from one chunk: bitwise the same.
        assert torch.equal(results[1], results[2])


# --- hypothesis ----------------------------------------------------------------------------------------------------


@st.composite
def pcgrad_cases(draw):
    num_tasks = draw(st.integers(1, 8))
    num_params = draw(SIZES)
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    grads = make_grads(num_tasks, num_params, dtype, seed=seed)
    if num_tasks > 1 and draw(st.booleans()):
        grads[draw(st.integers(0, num_tasks - 1))] = 0  # a zero-gradient task
    grads = with_layout(grads, draw(st.sampled_from(LAYOUTS_2D)))
    mask = draw(st.sampled_from([None, "random", "heads"]))
    mask = None if mask is None else make_mask(num_params, seed=seed, kind=mask)
    return dict(
        grads=grads,
        orders=make_orders(num_tasks, seed=seed),
        mask=mask,
        include_self=draw(st.booleans()),
        reduction=draw(st.sampled_from(["sum", "mean"])),
        eps=draw(st.sampled_from([0.0, 0.0, 1e-3, 2.0])),
    )


@given(pcgrad_cases())
def test_hypothesis_matches_per_pair_loop(backend, case):
    if case["grads"].dtype != torch.float64:
        *_, robust = tolerances(
            case["grads"], case["orders"], case["mask"], case["include_self"], case["reduction"], case["eps"], backend
        )
        assume(robust)
    check(case["grads"], case["orders"], case["mask"], case["include_self"], case["reduction"], case["eps"], backend)


# --- peers: LibMTL and TorchJD with their own orders reproduced ------------------------------------------------------


def _import_peer(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return __import__(name, fromlist=["_"])
        except ImportError as exc:
            if REQUIRE_PEERS:
                pytest.fail(
                    f"peer {name} is required (METAKERNELS_REQUIRE_PEERS=1) but does not import: {exc}", pytrace=False
                )
            pytest.skip(f"peer {name} not installed ({exc}); scripts/install_peers.sh installs it")


def libmtl_pcgrad(grads: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """LibMTL's PCGrad weighting on given gradients (its backward() minus the autograd around it): the update
    it writes into the shared parameters' .grad, and its batch_weight (1^T W)."""
    weighting_module = _import_peer("LibMTL.weighting.PCGrad")
    weighting = weighting_module.PCGrad()
    weighting.task_num, weighting.rep_grad, weighting.device = grads.shape[0], False, grads.device
    captured = {}
    weighting._compute_grad_dim = lambda: None
    weighting._compute_grad = lambda losses, mode: grads
    weighting._reset_grad = lambda new_grads: captured.setdefault("update", new_grads)
    batch_weight = weighting.backward([None] * grads.shape[0])
    return captured["update"], list(batch_weight)


def libmtl_orders(num_tasks: int) -> torch.Tensor:
    """The orders LibMTL draws next: random.shuffle(list(range(T))) for each task in turn."""
    rows = []
    for _ in range(num_tasks):
        row = list(range(num_tasks))
        random.shuffle(row)
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_matches_libmtl(backend, num_tasks):
    """LibMTL: visits j = i too, sum, no eps; the same update with its random.shuffle orders reproduced."""
    grads = make_grads(num_tasks, 101, torch.float64, seed=49)
    random.seed(50)
    ours_orders = libmtl_orders(num_tasks)
    random.seed(50)
    theirs, batch_weight = libmtl_pcgrad(grads)
    update, weights = metakernels.pcgrad(grads, orders=ours_orders, include_self=True, return_coefficients=True)
    torch.testing.assert_close(update, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights.sum(0), torch.tensor(batch_weight, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_tasks", [2, 6])
def test_matches_torchjd(backend, num_tasks):
    """TorchJD: j != i, sum; it draws torch.randperm(T) from the global generator row by row, as we do."""
    aggregation = _import_peer("torchjd.aggregation")
    grads = make_grads(num_tasks, 64, torch.float64, seed=51)
    torch.manual_seed(52)
    theirs = aggregation.PCGrad()(grads)
    torch.manual_seed(52)
    ours = metakernels.pcgrad(grads)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# --- bad input -------------------------------------------------------------------------------------------------------

T_, P_ = 3, 6


def _call(grads=None, **kwargs):
    def run():
        g = make_grads(T_, P_, torch.float64, seed=53) if grads is None else grads()
        return metakernels.pcgrad(g, **kwargs)

    return run


def _nan_grads():
    g = make_grads(T_, P_, torch.float64, seed=53)
    g[1, 2] = math.nan
    return g


def _inf_head_grads():
    g = make_grads(T_, P_, torch.float64, seed=53)
    g[0, 5] = math.inf
    return g


HEADS = torch.tensor([True, True, True, True, False, False])

BAD_PCGRAD = {
    "grads_1d": (_call(lambda: torch.ones(P_)), ValueError, r"grads must be a 2-D \[T, P\] tensor, got shape \[6\]"),
    "grads_3d": (_call(lambda: torch.ones(1, T_, P_)), ValueError, "grads must be a 2-D"),
    "empty_task_batch": (_call(lambda: torch.ones(0, P_)), ValueError, r"grads is an empty task batch \(T = 0\)"),
    "no_parameters": (_call(lambda: torch.ones(T_, 0)), ValueError, r"grads has no parameters \(P = 0\)"),
    "grads_integer": (
        _call(lambda: torch.ones(T_, P_, dtype=torch.int64)),
        TypeError,
        "grads must be a floating-point",
    ),
    "grads_nan": (_call(_nan_grads), ValueError, r"grads has a non-finite squared norm \(nan\) in task 1"),
    "grads_inf": (
        _call(lambda: _inf_head_grads()),
        ValueError,
        r"grads has a non-finite squared norm \(inf\) in task 0",
    ),
    "grads_inf_task_specific": (
        _call(_inf_head_grads, shared_mask=HEADS),
        ValueError,
        r"grads has NaN or inf in its task-specific columns \(shared_mask False\)",
    ),
    "orders_shape": (
        _call(orders=torch.zeros(T_, T_ + 1, dtype=torch.int64)),
        ValueError,
        r"orders must be a \[T, T\] tensor with T = 3",
    ),
    "orders_1d": (_call(orders=torch.arange(T_)), ValueError, r"orders must be a \[T, T\] tensor"),
    "orders_float": (_call(orders=torch.zeros(T_, T_)), TypeError, "orders must be an int64 tensor, got dtype"),
    "orders_not_permutation": (
        _call(orders=torch.tensor([[0, 1, 2], [0, 0, 2], [2, 1, 0]])),
        ValueError,
        r"orders row 1 must be a permutation of 0..T-1 \(T = 3\), got \[0, 0, 2\]",
    ),
    "orders_out_of_range": (
        _call(orders=torch.tensor([[0, 1, 2], [1, 2, 0], [3, 1, 0]])),
        ValueError,
        r"orders row 2 must be a permutation",
    ),
    "orders_negative": (
        _call(orders=torch.tensor([[0, 1, -1], [1, 2, 0], [2, 1, 0]])),
        ValueError,
        r"orders row 0 must be a permutation",
    ),
    "orders_and_generator": (
        _call(orders=torch.arange(T_).repeat(T_, 1), generator=torch.Generator()),
        ValueError,
        "pass orders or generator, not both",
    ),
    "mask_length": (
        _call(shared_mask=torch.ones(P_ + 1, dtype=torch.bool)),
        ValueError,
        r"shared_mask must be a 1-D \[P\] tensor with P = 6",
    ),
    "mask_2d": (_call(shared_mask=torch.ones(1, P_, dtype=torch.bool)), ValueError, "shared_mask must be a 1-D"),
    "mask_dtype": (_call(shared_mask=torch.ones(P_)), TypeError, "shared_mask must be a bool tensor, got dtype"),
    "reduction": (_call(reduction="max"), ValueError, "reduction must be 'sum' or 'mean', got 'max'"),
    "eps_negative": (_call(eps=-1e-8), ValueError, "eps must be finite and >= 0"),
    "eps_nan": (_call(eps=math.nan), ValueError, "eps must be finite and >= 0"),
    "eps_inf": (_call(eps=math.inf), ValueError, "eps must be finite and >= 0"),
    "out_shape": (
        _call(out=torch.empty(P_ + 1, dtype=torch.float64)),
        ValueError,
        r"out must be a contiguous 1-D \[P\] tensor with P = 6",
    ),
    "out_dtype": (_call(out=torch.empty(P_)), TypeError, "out has dtype .* but grads has dtype"),
}


@pytest.mark.parametrize("name", list(BAD_PCGRAD))
def test_bad_input_raises_naming_the_argument(backend, name):
    run, error, match = BAD_PCGRAD[name]
    with pytest.raises(error, match=r"metakernels\.pcgrad: " + match if not match.startswith("metakernels") else match):
        run()


def test_stage_bad_input(backend):
    grads = make_grads(T_, P_, torch.float64, seed=54)
    with pytest.raises(ValueError, match=r"metakernels.pcgrad_gram: grads must be a 2-D"):
        _stage(backend, "pcgrad_gram")(grads[0], None)
    with pytest.raises(ValueError, match=r"metakernels.pcgrad_coefficients: gram must be a square"):
        _stage(backend, "pcgrad_coefficients")(grads, make_orders(T_), False, 0.0)
    with pytest.raises(TypeError, match=r"metakernels.pcgrad_coefficients: gram must be a float64"):
        _stage(backend, "pcgrad_coefficients")(torch.eye(T_), make_orders(T_), False, 0.0)
    bad = torch.eye(T_, dtype=torch.float64)
    bad[1, 1] = math.inf
    with pytest.raises(
        ValueError, match=r"metakernels.pcgrad_coefficients: gram has a non-finite diagonal entry \(inf\) at task 1"
    ):
        _stage(backend, "pcgrad_coefficients")(bad, make_orders(T_), False, 0.0)
    with pytest.raises(ValueError, match=r"metakernels.pcgrad_combine: weights must be a 1-D \[T\] tensor with T = 3"):
        _stage(backend, "pcgrad_combine")(grads, torch.ones(T_ + 1), None)
    with pytest.raises(TypeError, match=r"metakernels.pcgrad_combine: weights must be a floating-point"):
        _stage(backend, "pcgrad_combine")(grads, torch.ones(T_, dtype=torch.int64), None)
