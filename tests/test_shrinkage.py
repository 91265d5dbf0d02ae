"""metakernels.ShrinkageIMAML: implicit gradients of the centre theta and the per-module log-variances.

Oracles (nothing from metakernels):
  (a) closed form: for a loss quadratic in the weights, the proximal inner problem
      argmin L_train(phi) + sum_m lambda_m / 2 ||phi_m - theta_m||^2 has the solution
      phi* = (H + Lam)^-1 (c + Lam theta);
      autograd through torch.linalg.solve, and central finite differences of the outer loss through phi*, give
      the exact meta-gradients in theta and s = log sigma^2;
  (b) dense: on a tanh MLP (non-quadratic), a naive per-task inner loop, dense Hessians and torch.linalg.solve
      evaluate the documented formulas Lam y and lambda_m y_m^T (phi_m - theta_m), (H + Lam) y = g, at the same phi.
All in float64. Tolerances: the inner loop runs until its contraction bound (1 - mu/L)^k is below 1e-14 and CG to a
1e-12 relative residual, so the learner's gradients carry errors of order 1e-12 * cond(H + Lam) (cond < 20 here);
1e-8 leaves room for that and for float64 rounding over a few hundred iterations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from naive_meta import sinusoid_batch
from torch import nn
from torch.func import functional_call

import metakernels as mk

DT = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)


class TwoBlocks(nn.Module):
    """pred = a(x[:, :2]) + b(x[:, 2:]): quadratic MSE in all four tensors; a custom forward (the vmap path)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x[..., :2]) + self.b(x[..., 2:])


def linear_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 2)) if kind == "sequential" else TwoBlocks()
    return model.to(DT)


def regression_batch(num_tasks=3, shots=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_tasks, 4, 2, generator=g, dtype=DT)
    x = torch.randn(num_tasks, 2 * shots, 4, generator=g, dtype=DT)
    y = x @ w + 0.1 * torch.randn(num_tasks, 2 * shots, 2, generator=g, dtype=DT)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def task_loss(model, flat, x, y):
    return F.mse_loss(functional_call(model, unflatten(model, flat), (x,)), y)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


MODULE_OF = {"parameter": lambda name: name, "layer": lambda name: name.rpartition(".")[0]}


def coordinate_lambdas(learner: mk.ShrinkageIMAML, log_variance: torch.Tensor, modules: str) -> torch.Tensor:
    """[P] lambda of each coordinate from [M] log-variances, mapped by parameter names (not the learner's maps)."""
    lam_of_module = dict(zip(learner.module_names, torch.exp(-log_variance), strict=True))
    return torch.cat(
        [lam_of_module[MODULE_OF[modules](n)].expand(p.numel()) for n, p in learner.model.named_parameters()]
    )


def module_mask(learner: mk.ShrinkageIMAML, m: int, modules: str) -> torch.Tensor:
    """[P] bool: the coordinates of module m."""
    names = [MODULE_OF[modules](n) for n, p in learner.model.named_parameters() for _ in range(p.numel())]
    return torch.tensor([n == learner.module_names[m] for n in names])


def make_learner(model, modules, variances, **kwargs) -> mk.ShrinkageIMAML:
    learner = mk.ShrinkageIMAML(model, init_variance=1.0, loss_fn=F.mse_loss, modules=modules, **kwargs)
    with torch.no_grad():
        learner.log_variance.copy_(torch.tensor(variances, dtype=DT).log())
    return learner


def closed_form_outer_loss(model, learner, modules, theta, log_variance, xs, ys, xq, yq):
    """(1/T) sum_t L_test,t(phi*_t(theta, lambda)), differentiable in theta and log_variance."""
    lam = coordinate_lambdas(learner, log_variance, modules)
    total = 0.0
    for t in range(xs.shape[0]):
        point = theta.detach()
        hess = torch.autograd.functional.hessian(lambda w, t=t: task_loss(model, w, xs[t], ys[t]), point)
        grad = torch.autograd.functional.jacobian(lambda w, t=t: task_loss(model, w, xs[t], ys[t]), point)
        c = hess @ point - grad  # the loss is 1/2 w^T H w - c^T w + const
        phi = torch.linalg.solve(hess + torch.diag(lam), c + lam * theta)
        total = total + task_loss(model, phi, xq[t], yq[t])
    return total / xs.shape[0]


