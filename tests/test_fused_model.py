"""The fused model path (metakernels/functional/fused_model.py) computes what the generic vmap path computes.

Recognition: which modules get a fused plan, and that everything else falls back. Equivalence (float64, to
1e-10): outputs, first and second derivatives of the task-batched call, and every learner's meta-gradient
with fused=True against fused=False. The batched standard losses equal the per-task losses they replace.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive_meta import image_batch, make_convnet, make_mlp, sinusoid_batch
from torch import nn

import metakernels as mk
from metakernels.functional.batched_call import task_batched_call
from metakernels.functional.fused_model import ConvStage, FlattenStage, LinearStage, build_plan, mlp_spec
from metakernels.functional.task_params import TaskParams
from metakernels.learners._losses import per_task_losses

TOL = dict(rtol=1e-10, atol=1e-10)


def conv_block(cin: int, cout: int, pool: bool = True, stride: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


def nested_convnet(dtype=torch.float64) -> nn.Sequential:
    """The few-shot 4-conv layout as nested blocks (as learn2learn-style code builds it), on 8x8 inputs."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Sequential(conv_block(1, 3), conv_block(3, 4, pool=False, stride=2)),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


# --- recognition ------------------------------------------------------------------------------------------


def test_plans_of_the_standard_architectures():
    mlp = make_mlp((1, 40, 40, 1))
    stages = build_plan(mlp)
    assert stages == (
        LinearStage("0.weight", "0.bias", "relu"),
        LinearStage("2.weight", "2.bias", "relu"),
        LinearStage("4.weight", "4.bias", "identity"),
    )
    spec = mlp_spec(mlp, stages)
    assert spec is not None and spec.widths == (1, 40, 40, 1) and spec.activation == "relu"

    stages = build_plan(nested_convnet())
    assert stages is not None and len(stages) == 4
    first, second, flatten, head = stages
    assert isinstance(first, ConvStage) and first.pool and first.weight == "0.0.0.weight"
    assert first.bn_weight == "0.0.1.weight" and first.stride == 1 and first.padding == 1
    assert isinstance(second, ConvStage) and not second.pool and second.stride == 2
    assert isinstance(flatten, FlattenStage) and head == LinearStage("2.weight", "2.bias", "identity")
    assert mlp_spec(nested_convnet(), stages) is None


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1), nn.Linear(3, 1)),  # an unknown layer
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()),  # conv without BatchNorm
        nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.BatchNorm2d(2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(3), nn.Flatten()),
        nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)),
        nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(2, 1)),
        nn.Sequential(ScaledLinear(2, 1)),  # a subclass overrides forward
    ],
    ids=["dropout", "conv-no-bn", "dilated", "pool3", "gelu", "flatten-dim2", "linear-subclass"],
)
def test_unrecognised_modules_have_no_plan(model):
    assert build_plan(model) is None


