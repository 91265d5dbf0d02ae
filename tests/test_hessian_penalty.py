"""Hessian Frobenius penalty: Hutchinson estimates of ||H_t||_F^2 and the learners' weighted penalty term.

Oracles: closed-form diagonal Hessians, dense per-task Hessians from torch.autograd.functional.hessian, finite
differences (gradcheck), and a plain per-task autograd loop for the learners (nothing from metakernels).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from naive_meta import naive_adapt, sinusoid_batch
from torch import nn
from torch.func import functional_call

import metakernels as mk
from metakernels.functional.hessian_penalty import hessian_penalty

TOL = dict(rtol=1e-9, atol=1e-9)


# --- models ---------------------------------------------------------------------------------------------------
class Scale(nn.Module):
    """pred = x * w (elementwise over P features): an MSE loss is a quadratic in w with a diagonal Hessian.
    Not an nn.Sequential of known layers, so the generic (vmap) path serves it."""

    def __init__(self, p: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(p, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Wrapped(nn.Module):
    """A tanh MLP hidden in a custom container: same function as the Sequential, generic (vmap) path."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def tanh_mlp(sizes=(1, 6, 6, 1), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(torch.float64)


def tanh_functional(params, x):
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            x = torch.tanh(x)
    return x


def flat_of(model: nn.Module, num_tasks: int, seed: int = 4, scale: float = 0.3) -> torch.Tensor:
    """[T, P] per-task parameters: the model's, perturbed differently per task."""
    g = torch.Generator().manual_seed(seed)
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return base + scale * torch.randn(num_tasks, base.numel(), generator=g, dtype=base.dtype)