def inner_schedule(model, learner, modules, xs, ys) -> tuple[float, int]:
    """inner_lr = 1/L and the steps k with (1 - mu/L)^k <= 1e-14, from the dense H_t + Lam of every task."""
    lam = coordinate_lambdas(learner, learner.log_variance.detach(), modules)
    point = flat_params(model)
    eigs = torch.cat(
        [
            torch.linalg.eigvalsh(
                torch.autograd.functional.hessian(lambda w, t=t: task_loss(model, w, xs[t], ys[t]), point)
                + torch.diag(lam)
            )
            for t in range(xs.shape[0])
        ]
    )
    mu, big = eigs.min().item(), eigs.max().item()
    steps = math.ceil(math.log(1e-14) / math.log(1 - mu / big))
    assert mu > 0 and steps < 3000
    return 1.0 / big, steps


def learner_grads(learner, xs, ys, xq, yq) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    learner.zero_grad()
    loss = learner.meta_loss(xs, ys, xq, yq)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])
    return loss.detach(), grads, learner.log_variance.grad.clone()


# --- (a) converged inner problem: closed form and finite differences ---------------------------------------------
CASES = [
    ("sequential", "parameter", [0.5, 2.0]),
    ("sequential", "layer", [0.7]),
    ("two_blocks", "parameter", [0.5, 2.0, 1.0, 0.25]),
    ("two_blocks", "layer", [0.4, 1.5]),
]


@pytest.mark.parametrize("kind,modules,variances", CASES)
def test_converged_quadratic_matches_closed_form(kind, modules, variances):
    model = linear_model(kind)
    xs, ys, xq, yq = regression_batch()
    probe = make_learner(model, modules, variances, inner_lr=0.1, inner_steps=1, cg_steps=1)
    lr, steps = inner_schedule(model, probe, modules, xs, ys)
    learner = make_learner(model, modules, variances, inner_lr=lr, inner_steps=steps, cg_steps=40, tol=1e-12)
    assert len(learner.module_names) == len(variances)
    loss, g_theta, g_s = learner_grads(learner, xs, ys, xq, yq)

    theta = flat_params(model).requires_grad_()
    s = learner.log_variance.detach().clone().requires_grad_()
    exact = closed_form_outer_loss(model, learner, modules, theta, s, xs, ys, xq, yq)
    e_theta, e_s = torch.autograd.grad(exact, (theta, s))
    torch.testing.assert_close(loss, exact.detach(), **TOL)
    torch.testing.assert_close(g_theta, e_theta, **TOL)
    torch.testing.assert_close(g_s, e_s, **TOL)
    assert (e_s.abs() > 1e-4).all()  # every module's variance gradient is non-trivial here


