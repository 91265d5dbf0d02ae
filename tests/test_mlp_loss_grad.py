"""Tests of metakernels::mlp_loss_grad and mlp_loss_grad_backward on every CPU backend.

Oracles: the reference (metakernels.reference.mlp_loss_grad) is checked against torch.autograd on
nn.Sequential with F.mse_loss / F.cross_entropy per task, and its Hessian-vector product against the dense
Hessian (torch.autograd.functional.hessian); every backend is then checked against the reference, and the
fused backward also against the dense Hessian directly.

Tolerance (float64 and float32 alike): a first-order rounding-error bound. Every output is a chain of inner
products (forward through the layers, the loss, backward through the layers, the final sum over samples),
with 1-Lipschitz activations (|act(z)| <= |z|, |act'| <= 1, |tanh''| <= 1) in between. Each rounding perturbs
an intermediate by at most u times its magnitude, and the perturbation reaches the output multiplied by at
most the absolute-value network's sensitivity. So |error| <= 2 gamma_(n + 8) M, where M is the output of
the same computation run on absolute values (|theta|, |x|, |target|, |v|; activations replaced by their
bounds; the cross-entropy derivative bounded by (1 + 2 max|z|) / N, which covers both its magnitude and
its sensitivity to errors in z), and n is the total length of the chain of reductions (the sum over layers of
the forward and backward reduction lengths, plus N and the classes). See magnitude_bounds(). A relu whose
pre-activation lies within rounding of 0 may switch in float32 (the gradient is discontinuous there), so
the float32 relu tests use fixed inputs that have no such unit; float64 keeps them ~1e-13 away from zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_within, tolerance
from conftest import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metakernels
from metakernels import _backend
from metakernels.ops.mlp_loss_grad import mlp_loss_grad
from metakernels.reference import mlp_loss_grad as R

OPS = torch.ops.metakernels
ACTIVATIONS = ["relu", "tanh", "identity"]
LOSSES = ["mse", "cross_entropy"]
SINUSOID = [1, 40, 40, 1]


# --- inputs -------------------------------------------------------------------------------------------------


def make_inputs(tasks, samples, widths, loss="mse", dtype=torch.float64, seed=0, scale=1.0):
    """theta with PyTorch's default Linear scale (U(-1/sqrt(in), 1/sqrt(in))) times `scale`, x ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        bound = scale / math.sqrt(fan_in)
        parts.append((torch.rand(tasks, fan_out * fan_in + fan_out, generator=gen, dtype=torch.float64) * 2 - 1)
                     * bound)
    theta = torch.cat(parts, 1).to(dtype)
    x = torch.randn(tasks, samples, widths[0], generator=gen, dtype=torch.float64).to(dtype)
    if loss == "mse":
        target = torch.randn(tasks, samples, widths[-1], generator=gen, dtype=torch.float64).to(dtype)
    else:
        target = torch.randint(0, widths[-1], (tasks, samples), generator=gen)
    return theta, x, target


def min_abs_preactivation(theta, x, widths):
    """The smallest |z| over the hidden units (float64 forward through relu)."""
    h, smallest = x.double(), math.inf
    for w, b in R.layer_params(theta.double(), widths)[:-1]:
        z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        smallest = min(smallest, z.abs().min().item())
        h = torch.relu(z)
    return smallest


def random_like(t, seed):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(t.dtype)


def make_mlp(widths, activation):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b, dtype=torch.float64))
        if i < len(widths) - 2:
            layers.append({"relu": nn.ReLU(), "tanh": nn.Tanh(), "identity": nn.Identity()}[activation])
    return nn.Sequential(*layers)


def task_loss_fn(widths, activation, loss, x_t, target_t):
    """theta_t [P] -> the loss of nn.Sequential with those parameters (torch.func.functional_call)."""
    model = make_mlp(widths, activation)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def fn(theta_t):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta_t[offset: offset + shape.numel()].view(shape)
            offset += shape.numel()
        pred = torch.func.functional_call(model, params, (x_t,))
        return F.mse_loss(pred, target_t) if loss == "mse" else F.cross_entropy(pred, target_t)

    return fn