def dense_hessians(model: nn.Module, flat: torch.Tensor, x, y, loss_fn, create_graph=False) -> torch.Tensor:
    """[T, P, P] Hessian of each task's loss at flat[t], by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def loss_at(vec, xt, yt):
        chunks = torch.split(vec, [math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (xt,)), yt)

    return torch.stack(
        [
            torch.autograd.functional.hessian(lambda v, t=t: loss_at(v, x[t], y[t]), flat[t], create_graph=create_graph)
            for t in range(flat.shape[0])
        ]
    )


def probes_like(seed: int, probes: int, flat: torch.Tensor) -> torch.Tensor:
    """The probes hessian_penalty draws from a generator seeded with ``seed`` (its documented recipe)."""
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randint(0, 2, (probes, *flat.shape), generator=g) - 1).to(flat.dtype)


# --- the estimator ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["vmap", "fused"])
def test_one_probe_is_exact_on_a_diagonal_quadratic(path):
    """||H v||^2 = sum_i H_ii^2 v_i^2 = ||H||_F^2 for every Rademacher v when H is diagonal."""
    num_tasks, shots, p = 3, 5, 7
    g = torch.Generator().manual_seed(0)
    if path == "vmap":
        model = Scale(p)
        x = torch.randn(num_tasks, shots, p, generator=g, dtype=torch.float64)
        y = torch.randn(num_tasks, shots, p, generator=g, dtype=torch.float64)
        # L = 1/(N P) sum_{n,i} (x_ni w_i - y_ni)^2  ->  H_ii = 2/(N P) sum_n x_ni^2
        diag = 2.0 / (shots * p) * x.square().sum(1)
    else:
        model = nn.Sequential(nn.Linear(1, p, bias=False)).to(torch.float64)  # pred_nj = w_j x_n
        x = torch.randn(num_tasks, shots, 1, generator=g, dtype=torch.float64)
        y = torch.randn(num_tasks, shots, p, generator=g, dtype=torch.float64)
        diag = (2.0 / (shots * p) * x.square().sum(1)).expand(num_tasks, p)
    expected = diag.square().sum(1)
    flat = flat_of(model, num_tasks)
    for seed in range(4):  # any probe gives the exact value
        got = hessian_penalty(model, flat, x, y, loss_fn=F.mse_loss, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


def test_one_probe_is_not_exact_on_a_full_hessian():
    """Guards the test above: with off-diagonal curvature single probes scatter around ||H||_F^2."""
    model = tanh_mlp()
    x, y, _, _ = sinusoid_batch(num_tasks=2)
    flat = flat_of(model, 2)
    values = torch.stack(
        [
            hessian_penalty(model, flat, x, y, loss_fn=F.mse_loss, generator=torch.Generator().manual_seed(s))
            for s in range(3)
        ]
    )
    assert (values.max(0).values - values.min(0).values > 1e-6 * values.abs().max(0).values).all()


def test_probe_mean_converges_to_dense_frobenius_norm():
    """Mean of K single-probe estimates vs ||H||_F^2 from dense Hessians, within 5 standard errors.

    Per probe, X = v^T A v with A = H^2, Var X = 2 (||A||_F^2 - sum_i A_ii^2) (Rademacher v). Chebyshev bounds
    the chance that a K-probe mean lies beyond 5 sigma / sqrt(K) by 1/25 for an arbitrary seed, whatever the
    distribution of X; the seed is fixed, so the outcome is deterministic. The bound is also required to be
    under 10% of ||H||_F^2, so the test can tell the right quantity from a wrong one. One path (the fused MLP
    R-operator) suffices here: test_matches_dense_hessian_with_the_same_probes ties every path to dense Hessians.
    """
    model = tanh_mlp()
    num_tasks, probes = 3, 8000  # sigma/mean per probe reaches ~1.3 here
    x, y, _, _ = sinusoid_batch(num_tasks=num_tasks, shots=6)
    flat = flat_of(model, num_tasks)
    hess = dense_hessians(model, flat, x, y, F.mse_loss)
    a = hess @ hess
    frob = hess.square().sum((1, 2))
    sigma = (2 * (a.square().sum((1, 2)) - torch.diagonal(a, dim1=1, dim2=2).square().sum(1))).sqrt()
    bound = 5 * sigma / math.sqrt(probes)
    assert (bound < 0.1 * frob).all()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        mean = hessian_penalty(model, flat, x, y, loss_fn=F.mse_loss, probes=probes, generator=g)
    assert ((mean - frob).abs() <= bound).all(), (mean, frob, bound)


@pytest.mark.parametrize("make", [tanh_mlp, lambda: Wrapped(tanh_mlp(sizes=(1, 3, 1)))], ids=["fused", "vmap"])
def test_matches_dense_hessian_with_the_same_probes(make):
    """Value and gradient in theta equal those of ||H_dense v||^2 with the documented probes (float64)."""
    model = make()
    num_tasks, probes = 2, 3
    x, y, _, _ = sinusoid_batch(num_tasks=num_tasks, shots=4)
    flat = flat_of(model, num_tasks).requires_grad_()
    ours = hessian_penalty(
        model, flat, x, y, loss_fn=F.mse_loss, probes=probes, generator=torch.Generator().manual_seed(5)
    )
    hess = dense_hessians(model, flat, x, y, F.mse_loss, create_graph=True)
    v = probes_like(5, probes, flat)
    dense = torch.einsum("tij,ktj->kti", hess, v).square().sum(2).mean(0)
    torch.testing.assert_close(ours, dense, **TOL)
    w = torch.linspace(0.5, 1.5, num_tasks, dtype=torch.float64)  # weigh tasks differently
    (g_ours,) = torch.autograd.grad((w * ours).sum(), flat)
    (g_dense,) = torch.autograd.grad((w * dense).sum(), flat)
    torch.testing.assert_close(g_ours, g_dense, **TOL)


@pytest.mark.parametrize("make", [tanh_mlp, lambda: Wrapped(tanh_mlp())], ids=["fused", "vmap"])
def test_gradient_matches_finite_differences(make):
    model = make()
    x, y, _, _ = sinusoid_batch(num_tasks=2, shots=4)
    flat = flat_of(model, 2).requires_grad_()

    def penalty(f):
        return hessian_penalty(model, f, x, y, loss_fn=F.mse_loss, probes=2, generator=torch.Generator().manual_seed(9))

    assert torch.autograd.gradcheck(penalty, (flat,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_taskparams_and_shared_parameters():
    """TaskParams with a subset layout: the Hessian is in the adapted (head) parameters; the frozen body's
    parameters still receive the penalty's gradient."""
    model = tanh_mlp(sizes=(1, 6, 1))  # Linear "0", Tanh, Linear "2" (the head)
    layout = mk.ParameterLayout.from_module(model, lambda name, _: name.startswith("2."))
    x, y, _, _ = sinusoid_batch(num_tasks=2, shots=4)
    head = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()]).expand(2, -1).clone()
    ours = hessian_penalty(
        model,
        mk.TaskParams(head, layout),
        x,
        y,
        loss_fn=F.mse_loss,
        probes=2,
        generator=torch.Generator().manual_seed(1),
    )
    v = probes_like(1, 2, head)
    expected = []
    for t in range(2):
        leaves = [p.detach().clone().requires_grad_() for p in model[2].parameters()]
        loss = F.mse_loss(F.linear(torch.tanh(model[0](x[t])), *leaves), y[t])
        grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, leaves, create_graph=True)])
        per_probe = []
        for k in range(2):
            hv = torch.autograd.grad(grads @ v[k, t], leaves, retain_graph=True, create_graph=True)
            per_probe.append(torch.cat([h.reshape(-1) for h in hv]).square().sum())
        expected.append(torch.stack(per_probe).mean())
    expected = torch.stack(expected)
    torch.testing.assert_close(ours, expected, **TOL)
    body = list(model[0].parameters())
    g_ours = torch.autograd.grad(ours.sum(), body)
    g_ref = torch.autograd.grad(expected.sum(), body)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
        assert a.abs().max() > 0


def test_bad_inputs():
    model = tanh_mlp()
    x, y, _, _ = sinusoid_batch(num_tasks=2)
    flat = flat_of(model, 2)
    for probes in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="probes"):
            hessian_penalty(model, flat, x, y, loss_fn=F.mse_loss, probes=probes)
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        hessian_penalty(model, flat[0], x, y, loss_fn=F.mse_loss)


