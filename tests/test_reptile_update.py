"""Tests of metakernels::reptile_update and metakernels.reptile_meta_gradient on every CPU backend.

Oracle: metakernels.reference.reptile_update. out = theta + eps * (mean_t fast[t] - theta) has elementwise
terms theta, eps*mean, eps*theta and one reduction (the task mean of T values): the tolerance is the
rounding-error bound of tests/_tolerance.py for that shape. The C++ kernel and the reference accumulate
the mean in double; the Triton kernel in the working type (float32 for float32/bf16 inputs), which is
what the gamma_T term of the bound covers.
"""

from __future__ import annotations

import math

import pytest
import torch
from _inputs import LAYOUTS_2D, SIZES, random_like, with_layout
from _tolerance import assert_within, tolerance
from hypothesis import given
from hypothesis import strategies as st

import metakernels
from metakernels import reference as R

OPS = torch.ops.metakernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
EPSILONS = [0.0, 0.25, 1.0, -0.5, 1.7]


def make_inputs(num_tasks: int, num_params: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(num_params, generator=gen, dtype=torch.float64).to(dtype)
    fast = torch.randn(num_tasks, num_params, generator=gen, dtype=torch.float64).to(dtype)
    return theta, fast


def check(actual: torch.Tensor, theta: torch.Tensor, fast: torch.Tensor, epsilon: float, what="reptile_update"):
    expected = R.reptile_update(theta, fast, epsilon)
    th, f = theta.double().abs(), fast.double().abs()
    mean_abs = f.mean(0)
    e = abs(epsilon)
    tol = tolerance(theta.dtype, expected, scale=th + e * (mean_abs + th), sums=((e * mean_abs, fast.shape[0]),))
    assert actual.is_contiguous(), f"{what}: output is not contiguous"
    assert_within(actual, expected, tol, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("num_tasks", [1, 4])
def test_matches_reference(backend, dtype, epsilon, num_tasks):
    theta, fast = make_inputs(num_tasks, 37, dtype, seed=1)
    check(metakernels.reptile_update(theta, fast, epsilon), theta, fast, epsilon)


def test_zero_epsilon_is_identity(backend):
    theta, fast = make_inputs(3, 11, torch.float32)
    assert torch.equal(metakernels.reptile_update(theta, fast, 0.0), theta)


def test_epsilon_one_moves_to_the_task_mean(backend):
    theta, fast = make_inputs(4, 13, torch.float64, seed=2)
    torch.testing.assert_close(metakernels.reptile_update(theta, fast, 1.0), fast.mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_params", [1, 1023, 1024, 1025, 2049])
def test_sizes_around_the_triton_block(backend, num_params):
    theta, fast = make_inputs(3, num_params, torch.float32, seed=num_params)
    check(metakernels.reptile_update(theta, fast, 0.3), theta, fast, 0.3)


def test_meta_gradient(backend):
    """theta - mean_t fast[t], and one SGD step with it at rate eps is reptile_update(theta, fast, eps)."""
    theta, fast = make_inputs(5, 17, torch.float64, seed=3)
    meta_grad = metakernels.reptile_meta_gradient(theta, fast)
    torch.testing.assert_close(meta_grad, theta - fast.mean(0), rtol=1e-12, atol=1e-12)
    param = torch.nn.Parameter(theta.clone())
    optimizer = torch.optim.SGD([param], lr=0.3)
    param.grad = meta_grad
    optimizer.step()
    torch.testing.assert_close(param.detach(), metakernels.reptile_update(theta, fast, 0.3), rtol=1e-12, atol=1e-12)


# --- autograd ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("theta",), ("fast",), ("theta", "fast")], ids="+".join)
def test_autograd_matches_autograd_of_reference(backend, names):
    theta, fast = make_inputs(3, 9, torch.float64, seed=4)
    theta.requires_grad_("theta" in names)
    fast.requires_grad_("fast" in names)
    inputs = [theta if n == "theta" else fast for n in names]
    grad_out = random_like(theta, seed=5)
    got = torch.autograd.grad(metakernels.reptile_update(theta, fast, 0.4), inputs, grad_out)
    expected = torch.autograd.grad(R.reptile_update(theta, fast, 0.4), inputs, grad_out)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_backward_accumulates_into_leaves(backend):
    theta, fast = make_inputs(3, 9, torch.float64, seed=6)
    theta.requires_grad_()
    fast.requires_grad_()
    (metakernels.reptile_update(theta, fast, 0.4) * 2).sum().backward()
    torch.testing.assert_close(theta.grad, torch.full_like(theta, 2 * 0.6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.grad, torch.full_like(fast, 2 * 0.4 / 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epsilon", [0.3, 1.0, -0.5])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_gradcheck(backend, epsilon, num_tasks):
    theta, fast = make_inputs(num_tasks, 4, torch.float64, seed=7)
    theta.requires_grad_()
    fast.requires_grad_()

    def fn(th, f):
        return OPS.reptile_update(th, f, epsilon)

    assert torch.autograd.gradcheck(fn, (theta, fast))
    assert torch.autograd.gradgradcheck(fn, (theta, fast))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    theta, fast = make_inputs(3, 5, torch.float64, seed=8)
    theta.requires_grad_(requires_grad)
    fast.requires_grad_(requires_grad)
    torch.library.opcheck(OPS.reptile_update.default, (theta, fast, 0.3))


# --- hypothesis -------------------------------------------------------------------------------------------


@st.composite
def reptile_cases(draw):
    num_tasks = draw(st.integers(1, 8))
    num_params = draw(SIZES)
    dtype = draw(st.sampled_from(DTYPES))
    epsilon = draw(st.one_of(st.sampled_from(EPSILONS), st.floats(-2.0, 2.0)))
    theta, fast = make_inputs(num_tasks, num_params, dtype, seed=draw(st.integers(0, 2**31 - 1)))
    fast_layout = draw(st.sampled_from([*LAYOUTS_2D, "expanded"]))
    if fast_layout == "expanded":  # every task at the same weights: row stride 0
        fast = fast[0].expand(num_tasks, num_params)
    else:
        fast = with_layout(fast, fast_layout)
    theta = with_layout(theta, draw(st.sampled_from(["contiguous", "column_step"])))
    return theta, fast, epsilon


@given(reptile_cases())
def test_hypothesis_matches_reference(backend, drawn):
    theta, fast, epsilon = drawn
    check(metakernels.reptile_update(theta, fast, epsilon), theta, fast, epsilon)


# --- torch.compile ----------------------------------------------------------------------------------------


def _reptile_loss(theta, fast):
    new = metakernels.reptile_update(theta, fast, 0.7)
    return (new.sin() * new).sum()


# Compiled once for the module: the graph depends on the fake kernel only, so later backends reuse it.
_COMPILED_REPTILE_LOSS = torch.compile(_reptile_loss, fullgraph=True, backend="aot_eager")


def test_torch_compile_matches_eager(backend):
    theta, fast = make_inputs(3, 19, torch.float64, seed=9)
    theta.requires_grad_()
    fast.requires_grad_()
    eager = _reptile_loss(theta, fast)
    compiled = _COMPILED_REPTILE_LOSS(theta, fast)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    for a, e in zip(
        torch.autograd.grad(compiled, (theta, fast)), torch.autograd.grad(eager, (theta, fast)), strict=True
    ):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


# --- bad input --------------------------------------------------------------------------------------------

T_, P_ = 3, 6


def _inputs(theta=None, fast=None, epsilon=0.5):
    def build():
        th, f = make_inputs(T_, P_)
        return (theta(th, f) if theta else th), (fast(th, f) if fast else f), epsilon

    return build


BAD_REPTILE = {
    "fast_weights_1d": (_inputs(fast=lambda th, f: f[0]), ValueError, "fast_weights must be a 2-D"),
    "fast_weights_3d": (_inputs(fast=lambda th, f: f[None]), ValueError, "fast_weights must be a 2-D"),
    "empty_task_batch": (
        _inputs(fast=lambda th, f: f[:0]),
        ValueError,
        r"fast_weights is an empty task batch \(T = 0\)",
    ),
    "no_parameters": (
        _inputs(theta=lambda th, f: th[:0], fast=lambda th, f: f[:, :0]),
        ValueError,
        r"fast_weights has no parameters \(P = 0\)",
    ),
    "theta_too_short": (_inputs(theta=lambda th, f: th[1:]), ValueError, r"theta must be \[P\] with P = 6"),
    "theta_too_long": (_inputs(theta=lambda th, f: torch.cat([th, th])), ValueError, r"theta must be \[P\] with P = 6"),
    "theta_2d": (_inputs(theta=lambda th, f: th[None]), ValueError, r"theta must be \[P\]"),
    "theta_scalar": (_inputs(theta=lambda th, f: th[0]), ValueError, r"theta must be \[P\]"),
    "theta_dtype": (_inputs(theta=lambda th, f: th.float()), TypeError, "theta has dtype"),
    "fast_weights_integer": (
        _inputs(theta=lambda th, f: th.long(), fast=lambda th, f: f.long()),
        TypeError,
        "fast_weights must be a floating-point tensor",
    ),
    "epsilon_nan": (_inputs(epsilon=math.nan), ValueError, "epsilon must be finite"),
    "epsilon_inf": (_inputs(epsilon=-math.inf), ValueError, "epsilon must be finite"),
}


@pytest.mark.parametrize("name", list(BAD_REPTILE))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD_REPTILE[name]
    theta, fast, epsilon = build()
    with pytest.raises(error, match=match):
        metakernels.reptile_update(theta, fast, epsilon)
    if theta.is_floating_point():
        with pytest.raises(error, match=match):  # through the autograd wrapper too
            metakernels.reptile_update(theta.detach().requires_grad_(), fast, epsilon)


def test_meta_gradient_bad_input(backend):
    theta, fast = make_inputs(T_, P_)
    with pytest.raises(ValueError, match=r"theta must be \[P\]"):
        metakernels.reptile_meta_gradient(theta[1:], fast)


# --- threads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_threads(backend, restore_threads, dtype):
    """8 x 20011 = 160088 elements: the C++ kernel splits the columns over the threads above 32768."""
    theta, fast = make_inputs(8, 20011, dtype, seed=10)
    results = {}
    for threads in (2, 1) if backend != "triton" else (2,):  # the interpreter ignores torch's thread count
        torch.set_num_threads(threads)
        results[threads] = metakernels.reptile_update(theta, fast, 0.3)
        check(results[threads], theta, fast, 0.3, f"reptile_update ({threads} threads)")
    if backend == "cpp":
        # Each column's mean is summed by the thread that owns the column, in task order: bitwise
        # independent of the thread count.
        assert torch.equal(results[1], results[2])
