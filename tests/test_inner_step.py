"""Tests of metakernels::inner_step, inner_step_backward and inner_step_out on every CPU backend.

Oracle: metakernels.reference.inner_step (pure PyTorch). Tolerances are the rounding-error bounds of
tests/_tolerance.py (module docstring there): elementwise results within 8*eps of the magnitude of their
terms, reductions within 2*gamma_(n+8) of the sum of the absolute terms, bf16 plus one bf16 ulp of the
result. In float64 that is ~1e-15 relative to the terms for the elementwise results, far inside 1e-10.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch
from _inputs import LAYOUTS_2D, SIZES, random_like, with_layout
from _tolerance import assert_within, elementwise_tol, reduction_tol
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import metakernels
from metakernels import _backend
from metakernels import reference as R
from metakernels.reference.inner_step import expand_rate, reduce_to_rate

OPS = torch.ops.metakernels
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LR_MODES = ["scalar", "per_coordinate", "segmented", "segmented_empty"]
THETA0_MODES = [None, "shared", "per_task"]
# (prox, weight_decay): neither, decay only, both (a negative decay); prox needs theta0.
COEFFICIENTS = [(0.0, 0.0), (0.0, 0.1), (0.7, -0.05)]
FULL_MASK = [True, True, True, True]


# --- inputs ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    theta: torch.Tensor
    grad: torch.Tensor
    lr: torch.Tensor
    segment_offsets: torch.Tensor | None
    theta0: torch.Tensor | None
    prox: float
    weight_decay: float

    def args(self) -> tuple:
        return (self.theta, self.grad, self.lr, self.segment_offsets, self.theta0, self.prox, self.weight_decay)

    def kwargs(self) -> dict:
        return dict(
            segment_offsets=self.segment_offsets, theta0=self.theta0, prox=self.prox, weight_decay=self.weight_decay
        )

    def step(self) -> torch.Tensor:
        """The public API call."""
        return metakernels.inner_step(self.theta, self.grad, self.lr, **self.kwargs())


def default_offsets(num_params: int, lr_mode: str) -> list[int] | None:
    if lr_mode == "segmented":
        return [0, num_params // 2, num_params] if num_params > 1 else [0, 1]
    if lr_mode == "segmented_empty":
        # Empty segments first, in the middle and last: their rates apply to no column and get zero gradient.
        third = num_params // 3
        return [0, 0, third, third, num_params, num_params]
    return None


def make_case(
    num_tasks: int,
    num_params: int,
    dtype: torch.dtype = torch.float64,
    lr_mode: str = "scalar",
    theta0_mode: str | None = None,
    prox: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    offsets: list[int] | None = None,
    lr_sign: int = 0,
) -> Case:
    """Random inputs, drawn in float64 and rounded once to dtype. Rates lie in [-1, 1] (both signs) unless
    lr_sign forces one sign."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    def rates(*shape):
        r = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        if lr_sign:
            r = lr_sign * r.abs()
        return r.to(dtype)

    theta, grad = randn(num_tasks, num_params), randn(num_tasks, num_params)
    segment_offsets = None
    if lr_mode == "scalar":
        lr = rates()
    elif lr_mode == "per_coordinate":
        lr = rates(num_params)
    else:
        offsets = offsets if offsets is not None else default_offsets(num_params, lr_mode)
        segment_offsets = torch.tensor(offsets, dtype=torch.int64)
        lr = rates(len(offsets) - 1)
    theta0 = {None: None, "shared": lambda: randn(num_params), "per_task": lambda: randn(num_tasks, num_params)}
    theta0 = theta0[theta0_mode]() if theta0_mode else None
    return Case(theta, grad, lr, segment_offsets, theta0, prox if theta0 is not None else 0.0, weight_decay)


# --- expected values and their tolerances -----------------------------------------------------------------


def _abs_parts(case: Case):
    """float64 magnitudes: |L| expanded to broadcast against [T, P], |theta|, |u|'s term sum."""
    th, g = case.theta.double().abs(), case.grad.double().abs()
    rate = expand_rate(case.lr.double().abs(), case.segment_offsets, case.theta.shape[1])
    u = g + abs(case.weight_decay) * th
    if case.theta0 is not None:
        u = u + abs(case.prox) * (th + case.theta0.double().abs())
    return rate, th, u


def check_forward(actual: torch.Tensor, case: Case, what: str = "inner_step") -> None:
    expected = R.inner_step(*case.args())
    rate, th, u = _abs_parts(case)
    scale = th + rate * u
    assert actual.is_contiguous(), f"{what}: output is not contiguous"
    assert_within(actual, expected, elementwise_tol(case.theta.dtype, scale, expected), what)