# --- tolerances ---------------------------------------------------------------------------------------------


def magnitude_bounds(theta, x, target, widths, activation, loss, v=None, g_loss=None):
    """float64 (M_loss [T], M_grad [T, P], M_hvp [T, P] or None): the computation on absolute values (see the
    module docstring), and the chain length n of the bound 2 gamma_(n + 8) M."""
    th, xx = theta.double().abs(), x.double().abs()
    params = R.layer_params(th, widths)
    samples, classes = x.shape[1], widths[-1]
    tanh = activation == "tanh"
    a = [xx]
    z = xx
    for i, (w, b) in enumerate(params):
        z = torch.baddbmm(b.unsqueeze(1), a[-1], w.transpose(1, 2))
        if i < len(params) - 1:
            a.append(z)
    if loss == "mse":
        yy = target.double().abs()
        m_loss = ((z + yy) ** 2).mean((1, 2))
        d = 2 * (z + yy) / (samples * classes)
    else:
        zmax = z.amax(2, keepdim=True)
        m_loss = (2 * zmax.squeeze(2) + math.log(classes) + 1).mean(1)
        d = ((1 + 2 * zmax) / samples).expand_as(z)
    ds = [None] * len(params)
    grad_parts = [None] * (2 * len(params))
    dl = d
    for i in range(len(params) - 1, -1, -1):
        ds[i] = dl
        grad_parts[2 * i] = torch.bmm(dl.transpose(1, 2), a[i]).flatten(1)
        grad_parts[2 * i + 1] = dl.sum(1)
        if i > 0:
            dl = torch.bmm(dl, params[i][0])
            if tanh:  # the slope 1 - h^2 is computed from a rounded h: |d slope| <= 2 |dh|
                dl = dl * (1 + 2 * a[i])
    m_grad = torch.cat(grad_parts, 1)
    chain = 2 * sum(widths) + samples + classes
    if v is None:
        return m_loss, m_grad, None, chain
    dirs = R.layer_params(v.double().abs(), widths)
    gl = g_loss.double().abs()[:, None, None] if g_loss is not None else 0.0
    ra = [None]
    rz = z
    for i, ((w, _), (vw, c)) in enumerate(zip(params, dirs, strict=True)):
        rz = torch.baddbmm(c.unsqueeze(1), a[i], vw.transpose(1, 2))
        if ra[i] is not None:
            rz = rz + torch.bmm(ra[i], w.transpose(1, 2))
        if i < len(params) - 1:
            ra.append(rz)
    if loss == "mse":
        rd = 2 * rz / (samples * classes)
    else:
        rd = (2 * rz.amax(2, keepdim=True) * (1 + 2 * z.amax(2, keepdim=True)) / samples).expand_as(z)
    hvp_parts = [None] * (2 * len(params))
    for i in range(len(params) - 1, -1, -1):
        dl = ds[i]
        e = rd + gl * dl
        gw = torch.bmm(e.transpose(1, 2), a[i])
        if ra[i] is not None:
            gw = gw + torch.bmm(dl.transpose(1, 2), ra[i])
        hvp_parts[2 * i] = gw.flatten(1)
        hvp_parts[2 * i + 1] = e.sum(1)
        if i > 0:
            w, vw = params[i][0], dirs[i][0]
            dh = torch.bmm(dl, w)
            rd = torch.bmm(rd, w) + torch.bmm(dl, vw)
            if tanh:
                rd = rd * (1 + 2 * a[i]) + 2 * dh * a[i] * ra[i]
    return m_loss, m_grad, torch.cat(hvp_parts, 1), chain + 2 * sum(widths)


