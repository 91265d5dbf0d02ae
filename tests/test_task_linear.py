"""Tests of metakernels::task_linear and task_linear_backward on every CPU backend.

Oracle: metakernels.reference.task_linear (pure PyTorch), itself checked against torch.nn.functional.linear.
Tolerances (tests/_tolerance.py): every output element is a sum of `count` products (in + 1 for the forward,
out for d_x, N for d_weight and d_bias) followed by a few elementwise roundings (bias, activation and its
derivative): two evaluations differ by at most 2 * gamma_(count + 8) times the sum of the absolute values of
the terms. The activations are 1-Lipschitz, so the forward bound carries through relu and tanh.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _tolerance import assert_within, tolerance
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import metakernels
from metakernels.ops.task_linear import task_linear
from metakernels.reference import task_linear as R

OPS = torch.ops.metakernels
ACTIVATIONS = ["identity", "relu", "tanh"]
DTYPES = [torch.float64, torch.float32]
FULL_MASK = [True, True, True]

# Shapes (T, N, in, out) that take each path of the C++ kernel: the feature-major forward (N small next to
# in x out), the sample-major one (in or out tiny), BLAS (N * in * out >= 2^18), and sizes of 1.
PATH_SHAPES = [(3, 10, 40, 40), (2, 10, 1, 40), (2, 10, 40, 1), (2, 5, 784, 70), (1, 1, 1, 1), (4, 7, 13, 3)]


def make_inputs(tasks, samples, fan_in, fan_out, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(tasks, samples, fan_in)
    weight = randn(tasks, fan_out, fan_in) / max(1.0, fan_in**0.5)
    b = randn(tasks, fan_out) if bias else None
    return x, weight, b


def forward_tol(x, weight, bias, expected):
    terms = torch.bmm(x.double().abs(), weight.double().abs().transpose(1, 2))
    if bias is not None:
        terms = terms + bias.double().abs().unsqueeze(1)
    return tolerance(x.dtype, expected, sums=((terms, x.shape[2] + 1),))


def check_forward(actual, x, weight, bias, activation, what="task_linear"):
    expected = R.task_linear(x, weight, bias, activation)
    assert actual.is_contiguous(), f"{what}: output is not contiguous"
    assert_within(actual, expected, forward_tol(x, weight, bias, expected), what)


def check_backward(outs, grad_out, x, weight, out, activation, mask=FULL_MASK, what="task_linear_backward"):
    expected = R.task_linear_backward(grad_out, x, weight, out, activation, mask)
    dz = grad_out.double().abs()  # |act'| <= 1
    samples, fan_out = grad_out.shape[1], grad_out.shape[2]
    bounds = (
        (torch.bmm(dz, weight.double().abs()), fan_out),
        (torch.bmm(dz.transpose(1, 2), x.double().abs()), samples),
        (dz.sum(1), samples),
    )
    for i, (name, a, e) in enumerate(zip(("d_x", "d_weight", "d_bias"), outs, expected, strict=True)):
        if not mask[i]:
            assert a.shape == (0,) and a.dtype == x.dtype, f"{what}: masked {name} must be an empty [0] tensor"
            continue
        assert a.is_contiguous(), f"{what}: {name} is not contiguous"
        assert_within(a, e, tolerance(x.dtype, e, sums=(bounds[i],)), f"{what} {name}")


# --- the reference against torch.nn.functional --------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_functional_linear(activation):
    x, weight, bias = make_inputs(3, 4, 5, 6, seed=1)
    got = R.task_linear(x, weight, bias, activation)
    act = {"identity": lambda z: z, "relu": torch.relu, "tanh": torch.tanh}[activation]
    for t in range(3):
        torch.testing.assert_close(got[t], act(torch.nn.functional.linear(x[t], weight[t], bias[t])), rtol=1e-14,
                                   atol=1e-14)


# --- forward and backward against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_reference(backend, dtype, activation, shape):
    if backend == "triton" and (shape[2] * shape[3] > 10_000 or dtype == torch.float32):
        pytest.skip("interpreter: float64 at the small shapes (the Triton kernel computes in the input's dtype "
                    "with the same code; float32 is in the hypothesis test)")
    x, weight, bias = make_inputs(*shape, dtype=dtype, seed=2)
    out = task_linear(x, weight, bias, activation)
    check_forward(out, x, weight, bias, activation)
    expected_out = R.task_linear(x, weight, bias, activation)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    check_backward(OPS.task_linear_backward(grad_out, x, weight, expected_out, activation, FULL_MASK), grad_out, x,
                   weight, expected_out, activation)


def test_without_bias(backend):
    x, weight, _ = make_inputs(2, 3, 4, 5, seed=4)
    check_forward(task_linear(x, weight, None, "relu"), x, weight, None, "relu")
    check_forward(task_linear(x, weight), x, weight, None, "identity")


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_output_mask(backend, mask):
    x, weight, bias = make_inputs(2, 3, 5, 4, seed=5)
    out = R.task_linear(x, weight, bias, "tanh")
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    outs = OPS.task_linear_backward(grad_out, x, weight, out, "tanh", list(mask))
    check_backward(outs, grad_out, x, weight, out, "tanh", list(mask))


def test_non_contiguous_inputs(backend):
    x, weight, bias = make_inputs(3, 5, 6, 4, seed=7)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    ws = torch.full((*weight.shape[:2], 2 * weight.shape[2]), float("nan"), dtype=weight.dtype)
    ws[..., ::2] = weight
    ws = ws[..., ::2]  # every other column of a NaN-padded buffer: a kernel that ignores strides reads NaN
    bs = bias.t().contiguous().t()
    check_forward(task_linear(xs, ws, bs, "relu"), x, weight, bias, "relu")
    out = R.task_linear(x, weight, bias, "relu")
    grad_out = torch.randn(out.shape, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    check_backward(OPS.task_linear_backward(grad_out, xs, ws, out, "relu", FULL_MASK), grad_out, x, weight, out,
                   "relu")


def test_relu_keeps_nan_and_backward_selects(backend):
    """relu(NaN) = NaN as torch.relu; the backward selects (an inf gradient behind a dead unit stays 0)."""
    x = torch.tensor([[[float("nan")], [-1.0], [2.0]]], dtype=torch.float64)
    weight = torch.ones(1, 1, 1, dtype=torch.float64)
    out = task_linear(x, weight, None, "relu")
    assert torch.isnan(out[0, 0, 0]) and out[0, 1, 0] == 0 and out[0, 2, 0] == 2
    grad_out = torch.tensor([[[float("inf")], [3.0]]], dtype=torch.float64)
    _, _, d_b = OPS.task_linear_backward(grad_out, x[:, 1:], weight, out[:, 1:], "relu", [False, False, True])
    assert d_b.item() == 3.0


# --- autograd -----------------------------------------------------------------------------------------------


class OpLog(TorchDispatchMode):
    """Records the metakernels ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("metakernels::"):
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autograd_matches_autograd_of_reference(backend, activation):
    """Every subset of (x, weight, bias): the op's gradients equal plain autograd through the reference."""
    base = make_inputs(2, 3, 4, 5, seed=8)
    names = ("x", "weight", "bias")
    subsets = [s for k in (1, 2, 3) for s in itertools.combinations(range(3), k)]
    if backend == "triton":  # the autograd kernel is backend-independent code: each alone and all together
        subsets = [s for s in subsets if len(s) in (1, 3)]
    grad_out = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for subset in subsets:
        inputs = [t.detach().requires_grad_(i in subset) for i, t in enumerate(base)]
        wrt = [inputs[i] for i in subset]
        got = torch.autograd.grad(task_linear(*inputs, activation), wrt, grad_out)
        expected = torch.autograd.grad(R.task_linear(*inputs, activation), wrt, grad_out)
        for i, a, e in zip(subset, got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m, i=i: f"d_{names[i]}: {m}")