def check_backward(outs, case: Case, grad_out: torch.Tensor, mask=FULL_MASK, what: str = "inner_step_backward"):
    """Compares the fused backward's 4 outputs with the reference's; masked outputs must be empty [0]."""
    expected = R.inner_step_backward(grad_out, *case.args(), mask)
    dtype = case.theta.dtype
    rate, th, u = _abs_parts(case)
    go = grad_out.double().abs()
    ones = torch.ones_like(go)
    c = abs(case.prox) + abs(case.weight_decay)
    names = ("d_theta", "d_grad", "d_lr", "d_theta0")
    for i, (name, a, e) in enumerate(zip(names, outs, expected, strict=True)):
        if not mask[i] or (i == 3 and case.theta0 is None):
            assert a.shape == (0,) and a.dtype == dtype, f"{what}: masked {name} must be an empty [0] tensor"
            continue
        if name == "d_theta":
            tol = elementwise_tol(dtype, go * (1 + rate * c), e)
        elif name == "d_grad":
            tol = elementwise_tol(dtype, rate * go, e)
        elif name == "d_lr":
            terms = go * u
            tol = reduction_tol(
                dtype,
                reduce_to_rate(terms, case.lr, case.segment_offsets),
                reduce_to_rate(ones, case.lr, case.segment_offsets),
                e,
            )
        else:
            terms = abs(case.prox) * rate * go
            if case.theta0.dim() == 1:
                tol = reduction_tol(dtype, terms.sum(0), go.shape[0], e)
            else:
                tol = elementwise_tol(dtype, terms, e)
        assert_within(a, e, tol, f"{what} {name}")


# --- forward and backward against the reference -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr_mode", LR_MODES)
@pytest.mark.parametrize(
    "theta0_mode,prox,weight_decay", [(t0, p, wd) for t0 in THETA0_MODES for p, wd in COEFFICIENTS if t0 or not p]
)
def test_forward_and_backward_match_reference(backend, dtype, lr_mode, theta0_mode, prox, weight_decay):
    case = make_case(3, 37, dtype, lr_mode, theta0_mode, prox, weight_decay, seed=1)
    check_forward(case.step(), case)
    grad_out = random_like(case.theta, seed=2)
    check_backward(OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK), case, grad_out)


@pytest.mark.parametrize("lr_sign", [-1, 1])
@pytest.mark.parametrize("lr_mode", LR_MODES)
def test_rates_of_one_sign(backend, lr_mode, lr_sign):
    """All-negative rates (gradient ascent: used by some meta-learners for adversarial inner steps) and
    all-positive ones."""
    case = make_case(4, 29, torch.float64, lr_mode, "shared", 0.3, 0.01, seed=3, lr_sign=lr_sign)
    check_forward(case.step(), case)
    grad_out = random_like(case.theta, seed=4)
    check_backward(OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK), case, grad_out)


def test_zero_rate_is_identity(backend):
    case = make_case(2, 7, torch.float64, "per_coordinate", "per_task", 0.5, 0.5)
    case.lr.zero_()
    torch.testing.assert_close(case.step(), case.theta, rtol=0, atol=0)


def test_float_lr_matches_tensor_lr(backend):
    case = make_case(2, 11, torch.float32, "scalar", "shared", 0.5, 0.1)
    by_float = metakernels.inner_step(case.theta, case.grad, float(case.lr), **case.kwargs())
    torch.testing.assert_close(by_float, case.step(), rtol=0, atol=0)


@pytest.mark.parametrize("num_params", [1, 2, 1023, 1024, 1025, 1031, 2049])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_coordinate", "segmented_empty"])
def test_sizes_around_the_triton_block(backend, num_params, lr_mode):
    """P at and across multiples of the Triton BLOCK (1024): the masked tail of the last column block."""
    case = make_case(2, num_params, torch.float32, lr_mode, "shared", 0.2, 0.1, seed=num_params)
    check_forward(case.step(), case)
    grad_out = random_like(case.theta, seed=5)
    check_backward(OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK), case, grad_out)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=4)), ids=str)
@pytest.mark.parametrize("theta0_mode", ["shared", "per_task"])
def test_backward_output_mask(backend, mask, theta0_mode):
    """Each of the 16 masks: requested outputs match the reference, the others are empty [0] tensors."""
    case = make_case(3, 10, torch.float64, "segmented_empty", theta0_mode, 0.4, 0.2, seed=6)
    grad_out = random_like(case.theta, seed=7)
    check_backward(OPS.inner_step_backward(grad_out, *case.args(), list(mask)), case, grad_out, list(mask))


def test_backward_without_theta0_returns_empty_d_theta0(backend):
    case = make_case(2, 5, torch.float64, "per_coordinate", None, 0.0, 0.3)
    grad_out = random_like(case.theta, seed=8)
    outs = OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK)
    assert outs[3].shape == (0,)
    check_backward(outs, case, grad_out)