@pytest.mark.parametrize("kind,modules,variances", CASES[:1] + CASES[3:])
def test_closed_form_gradients_match_finite_differences(kind, modules, variances):
    """Central differences (h = 1e-5, error O(h^2) ~ 1e-10) of the outer loss through the converged inner
    solution agree with the learner's implicit gradients, in every log-variance and a few theta coordinates."""
    model = linear_model(kind)
    xs, ys, xq, yq = regression_batch(seed=3)
    probe = make_learner(model, modules, variances, inner_lr=0.1, inner_steps=1, cg_steps=1)
    lr, steps = inner_schedule(model, probe, modules, xs, ys)
    learner = make_learner(model, modules, variances, inner_lr=lr, inner_steps=steps, cg_steps=40, tol=1e-12)
    _, g_theta, g_s = learner_grads(learner, xs, ys, xq, yq)
    theta, s = flat_params(model), learner.log_variance.detach().clone()
    h = 1e-5

    def outer(th, lv):
        with torch.no_grad():
            return closed_form_outer_loss(model, learner, modules, th, lv, xs, ys, xq, yq).item()

    for m in range(s.numel()):
        e = torch.zeros_like(s)
        e[m] = h
        fd = (outer(theta, s + e) - outer(theta, s - e)) / (2 * h)
        assert fd == pytest.approx(g_s[m].item(), rel=1e-6, abs=1e-9)
    for i in (0, theta.numel() // 2, theta.numel() - 1):
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (outer(theta + e, s) - outer(theta - e, s)) / (2 * h)
        assert fd == pytest.approx(g_theta[i].item(), rel=1e-6, abs=1e-9)


# --- (b) non-quadratic: dense Hessians at the learner's phi ------------------------------------------------------
def tanh_mlp(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


@pytest.mark.parametrize("modules,variances", [("parameter", [0.05, 0.2, 0.1, 0.08]), ("layer", [0.05, 0.2])])
@pytest.mark.parametrize("fused", [True, False])
def test_dense_hessian_reference(modules, variances, fused):
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=5)
    steps, lr = 6, 0.02
    learner = make_learner(
        model, modules, variances, inner_lr=lr, inner_steps=steps, cg_steps=60, tol=1e-13, fused=fused
    )
    loss, g_theta, g_s = learner_grads(learner, xs, ys, xq, yq)
    s = learner.log_variance.detach()
    lam = coordinate_lambdas(learner, s, modules)
    theta = flat_params(model)
    d_theta, d_s, losses = 0.0, 0.0, []
    for t in range(xs.shape[0]):
        phi = theta.clone()
        for _ in range(steps):  # naive proximal gradient descent
            w = phi.clone().requires_grad_()
            (g,) = torch.autograd.grad(task_loss(model, w, xs[t], ys[t]), w)
            phi = phi - lr * (g + lam * (phi - theta))
        hess = torch.autograd.functional.hessian(lambda w, t=t: task_loss(model, w, xs[t], ys[t]), phi)
        w = phi.clone().requires_grad_()
        query = task_loss(model, w, xq[t], yq[t])
        (g_test,) = torch.autograd.grad(query, w)
        losses.append(query.detach())
        y = torch.linalg.solve(hess + torch.diag(lam), g_test)
        d_theta = d_theta + lam * y
        contrib = y * (phi - theta)
        per_module = torch.stack([contrib[module_mask(learner, m, modules)].sum() for m in range(s.numel())])
        d_s = d_s + torch.exp(-s) * per_module
    T = xs.shape[0]
    torch.testing.assert_close(loss, torch.stack(losses).mean(), **TOL)
    torch.testing.assert_close(g_theta, d_theta / T, **TOL)
    torch.testing.assert_close(g_s, d_s / T, **TOL)
    assert (g_s.abs() > 1e-6).all()


# --- consistency with iMAML, training loop, semantics ------------------------------------------------------------
def test_theta_gradient_is_imaml_with_per_tensor_lam():
    """Same value and theta-gradient as iMAML given lam = 1 / sigma^2 per parameter tensor."""
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=5)
    variances = [0.05, 0.2, 0.1, 0.08]
    learner = make_learner(model, "parameter", variances, inner_lr=0.02, inner_steps=4, cg_steps=20)
    loss, g_theta, _ = learner_grads(learner, xs, ys, xq, yq)
    model.zero_grad()
    imaml = mk.iMAML(
        model, inner_lr=0.02, inner_steps=4, lam=[1 / v for v in variances], cg_steps=20, loss_fn=F.mse_loss
    )
    ref = imaml.meta_loss(xs, ys, xq, yq)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        g_theta, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), rtol=1e-12, atol=1e-14
    )


@pytest.mark.filterwarnings("ignore:.*negative curvature:RuntimeWarning")
def test_negative_curvature_mode_is_imaml_s():
    """Wide priors (lam ~0.1: H + Lam indefinite on this tanh MLP) make the stop rule stop tasks; with
    negative_curvature="continue" the learner runs iMAML's plain CG: the same theta-gradient as iMAML's."""
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=5)
    variances = [10.0, 8.0, 12.0, 9.0]
    hyper = dict(inner_lr=0.02, inner_steps=4, cg_steps=8, tol=0.0)
    stopping = make_learner(model, "parameter", variances, **hyper)
    _, g_stop, _ = learner_grads(stopping, xs, ys, xq, yq)
    assert (stopping.last_solve.status == mk.functional.cg.CG_NEGATIVE_CURVATURE).any()  # not vacuous
    plain = make_learner(model, "parameter", variances, negative_curvature="continue", **hyper)
    assert "negative_curvature='continue'" in repr(plain)
    loss, g_theta, g_s = learner_grads(plain, xs, ys, xq, yq)
    assert not (plain.last_solve.status == mk.functional.cg.CG_NEGATIVE_CURVATURE).any()
    assert torch.isfinite(g_s).all()
    model.zero_grad()
    # plain's own precisions (exp(-log sigma^2) may differ from 1 / sigma^2 in the last bit, and plain CG on an
    # indefinite system amplifies such differences far beyond what the definite case sees)
    lam = list(plain.lam)
    imaml = mk.iMAML(model, lam=lam, loss_fn=F.mse_loss, negative_curvature="continue", **hyper)
    imaml.meta_loss(xs, ys, xq, yq).backward()
    torch.testing.assert_close(
        g_theta, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), rtol=1e-12, atol=1e-14
    )
    assert not torch.allclose(g_theta, g_stop, rtol=1e-6, atol=0)


