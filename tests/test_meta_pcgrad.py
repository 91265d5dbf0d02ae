"""Meta-PCGrad: projected per-task/per-group meta-gradients against a naive per-group loop + the reference PCGrad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive_meta import image_batch, make_convnet, make_mlp, mlp_functional, naive_meta_loss, sinusoid_batch

import metakernels as mk
from metakernels.reference.pcgrad import pcgrad as reference_pcgrad

TOL = dict(rtol=1e-10, atol=1e-10)
NUM_TASKS = 5
GROUPINGS = {
    "tasks": (None, [[0], [1], [2], [3], [4]]),
    "two_uneven": (2, [[0, 1, 2], [3, 4]]),
    "ids": ([0, 1, 0, 2, 1], [[0, 2], [1, 4], [3]]),
}


def random_orders(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(n)])


def flat_grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                      for p, g in zip(params, grads, strict=True)])


def expected_update(group_grads, group_sizes, orders, reduction, include_self, eps=0.0):
    """The definition: rows h_g (group mean meta-gradients), scaled by n_g / T for "mean", projected, summed."""
    num_tasks = sum(group_sizes)
    rows = torch.stack([h * (n / num_tasks if reduction == "mean" else 1.0)
                        for h, n in zip(group_grads, group_sizes, strict=True)])
    update, weights = reference_pcgrad(rows, orders, None, include_self, "sum", eps)
    return update, weights


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_matches_naive_loop(grouping, reduction, include_self, first_order):
    groups, members = GROUPINGS[grouping]
    model = make_mlp(sizes=(1, 12, 12, 1))
    params = list(model.parameters())
    xs, ys, xq, yq = sinusoid_batch(num_tasks=NUM_TASKS, seed=2)  # a seed whose groups conflict in every grouping
    learner = mk.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order)
    orders = random_orders(len(members), 3)
    loss, weights = mk.meta_pcgrad_backward(learner, xs, ys, xq, yq, groups=groups, reduction=reduction,
                                            include_self=include_self, orders=orders, return_coefficients=True)
    ours = torch.cat([p.grad.reshape(-1) for p in params])

    group_grads, group_losses = [], []
    for m in members:
        idx = torch.tensor(m)
        naive = naive_meta_loss(mlp_functional, params, xs[idx], ys[idx], xq[idx], yq[idx], F.mse_loss,
                                lambda s, i: 0.1, 2, first_order)
        group_losses.append(naive.detach() * len(m) / NUM_TASKS)
        group_grads.append(flat_grads(naive, params))
    expected, expected_weights = expected_update(group_grads, [len(m) for m in members], orders, reduction,
                                                 include_self)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(weights, expected_weights, **TOL)
    torch.testing.assert_close(loss, sum(group_losses), **TOL)
    # The batch has conflicting tasks: the projection changed something.
    assert not torch.allclose(weights, torch.eye(len(members), dtype=torch.float64))


@pytest.mark.parametrize("name", ["MetaSGD", "MAMLPlusPlus", "ANIL", "Reptile"])
def test_other_learners_project_every_meta_parameter(name):
    """Learned inner rates are meta-parameters too: their projected gradient equals the per-group loop's."""
    model = make_mlp(sizes=(1, 10, 10, 1), seed=1)
    make = {
        "MetaSGD": lambda: mk.MetaSGD(model, inner_lr=0.05, inner_steps=2),
        "MAMLPlusPlus": lambda: mk.MAMLPlusPlus(model, inner_lr=0.05, inner_steps=2),
        "ANIL": lambda: mk.ANIL(model, inner_lr=0.1, inner_steps=2),
        "Reptile": lambda: mk.Reptile(model, inner_lr=0.05, inner_steps=2),
    }[name]
    learner = make()
    params = [p for p in learner.parameters() if p.requires_grad]
    xs, ys, xq, yq = sinusoid_batch(num_tasks=NUM_TASKS, seed=9)  # the two groups conflict for every learner
    orders = random_orders(2, 5)
    _, weights = mk.meta_pcgrad_backward(learner, xs, ys, xq, yq, groups=2, orders=orders, return_coefficients=True)
    assert not torch.allclose(weights, torch.eye(2, dtype=torch.float64))
    ours = torch.cat([p.grad.reshape(-1) for p in params])
    members = GROUPINGS["two_uneven"][1]
    group_grads = [flat_grads(learner.meta_loss(xs[m], ys[m], xq[m], yq[m]), params) for m in members]
    expected, _ = expected_update(group_grads, [3, 2], orders, "mean", False)
    torch.testing.assert_close(ours, expected, **TOL)
    if name in ("MetaSGD", "MAMLPlusPlus"):
        assert learner.inner_lrs.grad is not None and bool(learner.inner_lrs.grad.abs().sum() > 0)


