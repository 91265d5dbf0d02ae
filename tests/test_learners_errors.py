"""Bad input to the learners: clear errors naming the argument, NaN/inf policies, no lost state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive_meta import make_mlp, sinusoid_batch

import metakernels as mk


@pytest.fixture
def learner():
    return mk.MAML(make_mlp(), inner_lr=0.1, inner_steps=2)


def test_empty_task_batch(learner):
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(ValueError, match="xs is an empty task batch"):
        learner.meta_loss(xs[:0], ys[:0], xq[:0], yq[:0])


def test_support_and_query_task_counts_differ(learner):
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(ValueError, match="different task counts: xs has T = 4, xq has T = 3"):
        learner.meta_loss(xs, ys, xq[:3], yq[:3])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: (b[0], b[1][:3], b[2], b[3]), "ys has 3 tasks but xs has 4"),
        (lambda b: (b[0], b[1][:, :2], b[2], b[3]), "ys has 2 examples per task but xs has 5"),
        (lambda b: (b[0][0, 0], b[1], b[2], b[3]), r"xs must be \[T, N, ...\]"),
        (lambda b: (b[0], b[1], b[2], b[3][:2]), "yq has 2 tasks but xq has 4"),
        (lambda b: (b[0], b[1], torch.cat([b[2], b[2]], -1), b[3]), "xq's examples have shape"),
        (lambda b: (b[0][:, :0], b[1][:, :0], b[2], b[3]), "xs has no examples per task"),
    ],
)
def test_shape_errors_name_the_argument(learner, mutate, match):
    with pytest.raises(ValueError, match=match):
        learner.meta_loss(*mutate(sinusoid_batch()))


def test_dtype_and_device_errors(learner):
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(TypeError, match="xs has dtype torch.float32 but the model's parameters are torch.float64"):
        learner.meta_loss(xs.float(), ys, xq, yq)
    with pytest.raises(ValueError, match="xq is on meta"):
        learner.meta_loss(xs, ys, xq.to("meta"), yq)
    with pytest.raises(TypeError, match="ys must be a tensor"):
        learner.meta_loss(xs, ys.tolist(), xq, yq)


def test_nan_in_inputs_is_named(learner):
    xs, ys, xq, yq = sinusoid_batch()
    ys = ys.clone()
    ys[1, 0] = float("nan")
    with pytest.raises(ValueError, match="ys contains NaN or inf"):
        learner.meta_loss(xs, ys, xq, yq)


def test_constructor_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="inner_steps"):
        mk.MAML(model, inner_steps=-1)
    with pytest.raises(ValueError, match="nonfinite"):
        mk.MAML(model, nonfinite="ignore")
    with pytest.raises(ValueError, match="inner_lr must be finite"):
        mk.MAML(model, inner_lr=float("inf"))
    with pytest.raises(ValueError, match="head 'nope'"):
        mk.ANIL(model, head="nope")
    frozen = make_mlp()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to adapt"):
        mk.MAML(frozen)


def test_learning_rate_table_of_wrong_shape_is_named():
    model = make_mlp()
    learner = mk.MAMLPlusPlus(model, inner_lr=0.1, inner_steps=2)
    learner.inner_lrs = torch.nn.Parameter(torch.full((2, 3), 0.1, dtype=torch.float64))  # 6 tensors, not 3
    xs, ys, xq, yq = sinusoid_batch()
    with pytest.raises(ValueError, match="lr must be a 1-D table of 6 rates"):
        learner.meta_loss(xs, ys, xq, yq)


def _exploding_batch():
    """Task 2's support targets are huge: its inner loss and gradients overflow to inf in float32."""
    xs, ys, xq, yq = (t.float() for t in sinusoid_batch())
    ys = ys.clone()
    ys[2] = 3e38
    return xs, ys, xq, yq


def test_nonfinite_raise_names_the_task():
    model = make_mlp(dtype=torch.float32)
    learner = mk.MAML(model, inner_lr=0.1, inner_steps=1)
    with pytest.raises(FloatingPointError, match=r"tasks \[2\] produced NaN/inf \(first seen in the inner loss"):
        learner.meta_loss(*_exploding_batch())


def test_nonfinite_skip_drops_the_task_and_matches_the_clean_batch():
    model = make_mlp(dtype=torch.float32)
    learner = mk.MAML(model, inner_lr=0.1, inner_steps=1, nonfinite="skip")
    xs, ys, xq, yq = _exploding_batch()
    with pytest.warns(RuntimeWarning, match=r"skipping tasks \[2\]"):
        loss = learner.meta_loss(xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    keep = torch.tensor([0, 1, 3])
    clean = mk.MAML(model, inner_lr=0.1, inner_steps=1).meta_loss(xs[keep], ys[keep], xq[keep], yq[keep])
    clean_grads = torch.autograd.grad(clean, list(model.parameters()))
    torch.testing.assert_close(loss, clean)
    for a, b in zip(grads, clean_grads, strict=False):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_reptile_refuses_nonfinite_update_and_keeps_the_model():
    model = make_mlp(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    xs, ys, _, _ = _exploding_batch()
    with pytest.raises(FloatingPointError, match="the model was not updated"):
        mk.Reptile(model, inner_lr=0.1, inner_steps=1).batched_step(xs, ys, epsilon=0.5)
    for p, b in zip(model.parameters(), before, strict=False):
        assert torch.equal(p.detach(), b)


def test_loss_fn_must_return_one_scalar_per_task(learner):
    xs, ys, xq, yq = sinusoid_batch()
    learner.loss_fn = lambda p, t: F.mse_loss(p, t, reduction="none")
    with pytest.raises(ValueError, match="one scalar per task"):
        learner.meta_loss(xs, ys, xq, yq)