def check_loss_grad(outs, theta, x, target, widths, activation, loss, what="mlp_loss_grad"):
    loss_value, grad = outs
    exp_loss, exp_grad = R.mlp_loss_grad(theta.double(), x.double(), target if loss != "mse" else target.double(),
                                         widths, activation, loss)
    m_loss, m_grad, _, chain = magnitude_bounds(theta, x, target, widths, activation, loss)
    assert grad.is_contiguous() and grad.shape == theta.shape, f"{what}: grad must be a contiguous [T, P] tensor"
    assert_within(loss_value, exp_loss.to(theta.dtype), tolerance(theta.dtype, exp_loss, sums=((m_loss, chain),)),
                  f"{what} loss")
    assert_within(grad, exp_grad.to(theta.dtype), tolerance(theta.dtype, exp_grad, sums=((m_grad, chain),)),
                  f"{what} grad")


def check_backward(actual, g_loss, v, theta, x, target, widths, activation, loss, what="mlp_loss_grad_backward"):
    tgt = target if loss != "mse" else target.double()
    expected = R.mlp_loss_grad_backward(None if g_loss is None else g_loss.double(), v.double(), theta.double(),
                                        x.double(), tgt, widths, activation, loss)
    _, _, m_hvp, chain = magnitude_bounds(theta, x, target, widths, activation, loss, v, g_loss)
    assert actual.is_contiguous() and actual.shape == theta.shape
    assert_within(actual, expected.to(theta.dtype), tolerance(theta.dtype, expected, sums=((m_hvp, chain),)), what)


# --- the reference against autograd on nn.Sequential, and against the dense Hessian --------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("widths", [[3, 5], [2, 7, 3], [4, 6, 5, 3]], ids=str)
def test_reference_matches_autograd_on_sequential(activation, loss, widths):
    theta, x, target = make_inputs(3, 5, widths, loss, seed=1)
    got_loss, got_grad = R.mlp_loss_grad(theta, x, target, widths, activation, loss)
    for t in range(3):
        fn = task_loss_fn(widths, activation, loss, x[t], target[t])
        theta_t = theta[t].clone().requires_grad_()
        value = fn(theta_t)
        (grad,) = torch.autograd.grad(value, theta_t)
        torch.testing.assert_close(got_loss[t], value.detach(), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(got_grad[t], grad, rtol=1e-12, atol=1e-14)


def dense_expected(theta, x, target, widths, activation, loss, v, g_loss):
    """g_loss[t] grad_t + H_t v_t with H_t from torch.autograd.functional.hessian on nn.Sequential."""
    rows = []
    for t in range(theta.shape[0]):
        fn = task_loss_fn(widths, activation, loss, x[t], target[t])
        hess = torch.autograd.functional.hessian(fn, theta[t], vectorize=True)
        theta_t = theta[t].clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(theta_t), theta_t)
        rows.append(hess @ v[t] + (g_loss[t] * grad if g_loss is not None else 0))
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("with_g_loss", [True, False])
def test_reference_backward_matches_dense_hessian(activation, loss, with_g_loss):
    widths = [2, 3, 2, 2]  # depth 3: the hidden-layer second-order terms of the R-operator
    theta, x, target = make_inputs(2, 4, widths, loss, seed=2)
    v, g_loss = random_like(theta, 3), (random_like(theta[:, 0], 4) if with_g_loss else None)
    got = R.mlp_loss_grad_backward(g_loss, v, theta, x, target, widths, activation, loss)
    expected = dense_expected(theta, x, target, widths, activation, loss, v, g_loss)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fused_backward_matches_dense_hessian(backend, activation, loss):
    if backend == "triton" and (activation, loss) not in (("tanh", "mse"), ("relu", "cross_entropy")):
        pytest.skip("interpreter: two of the four cases")
    widths = [2, 5, 3]
    theta, x, target = make_inputs(2, 3, widths, loss, seed=5)
    v, g_loss = random_like(theta, 6), random_like(theta[:, 0], 7)
    got = OPS.mlp_loss_grad_backward(g_loss, v, theta, x, target, widths, activation, loss)
    expected = dense_expected(theta, x, target, widths, activation, loss, v, g_loss)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)