# --- autograd -----------------------------------------------------------------------------------------------

DIFFERENTIABLE = ("theta", "grad", "lr", "theta0")


class OpLog(TorchDispatchMode):
    """Records the metakernels ops (and inner_step_backward's output_mask) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[bool] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("metakernels::"):
            self.calls.append((name, list(args[8]) if name == "metakernels::inner_step_backward" else None))
        return func(*args, **(kwargs or {}))


def with_grad(case: Case, names) -> Case:
    fields = {
        n: getattr(case, n).detach().requires_grad_(n in names) for n in DIFFERENTIABLE if getattr(case, n) is not None
    }
    return replace(case, **fields)


@pytest.mark.parametrize(
    "lr_mode,theta0_mode,prox,weight_decay",
    # Every rate x theta0 mode with a contraction, and the identity-d_theta shortcut with each theta0 mode.
    [(lr, t0, 0.6 if t0 else 0.0, 0.1) for lr in LR_MODES for t0 in THETA0_MODES]
    + [("segmented_empty", t0, 0.0, 0.0) for t0 in THETA0_MODES],
)
def test_autograd_matches_autograd_of_reference(backend, lr_mode, theta0_mode, prox, weight_decay):
    """For every subset of the differentiable inputs: the op's gradients equal plain autograd through the
    reference forward, and the fused backward is asked only for the gradients that are needed."""
    base = make_case(3, 9, torch.float64, lr_mode, theta0_mode, prox, weight_decay, seed=9)
    grad_out = random_like(base.theta, seed=10)
    present = [n for n in DIFFERENTIABLE if getattr(base, n) is not None]
    subsets = [c for k in range(1, len(present) + 1) for c in itertools.combinations(present, k)]
    if backend == "triton":
        # Which gradients are requested is decided by the autograd kernel, the same code for every backend
        # and exercised with every subset on the others; the Triton kernel's own handling of each of the 16
        # output masks is test_backward_output_mask's. Here: each input alone and all together (a
        # quarter of the interpreter launches).
        subsets = [s for s in subsets if len(s) in (1, len(present))]
    for names in subsets:
        case = with_grad(base, names)
        inputs = [getattr(case, n) for n in names]
        with OpLog() as log:
            out = case.step()
            got = torch.autograd.grad(out, inputs, grad_out)
        expected = torch.autograd.grad(R.inner_step(*case.args()), inputs, grad_out)
        for n, a, e in zip(names, got, expected, strict=True):
            torch.testing.assert_close(
                a, e, rtol=1e-12, atol=1e-12, msg=lambda m, n=n, names=names: f"d_{n} ({names}): {m}"
            )
        # The mask passed to the fused backward: exactly the needed gradients, minus d_theta when it is
        # grad_out itself (prox + weight_decay == 0) ...
        identity = case.prox + case.weight_decay == 0.0
        want = ["theta" in names and not identity, "grad" in names, "lr" in names, "theta0" in names]
        backward_calls = [m for op, m in log.calls if op == "metakernels::inner_step_backward"]
        if any(want):
            assert backward_calls == [want], f"{names}: backward called with {backward_calls}, want {want}"
        else:  # ... in which case, with only theta requiring grad, the fused backward is skipped.
            assert backward_calls == [], f"{names}: identity d_theta must not run the backward kernel"
            assert torch.equal(got[0], grad_out)


def test_identity_d_theta_when_prox_cancels_weight_decay(backend):
    """prox + weight_decay == 0 makes the contraction vanish: d_theta = grad_out exactly."""
    case = with_grad(make_case(2, 6, torch.float64, "per_coordinate", "shared", 0.25, -0.25), ["theta"])
    grad_out = random_like(case.theta, seed=11)
    (d_theta,) = torch.autograd.grad(case.step(), case.theta, grad_out)
    assert torch.equal(d_theta, grad_out)


def test_second_order_through_two_steps(backend):
    """Second-order MAML's pattern: grad of a loss after two inner steps w.r.t. the initial weights and the
    rates, with create_graph through the first step's gradient, against the reference."""

    def meta_loss(step, theta, lr, target):
        fast = theta.expand(2, -1)
        for _ in range(2):
            loss = ((fast - target) ** 2).sum() * fast.sin().sum()
            (g,) = torch.autograd.grad(loss, fast, create_graph=True)
            fast = step(fast, g, lr)
        return (fast**3).sum()

    gen = torch.Generator().manual_seed(12)
    theta = torch.randn(7, dtype=torch.float64, generator=gen).requires_grad_()
    lr = (torch.rand(3, dtype=torch.float64, generator=gen) * 0.1).requires_grad_()
    target = torch.randn(2, 7, dtype=torch.float64, generator=gen)
    offsets = torch.tensor([0, 2, 2, 7])
    theta0 = torch.randn(7, dtype=torch.float64, generator=gen)

    def fused(f, g, r):
        return metakernels.inner_step(f, g, r, segment_offsets=offsets, theta0=theta0, prox=0.5, weight_decay=0.1)

    def ref(f, g, r):
        return R.inner_step(f, g, r, offsets, theta0, 0.5, 0.1)

    got = torch.autograd.grad(meta_loss(fused, theta, lr, target), (theta, lr))
    expected = torch.autograd.grad(meta_loss(ref, theta, lr, target), (theta, lr))
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# --- gradcheck / gradgradcheck ------------------------------------------------------------------------------


