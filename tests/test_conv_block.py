"""Tests of metakernels::conv_block and conv_block_backward on every CPU backend.

Oracles: metakernels.reference.conv_block.conv_block_reference (one grouped conv + F.batch_norm + relu +
max_pool2d), itself checked against a per-task loop of nn.Conv2d / nn.BatchNorm2d / nn.ReLU / nn.MaxPool2d.

float64 results must agree with the reference to 1e-10 relative to the magnitudes involved. float32 results
are compared with the float64 reference evaluated at the same inputs, within first-order rounding-error
bounds derived in `Float32Bounds` (Higham's gamma_n = n*u/(1-n*u) for every dot product and sum, propagated
through the batch normalisation). Those bounds hold only while every pooling window's winner is the same in
both precisions, so the float32 cases first check that the gap between each window's two largest values is
far above the forward bound (a near-tie may legitimately route a gradient differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from metakernels.ops import conv_block
from metakernels.reference.conv_block import (
    conv_block_output_size,
    conv_block_reference,
    from_grouped,
    grouped_conv,
    routed_output_grad,
    saves_conv_out,
)

OPS = torch.ops.metakernels
FULL_MASK = [True, True, True, True, True]
NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias")


# --- inputs ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn_weight: torch.Tensor | None
    bn_bias: torch.Tensor | None
    stride: int = 1
    padding: int = 1
    eps: float = 1e-5
    pool: bool = True

    def tensors(self) -> tuple:
        return (self.x, self.weight, self.bias, self.bn_weight, self.bn_bias)

    def args(self) -> tuple:
        return (*self.tensors(), self.stride, self.padding, self.eps, self.pool)

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, eps=self.eps, pool=self.pool)

    def call(self) -> torch.Tensor:
        return conv_block(*self.tensors(), **self.kwargs())

    def reference(self) -> torch.Tensor:
        return conv_block_reference(*self.args())

    def out_shape(self) -> tuple[int, ...]:
        t, n, _, h, w = self.x.shape
        _, hp = conv_block_output_size(h, self.weight.shape[3], self.stride, self.padding, self.pool)
        _, wp = conv_block_output_size(w, self.weight.shape[3], self.stride, self.padding, self.pool)
        return (t, n, self.weight.shape[1], hp, wp)

    def requiring_grad(self) -> Case:
        return Case(*(None if t is None else t.detach().clone().requires_grad_() for t in self.tensors()),
                    self.stride, self.padding, self.eps, self.pool)

    def present(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in zip(NAMES, self.tensors(), strict=True) if t is not None]


def make_case(
    tasks: int = 2,
    images: int = 3,
    cin: int = 3,
    size: tuple[int, int] = (6, 6),
    cout: int = 4,
    k: int = 3,
    stride: int = 1,
    padding: int = 1,
    pool: bool = True,
    bias: bool = True,
    affine: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    eps: float = 1e-5,
) -> Case:
    """Random inputs drawn in float64 and rounded once to dtype. gamma has both signs (a negative gamma
    reverses which position wins a pooling window), beta shifts some channels mostly below the ReLU."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(tasks, images, cin, *size)
    w = randn(tasks, cout, cin, k, k, scale=(cin * k * k) ** -0.5)
    b = randn(tasks, cout) if bias else None
    g = randn(tasks, cout) if affine else None
    bb = randn(tasks, cout) if affine else None
    return Case(x, w, b, g, bb, stride, padding, eps, pool)


def per_task_nn_loop(case: Case) -> torch.Tensor:
    """The block as a research code base writes it: nn modules, one task at a time."""
    outs = []
    t_count, _, cin = case.x.shape[:3]
    cout, k = case.weight.shape[1], case.weight.shape[3]
    for t in range(t_count):
        conv = nn.Conv2d(cin, cout, k, case.stride, case.padding, bias=case.bias is not None).to(case.x.dtype)
        bn = nn.BatchNorm2d(cout, eps=case.eps, affine=case.bn_weight is not None, track_running_stats=False)
        bn = bn.to(case.x.dtype)
        params = {"0.weight": case.weight[t]}
        if case.bias is not None:
            params["0.bias"] = case.bias[t]
        if case.bn_weight is not None:
            params["1.weight"], params["1.bias"] = case.bn_weight[t], case.bn_bias[t]
        layers = [conv, bn, nn.ReLU()] + ([nn.MaxPool2d(2)] if case.pool else [])
        seq = nn.Sequential(*layers)
        outs.append(torch.func.functional_call(seq, params, (case.x[t],)))
    return torch.stack(outs)