# --- every backend against the reference ---------------------------------------------------------------------

# What the interpreter runs of the parametrised tests below (~1 ms per interpreted program, ~10 launches per
# layer): the MAML sinusoid case, and each activation and loss with a depth-3 net through a width-1 layer.
TRITON_CASES = [
    ("relu", "mse", SINUSOID),
    ("tanh", "cross_entropy", [3, 1, 2, 4]),
    ("identity", "mse", [3, 1, 2, 4]),
    ("relu", "cross_entropy", [5, 13, 7]),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("widths", [SINUSOID, [5, 13, 7], [3, 1, 2, 4]], ids=str)
def test_matches_reference_float64(backend, activation, loss, widths):
    if backend == "triton" and (activation, loss, widths) not in TRITON_CASES:
        pytest.skip("interpreter: a subset (every activation, loss and depth once; hypothesis draws the rest)")
    if loss == "cross_entropy" and widths[-1] == 1:
        widths = [*widths[:-1], 3]
    # The interpreter costs ~1 ms per program and ~10 launches per layer: one task there (each task is a
    # separate program of the same code) and the 40-wide layers (two 32-wide tiles) with 5 samples.
    tasks, samples = (1, 5) if backend == "triton" else (3, 10)
    theta, x, target = make_inputs(tasks, samples, widths, loss, seed=8)
    check_loss_grad(mlp_loss_grad(theta, x, target, widths, activation, loss), theta, x, target, widths, activation,
                    loss)
    v, g_loss = random_like(theta, 9), random_like(theta[:, 0], 10)
    for gl in (g_loss, None):
        check_backward(OPS.mlp_loss_grad_backward(gl, v, theta, x, target, widths, activation, loss), gl, v, theta, x,
                       target, widths, activation, loss)


# Fixed float32 inputs at the sinusoid shape (the MAML benchmark) and a 3-class head; the seeds were checked to
# keep every relu pre-activation well away from 0 (see the module docstring).
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss,widths", [("mse", SINUSOID), ("cross_entropy", [4, 9, 3])], ids=["mse", "ce"])
def test_matches_reference_float32(backend, activation, loss, widths):
    if backend == "triton" and (activation, loss) not in (("relu", "mse"), ("tanh", "cross_entropy")):
        pytest.skip("interpreter: the sinusoid case and one other")
    theta, x, target = make_inputs(4, 10, widths, loss, torch.float32, seed=11)
    if backend == "triton":  # the same inputs, fewer tasks (see test_matches_reference_float64)
        theta, x, target = theta[:1], x[:1], target[:1]
    assert min_abs_preactivation(theta, x, widths) > 1e-4, "a hidden unit within rounding of 0: pick another seed"
    check_loss_grad(mlp_loss_grad(theta, x, target, widths, activation, loss), theta, x, target, widths, activation,
                    loss)
    v, g_loss = random_like(theta, 12), random_like(theta[:, 0], 13)
    check_backward(OPS.mlp_loss_grad_backward(g_loss, v, theta, x, target, widths, activation, loss), g_loss, v, theta,
                   x, target, widths, activation, loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_large_layers_through_blas(backend, dtype, activation):
    """widths [784, 256, 128, 5] (the larger case of the benchmarks): the C++ kernel sends its big products to
    BLAS."""
    if backend == "triton":
        pytest.skip("interpreter: too large; the Triton kernels are the same code at every size")
    widths = [784, 256, 128, 5]
    theta, x, target = make_inputs(2, 5, widths, "cross_entropy", dtype, seed=14)
    check_loss_grad(mlp_loss_grad(theta, x, target, widths, activation, "cross_entropy"), theta, x, target, widths,
                    activation, "cross_entropy")
    v, g_loss = random_like(theta, 15), random_like(theta[:, 0], 16)
    check_backward(OPS.mlp_loss_grad_backward(g_loss, v, theta, x, target, widths, activation, "cross_entropy"),
                   g_loss, v, theta, x, target, widths, activation, "cross_entropy")


def test_non_contiguous_inputs(backend):
    widths = [3, 5, 2]
    theta, x, target = make_inputs(3, 4, widths, seed=17)
    ts = theta.t().contiguous().t()
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    ys = target.transpose(0, 1).contiguous().transpose(0, 1)
    check_loss_grad(mlp_loss_grad(ts, xs, ys, widths, "tanh", "mse"), theta, x, target, widths, "tanh", "mse")
    v = random_like(theta, 18)
    check_backward(OPS.mlp_loss_grad_backward(None, v.t().contiguous().t(), ts, xs, ys, widths, "tanh", "mse"), None,
                   v, theta, x, target, widths, "tanh", "mse")


# --- hypothesis: shapes ---------------------------------------------------------------------------------------

SMALL = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 17]), st.integers(1, 24))