def _gradcheck_case(lr_mode, theta0_mode, names, prox=0.6, weight_decay=0.15) -> Case:
    offsets = [0, 0, 2, 3] if lr_mode == "segmented_empty" else None
    case = make_case(2, 3, torch.float64, lr_mode, theta0_mode, prox, weight_decay, seed=13, offsets=offsets)
    return with_grad(case, names)


def _run_gradchecks(case: Case, names, backend: str) -> None:
    def fn(*xs):
        return OPS.inner_step(*replace(case, **dict(zip(names, xs, strict=True))).args())

    inputs = tuple(getattr(case, n) for n in names)
    # The Triton interpreter costs 10-20 ms per launch and slow-mode gradgradcheck launches ~110 kernels per
    # case (two per input element), so on that backend the checks run in fast mode: they compare the
    # analytical and numerical Jacobians projected on random vectors (u^T J v), which still fails for any
    # wrong Jacobian entry with probability 1. The full Jacobians are compared on the other backends, and
    # the Triton backward kernel is compared elementwise with the reference by the tests above.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


# Every rate mode and every theta0 mode at least once (the cross product adds nothing the kernels branch on
# jointly: the rate and theta0 paths are independent code in every backend).
GRADCHECK_MODES = [
    ("scalar", None),
    ("scalar", "per_task"),
    ("per_coordinate", "shared"),
    ("per_coordinate", None),
    ("segmented", "per_task"),
    ("segmented_empty", "shared"),
]


@pytest.mark.parametrize("lr_mode,theta0_mode", GRADCHECK_MODES)
def test_gradcheck_all_inputs(backend, lr_mode, theta0_mode):
    names = [n for n in DIFFERENTIABLE if n != "theta0" or theta0_mode is not None]
    _run_gradchecks(_gradcheck_case(lr_mode, theta0_mode, names), names, backend)


@pytest.mark.parametrize(
    "names,theta0_mode",
    [
        (("theta",), "shared"),
        (("lr",), "per_task"),
        (("theta0",), "shared"),
        (("grad", "theta0"), "per_task"),
        (("theta", "lr"), "shared"),
    ],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else x,
)
def test_gradcheck_masked_backward(backend, names, theta0_mode):
    """Only some inputs require grad, so the fused backward runs with a partial output_mask."""
    _run_gradchecks(_gradcheck_case("segmented_empty", theta0_mode, names), names, backend)


@pytest.mark.parametrize("names", [("theta",), ("theta", "grad", "lr", "theta0")], ids="+".join)
def test_gradcheck_identity_d_theta(backend, names):
    """prox = weight_decay = 0: d_theta is grad_out itself (no backward pass over theta)."""
    _run_gradchecks(_gradcheck_case("per_coordinate", "per_task", names, prox=0.0, weight_decay=0.0), names, backend)


# --- opcheck ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("lr_mode,theta0_mode", [("scalar", None), ("segmented_empty", "shared")])
def test_opcheck(backend, lr_mode, theta0_mode, requires_grad):
    case = make_case(2, 5, torch.float64, lr_mode, theta0_mode, 0.3, 0.1, seed=14)
    if requires_grad:
        case = with_grad(case, DIFFERENTIABLE)
    torch.library.opcheck(OPS.inner_step.default, case.args())
    grad_out = random_like(case.theta, seed=15).requires_grad_(requires_grad)
    for mask in (FULL_MASK, [False, True, False, True]):
        torch.library.opcheck(OPS.inner_step_backward.default, (grad_out, *case.args(), mask))
    # The out= variant has no autograd (the public wrapper refuses inputs requiring grad under grad mode);
    # the raw op must still pass the schema, fake-tensor and AOT-dispatch checks with such inputs.
    torch.library.opcheck(OPS.inner_step_out.default, (*case.args(), torch.empty_like(case.theta.detach())))


# --- hypothesis: shapes, segment splits, strides -----------------------------------------------------------