def plain_meta_gradient(learner, batch):
    params = [p for p in learner.parameters() if p.requires_grad]
    return flat_grads(learner.meta_loss(*batch), params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_group_is_the_plain_meta_gradient(reduction):
    learner = mk.MAML(make_convnet(), inner_lr=0.4, inner_steps=1, loss_fn=F.cross_entropy)
    batch = image_batch()
    plain = plain_meta_gradient(learner, batch)
    loss = mk.meta_pcgrad_backward(learner, *batch, groups=1, reduction=reduction, include_self=True)
    ours = torch.cat([p.grad.reshape(-1) for p in learner.parameters()])
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)  # one row, scale 1, no projection: bit for bit
    torch.testing.assert_close(loss, learner.meta_loss(*batch).detach(), **TOL)


@pytest.mark.parametrize("groups", [None, 2])
def test_aligned_tasks_are_the_plain_meta_gradient(groups):
    """Copies of one task never conflict: with reduction="mean" the result is the plain mean meta-gradient."""
    learner = mk.MAML(make_mlp(sizes=(1, 12, 12, 1), seed=2), inner_lr=0.1, inner_steps=2)
    xs, ys, xq, yq = (t[:1].expand(4, *t.shape[1:]).contiguous() for t in sinusoid_batch(num_tasks=1, seed=7))
    plain = plain_meta_gradient(learner, (xs, ys, xq, yq))
    _, weights = mk.meta_pcgrad_backward(learner, xs, ys, xq, yq, groups=groups, generator=torch.Generator(),
                                         return_coefficients=True)
    torch.testing.assert_close(weights, torch.eye(weights.shape[0], dtype=torch.float64), rtol=0, atol=0)
    ours = torch.cat([p.grad.reshape(-1) for p in learner.parameters()])
    torch.testing.assert_close(ours, plain, **TOL)


def test_accumulates_like_backward():
    learner = mk.MAML(make_mlp(sizes=(1, 8, 1), seed=3), inner_lr=0.1, inner_steps=1)
    batch = sinusoid_batch(num_tasks=3, seed=8)
    orders = random_orders(3, 0)
    mk.meta_pcgrad_backward(learner, *batch, orders=orders)
    once = [p.grad.clone() for p in learner.parameters()]
    mk.meta_pcgrad_backward(learner, *batch, orders=orders)
    for p, g in zip(learner.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, **TOL)


def test_class_seeded_orders_and_float32():
    def run(**kwargs):
        learner = mk.MAML(make_mlp(sizes=(1, 8, 8, 1), dtype=torch.float32, seed=3), inner_lr=0.1, inner_steps=1)
        meta = mk.MetaPCGrad(learner, **kwargs)
        grads = []
        for step in range(2):
            learner.zero_grad()
            batch = sinusoid_batch(num_tasks=4, seed=10 + step, dtype=torch.float32)
            if "seed" in kwargs:
                loss = meta.backward(*batch)
            else:
                loss = meta.backward(*batch, orders=torch.stack([torch.randperm(4, generator=gen) for _ in range(4)]))
            assert loss.dtype == torch.float32
            grads.append(torch.cat([p.grad.reshape(-1) for p in learner.parameters()]))
        return grads

    gen = torch.Generator().manual_seed(6)
    for a, b in zip(run(seed=6), run(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "MetaPCGrad(groups=None" in repr(mk.MetaPCGrad(mk.MAML(make_mlp())))


def test_bad_input():
    learner = mk.MAML(make_mlp(sizes=(1, 4, 1)), inner_lr=0.1, inner_steps=1)
    batch = sinusoid_batch(num_tasks=3)
    cases = [
        (dict(groups=0), ValueError, "between 1 and T = 3"),
        (dict(groups=4), ValueError, "between 1 and T = 3"),
        (dict(groups=True), TypeError, "bool"),
        (dict(groups=[0, 1]), ValueError, "length T = 3"),
        (dict(groups=[0, 2, 2]), ValueError, r"no task in groups \[1\]"),
        (dict(groups=[0, -1, 1]), ValueError, ">= 0"),
        (dict(groups=[0.0, 1.0, 1.0]), TypeError, "integers"),
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(orders=random_orders(3, 0), generator=torch.Generator()), ValueError, "orders or generator"),
        (dict(orders=[[0, 1, 1], [0, 1, 2], [0, 1, 2]]), ValueError, "orders row 0"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mk.meta_pcgrad_backward(learner, *batch, **kwargs)
    with pytest.raises(TypeError, match="meta_loss"):
        mk.meta_pcgrad_backward(make_mlp(), *batch)
    with pytest.raises(ValueError, match="T = 0"):
        mk.meta_pcgrad_backward(learner, *(t[:0] for t in batch))
    with pytest.raises(ValueError, match="seed or generator"):
        mk.MetaPCGrad(learner, seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="meta_loss"):
        mk.MetaPCGrad(make_mlp())
    with pytest.raises(ValueError, match="reduction"):
        mk.MetaPCGrad(learner, reduction="max")
