"""metakernels.hvp / hvp_operator: H_t v_t of every task against dense per-task Hessians (float64, 1e-10).

Oracle: torch.autograd.functional.hessian of each task's loss, written per task with plain torch functions
(nothing from metakernels), times v_t. Paths: the fused whole-MLP R-operator (mse and cross-entropy heads),
double backward through the fused layer ops (conv + BatchNorm blocks, a non-standard loss, a parameter
subset), and the generic torch.func.vmap path (a model no fused plan covers, and fused=False).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS
from naive_meta import convnet_functional, image_batch, make_convnet, sinusoid_batch
from torch import nn
from torch.func import functional_call

import metakernels as mk
from metakernels import _backend
from metakernels.functional.hvp import conv_rop_case, fused_mlp_case

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64

# The interpreted Triton kernels (~ms per launch) serve the MLP cases only; the ops' own tests cover them.
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]


@pytest.fixture(params=FAST_BACKENDS)
def backend(request):
    previous = _backend.cpu_backend()
    _backend.set_cpu_backend(request.param)
    try:
        yield request.param
    finally:
        _backend.set_cpu_backend(previous)


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    previous = _backend.cpu_backend()
    _backend.set_cpu_backend(request.param)
    try:
        yield request.param
    finally:
        _backend.set_cpu_backend(previous)


# --- models and their per-task functional forms (the oracle's side) ----------------------------------------
def mlp(sizes, activation: type[nn.Module], seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(DT)


class Generic(nn.Module):
    """Softplus MLP with a residual connection: no fused plan covers it (custom forward), so vmap serves it."""

    def __init__(self, width=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(2, width)
        self.b = nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        self.to(DT)

    def forward(self, x):
        h = F.softplus(self.a(x))
        return self.head(h + torch.tanh(self.b(h)))


def split(model: nn.Module, p: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A flat [P] vector as name -> tensor in registration order (of ``names``, default all parameters)."""
    own = dict(model.named_parameters())
    names = names or list(own)
    out, offset = {}, 0
    for n in names:
        out[n] = p[offset : offset + own[n].numel()].view(own[n].shape)
        offset += own[n].numel()
    assert offset == p.numel()
    return out


def task_loss_fn(model: nn.Module, loss_fn, names: list[str] | None = None, conv: bool = False):
    """(p [P], x_t, y_t) -> scalar loss of one task, in plain torch."""

    def f(p, x, y):
        params = split(model, p, names)
        if conv:
            return loss_fn(convnet_functional(list(params.values()), x), y)
        full = {**dict(model.named_parameters()), **params}
        return loss_fn(functional_call(model, full, (x,)), y)

    return f


def dense_hessians(f, flat: torch.Tensor, x, y) -> torch.Tensor:
    """[T, P, P] per-task Hessians (vectorize=True: ~6x faster here, identical values to the looped version)."""
    rows = []
    for t in range(flat.shape[0]):
        h = torch.autograd.functional.hessian(lambda p, t=t: f(p, x[t], y[t]), flat[t].detach(), vectorize=True)
        # the oracle itself is sane (torch.func.jacrev(jacrev(f)) is not on the conv net in torch 2.13: its
        # "Hessian" is asymmetric by 0.5, so it is not used)
        torch.testing.assert_close(h, h.T, rtol=1e-12, atol=1e-12)
        rows.append(h)
    return torch.stack(rows)