def test_fused_backward_without_create_graph_composite_with(backend):
    """The fused backward op serves a plain backward; with create_graph the backward is differentiable ops."""
    x, weight, bias = (t.requires_grad_() for t in make_inputs(2, 3, 4, 5, seed=10))
    with OpLog() as log:
        torch.autograd.grad(task_linear(x, weight, bias, "tanh").sum(), (x, weight, bias))
    assert "metakernels::task_linear_backward" in log.calls
    with OpLog() as log:
        grads = torch.autograd.grad(task_linear(x, weight, bias, "tanh").sum(), (x, weight, bias), create_graph=True)
    assert "metakernels::task_linear_backward" not in log.calls
    assert all(g.requires_grad for g in grads)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(backend, activation, with_bias):
    if backend == "triton" and (activation, with_bias) not in (("tanh", True), ("relu", False)):
        pytest.skip("interpreter: two cases (the autograd code is the same for every backend; the Triton kernels "
                    "are compared elementwise with the reference by the tests above)")
    x, weight, bias = make_inputs(2, 3, 2, 3, seed=11, bias=with_bias)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias) if t is not None)

    def fn(*ts):
        return OPS.task_linear(ts[0], ts[1], ts[2] if with_bias else None, activation)

    # The interpreter costs ~10 ms per launch: fast mode there (u^T J v against random u, v; any wrong entry
    # fails with probability 1). Full Jacobians on the other backends.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def test_gradcheck_backward_op(backend):
    """task_linear_backward's own autograd (the reference differentiated), on every input."""
    x, weight, _ = make_inputs(2, 2, 3, 2, seed=12)
    out = R.task_linear(x, weight, None, "tanh")
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    inputs = tuple(t.detach().requires_grad_() for t in (grad_out, x, weight, out))

    def fn(*ts):
        return OPS.task_linear_backward(*ts, "tanh", FULL_MASK)

    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("requires_grad,with_bias", [(True, True), (False, False)])
