"""metakernels.PCGrad(optimizer): the drop-in wrapper against an oracle of the popular PyTorch wrapper.

The oracle below is written from the wrapper's algorithm as described in metakernels/compat/pcgrad_optimizer.py
(per-task backward, zeros and a "has gradient" flag where a task does not reach a parameter, projection of
each task over all columns in a given order with j = i visited, mean over the parameters every task reaches
and sum over the others), taking explicit orders where the wrapper calls random.shuffle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metakernels as mk
from metakernels.reference.pcgrad import pcgrad as reference_pcgrad

TOL = dict(rtol=1e-10, atol=1e-10)


# --- the oracle -----------------------------------------------------------------------------------------


def oracle_pc_backward(optimizer, losses, orders, reduction="mean"):
    """The wrapper's pc_backward with explicit orders (row i: the order of task i's visits, self included)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    task_grads, task_has = [], []
    for loss in losses:
        optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        flat, has = [], []
        for p in params:
            if p.grad is None:
                flat.append(torch.zeros(p.numel(), dtype=p.dtype))
                has.append(torch.zeros(p.numel(), dtype=p.dtype))
            else:
                flat.append(p.grad.detach().reshape(-1).clone())
                has.append(torch.ones(p.numel(), dtype=p.dtype))
        task_grads.append(torch.cat(flat))
        task_has.append(torch.cat(has))
    shared = torch.stack(task_has).prod(0).bool()
    projected = [g.clone() for g in task_grads]
    for i, g_i in enumerate(projected):
        for j in orders[i]:
            g_j = task_grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot / g_j.norm() ** 2 * g_j
    stacked = torch.stack(projected)
    merged = torch.zeros_like(stacked[0])
    merged[shared] = stacked[:, shared].mean(0) if reduction == "mean" else stacked[:, shared].sum(0)
    merged[~shared] = stacked[:, ~shared].sum(0)
    offset = 0
    for p in params:
        p.grad = merged[offset : offset + p.numel()].view(p.shape).clone()
        offset += p.numel()


# --- a small multi-task problem -------------------------------------------------------------------------