def dense_hvp(f, flat: torch.Tensor, x, y, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tij,tj->ti", dense_hessians(f, flat, x, y), v)


def perturbed(model: nn.Module, num_tasks: int, scale=0.1, seed=3) -> torch.Tensor:
    """[T, P] per-task parameters near the model's (each task different)."""
    g = torch.Generator().manual_seed(seed)
    base = mk.ParameterLayout.from_module(model).flatten_module(model).detach()
    return base + scale * torch.randn(num_tasks, base.numel(), generator=g, dtype=DT)


def directions(flat: torch.Tensor, seed=4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(flat.shape, generator=g, dtype=DT)


def classification_batch(num_tasks=3, n=6, features=4, classes=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, n, features, generator=g, dtype=DT)
    y = torch.randint(0, classes, (num_tasks, n), generator=g)
    return x, y


def quartic(pred, target):
    return (pred - target).pow(4).mean()


def regression2d(num_tasks=3, n=7, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, n, 2, generator=g, dtype=DT)
    return x, torch.randn(num_tasks, n, 1, generator=g, dtype=DT)


# Each case: (model, x, y, loss_fn, oracle's per-task loss, whether the fused whole-MLP R-operator serves it)
def case(name: str):
    if name in ("mlp_tanh", "mlp_relu"):
        model = mlp((1, 8, 8, 1), nn.Tanh if name == "mlp_tanh" else nn.ReLU)
        xs, ys, _, _ = sinusoid_batch(3)
        return model, xs, ys, F.mse_loss, task_loss_fn(model, F.mse_loss), True
    if name == "mlp_ce":
        model = mlp((4, 8, 3), nn.Tanh)
        x, y = classification_batch()
        return model, x, y, F.cross_entropy, task_loss_fn(model, F.cross_entropy), True
    if name == "mlp_quartic":  # a loss the whole-MLP kernel does not know: double backward through task_linear
        model = mlp((1, 6, 1), nn.Tanh)
        xs, ys, _, _ = sinusoid_batch(3)
        return model, xs, ys, quartic, task_loss_fn(model, quartic), False
    if name == "convnet":  # 8x8 inputs, 2 filters: P = 93 (the dense Hessians dominate the test's time)
        model = make_convnet(channels=2)
        xs, ys, _, _ = image_batch()
        return model, xs, ys, F.cross_entropy, task_loss_fn(model, F.cross_entropy, conv=True), False
    if name == "generic":
        model = Generic()
        x, y = regression2d()
        return model, x, y, F.mse_loss, task_loss_fn(model, F.mse_loss), False
    raise KeyError(name)


CASES = ["mlp_tanh", "mlp_relu", "mlp_ce", "mlp_quartic", "convnet", "generic"]


# --- against the dense Hessian ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_hvp_matches_dense_hessian(backend, name):
    model, x, y, loss_fn, f, fused_mlp = case(name)
    flat = perturbed(model, x.shape[0])
    v = directions(flat)
    layout = mk.ParameterLayout.from_module(model)
    assert (fused_mlp_case(model, layout, loss_fn, flat, x, y) is not None) == fused_mlp  # the path under test
    hessians = dense_hessians(f, flat, x, y)
    expected = torch.einsum("tij,tj->ti", hessians, v)
    assert expected.abs().max() > 1e-3  # a non-trivial Hessian
    for fused in (True, False):
        got = mk.hvp(model, flat, x, y, v, loss_fn=loss_fn, fused=fused)
        torch.testing.assert_close(got, expected, **TOL)
        assert not got.requires_grad
        op = mk.hvp_operator(model, flat, x, y, loss_fn=loss_fn, fused=fused)
        for k in range(3):  # the operator reuses its graph: repeated calls, different directions
            w = v * (k + 1) - 0.5 * k * flat
            torch.testing.assert_close(op(w), torch.einsum("tij,tj->ti", hessians, w), **TOL)


def conv_variant(loss: str, seed=0):
    """Conv blocks the R-operator must get right beyond the 4-conv net: no conv bias, BatchNorm without affine
    parameters, a block without pooling, stride 2 and no padding, an odd size (7 -> pool floors to 3), two
    linear layers (tanh) after Flatten; batch statistics only (no running buffers: the oracle is vmapped)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, affine=False, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 3, stride=2, padding=0),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2, 4),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).to(DT)
    with torch.no_grad():
        model[5].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 6, 1, 7, 7, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (3, 6), generator=g)
        y[1, 2] = -100  # F.cross_entropy's ignore_index: left out of that task's mean
        return model, x, y, F.cross_entropy
    return model, x, torch.randn(3, 6, 3, generator=g, dtype=DT), F.mse_loss


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_conv_r_operator_variants(loss):
    model, x, y, loss_fn = conv_variant(loss)
    flat = perturbed(model, 3, scale=0.3)
    layout = mk.ParameterLayout.from_module(model)
    assert conv_rop_case(model, layout, loss_fn, flat, x, y) is not None  # the R-operator serves it
    v = directions(flat)
    expected = dense_hvp(task_loss_fn(model, loss_fn), flat, x, y, v)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(mk.hvp(model, flat, x, y, v, loss_fn=loss_fn), expected, **TOL)
    torch.testing.assert_close(mk.hvp_operator(model, flat, x, y, loss_fn=loss_fn)(v), expected, **TOL)
    torch.testing.assert_close(mk.hvp(model, flat, x, y, v, loss_fn=loss_fn, fused=False), expected, **TOL)


def test_mlp_r_operator_on_every_backend(any_backend):
    model, x, y, loss_fn, f, _ = case("mlp_tanh")
    flat = perturbed(model, x.shape[0])
    v = directions(flat)
    torch.testing.assert_close(mk.hvp(model, flat, x, y, v, loss_fn=loss_fn), dense_hvp(f, flat, x, y, v), **TOL)


def test_hvp_on_a_parameter_subset():
    """TaskParams with a layout adapting only the head: the body is shared, H is the head block of the Hessian."""
    model = mlp((1, 6, 6, 1), nn.Tanh)
    xs, ys, _, _ = sinusoid_batch(3)
    names = ["2.weight", "2.bias"]
    layout = mk.ParameterLayout.from_module(model, lambda n, _: n in names)
    base = layout.flatten_module(model).detach()
    flat = base + 0.1 * torch.randn(3, base.numel(), dtype=DT, generator=torch.Generator().manual_seed(0))
    v = directions(flat)
    expected = dense_hvp(task_loss_fn(model, F.mse_loss, names), flat, xs, ys, v)
    for fused in (True, False):
        got = mk.hvp(model, mk.TaskParams(flat, layout), xs, ys, v, loss_fn=F.mse_loss, fused=fused)
        torch.testing.assert_close(got, expected, **TOL)


def test_expanded_params_and_one_task():
    """Every task at the model's own weights (an expanded, stride-0 [T, P] view), and T = 1."""
    model, x, y, loss_fn, f, _ = case("convnet")
    flat = mk.TaskParams.from_module(model, x.shape[0]).flat.detach()
    assert flat.stride(0) == 0
    v = directions(flat)
    torch.testing.assert_close(mk.hvp(model, flat, x, y, v, loss_fn=loss_fn), dense_hvp(f, flat, x, y, v), **TOL)
    torch.testing.assert_close(
        mk.hvp(model, flat[:1], x[:1], y[:1], v[:1], loss_fn=loss_fn), dense_hvp(f, flat[:1], x, y, v[:1]), **TOL
    )


def test_linear_model_has_zero_hessian_under_a_linear_loss():
    """A loss linear in the parameters: the gradient has no graph; hvp returns zeros, not an autograd error."""
    model = nn.Linear(3, 1).to(DT)
    x, _ = regression2d()
    x = torch.cat([x, x[..., :1]], 2)

    def linear_loss(pred, target):
        return (pred * target).mean()

    y = torch.ones(3, 7, 1, dtype=DT)
    flat = perturbed(model, 3)
    v = directions(flat)
    assert mk.hvp(model, flat, x, y, v, loss_fn=linear_loss).abs().max() == 0
    assert mk.hvp_operator(model, flat, x, y, loss_fn=linear_loss)(v).abs().max() == 0


# --- create_graph: a differentiable product ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_ce", "mlp_quartic", "generic"])
@pytest.mark.parametrize("fused", [True, False])
def test_create_graph_gradcheck(backend, name, fused):
    """Finite differences of v -> H(theta) v and theta -> H(theta) v (tiny sizes: gradcheck's Jacobians)."""
    model, x, y, loss_fn, _, _ = case(name)
    # gradcheck builds full Jacobians by finite differences (2 * T * P columns): the smallest models
    if name == "mlp_tanh":
        model = mlp((1, 3, 1), nn.Tanh)
    elif name == "mlp_ce":
        model, x, y = mlp((4, 3, 3), nn.Tanh), x[..., :4], y
    flat = perturbed(model, 2).requires_grad_()
    v = directions(flat.detach()).requires_grad_()
    x, y = x[:2], y[:2]

    def fn(theta, w):
        return mk.hvp(model, theta, x, y, w, loss_fn=loss_fn, create_graph=True, fused=fused)

    assert fn(flat, v).requires_grad
    assert torch.autograd.gradcheck(fn, (flat, v), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp_tanh", "convnet", "generic"])
def test_create_graph_third_derivative(backend, name):
    """d(v^T H v)/d theta against a dense third-derivative reference (autograd through the dense Hessian)."""
    model, x, y, loss_fn, f, _ = case(name)
    flat = perturbed(model, 2).requires_grad_()
    v = directions(flat.detach())
    x, y = x[:2], y[:2]
    ours = torch.autograd.grad((v * mk.hvp(model, flat, x, y, v, loss_fn=loss_fn, create_graph=True)).sum(), flat)[0]
    rows = []
    for t in range(2):
        p = flat[t].detach().requires_grad_()
        h = torch.autograd.functional.hessian(lambda q, t=t: f(q, x[t], y[t]), p, create_graph=True, vectorize=True)
        rows.append(torch.autograd.grad(v[t] @ h @ v[t], p)[0])
    torch.testing.assert_close(ours, torch.stack(rows), **TOL)


def test_create_graph_reaches_the_model_parameters():
    """params expanded from the model (TaskParams.from_module): the gradient of sum_t v^T H_t v reaches them."""
    model, x, y, loss_fn, f, _ = case("mlp_tanh")
    fast = mk.TaskParams.from_module(model, x.shape[0])
    v = directions(fast.flat.detach())
    (v * mk.hvp(model, fast, x, y, v, loss_fn=loss_fn, create_graph=True)).sum().backward()
    got = mk.ParameterLayout.from_module(model).flatten({n: p.grad for n, p in model.named_parameters()})
    base = fast.flat[0].detach()
    expected = torch.zeros_like(base)
    for t in range(x.shape[0]):
        p = base.clone().requires_grad_()
        h = torch.autograd.functional.hessian(lambda q, t=t: f(q, x[t], y[t]), p, create_graph=True, vectorize=True)
        expected += torch.autograd.grad(v[t] @ h @ v[t], p)[0]
    torch.testing.assert_close(got, expected, **TOL)


def test_without_create_graph_nothing_is_recorded():
    model, x, y, loss_fn, _, _ = case("convnet")
    flat = perturbed(model, x.shape[0]).requires_grad_()
    v = directions(flat.detach()).requires_grad_()
    assert not mk.hvp(model, flat, x, y, v, loss_fn=loss_fn).requires_grad
    with torch.no_grad():  # create_graph under no_grad: nothing to differentiate, same values
        a = mk.hvp(model, flat, x, y, v, loss_fn=loss_fn, create_graph=True)
    assert not a.requires_grad
    torch.testing.assert_close(a, mk.hvp(model, flat, x, y, v, loss_fn=loss_fn), **TOL)


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    model, x, y, loss_fn, _, _ = case("mlp_tanh")
    flat = perturbed(model, x.shape[0])
    v = directions(flat)
    with pytest.raises(ValueError, match="v must have the shape of params"):
        mk.hvp(model, flat, x, y, v[:, :-1], loss_fn=loss_fn)
    with pytest.raises(ValueError, match="v must have the shape of params"):
        mk.hvp(model, flat, x, y, v[:2], loss_fn=loss_fn)
    with pytest.raises(TypeError, match="v has dtype"):
        mk.hvp(model, flat, x, y, v.float(), loss_fn=loss_fn)
    with pytest.raises(TypeError, match="v must be a tensor"):
        mk.hvp(model, flat, x, y, v.tolist(), loss_fn=loss_fn)
    with pytest.raises(ValueError, match="x has 2 tasks but params has T = 3"):
        mk.hvp(model, flat, x[:2], y, v, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="y has 2 tasks"):
        mk.hvp(model, flat, x, y[:2], v, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="y has 4 examples per task but x has 5"):
        mk.hvp(model, flat, x, y[:, :4], v, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="params has P = "):
        mk.hvp(model, flat[:, 1:], x, y, v[:, 1:], loss_fn=loss_fn)
    with pytest.raises(ValueError, match="params must be a 2-D"):
        mk.hvp(model, flat[0], x, y, v[0], loss_fn=loss_fn)
    with pytest.raises(TypeError, match="params must be a"):
        mk.hvp(model, flat.tolist(), x, y, v, loss_fn=loss_fn)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mk.hvp(lambda z: z, flat, x, y, v, loss_fn=loss_fn)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        mk.hvp(model, flat, x, y, v, loss_fn="mse")
    with pytest.raises(ValueError, match="x must be \\[T, N, ...\\]"):
        mk.hvp(model, flat, x[:, 0, 0], y, v, loss_fn=loss_fn)
    op = mk.hvp_operator(model, flat, x, y, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="hvp_operator: v must have the shape of params"):
        op(v[:, :3])
    op = mk.hvp_operator(model, flat, x, y, loss_fn=loss_fn, fused=False)
    with pytest.raises(TypeError, match="hvp_operator: v has dtype"):
        op(v.float())