@st.composite
def mlp_cases(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(SMALL) for _ in range(depth + 1)]
    loss = draw(st.sampled_from(LOSSES))
    activation = draw(st.sampled_from(ACTIVATIONS))
    # float32 with the smooth activations only (module docstring: relu may switch within rounding of 0)
    dtype = draw(st.sampled_from([torch.float64, torch.float32])) if activation != "relu" else torch.float64
    return draw(st.integers(1, 8)), draw(SMALL), widths, loss, activation, dtype, draw(st.integers(0, 2**31 - 1))


@given(mlp_cases())
def test_hypothesis_matches_reference(backend, case):
    if backend == "triton":
        pytest.skip("interpreter: test_hypothesis_matches_reference_triton (fewer, smaller examples)")
    check_case(*case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs TRITON_INTERPRET=1 and triton")
@settings(max_examples=10)
@given(mlp_cases())
def test_hypothesis_matches_reference_triton(case):
    """The Triton kernels under hypothesis: ~1 ms per interpreted 32 x 32 program and ~10 launches per layer,
    so one task, one tile per product and 10 examples."""
    tasks, samples, widths, loss, activation, dtype, seed = case
    previous = _backend.cpu_backend()
    _backend.set_cpu_backend("triton")
    try:
        check_case(1, min(samples, 5), [min(w, 13) for w in widths], loss, activation, dtype, seed)
    finally:
        _backend.set_cpu_backend(previous)


def check_case(tasks, samples, widths, loss, activation, dtype, seed):
    theta, x, target = make_inputs(tasks, samples, widths, loss, dtype, seed)
    check_loss_grad(mlp_loss_grad(theta, x, target, widths, activation, loss), theta, x, target, widths, activation,
                    loss)
    v, g_loss = random_like(theta, seed + 1), random_like(theta[:, 0], seed + 2)
    check_backward(OPS.mlp_loss_grad_backward(g_loss, v, theta, x, target, widths, activation, loss), g_loss, v, theta,
                   x, target, widths, activation, loss)


# --- autograd ---------------------------------------------------------------------------------------------------


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("metakernels::"):
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", LOSSES)
def test_autograd_matches_autograd_of_reference(backend, loss):
    """Gradients in theta, x and (mse) target, from the loss and from the gradient, equal plain autograd
    through the reference; the theta gradient comes from the fused backward op."""
    widths = [3, 4, 2]
    base = make_inputs(2, 3, widths, loss, seed=19)
    c_loss, c_grad = random_like(base[0][:, 0], 20), random_like(base[0], 21)
    names = ["theta", "x"] + (["target"] if loss == "mse" else [])
    for cot in ((c_loss, c_grad), (None, c_grad), (c_loss, None)):
        inputs = [t.detach().requires_grad_(i < len(names)) for i, t in enumerate(base)]
        wrt = inputs[: len(names)]

        def scalar(outs, cot=cot):
            return sum((o * c).sum() for o, c in zip(outs, cot, strict=True) if c is not None)

        with OpLog() as log:
            got = torch.autograd.grad(scalar(mlp_loss_grad(*inputs, widths, "tanh", loss)), wrt)
        expected = torch.autograd.grad(scalar(R.mlp_loss_grad(*inputs, widths, "tanh", loss)), wrt)
        for n, a, e in zip(names, got, expected, strict=True):
            which = f"d_{n}, cotangents of (loss, grad) given: {cot[0] is not None, cot[1] is not None}"
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12, msg=lambda m, w=which: f"{w}: {m}")
        assert ("metakernels::mlp_loss_grad_backward" in log.calls) == (cot[1] is not None)