class MultiTaskNet(nn.Module):
    """A shared trunk and three heads; task 2 also reads head 1 (a parameter reached by two of three tasks),
    and one head no task uses (reached by none)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 3), nn.Linear(8, 2)])
        self.unused = nn.Linear(8, 1)

    def losses(self, x, y_reg, y_cls, y_two):
        z = self.trunk(x)
        a = F.mse_loss(self.heads[0](z).squeeze(-1), y_reg)
        b = F.cross_entropy(self.heads[1](z), y_cls)
        c = F.mse_loss(self.heads[2](z), y_two) + 0.1 * self.heads[1](z).pow(2).mean()
        return [a, b, c]


def make_net(seed=0):
    torch.manual_seed(seed)
    return MultiTaskNet().double()


def batch(step, n=16):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(n, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g), \
        torch.randn(n, 2, generator=g, dtype=torch.float64)


def random_orders(num_tasks, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tasks, generator=g) for _ in range(num_tasks)])


def plain_task_gradients(net, losses):
    """[T, P] per-task gradients over net.parameters() (zeros where unreached) and per-parameter reach flags."""
    params = list(net.parameters())
    rows, reached = [], []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                               for p, g in zip(params, grads, strict=True)]))
        reached.append([g is not None for g in grads])
    return torch.stack(rows), reached


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_matches_the_wrappers_algorithm(backend, opt_name):
    net_ours, net_oracle = make_net(), make_net()
    make_opt = {
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }[opt_name]
    pc = mk.PCGrad(make_opt(net_ours.parameters()))
    opt_oracle = make_opt(net_oracle.parameters())
    conflicts = 0
    for step in range(4):
        data = batch(step)
        orders = random_orders(3, step)
        pc.zero_grad()
        losses = net_ours.losses(*data)
        grads, _ = plain_task_gradients(net_ours, losses)
        conflicts += int(((grads @ grads.t()) < 0).sum())
        pc.pc_backward(losses, orders=orders)
        oracle_pc_backward(opt_oracle, net_oracle.losses(*data), orders.tolist())
        for (name, p), q in zip(net_ours.named_parameters(), net_oracle.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=f"{name} at step {step}")
        pc.step()
        opt_oracle.step()
        for p, q in zip(net_ours.parameters(), net_oracle.parameters(), strict=True):
            torch.testing.assert_close(p, q, **TOL)
    assert conflicts > 0  # the problem exercises the projection, not only the plain sum
    assert bool((net_ours.unused.weight.grad == 0).all())  # reached by no task: zeros, as the wrapper writes


def test_every_parameter_shared_is_the_ops_mean():
    """With one head read by every task, every parameter is shared: the wrapper is pcgrad(mean, include_self)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.randn(10, 3, dtype=torch.float64)
    targets = torch.randn(3, 10, 2, dtype=torch.float64)
    losses = [F.mse_loss(net(x), t) for t in targets]
    grads, _ = plain_task_gradients(net, losses)
    orders = random_orders(3, 7)
    pc.pc_backward(losses, orders=orders)
    expected, _ = reference_pcgrad(grads, orders, None, True, "mean", 0.0)
    ours = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("project", ["all", "shared"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("include_self", [False, True])
def test_options_against_the_reference(project, reduction, include_self):
    """reduction="sum", include_self=False is the paper; project="shared" is the op's shared_mask semantics."""
    net = make_net(1)
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), reduction=reduction, include_self=include_self,
                   project=project)
    losses = net.losses(*batch(0))
    grads, reached = plain_task_gradients(net, losses)
    sizes = torch.tensor([p.numel() for p in net.parameters()])
    shared = torch.repeat_interleave(torch.tensor([all(r[k] for r in reached) for k in range(len(sizes))]), sizes)
    orders = random_orders(3, 11)
    pc.pc_backward(losses, orders=orders)
    ours = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    if project == "shared":
        expected, _ = reference_pcgrad(grads, orders, shared, include_self, reduction, 0.0)
    else:
        expected, _ = reference_pcgrad(grads, orders, None, include_self, "sum", 0.0)
        if reduction == "mean":
            expected[shared] /= 3
    torch.testing.assert_close(ours, expected, **TOL)


def test_include_self_matters():
    """g_i = (1, 0) visits g_j = (-1, 1), g_k = (-3, -1), then itself: after two projections it is (-0.1, 0.3),
    whose dot product with the original g_i is negative, so visiting j = i projects once more."""
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    directions = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-3.0, -1.0]], dtype=torch.float64)
    orders = torch.tensor([[1, 2, 0], [0, 1, 2], [0, 1, 2]])
    results = {}
    for include_self in (False, True):
        pc = mk.PCGrad(torch.optim.SGD([w], lr=0.1), reduction="sum", include_self=include_self)
        pc.pc_backward([(d * w).sum() for d in directions], orders=orders)
        results[include_self] = w.grad.clone()
        opt = torch.optim.SGD([w], lr=0.1)
        oracle_pc_backward(opt, [(d * w).sum() for d in directions],
                           orders.tolist() if include_self else [[j for j in r if j != i] for i, r in
                                                                 enumerate(orders.tolist())], "sum")
        torch.testing.assert_close(results[include_self], w.grad, **TOL)
    assert not torch.allclose(results[False], results[True])


def test_seeded_orders_are_randperm_rows_and_reproducible():
    def run(**kwargs):
        net = make_net(2)
        pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), **kwargs)
        grads = []
        for step in range(2):
            pc.zero_grad()
            pc.pc_backward(net.losses(*batch(step)))
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        return grads

    g = torch.Generator().manual_seed(5)
    explicit = []
    net = make_net(2)
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    for step in range(2):
        orders = torch.stack([torch.randperm(3, generator=g) for _ in range(3)])
        pc.pc_backward(net.losses(*batch(step)), orders=orders)
        explicit.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    for a, b, c in zip(run(seed=5), run(generator=torch.Generator().manual_seed(5)), explicit, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    torch.manual_seed(9)
    first = run()
    torch.manual_seed(9)
    for a, b in zip(first, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_parameters_are_skipped():
    net = make_net(4)
    net.trunk[0].bias.requires_grad_(False)
    before = net.trunk[0].bias.detach().clone()
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.5))
    pc.pc_backward(net.losses(*batch(0)), orders=random_orders(3, 0))
    pc.step()
    assert net.trunk[0].bias.grad is None
    torch.testing.assert_close(net.trunk[0].bias, before, rtol=0, atol=0)
    assert net.trunk[0].weight.grad is not None


