"""Independent oracles for the learners: hand-written functional models and a naive per-task autograd loop.

Nothing here uses metakernels: every task is adapted on its own with torch.autograd.grad, as a
researcher would write MAML from its definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Functional = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


def make_mlp(sizes=(1, 40, 40, 1), dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def mlp_functional(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            x = F.relu(x)
    return x


def make_convnet(channels=4, ways=3, dtype=torch.float64, seed=0) -> nn.Sequential:
    """Two conv blocks (conv3x3 + BatchNorm + ReLU + maxpool2) and a linear head, on 1x8x8 inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * 2 * 2, ways),
    ).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def convnet_functional(p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in (0, 4):
        w, b, gamma, beta = p[i], p[i + 1], p[i + 2], p[i + 3]
        x = F.conv2d(x, w, b, padding=1)
        x = F.batch_norm(x, None, None, gamma, beta, training=True)  # per-task batch statistics
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p[8], p[9])


def naive_adapt(
    fn: Functional, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_fn, lrs, steps: int,
    first_order: bool, adapt_mask: list[bool] | None = None,
) -> list[list[torch.Tensor]]:
    """Fast weights after each step for ONE task. lrs(step, i) -> the rate of parameter i at that step."""
    fast = list(params)
    adapt_mask = adapt_mask or [True] * len(params)
    history = []
    for step in range(steps):
        loss = loss_fn(fn(fast, x), y)
        targets = [w for w, m in zip(fast, adapt_mask, strict=False) if m]
        grads = iter(torch.autograd.grad(loss, targets, create_graph=not first_order))
        pairs = enumerate(zip(fast, adapt_mask, strict=True))
        fast = [w - lrs(step, i) * next(grads) if m else w for i, (w, m) in pairs]
        history.append(fast)
    return history


def naive_meta_loss(
    fn: Functional, params: list[torch.Tensor], xs, ys, xq, yq, loss_fn, lrs, steps: int, first_order: bool,
    adapt_mask: list[bool] | None = None, step_weights: list[float] | None = None,
) -> torch.Tensor:
    total = 0.0
    for t in range(xs.shape[0]):
        history = naive_adapt(fn, params, xs[t], ys[t], loss_fn, lrs, steps, first_order, adapt_mask)
        if step_weights is not None:
            total = total + sum(w * loss_fn(fn(f, xq[t]), yq[t]) for w, f in zip(step_weights, history, strict=False))
        else:
            final = history[-1] if history else params
            total = total + loss_fn(fn(final, xq[t]), yq[t])
    return total / xs.shape[0]


def sinusoid_batch(num_tasks=4, shots=5, seed=1, dtype=torch.float64):
    """A meta-batch of the MAML paper's sinusoid tasks: (xs, ys, xq, yq), each [T, shots, 1]."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype) * torch.pi
    x = torch.rand(num_tasks, 2 * shots, 1, generator=g, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def image_batch(num_tasks=3, ways=3, shots=2, seed=2, dtype=torch.float64):
    """A meta-batch of random 1x8x8 images with class labels, for the conv net."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, ways * shots, 1, 8, 8, generator=g, dtype=dtype)
    xq = torch.randn(num_tasks, ways * shots, 1, 8, 8, generator=g, dtype=dtype)
    ys = torch.arange(ways).repeat_interleave(shots).expand(num_tasks, -1).clone()
    return xs, ys, xq, ys.clone()
