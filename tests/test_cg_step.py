"""Tests of metakernels::cg_step on every CPU backend (C++, reference, Triton interpreter).

Oracle: metakernels.reference.cg_step. Tolerances (u = eps / 2 of the working dtype; the derivation is the
one in csrc/tests/test_cg_step.cpp). An updated element a + s b (r - alpha Ap, x + alpha p) is rounded at most
twice per implementation (fused or not), and s = alpha = T(rs / pAp) may differ between implementations:
their float64 sums of p_i Ap_i are each within gamma_P sum |p_i Ap_i| of the exact value, and the rounding to
the working dtype may land on neighbouring values (eps relative). So
    |Δalpha| <= (P eps64 sum|p Ap| / |pAp| + eps) |alpha|,   |Δy| <= 4 eps (|a| + |s b|) + |Δalpha| |b|,
rr = r.r inherits |Δrr| <= sum_i (2|r_i| + Δr_i) Δr_i + P eps64 sum r_i^2, beta = T(rr / rs) is within
Δrr / rs + eps |beta|, and p = r + beta p within Δr + Δbeta |p| + 4 eps (|r| + |beta p|). rs (float64) is rr:
within Δrr. Statuses and iteration counts are compared exactly: the cases keep each decision far from its
boundary (p.Ap of either sign well away from 0, thresholds 0 or far below the new r.r), except the breakdown
case, which sits exactly on it (Ap = 0: p.Ap == 0 exactly in every summation order).

Both curvature rules run everywhere (stop_on_negative_curvature True and False, `stop` below): the bounds above
hold for a negative p.Ap with |p.Ap| in place of p.Ap, so the plain-CG step a "negative" task takes under False
is held to the same tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
from _inputs import SIZES, with_layout
from hypothesis import given
from hypothesis import strategies as st

from metakernels.ops import cg_step
from metakernels.reference.cg_step import (
    CG_ACTIVE,
    CG_CONVERGED,
    CG_NEGATIVE_CURVATURE,
    CG_NONFINITE,
)
from metakernels.reference.cg_step import cg_step as reference_cg_step

OPS = torch.ops.metakernels
DTYPES = [torch.float64, torch.float32]

# Task kinds: a plain step; a step that converges (p = r, Ap = 1.5 r: r drops to rounding noise, far below the
# threshold 1e-6 rs); negative curvature (Ap = -D p: stops under the stop rule, steps with alpha < 0 under plain
# CG); stopped before (status converged: untouched); non-finite Ap; rs already below its threshold (converges
# without a step); breakdown (Ap = 0, p in A's null space: p.Ap == 0 exactly, stops under either rule).
KINDS = ("step", "converges", "negative", "stopped", "nonfinite", "small_rs", "breakdown")
RULES = [True, False]  # stop_on_negative_curvature


def make_state(num_tasks: int, num_params: int, dtype: torch.dtype, seed: int, kinds: list[str] | None = None):
    gen = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(num_tasks, num_params, generator=gen, dtype=torch.float64)

    x, r, p = randn(), randn(), randn()
    diag = torch.rand(num_tasks, num_params, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    ap = diag * p
    kinds = kinds or [KINDS[t % len(KINDS)] for t in range(num_tasks)]
    status = torch.zeros(num_tasks, dtype=torch.int32)
    threshold = torch.zeros(num_tasks, dtype=torch.float64)
    for t, kind in enumerate(kinds):
        if kind == "converges":
            p[t] = r[t]
            ap[t] = 1.5 * r[t]
        elif kind == "negative":
            ap[t] = -diag[t] * p[t]
        elif kind == "stopped":
            status[t] = CG_CONVERGED
        elif kind == "nonfinite":
            ap[t, 0] = math.nan
        elif kind == "breakdown":
            ap[t] = 0.0
    x, r, p, ap = (v.to(dtype) for v in (x, r, p, ap))
    rs = (r.to(torch.float64) ** 2).sum(1)
    for t, kind in enumerate(kinds):
        if kind == "converges":
            threshold[t] = 1e-6 * rs[t]
        elif kind == "small_rs":
            threshold[t] = 2 * rs[t]
    iterations = torch.full((num_tasks,), 3, dtype=torch.int64)
    return [x, r, p, ap, rs, status, iterations, threshold]


def clone(state):
    return [t.clone() for t in state]


def tolerances(before, expected):
    """Bounds on |kernel - reference| for x, r, p (elementwise) and rs (per task), from the header's analysis."""
    x, r, p, ap, rs, *_ = (t.to(torch.float64) if t.is_floating_point() else t for t in before)
    dtype = before[0].dtype
    eps, eps64 = torch.finfo(dtype).eps, torch.finfo(torch.float64).eps
    tiny = torch.finfo(dtype).tiny
    num_params = x.shape[1]
    terms = p * torch.nan_to_num(ap, nan=0.0)
    pap = terms.sum(1, keepdim=True)
    safe_pap = torch.where(pap.abs() > 0, pap, 1.0)
    alpha = (rs[:, None] / safe_pap).abs()
    d_alpha = (num_params * eps64 * terms.abs().sum(1, keepdim=True) / safe_pap.abs() + eps) * alpha
    ap0 = torch.nan_to_num(ap, nan=0.0).abs()
    d_r = 4 * eps * (r.abs() + alpha * ap0) + d_alpha * ap0 + tiny
    d_x = 4 * eps * (x.abs() + alpha * p.abs()) + d_alpha * p.abs() + tiny
    r_new = expected[1].to(torch.float64)
    d_rr = ((2 * r_new.abs() + d_r) * d_r).sum(1) + num_params * eps64 * (r_new**2).sum(1)
    beta = (r_new**2).sum(1, keepdim=True) / rs[:, None]
    d_beta = d_rr[:, None] / rs[:, None] + eps * beta
    d_p = d_r + d_beta * p.abs() + 4 * eps * (r_new.abs() + beta * p.abs()) + tiny
    return d_x, d_r, d_p, d_rr


