"""Cross-checks of metakernels' meta-gradients against the peer libraries: learn2learn, higher, torchopt.

Each peer computes the meta-loss its own documented way (learn2learn: clone()/adapt(); higher:
innerloop_ctx with a differentiable SGD; torchopt: its MetaSGD optimizer and its functional sgd), one
task at a time, on the sinusoid MLP (1-40-40-1) and on a small conv net with BatchNorm, in float64 with
several inner steps; the loss and every meta-gradient must agree with metakernels to 1e-9.

BatchNorm: metakernels normalises with each task's batch statistics and tracks no running statistics,
so the peers get a copy of the conv net whose BatchNorm layers have track_running_stats=False (batch
statistics in every call, nothing updated between tasks): all then compute the same function.

The peers are installed by scripts/install_peers.sh. A missing peer skips its tests, except with
METAKERNELS_REQUIRE_PEERS=1 (CI), where it fails them. On a mismatch the assertion message also says
which side agrees with the naive per-task loop of naive_meta.py (the oracle).
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from naive_meta import (
    convnet_functional,
    image_batch,
    make_convnet,
    make_mlp,
    mlp_functional,
    naive_meta_loss,
    sinusoid_batch,
)
from torch import nn
from torch.func import functional_call

import metakernels as mk

TOL = dict(rtol=1e-9, atol=1e-9)
REQUIRE_PEERS = os.environ.get("METAKERNELS_REQUIRE_PEERS") == "1"
STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module: these problems are a few thousand tiny ops, and on a busy
    2-core machine a second OpenMP thread makes them 10-100x slower (measured), for no gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- peers ---------------------------------------------------------------------------------------------
def _import_peer(name: str):
    """The peer module; skips without it, or fails under METAKERNELS_REQUIRE_PEERS=1."""
    with warnings.catch_warnings():  # the peers' own import-time deprecation warnings
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            if REQUIRE_PEERS:
                pytest.fail(f"peer {name} is required (METAKERNELS_REQUIRE_PEERS=1) but does not import: {exc}; "
                            f"run scripts/install_peers.sh", pytrace=False)
            pytest.skip(f"peer {name} not installed ({exc}); scripts/install_peers.sh installs it")


@pytest.fixture(scope="module")
def l2l():
    return _import_peer("learn2learn")


@pytest.fixture(scope="module")
def higher():
    return _import_peer("higher")


@pytest.fixture(scope="module")
def torchopt():
    return _import_peer("torchopt")


# --- problems ------------------------------------------------------------------------------------------
# net -> (model factory, functional twin for the naive oracle, batch, loss, inner lr)
CASES = {
    "mlp": (make_mlp, mlp_functional, sinusoid_batch, F.mse_loss, 0.05),
    "convnet": (make_convnet, convnet_functional, image_batch, F.cross_entropy, 0.4),
}


def untracked(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers use batch statistics in every call and keep no running statistics
    (as if built with track_running_stats=False): the function metakernels computes."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def setup(net: str):
    make, fn, batch, loss_fn, lr = CASES[net]
    model = make()
    return model, untracked(model), fn, batch(), loss_fn, lr


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, list(params), allow_unused=True), strict=True)]


def ours(learner: mk.learners.GradientLearner, batch, extra=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = learner.meta_loss(*batch)
    return loss.detach(), grads_of(loss, list(learner.model.parameters()) + list(extra))


@functools.cache
def ours_maml(net: str, first_order: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """metakernels.MAML's loss and meta-gradients on a case; several peers compare against the same one."""
    model, _, _, batch, loss_fn, lr = setup(net)
    return ours(mk.MAML(model, inner_lr=lr, inner_steps=STEPS, first_order=first_order, loss_fn=loss_fn), batch)


