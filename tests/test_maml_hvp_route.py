"""Second-order MAML by reverse Hessian-vector products (learners/_hvp_route.py) equals the unrolled path.

The unrolled path (autograd through the inner loop) is itself checked against a naive per-task loop in
test_learners_exact.py; here both paths run on the same learner configuration in float64, where they must
agree to rounding (~1e-12 relative: the same products summed in a different order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive_meta import image_batch, make_convnet, make_mlp, sinusoid_batch
from torch import nn

import metakernels as mk
from metakernels.learners import _hvp_route

TOL = dict(rtol=1e-10, atol=1e-12)


def _meta_grad(learner: mk.MAML, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model = learner.model
    for p in model.parameters():
        p.grad = None
    loss = learner.meta_loss(*batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _both(make_learner, batch):
    return _meta_grad(make_learner("unroll"), batch), _meta_grad(make_learner("hvp"), batch)


def _regression_convnet() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 2),
    ).to(torch.float64)


def _regression_batch(num_tasks: int = 2):
    g = torch.Generator().manual_seed(4)
    xs, xq = (torch.randn(num_tasks, 4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ys, yq = (torch.randn(num_tasks, 4, 2, generator=g, dtype=torch.float64) for _ in range(2))
    return xs, ys, xq, yq


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_hvp_route_equals_unrolled_conv_maml(steps, weight_decay):
    model = make_convnet()
    batch = image_batch()

    def learner(mode):
        return mk.MAML(
            model,
            inner_lr=0.3,
            inner_steps=steps,
            loss_fn=F.cross_entropy,
            weight_decay=weight_decay,
            meta_gradient=mode,
        )

    (loss_u, grad_u), (loss_h, grad_h) = _both(learner, batch)
    torch.testing.assert_close(loss_h, loss_u, **TOL)
    torch.testing.assert_close(grad_h, grad_u, **TOL)
    assert grad_u.abs().max() > 1e-3  # a real gradient, not two zeros


def test_hvp_route_with_mse_head_and_negative_rate():
    # A regression head (MSE, tanh hidden layer) and a negative inner rate: the route assumes no sign.
    model = _regression_convnet()

    def learner(mode):
        return mk.MAML(model, inner_lr=-0.05, inner_steps=2, loss_fn=F.mse_loss, meta_gradient=mode)

    (loss_u, grad_u), (loss_h, grad_h) = _both(learner, _regression_batch())
    torch.testing.assert_close(loss_h, loss_u, **TOL)
    torch.testing.assert_close(grad_h, grad_u, **TOL)


def _tanh_classifier_mlp() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).to(torch.float64)


def _classification_batch(num_tasks: int = 3):
    g = torch.Generator().manual_seed(6)
    xs, xq = (torch.randn(num_tasks, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ys, yq = (torch.randint(0, 4, (num_tasks, 5), generator=g) for _ in range(2))
    return xs, ys, xq, yq


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("net", ["relu_mse", "tanh_cross_entropy"])
def test_hvp_route_equals_unrolled_mlp_maml(steps, weight_decay, net):
    # Whole MLPs: each H v is one call of the fused R-operator kernel (mlp_loss_grad_backward).
    if net == "relu_mse":
        model, batch, loss_fn, lr = make_mlp(), sinusoid_batch(), F.mse_loss, 0.01
    else:
        model, batch, loss_fn, lr = _tanh_classifier_mlp(), _classification_batch(), F.cross_entropy, 0.5

    def learner(mode):
        return mk.MAML(
            model, inner_lr=lr, inner_steps=steps, loss_fn=loss_fn, weight_decay=weight_decay, meta_gradient=mode
        )

    (loss_u, grad_u), (loss_h, grad_h) = _both(learner, batch)
    torch.testing.assert_close(loss_h, loss_u, **TOL)
    torch.testing.assert_close(grad_h, grad_u, **TOL)
    assert grad_u.abs().max() > 0


def test_auto_takes_the_route_on_conv_nets_and_whole_mlps(monkeypatch):
    calls = []
    original = _hvp_route.hvp_route_meta_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_hvp_route, "hvp_route_meta_loss", counting)
    conv = mk.MAML(make_convnet(), inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy)
    _meta_grad(conv, image_batch())
    assert len(calls) == 1
    mlp = mk.MAML(make_mlp(), inner_lr=0.01, inner_steps=1, loss_fn=F.mse_loss)
    _meta_grad(mlp, sinusoid_batch())
    assert len(calls) == 2  # whole MLPs: the fused R-operator kernel
    # Not a loss the fused kernels implement: the unrolled path.
    _meta_grad(mk.MAML(make_mlp(), inner_lr=0.01, inner_steps=1, loss_fn=F.l1_loss), sinusoid_batch())
    assert len(calls) == 2
    # First order and evaluation never take it (nothing second-order to compute).
    fo = mk.FOMAML(make_convnet(), inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy)
    _meta_grad(fo, image_batch())
    with torch.no_grad():
        conv.meta_loss(*image_batch())
    assert len(calls) == 2


@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_hvp_route_skips_nonfinite_tasks_like_the_unrolled_path(net):
    if net == "conv":
        model, (xs, ys, xq, yq), lr, steps = _regression_convnet(), _regression_batch(num_tasks=3), 0.1, 1
    else:
        model, (xs, ys, xq, yq), lr, steps = make_mlp(), sinusoid_batch(num_tasks=3), 0.01, 2
    ys = ys.clone()
    ys[1] = 1e200  # task 1's support loss overflows to inf (finite inputs: they pass the input checks)

    def learner(mode, nonfinite="skip"):
        return mk.MAML(
            model, inner_lr=lr, inner_steps=steps, loss_fn=F.mse_loss, nonfinite=nonfinite, meta_gradient=mode
        )

    with pytest.warns(RuntimeWarning, match=r"skipping tasks \[1\]"):
        (loss_u, grad_u) = _meta_grad(learner("unroll"), (xs, ys, xq, yq))
    with pytest.warns(RuntimeWarning, match=r"skipping tasks \[1\]"):
        (loss_h, grad_h) = _meta_grad(learner("hvp"), (xs, ys, xq, yq))
    torch.testing.assert_close(loss_h, loss_u, **TOL)
    torch.testing.assert_close(grad_h, grad_u, **TOL)
    assert torch.isfinite(grad_h).all()
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        learner("hvp", nonfinite="raise").meta_loss(xs, ys, xq, yq)


@pytest.mark.parametrize(
    "make, why",
    [
        (
            # an MLP with a loss the fused R-operator does not implement
            lambda: mk.MAML(make_mlp(), inner_lr=0.01, inner_steps=1, loss_fn=F.l1_loss, meta_gradient="hvp"),
            "R-operators cover",
        ),
        (
            lambda: mk.MetaSGD(make_convnet(), inner_steps=1, loss_fn=F.cross_entropy, meta_gradient="hvp"),
            "learning rates",
        ),
        (
            lambda: mk.MAML(make_convnet(), inner_lr=0.3, inner_steps=0, loss_fn=F.cross_entropy, meta_gradient="hvp"),
            "no inner steps",
        ),
        (
            lambda: mk.MAML(
                make_convnet(),
                inner_lr=0.3,
                inner_steps=1,
                loss_fn=F.cross_entropy,
                meta_gradient="hvp",
                hessian_penalty=0.1,
            ),
            "Hessian penalty",
        ),
        (
            lambda: mk.MAML(
                make_convnet(),
                inner_lr=0.3,
                inner_steps=1,
                loss_fn=F.cross_entropy,
                meta_gradient="hvp",
                adapt_filter=lambda name, p: not name.startswith("9."),
            ),
            "not adapted",
        ),
        (
            lambda: mk.MAML(
                make_convnet(), inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy, meta_gradient="hvp", fused=False
            ),
            "fused=False",
        ),
    ],
)
def test_forced_route_names_why_it_does_not_apply(make, why):
    learner = make()
    batch = sinusoid_batch() if isinstance(learner.model[0], nn.Linear) else image_batch()
    with pytest.raises(ValueError, match=why):
        learner.meta_loss(*batch)


def test_refused_cases_fall_back_under_auto():
    # Meta-SGD on the conv net: "auto" quietly takes the unrolled path, whose result test_learners_exact checks.
    learner = mk.MetaSGD(make_convnet(), inner_steps=1, loss_fn=F.cross_entropy)
    loss, grad = _meta_grad(learner, image_batch())
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_meta_gradient_argument_is_validated():
    with pytest.raises(ValueError, match="meta_gradient"):
        mk.MAML(make_convnet(), inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy, meta_gradient="implicit")


def test_route_keeps_no_graph_through_the_inner_loop():
    learner = mk.MAML(make_convnet(), inner_lr=0.3, inner_steps=2, loss_fn=F.cross_entropy, meta_gradient="hvp")
    loss = learner.meta_loss(*image_batch())
    # One node: the precomputed gradient, whose inputs are the parameters' AccumulateGrad leaves.
    assert type(loss.grad_fn).__name__ == "PrecomputedGradientBackward"
    leaves = {type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None}
    assert leaves == {"AccumulateGrad"}


def test_differentiating_the_precomputed_meta_gradient_again_raises_a_clear_error():
    model = make_convnet()
    loss = mk.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy).meta_loss(*image_batch())
    with pytest.raises(RuntimeError, match="meta_gradient='unroll'"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    # The unrolled path keeps the graph of the meta-gradient itself.
    unrolled = mk.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn=F.cross_entropy, meta_gradient="unroll")
    grads = torch.autograd.grad(unrolled.meta_loss(*image_batch()), list(model.parameters()), create_graph=True)
    assert grads[0].requires_grad


@pytest.mark.parametrize("net", ["classifier", "regression"])
def test_conv_hessian_operator_returns_the_gradient_and_losses_it_computes(net):
    # The route takes the last inner step's losses and gradient from the operator's own forward and backward.
    from metakernels.functional.conv_rop import ConvNetHessian
    from metakernels.functional.hvp import conv_rop_case

    if net == "classifier":
        model, (xs, ys, _, _), loss_fn = make_convnet(), image_batch(), F.cross_entropy
    else:
        model, (xs, ys, _, _), loss_fn = _regression_convnet(), _regression_batch(), F.mse_loss
    learner = mk.MAML(model, inner_lr=0.1, inner_steps=1, loss_fn=loss_fn)
    theta = learner.layout.flatten_module(model).detach()
    phi = (theta + 0.01 * torch.randn(xs.shape[0], theta.numel(), dtype=theta.dtype)).contiguous()
    stages, kind = conv_rop_case(model, learner.layout, loss_fn, phi, xs, ys)
    op = ConvNetHessian(stages, learner.layout, phi, xs, ys, kind, with_gradient=True)
    losses, grad = learner._detached_loss_grad(phi, xs, ys)
    torch.testing.assert_close(op.losses, losses, **TOL)
    torch.testing.assert_close(op.gradient, grad, **TOL)
    # and the products are those of the operator built without it
    v = torch.randn_like(phi)
    torch.testing.assert_close(op(v), ConvNetHessian(stages, learner.layout, phi, xs, ys, kind)(v), rtol=0, atol=0)