def test_float32_model_and_one_dimensional_losses():
    torch.manual_seed(0)
    net = MultiTaskNet()
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    losses = torch.stack(net.losses(*[t.float() if t.is_floating_point() else t for t in batch(0)]))
    pc.pc_backward(losses, orders=random_orders(3, 1))
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


def test_passthrough():
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    pc = mk.PCGrad(opt)
    assert pc.optimizer is opt and pc.param_groups is opt.param_groups
    pc.pc_backward(net.losses(*batch(0)), orders=random_orders(3, 0))
    pc.step()
    state = pc.state_dict()
    assert state == opt.state_dict()
    fresh = mk.PCGrad(torch.optim.Adam(net.parameters(), lr=0.5))
    fresh.load_state_dict(state)
    assert fresh.optimizer.param_groups[0]["lr"] == 0.01
    pc.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert "PCGrad(reduction='mean'" in repr(pc)


def test_graph_freed_unless_retained():
    net = make_net()
    pc = mk.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    losses = net.losses(*batch(0))
    pc.pc_backward(losses, orders=random_orders(3, 0))
    with pytest.raises(RuntimeError):
        losses[0].backward()
    losses = net.losses(*batch(0))
    pc.pc_backward(losses, orders=random_orders(3, 0), retain_graph=True)
    losses[0].backward()


def test_bad_input():
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pc = mk.PCGrad(opt)
    good = net.losses(*batch(0))
    cases = [
        ([], ValueError, "losses is empty"),
        ([good[0], torch.ones(2, requires_grad=True).double() * 2], ValueError, r"losses\[1\] must be a scalar"),
        ([good[0], good[1] * float("nan")], ValueError, r"losses \[1\] are NaN or inf"),
        ([good[0] * float("inf"), good[1]], ValueError, r"losses \[0\] are NaN or inf"),
        ([good[0], torch.tensor(1.0)], TypeError, r"losses\[1\] does not require grad"),
        ([good[0], 3.0], TypeError, r"losses\[1\] must be a tensor"),
        (torch.ones(2, 2), ValueError, "1-D tensor"),
        (good[0], ValueError, "1-D tensor"),
        ({"a": good[0]}, TypeError, "list of scalar loss tensors"),
    ]
    for losses, error, match in cases:
        with pytest.raises(error, match=match):
            pc.pc_backward(losses)
    with pytest.raises(ValueError, match="orders row"):
        pc.pc_backward(net.losses(*batch(0)), orders=[[0, 0, 1], [0, 1, 2], [0, 1, 2]])
    # A NaN gradient from finite losses: the op's message, pointing at the loss.
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"task 0.*losses\[i\]"):  # d sqrt(w0) / d w0 = inf at w0 = 0
        mk.PCGrad(torch.optim.SGD([w], lr=0.1)).pc_backward([w[0].sqrt() + w[1], w[1] * 2])
    with pytest.raises(ValueError, match="reduction must be"):
        mk.PCGrad(opt, reduction="avg")
    with pytest.raises(ValueError, match="project must be"):
        mk.PCGrad(opt, project="heads")
    with pytest.raises(ValueError, match="seed or generator"):
        mk.PCGrad(opt, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="eps"):
        mk.PCGrad(opt, eps=-1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        mk.PCGrad(net)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        mk.PCGrad(torch.optim.SGD(frozen.parameters(), lr=0.1)).pc_backward(good)


def test_compat_namespace():
    from metakernels.compat import PCGrad

    assert PCGrad is mk.PCGrad