def test_second_order_maml_meta_gradient(backend):
    """Second-order MAML on a sinusoid-shaped MLP: two inner steps (mlp_loss_grad then inner_step), a query loss
    through task_linear, backward to the shared initialisation; against the same computation with the
    references (plain autograd through the reference ops, create_graph for the inner gradients)."""
    from metakernels.ops.task_linear import task_linear
    from metakernels.reference.task_linear import task_linear as ref_task_linear

    widths = [1, 8, 8, 1]
    tasks = 3
    theta0, _, _ = make_inputs(1, 1, widths, seed=22)
    _, xs, ys = make_inputs(tasks, 5, widths, seed=23)
    _, xq, yq = make_inputs(tasks, 5, widths, seed=24)

    def meta_loss(loss_grad, linear, theta):
        fast = theta.expand(tasks, -1)
        for _ in range(2):
            _, g = loss_grad(fast, xs, ys, widths, "relu", "mse")
            fast = metakernels.ops.inner_step(fast, g, 0.1)
        h = xq
        for i, (w, b) in enumerate(R.layer_params(fast, widths)):
            h = linear(h, w, b, "relu" if i < 2 else "identity")
        return ((h - yq) ** 2).mean((1, 2)).sum()

    def ref_loss_grad(fast, x, y, w, a, loss):
        # the reference's grad is itself differentiable: the same graph as create_graph autograd would build
        return R.mlp_loss_grad(fast, x, y, w, a, loss)

    theta = theta0[0].clone().requires_grad_()
    (got,) = torch.autograd.grad(meta_loss(mlp_loss_grad, task_linear, theta), theta)
    (expected,) = torch.autograd.grad(meta_loss(ref_loss_grad, ref_task_linear, theta), theta)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("activation,loss", [("tanh", "mse"), ("relu", "cross_entropy"), ("identity", "mse")])