def assert_channels_last_per_image(t: torch.Tensor, what: str) -> None:
    """t [T, N, C, H, W] is stored as [T, N, H, W, C] (strides of size-1 dimensions do not matter)."""
    _, n, c, h, w = t.shape
    want = (n * h * w * c, h * w * c, 1, w * c, c)
    for dim, (size, got, expected) in enumerate(zip(t.shape, t.stride(), want, strict=True)):
        assert size <= 1 or got == expected, f"{what}: stride {t.stride()} of shape {tuple(t.shape)}, dim {dim}"


def close64(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """float64 agreement: 1e-10 relative to the largest magnitude of the expected tensor (and elementwise)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


def reference_grads(case: Case, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    c = case.requiring_grad()
    present = c.present()
    grads = torch.autograd.grad(c.reference(), [t for _, t in present], grad_out)
    return {n: g for (n, _), g in zip(present, grads, strict=True)}


# --- the reference itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("bias,affine", [(True, True), (False, False)])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_reference_matches_per_task_nn_loop(pool, bias, affine, stride, padding):
    case = make_case(3, 2, 3, (7, 6), 5, 3, stride, padding, pool, bias, affine, seed=1).requiring_grad()
    ref, loop = case.reference(), per_task_nn_loop(case)
    close64(ref, loop, "reference forward")
    grad_out = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    inputs = [t for _, t in case.present()]
    for a, e, (n, _) in zip(torch.autograd.grad(ref, inputs, grad_out), torch.autograd.grad(loop, inputs, grad_out),
                            case.present(), strict=True):
        close64(a, e, f"reference d_{n}")


# --- forward -----------------------------------------------------------------------------------------------

# (cin, size, k, stride, padding): the direct few-tap path (Cin*k*k <= 27), the stored-conv path, odd sizes,
# stride 2, no padding, a 1x1 kernel.
GEOMETRIES = [
    (1, (6, 6), 3, 1, 1),
    (3, (7, 5), 3, 1, 1),
    (4, (9, 8), 3, 2, 1),
    (5, (5, 7), 3, 1, 0),
    (29, (4, 5), 1, 1, 0),
]


def check_forward(case: Case) -> None:
    out, conv_out, mean, invstd = OPS.conv_block(*case.args())
    expected = case.reference()
    assert out.shape == case.out_shape()
    assert_channels_last_per_image(out, "out")
    close64(out, expected, "out")
    cin, k = case.x.shape[2], case.weight.shape[3]
    z = from_grouped(grouped_conv(case.x, case.weight, None, case.stride, case.padding), case.x.shape[0])
    var, mu = torch.var_mean(z, dim=(1, 3, 4), correction=0)
    close64(mean, mu, "mean")
    close64(invstd, torch.rsqrt(var + case.eps), "invstd")
    if saves_conv_out(cin, k):
        assert_channels_last_per_image(conv_out, "conv_out")
        close64(conv_out, z, "conv_out")
    else:
        assert conv_out.numel() == 0


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_forward_matches_reference(backend, geometry, pool):
    cin, size, k, stride, padding = geometry
    check_forward(make_case(2, 3, cin, size, 4, k, stride, padding, pool, seed=3))


@pytest.mark.parametrize("bias,affine", [(False, True), (True, False), (False, False)])
def test_forward_optional_parameters(backend, bias, affine):
    for cin in (1, 4):
        check_forward(make_case(2, 2, cin, (6, 6), 3, 3, 1, 1, True, bias, affine, seed=4))


def test_matches_per_task_nn_loop(backend):
    """The op against nn layers task by task: forward and every gradient, float64."""
    for cin in (1, 5):
        case = make_case(3, 4, cin, (8, 8), 6, seed=5).requiring_grad()
        out, loop = case.call(), per_task_nn_loop(case)
        close64(out, loop, "out vs nn loop")
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        inputs = [t for _, t in case.present()]
        got = torch.autograd.grad(out, inputs, grad_out)
        expected = torch.autograd.grad(loop, inputs, grad_out)
        for (n, _), a, e in zip(case.present(), got, expected, strict=True):
            close64(a, e, f"d_{n} vs nn loop")


@pytest.mark.parametrize(
    "layout",
    ["channels_last_per_image", "nchw", "task_minor", "sliced"],
)
def test_input_layouts(backend, layout):
    """Any strides of x give the same result; the layout the op returns is read as is."""
    case = make_case(2, 3, 5, (6, 7), 4, seed=7)
    expected = case.reference()
    x = case.x
    if layout == "channels_last_per_image":
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif layout == "task_minor":  # physical [N, H, W, T, C]: what a grouped channels_last conv returns
        x = x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    elif layout == "sliced":
        big = torch.full((2, 3, 10, 6, 14), float("nan"), dtype=torch.float64)
        big[:, :, ::2, :, ::2] = x
        x = big[:, :, ::2, :, ::2]
    case.x = x
    close64(case.call(), expected, layout)


def test_shared_parameters_expanded(backend):
    """Parameters shared by all tasks arrive as stride-0 expansions of one tensor (the fused model call does
    this for parameters that are not adapted); gradients sum over the tasks."""
    for cin in (1, 5):
        case = make_case(3, 2, cin, (6, 6), 4, seed=24)
        shared = [t[0].clone().requires_grad_() for t in case.tensors()[1:]]
        expanded = [t.expand(3, *t.shape) for t in shared]
        out = conv_block(case.x, *expanded, **case.kwargs())
        ref = conv_block_reference(case.x, *expanded, *case.args()[5:])
        close64(out, ref, "expanded parameters")
        g = torch.randn(out.shape, dtype=torch.float64)
        for a, e in zip(torch.autograd.grad(out, shared, g), torch.autograd.grad(ref, shared, g), strict=True):
            close64(a, e, "shared parameter gradient")


def test_chained_blocks(backend):
    """Two blocks: the second reads the first's output layout; gradients flow through both."""
    a = make_case(2, 4, 1, (12, 12), 6, seed=8).requiring_grad()
    b = make_case(2, 4, 6, (6, 6), 5, seed=9).requiring_grad()
    out = conv_block(conv_block(*a.tensors(), **a.kwargs()), *b.tensors()[1:], **b.kwargs())
    ref = conv_block_reference(conv_block_reference(*a.args()), *b.args()[1:])
    close64(out, ref, "two blocks")
    inputs = [t for _, t in a.present()] + [t for n, t in b.present() if n != "x"]
    g = torch.randn(out.shape, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        close64(x, y, "two blocks gradient")


def test_large_outputs_default_backend():
    """Outputs past 8 MB (the C++ kernels ask for huge pages on those before the first write), forward and
    backward against the reference, on the default CPU backend (the interpreter would take minutes)."""
    case = make_case(1, 24, 5, (48, 48), 24, pool=False, seed=25)  # conv_out and out: 10.6 MB each
    check_forward(case)
    grad_out = torch.randn(case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(26))
    check_backward(case, grad_out)


# --- backward ------------------------------------------------------------------------------------------


def check_backward(case: Case, grad_out: torch.Tensor, mask: list[bool] = FULL_MASK) -> None:
    _, conv_out, mean, invstd = OPS.conv_block(*case.args())
    x, w, _, g, bb = case.tensors()
    outs = OPS.conv_block_backward(grad_out, x, w, g, bb, conv_out, mean, invstd, case.stride, case.padding,
                                   case.pool, mask)
    expected = reference_grads(case, grad_out)
    for i, (name, got) in enumerate(zip(NAMES, outs, strict=True)):
        if name == "bias" and mask[i]:
            # The bias cancels in the normalisation: exactly zero (the op does not see the bias; the mask decides).
            assert torch.equal(got, torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype))
            if case.bias is not None:
                close64(got, expected[name], "d_bias")
            continue
        if not mask[i] or case.tensors()[i] is None:
            assert got.numel() == 0, f"d_{name} masked out must be empty"
            continue
        if name == "x":
            assert_channels_last_per_image(got, "d_x")
        close64(got, expected[name], f"d_{name}")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_backward_matches_reference(backend, geometry, pool):
    cin, size, k, stride, padding = geometry
    case = make_case(2, 3, cin, size, 4, k, stride, padding, pool, seed=10)
    grad_out = torch.randn(case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    check_backward(case, grad_out)


@pytest.mark.parametrize("cin,k,stride", [(1, 3, 1), (3, 3, 2), (2, 2, 1), (5, 1, 1), (1, 5, 1)], ids=str)
def test_wide_blocks(backend, cin, k, stride):
    """Enough channels and columns for the C++ kernels' register tiles (16 float / 8 double lanes, 8 output
    columns) plus their remainders, for each direct-convolution kernel size (k = 1, 2, 3 tiles; 5 the plain
    loop) and for the stored path."""
    for dtype_cin in (cin, 7):  # 7 channels of a 3x3 (or larger) kernel take the stored path
        case = make_case(2, 2, dtype_cin, (11, 13), 20, k, stride, k // 2, True, seed=22)
        check_forward(case)
        grad_out = torch.randn(case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(23))
        check_backward(case, grad_out)
        check_backward(case, grad_out, [False, True, False, True, True])


@pytest.mark.parametrize(
    "mask",
    [[False, True, False, False, False], [True, False, False, False, False], [False, False, False, True, True],
     [False, True, True, False, True], [False] * 5],
    ids=lambda m: "".join("1" if b else "0" for b in m),
)
@pytest.mark.parametrize("cin", [1, 4])
def test_backward_masks(backend, mask, cin):
    case = make_case(2, 2, cin, (6, 6), 3, seed=12)
    grad_out = torch.randn(case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    check_backward(case, grad_out, mask)


def test_backward_without_affine(backend):
    case = make_case(2, 3, 4, (6, 5), 3, bias=False, affine=False, seed=14)
    check_backward(case, torch.randn(case.out_shape(), dtype=torch.float64))


@pytest.mark.parametrize("cin,k", [(2, 1), (30, 1)], ids=["direct", "stored"])
def test_pool_ties_and_relu_zeros(backend, cin, k):
    """Windows whose values tie exactly (equal inputs under a 1x1 conv give bitwise-equal y), including the
    all-zero windows ReLU makes: the gradient goes where torch's max_pool2d backward sends it."""
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(2, 3, cin, 3, 3, generator=gen, dtype=torch.float64)
    x = base.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # every 2x2 window constant
    x[:, :, :, 0::2, 1::2] += (torch.rand(2, 3, cin, 3, 3, generator=gen, dtype=torch.float64) > 0.5).double()
    w = torch.randn(2, 4, cin, 1, 1, generator=gen, dtype=torch.float64)
    # beta pushes two channels mostly below zero: many windows become all-zero after the ReLU
    bb = torch.tensor([[0.0, -3.0, 0.5, -1.5]] * 2, dtype=torch.float64)
    case = Case(x, w, None, torch.ones(2, 4, dtype=torch.float64), bb, 1, 0, 1e-5, True)
    out = case.reference()
    assert (out == 0).any() and (out > 0).any()
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    check_backward(case, grad_out)
    close64(case.call(), out, "forward with ties")


# --- gradcheck / gradgradcheck ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cin,pool,stride",
    [(1, True, 1), (3, True, 1), (2, False, 2)],
    ids=["direct_pool", "stored_pool", "stored_nopool_stride2"],
)
def test_gradcheck_and_gradgradcheck(backend, cin, pool, stride):
    # cin=3 with k=3 is 27 taps (direct path); 4 channels give 36 (stored path).
    cin = 4 if cin == 3 else cin
    case = make_case(2, 2, cin, (5, 4), 2, 3, stride, 1, pool, seed=16).requiring_grad()
    # A larger eps keeps the normalisation well conditioned for the finite differences.
    case.eps = 0.1

    def fn(*tensors):
        return conv_block(*tensors, **case.kwargs())

    inputs = case.tensors()
    # The first derivative is the fused backward of the backend under test: its full Jacobian is compared
    # (projected on random vectors on the interpreter, ~1 ms per Triton program: fast mode still fails for
    # any wrong entry with probability 1). The second derivative comes from the reference composition on
    # every backend (the create_graph path), so its check runs in fast mode: the full Jacobian of a
    # backward w.r.t. all inputs and grad_out costs minutes on 2 cores.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_second_order_maml_pattern(backend):
    """An inner step with create_graph through the block, then the meta-gradient: against the reference."""

    def meta_grad(block):
        case = make_case(2, 3, 4, (6, 6), 3, seed=17)
        w = case.weight.clone().requires_grad_()
        g = case.bn_weight.clone().requires_grad_()
        inner = (block(case.x, w, g, case.bn_bias) ** 2).sum()
        dw, dg = torch.autograd.grad(inner, (w, g), create_graph=True)
        fast_w, fast_g = w - 0.1 * dw, g - 0.1 * dg
        outer = (block(case.x.flip(1), fast_w, fast_g, case.bn_bias) ** 3).sum()
        return torch.autograd.grad(outer, (w, g))

    got = meta_grad(lambda x, w, g, bb: conv_block(x, w, None, g, bb))
    expected = meta_grad(lambda x, w, g, bb: conv_block_reference(x, w, None, g, bb, 1, 1, 1e-5, True))
    for a, e in zip(got, expected, strict=True):
        close64(a, e, "meta-gradient")


def _compiled_block_loss(x, w, g, bb):
    return (conv_block(x, w, None, g, bb) ** 2).sum()


# One compiled function for the module: the graph depends only on the fake kernels, not on the backend.
_COMPILED_BLOCK_LOSS = torch.compile(_compiled_block_loss, fullgraph=True, backend="aot_eager")


def test_torch_compile_matches_eager(backend):
    case = make_case(2, 3, 4, (6, 6), 3, seed=27).requiring_grad()
    args = (case.x, case.weight, case.bn_weight, case.bn_bias)
    eager, compiled = _compiled_block_loss(*args), _COMPILED_BLOCK_LOSS(*args)
    close64(compiled, eager, "compiled loss")
    for a, e in zip(torch.autograd.grad(compiled, args), torch.autograd.grad(eager, args), strict=True):
        close64(a, e, "compiled gradient")


# --- opcheck ---------------------------------------------------------------------------------------------


# opcheck costs ~3 s a case: both conv paths with autograd, and the plain (no-grad) dispatch once.
@pytest.mark.parametrize("cin,requires_grad", [(1, True), (4, True), (4, False)], ids=["direct", "stored", "nograd"])
def test_opcheck(backend, cin, requires_grad):
    case = make_case(2, 2, cin, (6, 5), 3, seed=18)
    if requires_grad:
        case = case.requiring_grad()
    torch.library.opcheck(OPS.conv_block.default, case.args())
    _, conv_out, mean, invstd = OPS.conv_block(*[t.detach() if isinstance(t, torch.Tensor) else t
                                                 for t in case.args()])
    grad_out = torch.randn(case.out_shape(), dtype=torch.float64)
    x, w, _, g, bb = (None if t is None else t.detach() for t in case.tensors())
    for mask in (FULL_MASK, [False, True, False, True, False]):
        torch.library.opcheck(
            OPS.conv_block_backward.default,
            (grad_out, x, w, g, bb, conv_out, mean, invstd, case.stride, case.padding, case.pool, mask),
        )


# --- hypothesis ------------------------------------------------------------------------------------------


@st.composite
def conv_block_cases(draw):
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, 1))
    pool = draw(st.booleans())
    h = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
    w = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
    images = draw(st.integers(1, 3))
    ho, _ = conv_block_output_size(h, k, stride, padding, pool)
    wo, _ = conv_block_output_size(w, k, stride, padding, pool)
    assume(h + 2 * padding >= k and w + 2 * padding >= k)
    assume(images * ho * wo >= 2 and (not pool or (ho >= 2 and wo >= 2)))
    cin = draw(st.sampled_from([1, 2, 3, 5, 13]))  # 13 channels of a 3x3 kernel take the stored path
    case = make_case(
        draw(st.integers(1, 4)), images, cin, (h, w), draw(st.integers(1, 5)), k, stride, padding, pool,
        draw(st.booleans()), draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


@given(conv_block_cases())
def test_hypothesis_matches_reference(backend, case):
    check_forward(case)
    check_backward(case, torch.randn(case.out_shape(), dtype=torch.float64))


# --- float32 ---------------------------------------------------------------------------------------------


def gamma_n(n: float) -> float:
    u = torch.finfo(torch.float32).eps / 2
    return n * u / (1 - n * u)


class Float32Bounds:
    """First-order bounds on |float32 kernel - exact| for a case whose pooling winners are unambiguous.

    Forward, per (task, channel) c over its M conv outputs, with K = Cin*k*k taps and A = conv(|x|, |w|):
      conv output   Dz_c = gamma_K * max A_c                              (each dot product, Higham 3.5)
      mean          Dm_c = Dz_c + gamma_M * mean|z|_c                      (perturbed terms + the sum)
      variance      Dv_c = 2*std_c*Dm_c + Dm_c^2 + gamma_M * var_c        (centred terms move by <= Dm_c)
      x_hat         E_c  = invstd_c*(Dz_c + Dm_c) + max|x_hat|_c * Dv_c / (2*(var_c + eps))
      y, out        |gamma_c| * E_c + 4u * (|gamma_c| max|x_hat|_c + |beta_c|)  (ReLU and max are 1-Lipschitz)
    Backward, with the routed dy and S1 = sum dy, S2 = sum dy*x_hat:
      S1            gamma_M * sum|dy|                            S2  sum|dy|*E_c + gamma_M * sum|dy*x_hat|
      dz            |k_c|*(err S1/M + E_c*|S2|/M + max|x_hat|*err S2/M) + (rel err k + 4u)*max|dz|_abs
                    (k = gamma*invstd, |dz|_abs = |k|(|dy| + |S1|/M + |x_hat S2|/M))
      d_w           err dz * sum|x| over each tap's positions + gamma_M * conv_backward(|dz|_abs, |x|)
      d_x           conv_transpose(err dz, |w|) + gamma_(Cout k k) * conv_transpose(|dz|_abs, |w|)
    """

    def __init__(self, case: Case):
        c64 = Case(*(None if t is None else t.double() for t in case.tensors()), case.stride, case.padding,
                   case.eps, case.pool)
        self.case, self.c64 = case, c64
        t = case.x.shape[0]
        x, w = c64.x, c64.weight
        self.z = from_grouped(grouped_conv(x, w, None, case.stride, case.padding), t)
        a = from_grouped(grouped_conv(x.abs(), w.abs(), None, case.stride, case.padding), t)
        k_taps = w.shape[2] * w.shape[3] * w.shape[4]
        self.m = self.z.shape[1] * self.z.shape[3] * self.z.shape[4]
        var, mean = torch.var_mean(self.z, dim=(1, 3, 4), correction=0)
        self.var, self.mean, self.std = var, mean, var.sqrt()
        self.invstd = torch.rsqrt(var + case.eps)
        xhat = (self.z - mean[:, None, :, None, None]) * self.invstd[:, None, :, None, None]
        self.xhat = xhat
        self.max_xhat = xhat.abs().amax(dim=(1, 3, 4))
        dz_ = gamma_n(k_taps) * a.amax(dim=(1, 3, 4))
        dm = dz_ + gamma_n(self.m) * self.z.abs().mean(dim=(1, 3, 4))
        dv = 2 * self.std * dm + dm**2 + gamma_n(self.m) * var
        self.e = self.invstd * (dz_ + dm) + self.max_xhat * dv / (2 * (var + case.eps))
        self.rel_invstd = dv / (2 * (var + case.eps))
        self.gamma = torch.ones_like(mean) if c64.bn_weight is None else c64.bn_weight
        self.beta = torch.zeros_like(mean) if c64.bn_bias is None else c64.bn_bias
        u = torch.finfo(torch.float32).eps / 2
        self.out_tol = self.gamma.abs() * self.e + 4 * u * (self.gamma.abs() * self.max_xhat + self.beta.abs())
        self.k_taps = k_taps

    def window_gap_ok(self) -> bool:
        """Every pooling window (every position without pool) decides the same in both precisions: a winner
        above 0 beats the runner-up by more than twice the forward bound, or the whole window lies below
        the ReLU by more than it. Each float32 y is within out_tol of the exact y, so then the float32
        kernel routes each gradient exactly where the float64 reference does."""
        y = self.xhat * self.gamma[:, None, :, None, None] + self.beta[:, None, :, None, None]
        tol = 2 * self.out_tol[:, None, :, None, None]
        if not self.case.pool:
            return bool((y.abs() > tol).all())
        t, n, c, h, w = y.shape
        y = y[:, :, :, : h // 2 * 2, : w // 2 * 2].reshape(t, n, c, h // 2, 2, w // 2, 2)
        y = y.permute(0, 1, 2, 3, 5, 4, 6).reshape(t, n, c, h // 2, w // 2, 4)
        top2 = y.topk(2, dim=-1).values
        top, gap = top2[..., 0], top2[..., 0] - top2[..., 1]
        return bool(((top < -tol) | ((top > tol) & (gap > tol))).all())

    def per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, None, :, None, None]

    def check_forward(self, out: torch.Tensor) -> None:
        expected = conv_block_reference(*self.c64.args())
        err = (out.double() - expected).abs()
        tol = self.per_channel(self.out_tol).expand_as(err)
        assert (err <= tol).all(), f"float32 forward: max excess {(err - tol).max().item():.3e}"

    def check_backward(self, grad_out: torch.Tensor, got: dict[str, torch.Tensor]) -> None:
        case, c64 = self.case, self.c64
        go = grad_out.double()
        expected = reference_grads(c64, go)
        # routed dy in float64 (routing identical in both precisions: window_gap_ok)
        pc = self.per_channel
        y = self.xhat * pc(self.gamma) + pc(self.beta)
        dy = routed_output_grad(y, go, case.pool)
        s1 = dy.sum(dim=(1, 3, 4))
        s2 = (dy * self.xhat).sum(dim=(1, 3, 4))
        u = torch.finfo(torch.float32).eps / 2
        gm = gamma_n(self.m + 8)
        e_s1 = gm * dy.abs().sum(dim=(1, 3, 4))
        e_s2 = dy.abs().sum(dim=(1, 3, 4)) * self.e + gm * (dy * self.xhat).abs().sum(dim=(1, 3, 4))
        k = self.gamma * self.invstd
        dz_abs = pc(k.abs()) * (dy.abs() + pc(s1.abs() / self.m) + self.xhat.abs() * pc(s2.abs() / self.m))
        e_dz = k.abs() * (e_s1 / self.m + self.e * s2.abs() / self.m + self.max_xhat * e_s2 / self.m)
        e_dz = e_dz + (self.rel_invstd + 8 * u) * dz_abs.amax(dim=(1, 3, 4))
        tols = {"bn_bias": e_s1 + 4 * u * s1.abs(), "bn_weight": e_s2 + 4 * u * s2.abs()}
        t = case.x.shape[0]
        x64, w64 = c64.x, c64.weight
        xg = x64.abs().permute(1, 0, 2, 3, 4).flatten(1, 2)
        wg = w64.abs().reshape(-1, *w64.shape[2:])

        def conv_bw(d: torch.Tensor, mask):
            return torch.ops.aten.convolution_backward(
                d.permute(1, 0, 2, 3, 4).flatten(1, 2), xg, wg, None, [case.stride] * 2, [case.padding] * 2, [1, 1],
                False, [0, 0], t, mask)

        ones_err = pc(e_dz).expand_as(dz_abs).contiguous()
        gx1, gw1, _ = conv_bw(ones_err, [True, True, False])
        gx2, gw2, _ = conv_bw(dz_abs, [True, True, False])
        tols["weight"] = (gw1 + gamma_n(self.m + 8) * gw2).reshape(w64.shape) * (1 + 1e-3)
        tols["x"] = from_grouped(gx1 + gamma_n(self.k_taps * 0 + w64.shape[1] * w64.shape[3] ** 2 + 8) * gx2, t)
        tols["x"] = tols["x"] * (1 + 1e-3)
        for name, g in got.items():
            if name == "bias":
                assert torch.equal(g, torch.zeros_like(g))
                continue
            err = (g.double() - expected[name]).abs()
            tol = tols[name]
            assert (err <= tol).all(), f"float32 d_{name}: max excess {(err - tol).max().item():.3e}"


@pytest.mark.parametrize("cin", [1, 8], ids=["direct", "stored"])
@pytest.mark.parametrize("pool", [True, False])
def test_float32_within_rounding_bounds(backend, cin, pool):
    for seed in range(100, 140):  # the first seed whose windows all have a clear winner
        # 17 channels and 9 columns: the C++ kernels' 16-lane, 8-column register tiles and their remainders
        case = make_case(2, 2, cin, (9, 9), 17, 3, 1, 1, pool, dtype=torch.float32, seed=seed)
        bounds = Float32Bounds(case)
        if bounds.window_gap_ok():
            break
    else:
        pytest.fail("no seed with unambiguous pooling windows")
    out, conv_out, mean, invstd = OPS.conv_block(*case.args())
    assert out.dtype == torch.float32
    bounds.check_forward(out)
    grad_out = torch.randn(case.out_shape(), generator=torch.Generator().manual_seed(19))
    x, w, _, g, bb = case.tensors()
    outs = OPS.conv_block_backward(grad_out, x, w, g, bb, conv_out, mean, invstd, 1, 1, pool, FULL_MASK)
    bounds.check_backward(grad_out, dict(zip(NAMES, outs, strict=True)))


# --- bad input -------------------------------------------------------------------------------------------


def _bad(**changes):
    def build() -> Case:
        case = make_case(2, 3, 2, (6, 6), 4, seed=20)
        for name, f in changes.items():
            setattr(case, name, f(case) if callable(f) else f)
        return case

    return build


BAD = {
    "x_4d": (_bad(x=lambda c: c.x[0]), ValueError, r"x must be a 5-D \[T, N, Cin, H, W\] tensor"),
    "x_int": (_bad(x=lambda c: c.x.long()), TypeError, "x must be float32 or float64"),
    "x_bf16": (_bad(x=lambda c: c.x.bfloat16()), TypeError, "x must be float32 or float64"),
    "x_no_tasks": (_bad(x=lambda c: c.x[:0], weight=lambda c: c.weight[:0], bias=None, bn_weight=None, bn_bias=None),
                   ValueError, r"x is an empty task batch \(T = 0\)"),
    "x_no_images": (_bad(x=lambda c: c.x[:, :0]), ValueError, r"x has no images \(N = 0\)"),
    "weight_4d": (_bad(weight=lambda c: c.weight[0]), ValueError, r"weight must be a 5-D \[T, Cout, Cin, k, k\]"),
    "weight_dtype": (_bad(weight=lambda c: c.weight.float()), TypeError, "weight has dtype"),
    "weight_tasks": (_bad(weight=lambda c: c.weight[:1]), ValueError, "weight has 1 tasks but x has 2"),
    "channel_mismatch": (_bad(weight=lambda c: c.weight[:, :, :1]), ValueError,
                         "weight expects Cin = 1 input channels but x has 2"),
    "weight_not_square": (_bad(weight=lambda c: c.weight[..., :2]), ValueError, "square, non-empty k x k kernel"),
    "bias_shape": (_bad(bias=lambda c: c.bias[:, :2]), ValueError, r"bias must be \[T, Cout\] = \[2, 4\]"),
    "bn_weight_shape": (_bad(bn_weight=lambda c: c.bn_weight[0]), ValueError, r"bn_weight must be \[T, Cout\]"),
    "bn_bias_dtype": (_bad(bn_bias=lambda c: c.bn_bias.float()), TypeError, "bn_bias has dtype"),
    "stride_zero": (_bad(stride=0), ValueError, "stride must be >= 1"),
    "padding_negative": (_bad(padding=-1), ValueError, "padding must be >= 0"),
    "eps_zero": (_bad(eps=0.0), ValueError, "eps must be finite and > 0"),
    "eps_nan": (_bad(eps=float("nan")), ValueError, "eps must be finite and > 0"),
    "x_smaller_than_kernel": (_bad(x=lambda c: c.x[..., :1, :1], padding=0), ValueError,
                              "x's spatial size 1 x 1 .* smaller than the 3 x 3 kernel"),
    "one_value_per_channel": (_bad(x=lambda c: c.x[:, :1, :, :3, :3], padding=0, pool=False), ValueError,
                              r"x gives one conv output value per channel"),
    "pool_too_small": (_bad(x=lambda c: c.x[..., :3, :3], padding=0), ValueError,
                       "pool needs a conv output of at least 2 x 2"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_argument(backend, name):
    build, error, match = BAD[name]
    case = build()
    with pytest.raises(error, match=match):
        case.call()
    with pytest.raises(error, match=match):
        OPS.conv_block(*case.args())


def test_backward_bad_arguments(backend):
    case = make_case(2, 3, 4, (6, 6), 3, seed=21)
    _, conv_out, mean, invstd = OPS.conv_block(*case.args())
    x, w, _, g, bb = case.tensors()
    go = torch.zeros(case.out_shape(), dtype=torch.float64)

    def call(**kw):
        a = dict(grad_out=go, conv_out=conv_out, mean=mean, invstd=invstd, mask=FULL_MASK)
        a.update(kw)
        return OPS.conv_block_backward(a["grad_out"], x, w, g, bb, a["conv_out"], a["mean"], a["invstd"], 1, 1, True,
                                       a["mask"])

    with pytest.raises(ValueError, match="grad_out must be the block output's shape"):
        call(grad_out=go[:, :, :, :1])
    with pytest.raises(TypeError, match="grad_out has dtype"):
        call(grad_out=go.float())
    with pytest.raises(ValueError, match="conv_out must be empty or"):
        call(conv_out=conv_out[:, :1])
    with pytest.raises(ValueError, match=r"mean must be \[T, Cout\]"):
        call(mean=mean[:1])
    with pytest.raises(ValueError, match=r"invstd must be \[T, Cout\]"):
        call(invstd=invstd[:, :1])