def check(after, before, what="cg_step", stop=True):
    """after: the state after the op; before: the state it started from (the reference runs on a copy, with
    stop_on_negative_curvature=stop)."""
    expected = clone(before)
    reference_cg_step(*expected, stop)
    d_x, d_r, d_p, d_rr = tolerances(before, expected)
    status, iterations = after[5], after[6]
    assert status.tolist() == expected[5].tolist(), f"{what}: status {status.tolist()} vs {expected[5].tolist()}"
    assert iterations.tolist() == expected[6].tolist(), f"{what}: iterations"
    stepped = expected[6] != before[6]
    touched = stepped | ((expected[5] == CG_NONFINITE) & (before[5] == CG_ACTIVE))  # r may be spent
    for name, i, tol in (("x", 0, d_x), ("r", 1, d_r), ("p", 2, d_p)):
        got, exp = after[i], expected[i]
        assert got.dtype == exp.dtype and got.shape == exp.shape
        for t in range(got.shape[0]):
            if not touched[t] or (name != "r" and not stepped[t]):
                assert torch.equal(got[t], before[i][t]), f"{what}: {name}[{t}] changed without a step"
                continue
            if name == "r" and not stepped[t]:
                continue  # a rejected step leaves r unspecified
            err = (got[t].double() - exp[t].double()).abs()
            bad = ~(err <= tol[t])
            assert not bad.any(), (
                f"{what}: {name}[{t}] {int(bad.sum())} elements outside tolerance, worst {err.max().item():.3g} "
                f"(tol {tol[t][bad].min().item():.3g})"
            )
    rs_err = (after[4] - expected[4]).abs()
    assert (rs_err[stepped] <= d_rr[stepped]).all(), f"{what}: rs {after[4]} vs {expected[4]}"
    unchanged = after[4][~stepped].view(torch.int64), before[4][~stepped].view(torch.int64)  # bitwise (NaN too)
    assert torch.equal(*unchanged), f"{what}: rs changed without a step"
    assert torch.equal(after[3].nan_to_num(0.5), before[3].nan_to_num(0.5)), f"{what}: Ap was modified"