@st.composite
def inner_step_cases(draw):
    num_tasks = draw(st.integers(1, 8))
    num_params = draw(SIZES)
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    lr_mode = draw(st.sampled_from(["scalar", "per_coordinate", "segmented"]))
    offsets = None
    if lr_mode == "segmented":
        cuts = draw(st.lists(st.integers(0, num_params), min_size=0, max_size=6))
        offsets = [0, *sorted(cuts), num_params]  # repeated cuts are empty segments
    theta0_mode = draw(st.sampled_from([None, "shared", "per_task", "expanded"]))
    prox = draw(st.sampled_from([0.0, 0.3, -0.2])) if theta0_mode else 0.0
    weight_decay = draw(st.sampled_from([0.0, 1e-2, -0.5]))
    case = make_case(
        num_tasks,
        num_params,
        dtype,
        lr_mode,
        "shared" if theta0_mode == "expanded" else theta0_mode,
        prox,
        weight_decay,
        seed=draw(st.integers(0, 2**31 - 1)),
        offsets=offsets,
    )
    if theta0_mode == "expanded":  # a [T, P] theta0 with row stride 0
        case.theta0 = case.theta0.expand(num_tasks, num_params)
    layouts = {n: draw(st.sampled_from(LAYOUTS_2D)) for n in ("theta", "grad", "theta0", "lr")}
    case.theta, case.grad = with_layout(case.theta, layouts["theta"]), with_layout(case.grad, layouts["grad"])
    if case.theta0 is not None and theta0_mode != "expanded":
        case.theta0 = with_layout(case.theta0, layouts["theta0"])
    if lr_mode == "per_coordinate":
        case.lr = with_layout(case.lr, layouts["lr"])
    grad_out = with_layout(random_like(case.theta, seed=num_params), draw(st.sampled_from(LAYOUTS_2D)))
    return case, grad_out


@given(inner_step_cases())
def test_hypothesis_matches_reference(backend, drawn):
    case, grad_out = drawn
    check_forward(case.step(), case)
    check_backward(OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK), case, grad_out)


# --- torch.compile ------------------------------------------------------------------------------------------


def _compiled_inner_step_loss(theta, grad, lr, offsets, theta0):
    out = metakernels.inner_step(theta, grad, lr, segment_offsets=offsets, theta0=theta0, prox=0.3, weight_decay=0.05)
    return (out.sin() * out).sum()


# One compiled function for the module: the graph depends only on the fake kernels, not on the backend,
# so the backends after the first reuse the compiled graph and the test stays fast.
_COMPILED_INNER_STEP_LOSS = torch.compile(_compiled_inner_step_loss, fullgraph=True, backend="aot_eager")


def test_torch_compile_matches_eager(backend):
    case = with_grad(make_case(3, 17, torch.float64, "segmented_empty", "shared", 0.3, 0.05, seed=16), DIFFERENTIABLE)
    inputs = (case.theta, case.grad, case.lr, case.theta0)
    args = (case.theta, case.grad, case.lr, case.segment_offsets, case.theta0)
    eager = _compiled_inner_step_loss(*args)
    compiled = _COMPILED_INNER_STEP_LOSS(*args)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    for a, e in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _compiled_out_step(theta, grad, lr, theta0):
    metakernels.inner_step(theta, grad, lr, theta0=theta0, prox=0.3, weight_decay=0.05, out=theta)
    return theta


_COMPILED_OUT_STEP = torch.compile(_compiled_out_step, fullgraph=True, backend="aot_eager")


def test_torch_compile_out_variant_matches_eager(backend):
    case = make_case(3, 17, torch.float32, "per_coordinate", "per_task", 0.3, 0.05, seed=17)
    expected = case.step()
    theta = case.theta.clone()
    result = _COMPILED_OUT_STEP(theta, case.grad, case.lr, case.theta0)
    torch.testing.assert_close(theta, expected, rtol=0, atol=0)  # same kernel, same inputs: bitwise
    assert result.data_ptr() == theta.data_ptr()


# --- out= -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lr_mode", LR_MODES)
def test_out_separate_buffer(backend, dtype, lr_mode):
    case = make_case(3, 21, dtype, lr_mode, "shared", 0.3, 0.1, seed=18)
    buffer = torch.full_like(case.theta, float("nan"))
    theta_before = case.theta.clone()
    result = metakernels.inner_step(case.theta, case.grad, case.lr, **case.kwargs(), out=buffer)
    assert result is buffer
    check_forward(buffer, case, "inner_step(out=buffer)")
    assert torch.equal(case.theta, theta_before), "out= must leave theta alone"
    # The same kernel as the functional form: bitwise equal.
    torch.testing.assert_close(buffer, case.step(), rtol=0, atol=0)