def test_opcheck(backend, requires_grad, with_bias):
    x, weight, bias = make_inputs(2, 3, 4, 5, seed=14, bias=with_bias)
    if requires_grad:
        x, weight = x.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(OPS.task_linear.default, (x, weight, bias, "tanh"))
    out = R.task_linear(x.detach(), weight.detach(), bias, "tanh")
    grad_out = torch.randn(out.shape, dtype=torch.float64).requires_grad_(requires_grad)
    mask = FULL_MASK if requires_grad else [False, True, False]
    torch.library.opcheck(OPS.task_linear_backward.default, (grad_out, x, weight, out, "tanh", mask))


# --- hypothesis ---------------------------------------------------------------------------------------------

SMALL = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31]), st.integers(1, 40))


@given(
    tasks=st.integers(1, 8), samples=SMALL, fan_in=SMALL, fan_out=SMALL, dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTIVATIONS), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_matches_reference(backend, tasks, samples, fan_in, fan_out, dtype, activation, with_bias, seed):
    if backend == "triton":
        # The interpreter costs ~1 ms per 32 x 32 program: one tile per product (the tiling across several
        # tiles is covered by the PATH_SHAPES test), at most 3 tasks.
        tasks, samples, fan_in, fan_out = min(tasks, 3), min(samples, 17), min(fan_in, 17), min(fan_out, 17)
    x, weight, bias = make_inputs(tasks, samples, fan_in, fan_out, dtype, seed, with_bias)
    check_forward(task_linear(x, weight, bias, activation), x, weight, bias, activation)
    out = R.task_linear(x, weight, bias, activation)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    check_backward(OPS.task_linear_backward(grad_out, x, weight, out, activation, FULL_MASK), grad_out, x, weight, out,
                   activation)


# --- threads ------------------------------------------------------------------------------------------------


def test_threads_give_identical_results(backend, restore_threads):
    """Enough work for the C++ kernels to split the tasks over threads: each task is computed by the same code
    whatever the thread, so the results are bitwise equal."""
    if backend == "triton":
        pytest.skip("the interpreter runs programs one after another whatever the thread count")
    x, weight, bias = make_inputs(8, 32, 40, 40, torch.float32, seed=15)
    grad_out = torch.randn(8, 32, 40, generator=torch.Generator().manual_seed(16))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = task_linear(x, weight, bias, "tanh")
        results.append((out, *OPS.task_linear_backward(grad_out, x, weight, out, "tanh", FULL_MASK)))
    check_forward(results[0][0], x, weight, bias, "tanh")
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --- bad input ----------------------------------------------------------------------------------------------