def test_outer_optimizer_learns_variances_and_state_dict():
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=2, shots=5)
    learner = mk.ShrinkageIMAML(
        model, inner_lr=0.02, inner_steps=3, init_variance=0.1, cg_steps=10, loss_fn=F.mse_loss, modules="layer"
    )
    assert learner.module_names == ["0", "2"]
    assert learner.variances() == pytest.approx({"0": 0.1, "2": 0.1})
    assert any(p is learner.log_variance for p in learner.parameters())
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    before = learner.log_variance.detach().clone()
    learner.meta_loss(xs, ys, xq, yq).backward()
    grad = learner.log_variance.grad.clone()
    opt.step()
    torch.testing.assert_close(learner.log_variance.detach(), before - 0.5 * grad)
    assert not torch.equal(before, learner.log_variance.detach())
    # Scaled losses scale both gradients (the surrogate follows grad_output).
    learner.zero_grad()
    (3.0 * learner.meta_loss(xs, ys, xq, yq)).backward()
    learner_3 = learner.log_variance.grad.clone()
    learner.zero_grad()
    learner.meta_loss(xs, ys, xq, yq).backward()
    torch.testing.assert_close(learner_3, 3.0 * learner.log_variance.grad, rtol=1e-12, atol=0)
    clone = mk.ShrinkageIMAML(
        tanh_mlp(seed=3),
        inner_lr=0.02,
        inner_steps=3,
        init_variance=5.0,
        cg_steps=10,
        loss_fn=F.mse_loss,
        modules="layer",
    )
    clone.load_state_dict(learner.state_dict())
    assert clone.variances() == pytest.approx(learner.variances())


def test_adapt_uses_current_variances():
    """adapt after the log-variances change (an optimizer step, a checkpoint load) uses the new precisions."""
    model = tanh_mlp()
    xs, ys, _, _ = sinusoid_batch(num_tasks=2, shots=5)
    learner = mk.ShrinkageIMAML(model, inner_lr=0.02, inner_steps=3, init_variance=0.1, cg_steps=10, loss_fn=F.mse_loss)
    with torch.no_grad():
        learner.log_variance.fill_(math.log(1e3))  # lambda = 1e-3 instead of the initial 10
    free = mk.iMAML(model, inner_lr=0.02, inner_steps=3, lam=1e-3, cg_steps=10, loss_fn=F.mse_loss)
    torch.testing.assert_close(learner.adapt(xs, ys).flat, free.adapt(xs, ys).flat, rtol=1e-13, atol=0)


def test_custom_module_grouping():
    model = tanh_mlp()
    learner = mk.ShrinkageIMAML(
        model,
        inner_lr=0.02,
        inner_steps=1,
        init_variance=1.0,
        cg_steps=1,
        loss_fn=F.mse_loss,
        modules=lambda name: "bias" if name.endswith("bias") else "weight",
    )
    assert learner.module_names == ["weight", "bias"]
    assert learner.log_variance.shape == (2,)


def test_bad_inputs():
    model = tanh_mlp()
    common = dict(inner_lr=0.02, inner_steps=1, cg_steps=1, loss_fn=F.mse_loss)
    for variance in (0.0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="init_variance"):
            mk.ShrinkageIMAML(model, init_variance=variance, **common)
    with pytest.raises(ValueError, match="modules"):
        mk.ShrinkageIMAML(model, init_variance=1.0, modules="block", **common)
    with pytest.raises(TypeError, match="modules"):
        mk.ShrinkageIMAML(model, init_variance=1.0, modules=3, **common)
    with pytest.raises(ValueError, match="inner_lr"):
        mk.ShrinkageIMAML(model, init_variance=1.0, **{**common, "inner_lr": 0.0})


def test_skipped_tasks_are_left_out_of_the_variance_gradient():
    """nonfinite='skip': a task whose inner loss overflows is dropped from both gradients, as iMAML drops it."""
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=5)
    ys = ys.clone()
    ys[1] *= 1e300  # its squared error overflows to inf
    kwargs = dict(inner_lr=0.02, inner_steps=3, init_variance=0.1, cg_steps=20, loss_fn=F.mse_loss)
    learner = mk.ShrinkageIMAML(model, nonfinite="skip", **kwargs)
    with pytest.warns(RuntimeWarning, match=r"skipping tasks \[1\]"):
        _, g_theta, g_s = learner_grads(learner, xs, ys, xq, yq)
    keep = torch.tensor([0, 2])
    _, e_theta, e_s = learner_grads(learner, xs[keep], ys[keep], xq[keep], yq[keep])
    torch.testing.assert_close(g_theta, e_theta, rtol=1e-13, atol=0)
    torch.testing.assert_close(g_s, e_s, rtol=1e-13, atol=0)
    with pytest.raises(FloatingPointError, match="tasks"):
        mk.ShrinkageIMAML(model, **kwargs).meta_loss(xs, ys, xq, yq)