@pytest.mark.parametrize("lr_mode", LR_MODES)
@pytest.mark.parametrize("theta0_mode", THETA0_MODES, ids=str)
def test_out_in_place(backend, lr_mode, theta0_mode):
    case = make_case(3, 21, torch.float32, lr_mode, theta0_mode, 0.3, 0.1, seed=19)
    expected = case.step()
    theta = case.theta.clone()
    result = metakernels.inner_step(theta, case.grad, case.lr, **case.kwargs(), out=theta)
    assert result is theta
    torch.testing.assert_close(theta, expected, rtol=0, atol=0)


def test_out_op_in_place(backend):
    case = make_case(2, 9, torch.float64, "segmented_empty", "per_task", 0.3, 0.1, seed=20)
    expected = case.step()
    OPS.inner_step_out(*case.args(), case.theta)
    torch.testing.assert_close(case.theta, expected, rtol=0, atol=0)


def test_out_with_non_contiguous_inputs(backend):
    case = make_case(3, 13, torch.float64, "per_coordinate", "per_task", 0.3, 0.1, seed=21)
    strided = replace(
        case,
        theta=with_layout(case.theta, "transposed"),
        grad=with_layout(case.grad, "row_stride"),
        theta0=with_layout(case.theta0, "column_step"),
        lr=with_layout(case.lr, "column_step"),
    )
    out = torch.empty_like(case.theta)
    metakernels.inner_step(strided.theta, strided.grad, strided.lr, **strided.kwargs(), out=out)
    check_forward(out, strided, "inner_step(out=, strided inputs)")


def test_out_under_no_grad_accepts_inputs_requiring_grad(backend):
    case = with_grad(make_case(2, 5, torch.float64, "scalar", "shared", 0.3, 0.1), DIFFERENTIABLE)
    out = torch.empty_like(case.theta)
    with torch.no_grad():
        metakernels.inner_step(case.theta, case.grad, case.lr, **case.kwargs(), out=out)
    check_forward(out, case)
    assert not out.requires_grad


@pytest.mark.parametrize(
    "make_out,error,match",
    [
        (lambda th: torch.empty(th.shape[1], th.shape[0], dtype=th.dtype).t(), ValueError, r"out .*non-contiguous"),
        (lambda th: torch.empty(th.shape[0], 2 * th.shape[1], dtype=th.dtype)[:, ::2], ValueError, "out"),
        (lambda th: torch.empty(th.shape[0], th.shape[1] + 1, dtype=th.dtype), ValueError, "out must be"),
        (lambda th: torch.empty(th.shape[1], dtype=th.dtype), ValueError, "out must be"),
        (lambda th: torch.empty(th.shape, dtype=torch.float32), TypeError, "out has dtype"),
    ],
    ids=["transposed", "column_step", "wrong_shape", "one_dim", "wrong_dtype"],
)
def test_out_rejects_bad_buffer(backend, make_out, error, match):
    case = make_case(3, 4, torch.float64, "scalar")
    out = make_out(case.theta).fill_(7.0)
    with pytest.raises(error, match=match):
        metakernels.inner_step(case.theta, case.grad, case.lr, out=out)
    with pytest.raises(error, match=match):
        OPS.inner_step_out(*case.args(), out)
    assert (out == 7.0).all(), "a rejected out= must not be written"


@pytest.mark.parametrize("name", [*DIFFERENTIABLE, "out"])
def test_out_rejects_inputs_requiring_grad(backend, name):
    case = make_case(2, 5, torch.float64, "per_coordinate", "shared", 0.3, 0.1)
    out = torch.empty_like(case.theta)
    if name == "out":
        out.requires_grad_()
    else:
        case = with_grad(case, [name])
    with pytest.raises(ValueError, match="out= is not differentiable"):
        metakernels.inner_step(case.theta, case.grad, case.lr, **case.kwargs(), out=out)


# --- bad input ------------------------------------------------------------------------------------------------

T_, P_ = 3, 6


def _bad(**changes):
    """A valid float64 case with some fields replaced (values are callables of the base case)."""

    def build():
        base = make_case(T_, P_, torch.float64, "scalar", "shared", 0.1, 0.1)
        return replace(base, **{k: (v(base) if callable(v) else v) for k, v in changes.items()})

    return build


def _segmented(offsets, lr_len=None, dtype=torch.int64):
    def build():
        base = make_case(T_, P_, torch.float64, "scalar", "shared", 0.1, 0.1)
        lr = torch.full((lr_len if lr_len is not None else len(offsets) - 1,), 0.1, dtype=torch.float64)
        return replace(base, lr=lr, segment_offsets=torch.tensor(offsets, dtype=dtype))

    return build