def _bad(**changes):
    def build():
        x, weight, bias = make_inputs(2, 3, 4, 5, seed=17)
        args = {"x": x, "weight": weight, "bias": bias, "activation": "relu"}
        args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
        return args

    return build


BAD = {
    "x_2d": (_bad(x=lambda a: a["x"][0]), ValueError, r"x must be a 3-D \[T, N, in\] tensor"),
    "x_integer": (_bad(x=lambda a: a["x"].long()), TypeError, "x must be a float32 or float64 tensor"),
    "x_bf16": (_bad(x=lambda a: a["x"].bfloat16()), TypeError, "x must be a float32 or float64 tensor"),
    "weight_2d": (_bad(weight=lambda a: a["weight"][0]), ValueError, r"weight must be a 3-D \[T, out, in\] tensor"),
    "weight_dtype": (_bad(weight=lambda a: a["weight"].float()), TypeError, "weight has dtype"),
    "weight_tasks": (_bad(weight=lambda a: a["weight"][:1]), ValueError, "weight has 1 tasks but x has T = 2"),
    "weight_in": (_bad(weight=lambda a: a["weight"][:, :, :3]), ValueError, "weight .* has in = 3 but x has 4"),
    "empty_tasks": (
        _bad(x=lambda a: a["x"][:0], weight=lambda a: a["weight"][:0], bias=None),
        ValueError,
        r"x is an empty task batch \(T = 0\)",
    ),
    "no_samples": (_bad(x=lambda a: a["x"][:, :0]), ValueError, r"x has no samples \(N = 0\)"),
    "no_outputs": (_bad(weight=lambda a: a["weight"][:, :0], bias=None), ValueError, "in > 0 and out > 0"),
    "bias_shape": (_bad(bias=lambda a: a["bias"][:, 1:]), ValueError, r"bias must be \[T, out\] = \[2, 5\]"),
    "bias_dtype": (_bad(bias=lambda a: a["bias"].float()), TypeError, "bias has dtype"),
    "activation": (_bad(activation="gelu"), ValueError, "activation must be one of 'identity', 'relu', 'tanh'"),
    "device": (_bad(weight=lambda a: a["weight"].to("meta")), ValueError, "weight is on meta but x is on cpu"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD[name]
    args = build()
    with pytest.raises(error, match=match):
        task_linear(args["x"], args["weight"], args["bias"], args["activation"])
    with pytest.raises(error, match=match):
        OPS.task_linear(args["x"], args["weight"], args["bias"], args["activation"])
    if name.startswith("bias"):
        return
    x, weight = args["x"], args["weight"]
    shape = (x.shape[0], x.shape[1], weight.shape[1]) if x.dim() == 3 and weight.dim() == 3 else (1, 1, 1)
    grad_out = torch.zeros(shape, dtype=torch.float64)
    match = match.replace("task_linear", "task_linear_backward")
    with pytest.raises(error, match=match):
        OPS.task_linear_backward(grad_out, x, weight, grad_out, args["activation"], FULL_MASK)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda g, o: (g[:, 1:], o), ValueError, r"grad_out must be \[T, N, out\]"),
        (lambda g, o: (g.float(), o), TypeError, "grad_out has dtype"),
        (lambda g, o: (g, o[..., 1:]), ValueError, r"out must be \[T, N, out\]"),
        (lambda g, o: (g, o.float()), TypeError, "out has dtype"),
    ],
    ids=["grad_out_shape", "grad_out_dtype", "out_shape", "out_dtype"],
)
def test_backward_bad_grad_out_and_out(backend, change, error, match):
    x, weight, bias = make_inputs(2, 3, 4, 5, seed=18)
    out = R.task_linear(x, weight, bias, "relu")
    grad_out, out = change(torch.zeros_like(out), out)
    with pytest.raises(error, match=match):
        OPS.task_linear_backward(grad_out, x, weight, out, "relu", FULL_MASK)


def test_public_api_is_exported():
    assert metakernels.ops.task_linear is task_linear
    assert "task_linear" in metakernels.ops.OP_NAMES and "task_linear_backward" in metakernels.ops.OP_NAMES
