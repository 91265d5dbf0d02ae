"""Meta-gradients of every learner equal a naive per-task autograd loop (float64, to 1e-9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS
from naive_meta import (
    convnet_functional,
    image_batch,
    make_convnet,
    make_mlp,
    mlp_functional,
    naive_adapt,
    naive_meta_loss,
    sinusoid_batch,
)

import metakernels as mk
from metakernels import _backend

TOL = dict(rtol=1e-9, atol=1e-9)

# The learners are tested on the compiled and reference kernels; the interpreted Triton kernels (each
# launch ~ms) run the MAML cases only: the ops' own tests cover them exhaustively.
LEARNER_BACKENDS = [b for b in BACKENDS if b != "triton"]


def _serve_from(name: str):
    previous = _backend.cpu_backend()
    _backend.set_cpu_backend(name)
    try:
        yield name
    finally:
        _backend.set_cpu_backend(previous)


@pytest.fixture(params=LEARNER_BACKENDS)
def backend(request):
    yield from _serve_from(request.param)


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    yield from _serve_from(request.param)


def meta_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def assert_grads_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=False):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **TOL)


CASES = {
    "mlp": (make_mlp, mlp_functional, sinusoid_batch, F.mse_loss),
    "convnet": (make_convnet, convnet_functional, image_batch, F.cross_entropy),
}


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_matches_naive_loop(any_backend, net, steps, first_order):
    make, fn, batch, loss_fn = CASES[net]
    model = make()
    xs, ys, xq, yq = batch()
    lr = 0.1 if net == "mlp" else 0.4
    learner = mk.MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss_fn=loss_fn)
    params = list(model.parameters())
    ours = learner.meta_loss(xs, ys, xq, yq)
    theirs = naive_meta_loss(fn, params, xs, ys, xq, yq, loss_fn, lambda s, i: lr, steps, first_order)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_grads_close(meta_grads(ours, params), meta_grads(theirs, params))


def test_second_order_differs_from_first_order():
    """Guards the test above: the two orders must not coincide on this problem (else it checks nothing)."""
    model = make_mlp()
    xs, ys, xq, yq = sinusoid_batch()
    g = [meta_grads(mk.MAML(model, 0.1, 2, first_order=fo).meta_loss(xs, ys, xq, yq), list(model.parameters()))
         for fo in (False, True)]
    assert max((a - b).abs().max().item() for a, b in zip(*g, strict=False)) > 1e-4


def test_negative_inner_lr_and_multitask_baseline(backend):
    model = make_mlp()
    xs, ys, xq, yq = sinusoid_batch()
    params = list(model.parameters())
    ours = mk.MAML(model, inner_lr=-0.05, inner_steps=2).meta_loss(xs, ys, xq, yq)
    theirs = naive_meta_loss(mlp_functional, params, xs, ys, xq, yq, F.mse_loss, lambda s, i: -0.05, 2, False)
    assert_grads_close(meta_grads(ours, params), meta_grads(theirs, params))
    base = mk.MultiTaskBaseline(model).meta_loss(xs, ys, xq, yq)
    plain = torch.stack([F.mse_loss(model(xq[t]), yq[t]) for t in range(xq.shape[0])]).mean()
    torch.testing.assert_close(base, plain, **TOL)
    assert_grads_close(meta_grads(base, params), meta_grads(plain, params))


@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_meta_sgd_matches_naive_loop(backend, net):
    make, fn, batch, loss_fn = CASES[net]
    model = make()
    xs, ys, xq, yq = batch()
    learner = mk.MetaSGD(model, inner_lr=0.05, inner_steps=2, loss_fn=loss_fn)
    with torch.no_grad():  # distinct per-coordinate rates, some negative
        learner.inner_lrs.uniform_(-0.05, 0.2)
    rates = [r.detach().clone().requires_grad_() for r in learner.rates_by_name().values()]
    params = list(model.parameters())
    ours = learner.meta_loss(xs, ys, xq, yq)
    theirs = naive_meta_loss(fn, params, xs, ys, xq, yq, loss_fn, lambda s, i: rates[i], 2, False)
    torch.testing.assert_close(ours, theirs, **TOL)
    naive = meta_grads(theirs, params + rates)
    naive_rates = torch.cat([g.reshape(-1) for g in naive[len(params):]])
    assert_grads_close(meta_grads(ours, params + [learner.inner_lrs]), naive[: len(params)] + [naive_rates])


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("multi_step_loss", [False, True])
def test_maml_plus_plus_matches_naive_loop(backend, net, multi_step_loss):
    make, fn, batch, loss_fn = CASES[net]
    model = make()
    xs, ys, xq, yq = batch()
    steps = 3
    learner = mk.MAMLPlusPlus(model, inner_lr=0.05, inner_steps=steps, loss_fn=loss_fn,
                              multi_step_loss=multi_step_loss, annealing_epochs=4)
    learner.set_epoch(1)
    with torch.no_grad():
        learner.inner_lrs.uniform_(-0.02, 0.15)
    table = learner.inner_lrs.detach().clone().requires_grad_()
    weights = mk.learners.multi_step_loss_weights(steps, 1, 4) if multi_step_loss else None
    params = list(model.parameters())
    ours = learner.meta_loss(xs, ys, xq, yq)
    theirs = naive_meta_loss(fn, params, xs, ys, xq, yq, loss_fn, lambda s, i: table[s, i], steps, False,
                             step_weights=weights)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_grads_close(meta_grads(ours, params + [learner.inner_lrs]), meta_grads(theirs, params + [table]))


def test_multi_step_loss_weights_anneal():
    w0 = mk.learners.multi_step_loss_weights(5, 0, 10)
    assert w0 == pytest.approx([0.2] * 5)
    w_mid = mk.learners.multi_step_loss_weights(5, 5, 10)
    assert w_mid[:4] == pytest.approx([0.1] * 4) and w_mid[4] == pytest.approx(0.6)
    w_end = mk.learners.multi_step_loss_weights(5, 100, 10)
    assert w_end[:4] == pytest.approx([0.006] * 4) and w_end[4] == pytest.approx(1 - 4 * 0.006)
    for w in (w0, w_mid, w_end):
        assert sum(w) == pytest.approx(1.0)


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_matches_naive_loop(backend, net, first_order):
    make, fn, batch, loss_fn = CASES[net]
    model = make()
    xs, ys, xq, yq = batch()
    learner = mk.ANIL(model, inner_lr=0.3, inner_steps=2, first_order=first_order, loss_fn=loss_fn)
    params = list(model.parameters())
    mask = [False] * (len(params) - 2) + [True, True]  # only the last Linear adapts
    ours = learner.meta_loss(xs, ys, xq, yq)
    theirs = naive_meta_loss(fn, params, xs, ys, xq, yq, loss_fn, lambda s, i: 0.3, 2, first_order, mask)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert_grads_close(meta_grads(ours, params), meta_grads(theirs, params))


def test_anil_general_module_path_matches_sequential_path():
    """A non-Sequential model (no feature caching) gives the same meta-gradient as the cached path."""
    seq = make_mlp()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = seq[:-1]
            self.head = seq[-1]

        def forward(self, x):
            return self.head(self.body(x))

    xs, ys, xq, yq = sinusoid_batch()
    a = mk.ANIL(seq, 0.2, 2).meta_loss(xs, ys, xq, yq)
    b = mk.ANIL(Wrapped(), 0.2, 2, head="head").meta_loss(xs, ys, xq, yq)
    params = list(seq.parameters())
    torch.testing.assert_close(a, b, **TOL)
    assert_grads_close(meta_grads(a, params), meta_grads(b, params))


def test_reptile_direction_and_steps(backend):
    model = make_mlp()
    xs, ys, xq, yq = sinusoid_batch()
    params = [p.detach().clone() for p in model.parameters()]
    learner = mk.Reptile(model, inner_lr=0.02, inner_steps=3)
    # Naive: adapt each task with plain SGD, direction theta - mean phi.
    phis = []
    for t in range(xs.shape[0]):
        leaf = [p.clone().requires_grad_() for p in params]
        phis.append([w.detach() for w in naive_adapt(mlp_functional, leaf, xs[t], ys[t], F.mse_loss,
                                                      lambda s, i: 0.02, 3, True)[-1]])
    direction = [p - torch.stack([phi[i] for phi in phis]).mean(0) for i, p in enumerate(params)]
    loss = learner.meta_loss(xs, ys, xq, yq)
    assert_grads_close(meta_grads(loss, list(model.parameters())), direction)
    # Batched step: theta + eps * (mean phi - theta) == theta - eps * direction.
    learner.batched_step(xs, ys, epsilon=0.5)
    for p, p0, d in zip(model.parameters(), params, direction, strict=False):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * d, **TOL)


def test_serial_reptile_matches_naive(backend):
    model = make_mlp()
    xs, ys, _, _ = sinusoid_batch()
    theta = [p.detach().clone() for p in model.parameters()]
    for t in range(xs.shape[0]):
        leaf = [p.clone().requires_grad_() for p in theta]
        phi = naive_adapt(mlp_functional, leaf, xs[t], ys[t], F.mse_loss, lambda s, i: 0.02, 2, True)[-1]
        theta = [p + 0.3 * (f.detach() - p) for p, f in zip(theta, phi, strict=False)]
    mk.Reptile(model, inner_lr=0.02, inner_steps=2).serial_step(xs, ys, epsilon=0.3)
    for p, expected in zip(model.parameters(), theta, strict=False):
        torch.testing.assert_close(p.detach(), expected, **TOL)


def test_adapt_and_predict_contract():
    model = make_mlp()
    xs, ys, xq, yq = sinusoid_batch()
    learner = mk.MAML(model, inner_lr=0.1, inner_steps=2)
    fast = learner.adapt(xs, ys)
    assert fast.flat.shape == (xs.shape[0], sum(p.numel() for p in model.parameters()))
    out = learner.predict(fast, xq)
    assert out.shape == yq.shape
    loss = torch.stack([F.mse_loss(out[t], yq[t]) for t in range(xs.shape[0])]).mean()
    torch.testing.assert_close(loss, learner.meta_loss(xs, ys, xq, yq), **TOL)
    with torch.no_grad():  # evaluation: adaptation still works, no graph is kept
        fast = learner.adapt(xs, ys)
    assert not fast.flat.requires_grad


def test_batchnorm_running_stats_untouched_and_restored():
    model = make_convnet()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    xs, ys, xq, yq = image_batch()
    mk.MAML(model, 0.1, 2, loss_fn=F.cross_entropy).meta_loss(xs, ys, xq, yq).backward()
    assert bn.track_running_stats and bn.running_mean is not None
    for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked), strict=False):
        assert torch.equal(a, b)


def test_frozen_parameters_are_not_adapted():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    learner = mk.MAML(model, 0.1, 1)
    assert "0.weight" not in learner.layout.names
    xs, ys, xq, yq = sinusoid_batch()
    learner.meta_loss(xs, ys, xq, yq).backward()
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_state_dict_and_outer_optimizer_learn_rates():
    model = make_mlp(dtype=torch.float32)
    learner = mk.MAMLPlusPlus(model, inner_lr=0.01, inner_steps=2)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    xs, ys, xq, yq = (t.float() for t in sinusoid_batch())
    before = learner.inner_lrs.detach().clone()
    learner.meta_loss(xs, ys, xq, yq).backward()
    opt.step()
    assert not torch.equal(before, learner.inner_lrs.detach())
    learner.set_epoch(7)
    state = learner.state_dict()
    assert "inner_lrs" in state and any(k.startswith("model.") for k in state)
    clone = mk.MAMLPlusPlus(make_mlp(dtype=torch.float32, seed=5), inner_lr=0.5, inner_steps=2)
    clone.load_state_dict(state)
    assert clone.epoch == 7 and torch.equal(clone.inner_lrs, learner.inner_lrs)


def test_maml_plus_plus_adapts_beyond_trained_steps_with_last_rates():
    model = make_mlp()
    xs, ys, _, _ = sinusoid_batch()
    learner = mk.MAMLPlusPlus(model, inner_lr=0.05, inner_steps=2)
    with torch.no_grad():
        learner.inner_lrs.copy_(torch.tensor([[0.01] * 6, [0.03] * 6], dtype=torch.float64))
        fast = learner.adapt(xs, ys, steps=4)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    rates = [0.01, 0.03, 0.03, 0.03]
    expected = naive_adapt(mlp_functional, params, xs[0], ys[0], F.mse_loss, lambda s, i: rates[s], 4, True)[-1]
    torch.testing.assert_close(fast.flat[0], torch.cat([w.detach().reshape(-1) for w in expected]), **TOL)