# --- the learners' penalty term ----------------------------------------------------------------------------
def naive_penalised_meta_loss(params, xs, ys, xq, yq, lr, steps, weight, v, first_order=False, adapt_mask=None):
    """Per task: adapt by naive_adapt, query loss, + weight * mean_k ||H v_k||^2 at the adapted weights, where
    H is the Hessian of the support loss in the adapted tensors (plain autograd double backward)."""
    adapt_mask = adapt_mask or [True] * len(params)
    total = 0.0
    for t in range(xs.shape[0]):
        history = naive_adapt(
            tanh_functional, params, xs[t], ys[t], F.mse_loss, lambda s, i: lr, steps, first_order, adapt_mask
        )
        fast = history[-1] if history else params
        adapted = [w for w, m in zip(fast, adapt_mask, strict=True) if m]
        support = F.mse_loss(tanh_functional(fast, xs[t]), ys[t])
        grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(support, adapted, create_graph=True)])
        penalty = 0.0
        for k in range(v.shape[0]):
            hv = torch.autograd.grad(grads @ v[k, t], adapted, retain_graph=True, create_graph=True)
            penalty = penalty + torch.cat([h.reshape(-1) for h in hv]).square().sum()
        total = total + F.mse_loss(tanh_functional(fast, xq[t]), yq[t]) + weight * penalty / v.shape[0]
    return total / xs.shape[0]


@pytest.mark.parametrize("kind,first_order", [("maml", False), ("maml", True), ("anil", False), ("vmap", False)])
def test_learner_penalty_matches_naive_loop(kind, first_order):
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=4)
    lr, steps, weight, probes = 0.1, 2, 0.3, 2
    params = list(model.parameters())
    mask = [False, False, False, False, True, True] if kind == "anil" else None
    if kind == "anil":
        learner = mk.ANIL(model, lr, steps, hessian_penalty=weight, hessian_probes=probes)
    else:
        learner = mk.MAML(
            model,
            lr,
            steps,
            first_order=first_order,
            hessian_penalty=weight,
            hessian_probes=probes,
            fused=kind != "vmap",
        )
    num_adapted = learner.layout.num_params
    torch.manual_seed(123)  # the learner draws its probes from torch's global generator
    ours = learner.meta_loss(xs, ys, xq, yq)
    torch.manual_seed(123)
    v = (2 * torch.randint(0, 2, (probes, 3, num_adapted)) - 1).to(torch.float64)
    theirs = naive_penalised_meta_loss(params, xs, ys, xq, yq, lr, steps, weight, v, first_order, mask)
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_learner_penalty_in_maml_plus_plus_multi_step_loss():
    """MAML++: the penalty (at the final fast weights) adds to the weighted multi-step loss."""
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=2, shots=4)
    plain = mk.MAMLPlusPlus(model, 0.05, 2, annealing_epochs=4)
    penalised = mk.MAMLPlusPlus(model, 0.05, 2, annealing_epochs=4, hessian_penalty=0.5)
    torch.manual_seed(7)
    total = penalised.meta_loss(xs, ys, xq, yq)
    torch.manual_seed(7)
    fast = plain.adapt(xs, ys)
    penalty = hessian_penalty(model, fast, xs, ys, loss_fn=F.mse_loss)  # same global-generator draw
    torch.testing.assert_close(total, plain.meta_loss(xs, ys, xq, yq) + 0.5 * penalty.mean(), **TOL)


def test_weight_zero_is_exactly_the_plain_meta_loss():
    model = tanh_mlp()
    xs, ys, xq, yq = sinusoid_batch(num_tasks=3, shots=4)
    params = list(model.parameters())
    plain = mk.MAML(model, 0.1, 2).meta_loss(xs, ys, xq, yq)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    zero = mk.MAML(model, 0.1, 2, hessian_penalty=0.0, hessian_probes=4).meta_loss(xs, ys, xq, yq)
    assert torch.equal(torch.get_rng_state(), state)  # not even a probe drawn
    assert torch.equal(zero, plain)
    for a, b in zip(torch.autograd.grad(zero, params), torch.autograd.grad(plain, params), strict=True):
        assert torch.equal(a, b)
    # Guard: a positive weight does change the loss on this problem.
    assert mk.MAML(model, 0.1, 2, hessian_penalty=1.0).meta_loss(xs, ys, xq, yq) > plain + 1e-6


def test_learner_rejects_bad_penalty_options():
    model = tanh_mlp()
    for weight in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="hessian_penalty"):
            mk.MAML(model, 0.1, 1, hessian_penalty=weight)
    for probes in (0, -2, 2.0):
        with pytest.raises(ValueError, match="hessian_probes"):
            mk.MAML(model, 0.1, 1, hessian_penalty=0.1, hessian_probes=probes)
    with pytest.raises(ValueError, match="not supported"):
        mk.Reptile(model, 0.1, 1, hessian_penalty=0.1)
    mk.Reptile(model, 0.1, 1, hessian_penalty=0.0)  # weight 0 is the plain learner everywhere