@pytest.mark.parametrize("stop", RULES, ids=["stop", "continue"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_params", [1, 37, 1031, 2053])
def test_matches_reference(backend, dtype, num_params, stop):
    before = make_state(len(KINDS), num_params, dtype, seed=num_params)
    after = clone(before)
    cg_step(*after, stop_on_negative_curvature=stop)
    check(after, before, stop=stop)
    # The cases are what they claim to be: "negative" stops under the stop rule and steps under plain CG;
    # "breakdown" stops under both.
    negative, negative_steps = (CG_NEGATIVE_CURVATURE, 3) if stop else (CG_ACTIVE, 4)
    expected = [CG_ACTIVE, CG_CONVERGED, negative, CG_CONVERGED, CG_NONFINITE, CG_CONVERGED, CG_NEGATIVE_CURVATURE]
    assert after[5].tolist() == expected
    assert after[6].tolist() == [4, 4, negative_steps, 3, 3, 3, 3]
    if not stop:  # the plain-CG step went backwards along p: alpha = rs / p.Ap < 0
        alpha = (after[0][2].double() - before[0][2].double()) / before[2][2].double()
        assert (alpha < 0).all()
    for t in (0, 1, 2, 6):  # never NaN, whatever the rule
        assert torch.isfinite(after[0][t]).all() and torch.isfinite(after[2][t]).all()


def test_default_rule_is_stop(backend):
    """Omitting the argument (the op's schema default, and the Python wrapper's) is the stop rule."""
    before = make_state(len(KINDS), 9, torch.float64, seed=11)
    by_schema, by_wrapper, explicit = clone(before), clone(before), clone(before)
    OPS.cg_step(*by_schema)
    cg_step(*by_wrapper)
    cg_step(*explicit, stop_on_negative_curvature=True)
    for a, b, c in zip(by_schema, by_wrapper, explicit, strict=True):
        assert torch.equal(a.nan_to_num(0.5), c.nan_to_num(0.5)) and torch.equal(b.nan_to_num(0.5), c.nan_to_num(0.5))
    assert explicit[5][2].item() == CG_NEGATIVE_CURVATURE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_steps_solve_a_diagonal_system(backend, dtype):
    """Iterating the op with Ap = D p is CG on D: it converges in as many steps as D has distinct values."""
    T, P = 3, 300
    d = torch.stack([1.0 + (torch.arange(P) * 7 % (t + 2)).to(torch.float64) for t in range(T)]).to(dtype)
    b = torch.sin(torch.arange(1, P + 1, dtype=torch.float64)[None] * torch.arange(1, T + 1)[:, None]).to(dtype)
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rs = (b.double() ** 2).sum(1)
    threshold = rs * (1e-20 if dtype == torch.float64 else 1e-10)
    status, iterations = torch.zeros(T, dtype=torch.int32), torch.zeros(T, dtype=torch.int64)
    for _ in range(6):
        cg_step(x, r, p, d * p, rs, status, iterations, threshold)
    assert status.tolist() == [CG_CONVERGED] * T
    assert iterations.tolist() == [2, 3, 4]
    # CG's error in D-norm shrinks with the recursive residual; at rs ~ eps^2 ||b||^2 and cond(D) <= 5 the
    # iterate is within ~10 * 5 * eps of b / d (float32: the recursive residual drifts from the true one by
    # ~P * eps over 4 steps; bound 1e-5 relative).
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x, b / d, rtol=rel, atol=rel)


def test_rejected_step_keeps_x(backend):
    """alpha overflows float32 (no step), or r - alpha Ap overflows (step rejected: x, rs, iterations kept)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ap = torch.tensor([[1e-30, 0.0], [1e-30, 1e30]])
    rs = torch.tensor([1e10, 1e7], dtype=torch.float64)
    status, iterations = torch.zeros(2, dtype=torch.int32), torch.tensor([5, 6])
    x0, p0 = x.clone(), p.clone()
    cg_step(x, r, p, ap, rs, status, iterations, torch.zeros(2, dtype=torch.float64))
    assert status.tolist() == [CG_NONFINITE, CG_NONFINITE]
    assert torch.equal(x, x0) and torch.equal(p, p0)
    assert rs.tolist() == [1e10, 1e7] and iterations.tolist() == [5, 6]
    assert torch.equal(r[0], torch.ones(2))  # no step at all: r untouched


def test_all_stopped_is_a_no_op(backend):
    before = make_state(3, 17, torch.float32, seed=1, kinds=["stopped", "stopped", "small_rs"])
    before[5][1] = CG_NEGATIVE_CURVATURE
    after = clone(before)
    cg_step(*after)
    for a, b in zip(after[:4], before[:4], strict=True):
        assert torch.equal(a, b)
    assert after[5].tolist() == [CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_CONVERGED]


@pytest.mark.parametrize("stop", RULES, ids=["stop", "continue"])
@pytest.mark.parametrize("layout", ["transposed", "row_stride", "column_step"])
def test_strided_ap(backend, layout, stop):
    before = make_state(4, 29, torch.float64, seed=2, kinds=["step", "negative", "step", "converges"])
    after = clone(before)
    after[3] = with_layout(after[3], layout)
    cg_step(*after, stop_on_negative_curvature=stop)
    after[3] = before[3]
    check(after, before, stop=stop)


def test_nonfinite_rs(backend):
    before = make_state(3, 11, torch.float64, seed=3, kinds=["step"] * 3)
    before[4][1] = math.nan
    before[4][2] = math.inf
    after = clone(before)
    cg_step(*after)
    check(after, before)
    assert after[5].tolist() == [CG_ACTIVE, CG_NONFINITE, CG_NONFINITE]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [8, 3])
def test_threads(backend, restore_threads, dtype, num_tasks):
    """T x 20011 elements: above the C++ kernel's parallel grain. 8 tasks on 2 threads run whole, one thread
    each; of 3 tasks, 2 run whole and the third is split by columns between the threads. Both curvature rules
    (task 2 is a "negative" one: it stops or steps); on the Triton interpreter only plain CG, the rule the other
    tests cover less (one ~20 s run per dtype is enough there)."""
    if backend == "triton" and num_tasks == 8:
        pytest.skip("the interpreter ignores torch's thread count; the 3-task case runs this size on it (~20 s each)")
    before = make_state(num_tasks, 20011, dtype, seed=4)
    rules = [False] if backend == "triton" else RULES
    results = {}
    for threads in (2, 1) if backend != "triton" else (2,):
        torch.set_num_threads(threads)
        for stop in rules:
            after = clone(before)
            cg_step(*after, stop_on_negative_curvature=stop)
            check(after, before, f"cg_step ({threads} threads, stop={stop})", stop=stop)
        results[threads] = after
    if backend == "cpp" and num_tasks == 8:
        # A whole task is summed by one thread over its full row, as on one thread: bitwise the same.
        for a, b in zip(results[1], results[2], strict=True):
            assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


# --- opcheck, torch.compile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [None, True, False], ids=["default", "stop", "continue"])
def test_opcheck(backend, stop):
    state = make_state(len(KINDS), 13, torch.float64, seed=5)
    args = tuple(state) if stop is None else (*state, stop)
    torch.library.opcheck(OPS.cg_step.default, args)


def _two_steps(x, r, p, d, rs, status, iterations, threshold, stop):
    for _ in range(2):
        OPS.cg_step(x, r, p, d * p, rs, status, iterations, threshold, stop)
    return x.sum() + r.sum()


_COMPILED_TWO_STEPS = torch.compile(_two_steps, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("stop", RULES, ids=["stop", "continue"])
def test_torch_compile_matches_eager(backend, stop):
    """Ap = d p with d > 0 for tasks 0 and 2 and d < 0 for task 1: p.Ap < 0 there on the first step, so the two
    rules part on task 1 (the stop rule stops it, plain CG takes both steps), compiled as eagerly."""
    state = make_state(3, 19, torch.float64, seed=6, kinds=["step"] * 3)
    d = torch.rand(3, 19, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    d[1, :] = -d[1, :]  # task 1: negative definite, p.Ap < 0 on the first step
    state[3] = d
    eager, compiled = clone(state), clone(state)
    out_eager = _two_steps(*eager, stop)
    out_compiled = _COMPILED_TWO_STEPS(*compiled, stop)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # two steps taken, mutations visible to the caller; task 1 (p.Ap < 0) stops at once under the stop rule
    assert eager[6].tolist() == ([5, 3, 5] if stop else [5, 5, 5])
    assert eager[5].tolist() == ([CG_ACTIVE, CG_NEGATIVE_CURVATURE, CG_ACTIVE] if stop else [CG_ACTIVE] * 3)


# --- hypothesis -------------------------------------------------------------------------------------------


@st.composite
def cg_cases(draw):
    num_tasks = draw(st.integers(1, 8))
    num_params = draw(SIZES)
    dtype = draw(st.sampled_from(DTYPES))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=num_tasks, max_size=num_tasks))
    state = make_state(num_tasks, num_params, dtype, seed=draw(st.integers(0, 2**31 - 1)), kinds=kinds)
    return state, draw(st.sampled_from(["contiguous", "transposed", "column_step"])), draw(st.sampled_from(RULES))


@given(cg_cases())
def test_hypothesis_matches_reference(backend, drawn):
    before, ap_layout, stop = drawn
    after = clone(before)
    after[3] = with_layout(after[3], ap_layout)
    cg_step(*after, stop_on_negative_curvature=stop)
    after[3] = before[3]
    check(after, before, stop=stop)


# --- bad input --------------------------------------------------------------------------------------------


def _bad(index, fn):
    def build():
        state = make_state(3, 5, torch.float64, seed=8)
        state[index] = fn(state)
        return state

    return build


def _alias(i, j):
    def build():
        state = make_state(3, 5, torch.float64, seed=8)
        state[j] = state[i]
        return state

    return build


BAD = {
    "x_1d": (_bad(0, lambda s: s[0][0].contiguous()), ValueError, r"x must be a 2-D \[T, P\] tensor"),
    "x_empty": (_bad(0, lambda s: s[0][:0]), ValueError, r"x is an empty task batch \(T = 0\)"),
    "x_float16": (_bad(0, lambda s: s[0].half()), TypeError, "x must be a float32 or float64 tensor"),
    "x_integer": (_bad(0, lambda s: s[0].long()), TypeError, "x must be a float32 or float64 tensor"),
    "r_shape": (_bad(1, lambda s: s[1][:, :4].contiguous()), ValueError, r"r must have the shape of x \[3, 5\]"),
    "p_dtype": (_bad(2, lambda s: s[2].float()), TypeError, "p has dtype .* but x has dtype"),
    "Ap_shape": (_bad(3, lambda s: s[3][:2]), ValueError, r"Ap must have the shape of x"),
    "x_noncontiguous": (_bad(0, lambda s: with_layout(s[0], "column_step")), ValueError, "x must be contiguous"),
    "p_transposed": (_bad(2, lambda s: with_layout(s[2], "transposed")), ValueError, "p must be contiguous"),
    "rs_float32": (_bad(4, lambda s: s[4].float()), TypeError, "rs must be a torch.float64 tensor"),
    "rs_shape": (_bad(4, lambda s: s[4][:2]), ValueError, r"rs must be \[T\] with T = 3"),
    "threshold_2d": (_bad(7, lambda s: s[7][None]), ValueError, r"threshold must be \[T\] with T = 3"),
    "status_int64": (_bad(5, lambda s: s[5].long()), TypeError, "status must be a torch.int32 tensor"),
    "iterations_int32": (_bad(6, lambda s: s[6].int()), TypeError, "iterations must be a torch.int64 tensor"),
    "status_noncontiguous": (
        _bad(5, lambda s: torch.zeros(6, dtype=torch.int32)[::2]),
        ValueError,
        "status must be contiguous",
    ),
    "r_is_x": (_alias(0, 1), ValueError, "x and r must not share memory"),
    "Ap_is_p": (_alias(2, 3), ValueError, "p and Ap must not share memory"),
    "Ap_overlaps_r": (_bad(3, lambda s: s[1][:, :]), ValueError, "r and Ap must not share memory"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD[name]
    state = build()
    with pytest.raises(error, match=match):
        cg_step(*state)


@pytest.mark.parametrize("value", [1, 0, "continue", None])
def test_rule_must_be_a_bool(backend, value):
    """The wrapper refuses what the schema would coerce (0/1) or reject with a generic message."""
    state = make_state(3, 5, torch.float64, seed=8)
    before = clone(state)
    with pytest.raises(TypeError, match="stop_on_negative_curvature must be a bool"):
        cg_step(*state, stop_on_negative_curvature=value)
    for a, b in zip(state, before, strict=True):
        assert torch.equal(a, b)