BAD_INNER_STEP = {
    "theta_1d": (_bad(theta=lambda c: c.theta[0], grad=lambda c: c.grad[0]), ValueError, "theta must be a 2-D"),
    "theta_3d": (_bad(theta=lambda c: c.theta[None], grad=lambda c: c.grad[None]), ValueError, "theta must be a 2-D"),
    "empty_task_batch": (
        _bad(theta=lambda c: c.theta[:0], grad=lambda c: c.grad[:0], theta0=None, prox=0.0),
        ValueError,
        r"theta is an empty task batch \(T = 0\)",
    ),
    "no_parameters": (
        _bad(theta=lambda c: c.theta[:, :0], grad=lambda c: c.grad[:, :0], theta0=None, prox=0.0),
        ValueError,
        r"theta has no parameters \(P = 0\)",
    ),
    "grad_shape": (_bad(grad=lambda c: c.grad[:, 1:]), ValueError, "grad must have the shape of theta"),
    "grad_transposed_shape": (
        _bad(grad=lambda c: torch.zeros(P_, T_, dtype=torch.float64)),
        ValueError,
        "grad must have the shape of theta",
    ),
    "grad_dtype": (_bad(grad=lambda c: c.grad.float()), TypeError, "grad has dtype"),
    "theta_integer": (
        _bad(
            theta=lambda c: c.theta.long(),
            grad=lambda c: c.grad.long(),
            lr=lambda c: c.lr.long(),
            theta0=None,
            prox=0.0,
        ),
        TypeError,
        "theta must be a floating-point tensor",
    ),
    "lr_dtype": (_bad(lr=lambda c: c.lr.float()), TypeError, "lr has dtype"),
    "lr_too_long": (_bad(lr=lambda c: torch.zeros(P_ + 1, dtype=torch.float64)), ValueError, "lr must be a scalar"),
    "lr_2d": (_bad(lr=lambda c: torch.zeros(T_, P_, dtype=torch.float64)), ValueError, "lr must be a scalar"),
    "lr_1_element": (_bad(lr=lambda c: torch.zeros(1, dtype=torch.float64)), ValueError, "lr must be a scalar"),
    "segment_offsets_too_long": (
        _segmented([0, 2, 4, P_], lr_len=2),
        ValueError,
        r"with segment_offsets of shape \[4\] lr must be a 1-D table of 3 rates",
    ),
    "segment_offsets_too_short": (
        _segmented([0, P_], lr_len=2),
        ValueError,
        "with segment_offsets of shape .* lr must be a 1-D table of 1 rates",
    ),
    "segment_offsets_not_from_0": (
        _segmented([1, 3, P_]),
        ValueError,
        "segment_offsets must start at 0 and end at P = 6, got 1 and 6",
    ),
    "segment_offsets_not_to_P": (
        _segmented([0, 3, P_ - 1]),
        ValueError,
        "segment_offsets must start at 0 and end at P = 6, got 0 and 5",
    ),
    "segment_offsets_past_P": (_segmented([0, 3, P_ + 1]), ValueError, "segment_offsets must start at 0 and end at P"),
    "segment_offsets_decreasing": (
        _segmented([0, 4, 2, P_]),
        ValueError,
        "segment_offsets must be non-decreasing, got 4 before 2",
    ),
    "segment_offsets_negative": (_segmented([0, -1, P_]), ValueError, "segment_offsets must be non-decreasing"),
    "segment_offsets_int32": (
        _segmented([0, 3, P_], dtype=torch.int32),
        TypeError,
        "segment_offsets must be an int64 tensor",
    ),
    "segment_offsets_float": (
        _segmented([0, 3, P_], dtype=torch.float64),
        TypeError,
        "segment_offsets must be an int64 tensor",
    ),
    "segment_offsets_2d": (
        _bad(lr=lambda c: torch.zeros(2, dtype=torch.float64), segment_offsets=lambda c: torch.tensor([[0, 3, P_]])),
        ValueError,
        "segment_offsets must be a 1-D",
    ),
    "theta0_wrong_length": (
        _bad(theta0=lambda c: torch.zeros(P_ + 1, dtype=torch.float64)),
        ValueError,
        r"theta0 must be \[P\] or \[T, P\]",
    ),
    "theta0_wrong_tasks": (
        _bad(theta0=lambda c: torch.zeros(T_ + 1, P_, dtype=torch.float64)),
        ValueError,
        r"theta0 must be \[P\] or \[T, P\]",
    ),
    "theta0_scalar": (
        _bad(theta0=lambda c: torch.zeros((), dtype=torch.float64)),
        ValueError,
        r"theta0 must be \[P\] or \[T, P\]",
    ),
    "theta0_dtype": (_bad(theta0=lambda c: c.theta0.float()), TypeError, "theta0 has dtype"),
    "prox_without_theta0": (_bad(theta0=None, prox=0.5), ValueError, r"theta0 is required when prox != 0"),
    "prox_nan": (_bad(prox=math.nan), ValueError, "prox must be finite"),
    "prox_inf": (_bad(prox=math.inf), ValueError, "prox must be finite"),
    "weight_decay_inf": (_bad(weight_decay=-math.inf), ValueError, "weight_decay must be finite"),
    "weight_decay_nan": (_bad(weight_decay=math.nan), ValueError, "weight_decay must be finite"),
}