def test_gradcheck(backend, activation, loss):
    """gradcheck and gradgradcheck (third derivatives through the create_graph composition) in theta and x
    (and an mse target)."""
    if backend == "triton" and activation != "tanh":
        pytest.skip("interpreter: one case (the autograd code is the same for every backend; the Triton kernels "
                    "are compared elementwise with the reference above)")
    widths = [2, 3, 2]
    theta, x, target = make_inputs(1 if backend == "triton" else 2, 2, widths, loss, seed=25)
    diff = [theta.requires_grad_(), x.requires_grad_()] + ([target.requires_grad_()] if loss == "mse" else [])

    def fn(*ts):
        tgt = ts[2] if loss == "mse" else target
        return OPS.mlp_loss_grad(ts[0], ts[1], tgt, widths, activation, loss)

    # Full Jacobians for the first derivatives (the fused Hessian-vector product is the backward here), except
    # in the interpreter (see tests/test_task_linear.py::test_gradcheck). The second derivatives (the backward
    # of the create_graph composition) in fast mode everywhere: u^T J v against random u, v, which fails for
    # any wrong entry with probability 1; slow mode costs ~10 s per case here for a path of stock torch ops.
    assert torch.autograd.gradcheck(fn, tuple(diff), fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(fn, tuple(diff), fast_mode=True)


def test_gradcheck_backward_op(backend):
    """mlp_loss_grad_backward's own autograd (the reference R-operator differentiated)."""
    if backend == "triton":
        pytest.skip("interpreter: this autograd is the reference's, the same code for every backend, and the Triton "
                    "backward kernel is compared elementwise with the reference above")
    widths = [2, 3, 2]
    theta, x, target = make_inputs(2, 2, widths, seed=26)
    v, g_loss = random_like(theta, 27), random_like(theta[:, 0], 28)
    inputs = tuple(t.requires_grad_() for t in (g_loss, v, theta, x, target))

    def fn(*ts):
        return OPS.mlp_loss_grad_backward(*ts, widths, "tanh", "mse")

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


def test_opcheck(backend):
    """The schema, fake kernels and autograd registration (the checks concern the ops, not the loss: the
    forward with mse, the backward with cross entropy)."""
    widths = [3, 4, 2]
    theta, x, target = make_inputs(2, 3, widths, "mse", seed=29)
    torch.library.opcheck(OPS.mlp_loss_grad.default, (theta.requires_grad_(), x, target, widths, "tanh", "mse"))
    theta, x, labels = make_inputs(2, 3, widths, "cross_entropy", seed=30)
    v, g_loss = random_like(theta, 30), random_like(theta[:, 0], 31)
    torch.library.opcheck(OPS.mlp_loss_grad_backward.default,
                          (g_loss, v.requires_grad_(), theta, x, labels, widths, "tanh", "cross_entropy"))
    if backend != "triton":
        torch.library.opcheck(OPS.mlp_loss_grad_backward.default,
                              (None, v.detach(), theta, x, labels, widths, "relu", "cross_entropy"))


# --- threads ------------------------------------------------------------------------------------------------


def test_threads_give_identical_results(backend, restore_threads):
    if backend == "triton":
        pytest.skip("the interpreter runs programs one after another whatever the thread count")
    theta, x, target = make_inputs(25, 10, SINUSOID, dtype=torch.float32, seed=32)
    v = random_like(theta, 33)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((*mlp_loss_grad(theta, x, target, SINUSOID, "relu", "mse"),
                        OPS.mlp_loss_grad_backward(None, v, theta, x, target, SINUSOID, "relu", "mse")))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --- bad input ------------------------------------------------------------------------------------------------

W = [3, 4, 2]


def _bad(loss="mse", **changes):
    def build():
        theta, x, target = make_inputs(2, 3, W, loss, seed=34)
        args = {"theta": theta, "x": x, "target": target, "widths": W, "activation": "relu", "loss": loss}
        args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
        return args

    return build


BAD = {
    "widths_short": (_bad(widths=[3]), ValueError, r"widths must list at least 2 layer widths"),
    "widths_zero": (_bad(widths=[3, 0, 2]), ValueError, r"widths must be positive, got \[3, 0, 2\]"),
    "theta_vs_widths": (
        _bad(widths=[3, 5, 2]), ValueError, r"theta has P = 26 columns but widths \[3, 5, 2\] need P = 32"
    ),
    "theta_1d": (_bad(theta=lambda a: a["theta"][0]), ValueError, r"theta must be a 2-D \[T, P\] tensor"),
    "theta_integer": (_bad(theta=lambda a: a["theta"].long()), TypeError, "theta must be a float32 or float64 tensor"),
    "empty_tasks": (
        _bad(theta=lambda a: a["theta"][:0], x=lambda a: a["x"][:0], target=lambda a: a["target"][:0]),
        ValueError,
        r"theta is an empty task batch \(T = 0\)",
    ),
    "no_samples": (
        _bad(x=lambda a: a["x"][:, :0], target=lambda a: a["target"][:, :0]),
        ValueError,
        r"x has no samples \(N = 0\)",
    ),
    "x_2d": (_bad(x=lambda a: a["x"][0]), ValueError, r"x must be a 3-D \[T, N, in\] tensor"),
    "x_dtype": (_bad(x=lambda a: a["x"].float()), TypeError, "x has dtype"),
    "x_tasks": (_bad(x=lambda a: a["x"][:1]), ValueError, "x has 1 tasks but theta has T = 2"),
    "x_features": (_bad(x=lambda a: a["x"][..., :2]), ValueError, r"x has 2 features but widths\[0\] = 3"),
    "x_device": (_bad(x=lambda a: a["x"].to("meta")), ValueError, "x is on meta but theta is on cpu"),
    "target_shape": (
        _bad(target=lambda a: a["target"][..., :1]), ValueError, r"target must be \[T, N, w_L\] = \[2, 3, 2\]"
    ),
    "target_dtype": (_bad(target=lambda a: a["target"].float()), TypeError, "target has dtype"),
    "ce_target_float": (
        _bad("cross_entropy", target=lambda a: a["target"].double()),
        TypeError,
        "target must be an int64 tensor of class indices",
    ),
    "ce_target_shape": (
        _bad("cross_entropy", target=lambda a: a["target"][:, :2]),
        ValueError,
        r"target must be \[T, N\] = \[2, 3\]",
    ),
    "ce_target_too_large": (
        _bad("cross_entropy", target=lambda a: torch.full_like(a["target"], 2)),
        ValueError,
        r"target must hold class indices in \[0, w_L\) = \[0, 2\), got 2",
    ),
    "ce_target_negative": (
        _bad("cross_entropy", target=lambda a: torch.full_like(a["target"], -1)),
        ValueError,
        r"class indices in \[0, w_L\) = \[0, 2\), got -1",
    ),
    "activation": (_bad(activation="sigmoid"), ValueError, "activation must be one of 'identity', 'relu', 'tanh'"),
    "loss": (_bad(loss_name="l1"), ValueError, "loss must be 'mse' or 'cross_entropy', got 'l1'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD[name]
    a = build()
    loss = a.pop("loss_name", a["loss"])
    args = (a["theta"], a["x"], a["target"], a["widths"], a["activation"], loss)
    with pytest.raises(error, match=match):
        mlp_loss_grad(*args)
    with pytest.raises(error, match=match):
        OPS.mlp_loss_grad(*args)
    theta = a["theta"]
    v = torch.zeros_like(theta) if theta.is_floating_point() else torch.zeros(theta.shape, dtype=torch.float64)
    with pytest.raises(error, match=match):
        OPS.mlp_loss_grad_backward(None, v, *args)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda g, v: (g, v[:, 1:]), ValueError, "grad_grad must have the shape of theta"),
        (lambda g, v: (g, v.float()), TypeError, "grad_grad has dtype"),
        (lambda g, v: (g[:1], v), ValueError, r"grad_loss must be \[T\] = \[2\]"),
        (lambda g, v: (g.float(), v), TypeError, "grad_loss has dtype"),
    ],
    ids=["grad_grad_shape", "grad_grad_dtype", "grad_loss_shape", "grad_loss_dtype"],
)
def test_backward_bad_cotangents(backend, change, error, match):
    theta, x, target = make_inputs(2, 3, W, seed=35)
    g_loss, v = change(torch.zeros(2, dtype=torch.float64), torch.zeros_like(theta))
    with pytest.raises(error, match=match):
        OPS.mlp_loss_grad_backward(g_loss, v, theta, x, target, W, "relu", "mse")


def test_public_api_is_exported():
    assert metakernels.ops.mlp_loss_grad is mlp_loss_grad
    assert {"mlp_loss_grad", "mlp_loss_grad_backward"} <= set(metakernels.ops.OP_NAMES)