def assert_agree(peer: str, mine, theirs, oracle=None) -> None:
    """Loss and meta-gradients agree; on a mismatch, says which side the naive loop agrees with."""
    (loss_a, grads_a), (loss_b, grads_b) = mine, theirs
    assert len(grads_a) == len(grads_b)
    pairs = [("loss", loss_a, loss_b)]
    pairs += [(f"grad[{i}]", a, b) for i, (a, b) in enumerate(zip(grads_a, grads_b, strict=True))]
    for what, a, b in pairs:
        try:
            torch.testing.assert_close(a, b, **TOL)
        except AssertionError as exc:
            verdict = ""
            if oracle is not None:
                loss_n, grads_n = oracle()
                n = {"loss": loss_n, **{f"grad[{i}]": g for i, g in enumerate(grads_n)}}[what]
                err_a, err_b = (a - n).abs().max().item(), (b - n).abs().max().item()
                verdict = (f"\nnaive loop vs metakernels: max |diff| {err_a:.3e}; naive loop vs {peer}: "
                           f"max |diff| {err_b:.3e}")
            raise AssertionError(f"metakernels and {peer} disagree on {what}: {exc}{verdict}") from None
    # The comparison is not vacuous: the meta-gradient is far from zero.
    assert max(g.abs().max().item() for g in grads_a) > 1e-3


def naive_oracle(model, fn, batch, loss_fn, lrs, first_order, mask=None, extra=()):
    params = list(model.parameters())

    def run():
        loss = naive_meta_loss(fn, params, *batch, loss_fn, lrs, STEPS, first_order, mask)
        return loss.detach(), grads_of(loss, params + list(extra))

    return run


# --- learn2learn -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learn2learn_maml(l2l, net, first_order):
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    maml = l2l.algorithms.MAML(peer_model, lr=lr, first_order=first_order)
    total = 0.0
    for t in range(xs.shape[0]):
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(loss_fn(learner(xs[t]), ys[t]))
        total = total + loss_fn(learner(xq[t]), yq[t])
    total = total / xs.shape[0]
    theirs = total.detach(), grads_of(total, list(peer_model.parameters()))
    mine = ours_maml(net, first_order)
    assert_agree("learn2learn MAML", mine, theirs,
                 naive_oracle(model, fn, batch, loss_fn, lambda s, i: lr, first_order))


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learn2learn_meta_sgd(l2l, net, first_order):
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    learner_mk = mk.MetaSGD(model, inner_lr=lr, inner_steps=STEPS, first_order=first_order, loss_fn=loss_fn)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct per-coordinate rates, some negative
        learner_mk.inner_lrs.copy_(lr * (torch.rand(learner_mk.inner_lrs.shape, generator=g, dtype=torch.float64)
                                         * 1.5 - 0.25))
    rates = [r.detach().clone() for r in learner_mk.rates_by_name().values()]
    assert list(learner_mk.rates_by_name()) == [n for n, _ in model.named_parameters()]
    meta_sgd = l2l.algorithms.MetaSGD(peer_model, lr=lr, first_order=first_order,
                                      lrs=nn.ParameterList([nn.Parameter(r.clone()) for r in rates]))
    total = 0.0
    for t in range(xs.shape[0]):
        learner = meta_sgd.clone()
        for _ in range(STEPS):
            learner.adapt(loss_fn(learner(xs[t]), ys[t]))
        total = total + loss_fn(learner(xq[t]), yq[t])
    total = total / xs.shape[0]
    their_grads = grads_of(total, list(peer_model.parameters()) + list(meta_sgd.lrs))
    n = len(list(peer_model.parameters()))
    theirs = total.detach(), their_grads[:n] + [torch.cat([r.reshape(-1) for r in their_grads[n:]])]
    mine = ours(learner_mk, batch, extra=[learner_mk.inner_lrs])

    def oracle():
        leaves = [r.clone().requires_grad_() for r in rates]
        loss, grads = naive_oracle(model, fn, batch, loss_fn, lambda s, i: leaves[i], first_order,
                                   extra=leaves)()
        return loss, grads[:n] + [torch.cat([r.reshape(-1) for r in grads[n:]])]

    assert_agree("learn2learn MetaSGD", mine, theirs, oracle)


@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_learn2learn_anil(l2l, net):
    """learn2learn's ANIL recipe: the body runs outside, only the head is wrapped in MAML."""
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    body, head = peer_model[:-1], l2l.algorithms.MAML(peer_model[-1], lr=lr)
    total = 0.0
    for t in range(xs.shape[0]):
        learner = head.clone()
        fs, fq = body(xs[t]), body(xq[t])  # per-task support and query batches, as metakernels does
        for _ in range(STEPS):
            learner.adapt(loss_fn(learner(fs), ys[t]))
        total = total + loss_fn(learner(fq), yq[t])
    total = total / xs.shape[0]
    theirs = total.detach(), grads_of(total, list(peer_model.parameters()))
    mine = ours(mk.ANIL(model, inner_lr=lr, inner_steps=STEPS, loss_fn=loss_fn), batch)
    num = len(list(model.parameters()))
    assert_agree("learn2learn MAML(head)", mine, theirs,
                 naive_oracle(model, fn, batch, loss_fn, lambda s, i: lr, False, [False] * (num - 2) + [True] * 2))