@pytest.mark.parametrize("name", list(BAD_INNER_STEP))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD_INNER_STEP[name]
    case = build()
    with pytest.raises(error, match=match):
        case.step()
    with pytest.raises(error, match=match):
        OPS.inner_step(*case.args())
    grad_out = torch.zeros(case.theta.shape, dtype=case.theta.dtype if case.theta.is_floating_point() else None)
    with pytest.raises(error, match=match):
        OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK)
    with pytest.raises(error, match=match):
        OPS.inner_step_out(*case.args(), torch.empty(case.theta.shape, dtype=case.theta.dtype))


def test_bad_input_raises_through_autograd(backend):
    """The checks run on the differentiable path too (the autograd kernel must not swallow or reorder them)."""
    case = with_grad(make_case(T_, P_, torch.float64, "per_coordinate", "shared", 0.1, 0.1), DIFFERENTIABLE)
    with pytest.raises(ValueError, match=r"theta0 must be \[P\] or \[T, P\]"):
        metakernels.inner_step(case.theta, case.grad, case.lr, theta0=case.theta0[:-1], prox=0.1)
    with pytest.raises(ValueError, match="lr must be a scalar"):
        metakernels.inner_step(case.theta, case.grad, case.lr[:-1])


@pytest.mark.parametrize(
    "grad_out,error,match",
    [
        (lambda th: th[:, 1:], ValueError, "grad_out must have the shape of theta"),
        (lambda th: th.float(), TypeError, "grad_out has dtype"),
    ],
    ids=["shape", "dtype"],
)
def test_backward_bad_grad_out(backend, grad_out, error, match):
    case = make_case(T_, P_, torch.float64, "scalar")
    with pytest.raises(error, match=match):
        OPS.inner_step_backward(grad_out(case.theta), *case.args(), FULL_MASK)


# --- threads ------------------------------------------------------------------------------------------------

BIG_T, BIG_P = 8, 20011  # 160088 elements: the C++ kernels go parallel above 32768


BIG_OFFSETS = [0, 5, 2048, 10005, 10007, 10007, 14000, BIG_P]
"""Segments that straddle the two threads' column ranges ([0, 10006) and [10006, 20011)) and the 2048-column
tiles, with an empty one at the thread boundary."""


@pytest.mark.parametrize(
    "dtype,lr_mode,theta0_mode,offsets",
    [
        (torch.float32, "scalar", "per_task", None),
        (torch.float64, "per_coordinate", "shared", None),
        (torch.float32, "segmented", "shared", BIG_OFFSETS),
        (torch.float64, "segmented", "per_task", BIG_OFFSETS),
    ],
    ids=lambda x: str(x).removeprefix("torch.") if not isinstance(x, list) else "offsets",
)
def test_threads(backend, restore_threads, dtype, lr_mode, theta0_mode, offsets):
    case = make_case(BIG_T, BIG_P, dtype, lr_mode, theta0_mode, 0.3, 0.05, seed=22, offsets=offsets)
    grad_out = random_like(case.theta, seed=23)
    results = {}
    # The interpreter runs Triton programs one after another whatever torch's thread count: one pass is
    # enough there (and costs ~1 s per pass at this size).
    for threads in (2, 1) if backend != "triton" else (2,):
        torch.set_num_threads(threads)
        forward = case.step()
        outs = OPS.inner_step_backward(grad_out, *case.args(), FULL_MASK)
        check_forward(forward, case, f"inner_step ({threads} threads)")
        check_backward(outs, case, grad_out, what=f"inner_step_backward ({threads} threads)")
        results[threads] = (forward, *outs)
    if backend == "cpp":
        # Threads own disjoint columns and each element is computed by the same code: the elementwise
        # outputs (and a shared theta0's per-column sums) are bitwise independent of the thread count;
        # only the scalar/segmented d_lr reduction order differs.
        for i in (0, 1, 2, 4):
            assert torch.equal(results[1][i], results[2][i])


# --- backend selection ------------------------------------------------------------------------------------


def test_backend_fixture_selects_backend(backend):
    assert _backend.cpu_backend() == backend