def test_mlp_spec_needs_one_hidden_activation_and_a_linear_head():
    mixed = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    assert build_plan(mixed) is not None and mlp_spec(mixed, build_plan(mixed)) is None
    squashed = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1), nn.Tanh())
    assert mlp_spec(squashed, build_plan(squashed)) is None
    no_bias = nn.Sequential(nn.Linear(1, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
    assert mlp_spec(no_bias, build_plan(no_bias)) is None


# --- equivalence of the task-batched call -------------------------------------------------------------------


def _models_and_inputs():
    torch.manual_seed(0)
    tanh_mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    xs, _, _, _ = sinusoid_batch(num_tasks=3)
    images, _, _, _ = image_batch(num_tasks=2)
    return [
        ("relu-mlp", make_mlp((1, 6, 5, 1)), xs),
        ("tanh-mlp", tanh_mlp, torch.randn(3, 4, 3, dtype=torch.float64)),
        ("convnet", make_convnet(), images),
        ("nested-convnet", nested_convnet(), images),
    ]


@pytest.mark.parametrize("case", _models_and_inputs(), ids=lambda c: c[0])
def test_fused_call_equals_generic_call_to_second_order(case):
    _, model, x = case
    num_tasks = x.shape[0]
    base = TaskParams.from_module(model, num_tasks).flat.detach()
    flat = (base + 0.05 * torch.randn_like(base)).requires_grad_()  # different weights per task
    views = TaskParams(flat, TaskParams.from_module(model, num_tasks).layout).views()
    probe = torch.randn_like(task_batched_call(model, views, x, fused=False))

    def first_and_second(fused: bool):
        out = task_batched_call(model, views, x, fused=fused)
        (grad,) = torch.autograd.grad((out * probe).sum(), flat, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), flat)
        return out, grad, second

    for ours, theirs in zip(first_and_second(True), first_and_second(False), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_shared_parameters_are_broadcast_on_the_fused_path():
    model = make_convnet()
    x, _, _, _ = image_batch(num_tasks=2)
    torch.testing.assert_close(
        task_batched_call(model, None, x, fused=True), task_batched_call(model, None, x, fused=False), **TOL
    )


# --- equivalence of the learners --------------------------------------------------------------------------


def _episode(net: str):
    if net == "convnet":
        return make_convnet, image_batch(num_tasks=2), F.cross_entropy, 0.4
    if net == "classifier-mlp":
        g = torch.Generator().manual_seed(4)
        xs, xq = torch.randn(3, 6, 5, generator=g, dtype=torch.float64), torch.randn(3, 6, 5, generator=g,
                                                                                      dtype=torch.float64)
        ys = torch.randint(0, 4, (3, 6), generator=g)
        return (lambda: make_mlp((5, 7, 4))), (xs, ys, xq, ys.clone()), F.cross_entropy, 0.3
    return (lambda: make_mlp((1, 8, 8, 1))), sinusoid_batch(num_tasks=3), F.mse_loss, 0.1


@pytest.mark.parametrize("net", ["sinusoid-mlp", "classifier-mlp", "convnet"])
@pytest.mark.parametrize(
    "learner",
    [
        lambda m, lr, loss, fused: mk.MAML(m, inner_lr=lr, inner_steps=2, loss_fn=loss, fused=fused),
        lambda m, lr, loss, fused: mk.MAML(m, inner_lr=lr, inner_steps=2, first_order=True, loss_fn=loss, fused=fused),
        lambda m, lr, loss, fused: mk.MetaSGD(m, inner_lr=lr, inner_steps=2, loss_fn=loss, fused=fused),
        lambda m, lr, loss, fused: mk.MAMLPlusPlus(m, inner_lr=lr, inner_steps=2, loss_fn=loss, fused=fused),
        lambda m, lr, loss, fused: mk.ANIL(m, inner_lr=lr, inner_steps=2, loss_fn=loss, fused=fused),
    ],
    ids=["maml", "fomaml", "meta-sgd", "maml++", "anil"],
)
def test_learner_meta_gradient_is_the_same_on_both_paths(net, learner):
    make, (xs, ys, xq, yq), loss_fn, lr = _episode(net)
    grads = []
    for fused in (True, False):
        model = make()
        meta = learner(model, lr, loss_fn, fused)
        loss = meta.meta_loss(xs, ys, xq, yq)
        params = [p for p in meta.parameters() if p.requires_grad]
        grads.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (loss_f, grad_f), (loss_g, grad_g) = grads
    torch.testing.assert_close(loss_f, loss_g, **TOL)
    for a, b in zip(grad_f, grad_g, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **TOL)


def test_fused_flag_selects_the_path():
    assert mk.MAML(make_mlp(), fused=False)._stages is None
    learner = mk.MAML(make_mlp())
    assert learner._stages is not None and learner._mlp is not None
    # ANIL adapts the head only: the whole-MLP kernel (which adapts every layer) must not be used.
    assert mk.ANIL(make_mlp())._mlp is None


# --- batched standard losses ------------------------------------------------------------------------------


def _loop(loss_fn, pred, target):
    return torch.stack([loss_fn(p, t) for p, t in zip(pred, target, strict=True)])


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss()], ids=["F.mse_loss", "nn.MSELoss"])
def test_batched_mse_equals_per_task_loss(loss_fn):
    pred, target = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(per_task_losses(loss_fn, pred, target), _loop(loss_fn, pred, target), **TOL)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss()], ids=["F", "nn"])
def test_batched_cross_entropy_equals_per_task_loss_with_ignored_targets(loss_fn):
    pred = torch.randn(3, 5, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5))
    target[1, :2] = -100  # ignore_index: left out of that task's mean
    torch.testing.assert_close(per_task_losses(loss_fn, pred, target), _loop(loss_fn, pred, target), **TOL)


def test_other_losses_still_go_through_vmap():
    pred, target = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    logits, labels = torch.randn(2, 5, 3, dtype=torch.float64), torch.randint(0, 3, (2, 5))
    torch.testing.assert_close(per_task_losses(F.l1_loss, pred, target), _loop(F.l1_loss, pred, target), **TOL)
    torch.testing.assert_close(per_task_losses(smooth, logits, labels), _loop(smooth, logits, labels), **TOL)