# --- higher ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("track_higher_grads", [True, False])
def test_higher_innerloop_ctx(higher, net, track_higher_grads):
    """track_higher_grads=True: MAML. False: higher detaches the fast weights after every step, so the
    query loss's gradient with respect to the final fast weights is the first-order (FOMAML) meta-gradient."""
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    params = list(peer_model.parameters())
    inner_opt = torch.optim.SGD(params, lr=lr)
    total_loss = 0.0
    total_grads = [torch.zeros_like(p) for p in params]
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(peer_model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=track_higher_grads) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(loss_fn(fmodel(xs[t]), ys[t]))
            query = loss_fn(fmodel(xq[t]), yq[t]) / xs.shape[0]
            wrt = params if track_higher_grads else list(fmodel.parameters())
            total_grads = [a + b for a, b in zip(total_grads, grads_of(query, wrt), strict=True)]
            total_loss = total_loss + query.detach()
    first_order = not track_higher_grads
    mine = ours_maml(net, first_order)
    assert_agree(f"higher (track_higher_grads={track_higher_grads})", mine, (total_loss, total_grads),
                 naive_oracle(model, fn, batch, loss_fn, lambda s, i: lr, first_order))


# --- torchopt ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_torchopt_meta_sgd(torchopt, net):
    """torchopt's MAML recipe: MetaSGD steps the module in place; extract/recover_state_dict reset it."""
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    params = list(peer_model.parameters())
    inner_opt = torchopt.MetaSGD(peer_model, lr=lr)
    net_state = torchopt.extract_state_dict(peer_model)
    opt_state = torchopt.extract_state_dict(inner_opt)
    total = 0.0
    for t in range(xs.shape[0]):
        for _ in range(STEPS):
            inner_opt.step(loss_fn(peer_model(xs[t]), ys[t]))
        total = total + loss_fn(peer_model(xq[t]), yq[t])
        torchopt.recover_state_dict(peer_model, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    total = total / xs.shape[0]
    theirs = total.detach(), grads_of(total, params)
    mine = ours_maml(net, False)
    assert_agree("torchopt MetaSGD", mine, theirs, naive_oracle(model, fn, batch, loss_fn, lambda s, i: lr, False))


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("first_order", [False, True])
def test_torchopt_functional_sgd(torchopt, net, first_order):
    """torchopt's functional API: sgd().update + apply_updates on a parameter dict, torch.func.functional_call."""
    model, peer_model, fn, batch, loss_fn, lr = setup(net)
    xs, ys, xq, yq = batch
    theta = dict(peer_model.named_parameters())
    optimizer = torchopt.sgd(lr=lr)
    total = 0.0
    for t in range(xs.shape[0]):
        fast = dict(theta)
        state = optimizer.init(fast)
        for _ in range(STEPS):
            loss = loss_fn(functional_call(peer_model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            updates, state = optimizer.update(dict(zip(fast, grads, strict=True)), state, inplace=False)
            fast = torchopt.apply_updates(fast, updates, inplace=False)
        total = total + loss_fn(functional_call(peer_model, fast, (xq[t],)), yq[t])
    total = total / xs.shape[0]
    theirs = total.detach(), grads_of(total, list(theta.values()))
    mine = ours_maml(net, first_order)
    assert_agree("torchopt sgd (functional)", mine, theirs,
                 naive_oracle(model, fn, batch, loss_fn, lambda s, i: lr, first_order))


# --- the BatchNorm configuration itself -------------------------------------------------------------------
def test_metakernels_ignores_running_stats_configuration():
    """metakernels computes the same meta-gradient whether the conv net's BatchNorm tracks running
    statistics or not (it uses per-task batch statistics either way), so giving the peers the untracked
    copy compares like with like."""
    _, peer_model, _, batch, loss_fn, lr = setup("convnet")
    a = ours_maml("convnet", False)
    b = ours(mk.MAML(peer_model, inner_lr=lr, inner_steps=STEPS, loss_fn=loss_fn), batch)
    assert_agree("metakernels on the untracked copy", a, b)
