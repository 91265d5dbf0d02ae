"""Fused execution plans for the modules meta-learning uses most.

The generic task-batched call (torch.func.vmap over functional_call) runs every layer as several batched
ops plus vmap's own bookkeeping. For the two architectures of the MAML literature the whole layer is one
fused op instead:

- stacks of nn.Linear, each optionally followed by nn.ReLU / nn.Tanh / nn.Identity   -> task_linear
- nn.Conv2d + nn.BatchNorm2d + nn.ReLU [+ nn.MaxPool2d(2)] (the few-shot "conv block") -> conv_block
- nn.Flatten between them

A model is recognised when it is an nn.Sequential (nested Sequentials are flattened) whose leaves all
match those patterns; anything else returns no plan, and the caller uses the generic path. Both paths
compute the same function (tests/test_fused_model.py checks it to 1e-10 in float64): BatchNorm uses
per-task batch statistics in both, and its running buffers are neither read nor written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Identity: "identity"}


@dataclass(frozen=True)
class LinearStage:
    """task_linear: Linear(weight, bias) followed by an activation."""

    weight: str
    bias: str | None
    activation: str


@dataclass(frozen=True)
class ConvStage:
    """conv_block: Conv2d + BatchNorm2d (batch statistics) + ReLU [+ MaxPool2d(2)]."""

    weight: str
    bias: str | None
    bn_weight: str | None
    bn_bias: str | None
    stride: int
    padding: int
    eps: float
    pool: bool


@dataclass(frozen=True)
class FlattenStage:
    """nn.Flatten(): [T, N, ...] -> [T, N, features]."""


Stage = LinearStage | ConvStage | FlattenStage


@dataclass(frozen=True)
class MlpSpec:
    """A pure MLP: what the fused whole-MLP op mlp_loss_grad needs to know about it."""

    widths: tuple[int, ...]
    activation: str
    parameter_names: tuple[str, ...]  # weight, bias of each layer in order: the flat layout it expects


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]] | None:
    """(qualified name, module) of the leaves of nested nn.Sequentials; None if another container appears."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            sub = _leaves(child, f"{prefix}{name}.")
            if sub is None:
                return None
            out.extend(sub)
        return out
    if any(True for _ in module.children()):
        return None  # a custom container: its forward could do anything
    return [(prefix.rstrip("."), module)]


def _is_plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def _is_plain_conv(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:
        return False
    k, s, p = m.kernel_size, m.stride, m.padding
    return (
        m.groups == 1
        and m.dilation == (1, 1)
        and m.padding_mode == "zeros"
        and not isinstance(p, str)
        and k[0] == k[1]
        and s[0] == s[1]
        and p[0] == p[1]
    )


def _is_pool2(m: nn.Module) -> bool:
    if type(m) is not nn.MaxPool2d:
        return False

    def pair(v) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (
        pair(m.kernel_size) == (2, 2)
        and pair(m.stride) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def _param_name(prefix: str, module: nn.Module, attr: str) -> str | None:
    if getattr(module, attr, None) is None:
        return None
    return f"{prefix}.{attr}" if prefix else attr  # a bare module (not in a Sequential) has no prefix


def build_plan(module: nn.Module) -> tuple[Stage, ...] | None:
    """The fused stages computing ``module``, or None when it has a layer the fused ops do not cover."""
    leaves = _leaves(module)
    if not leaves:
        return None
    stages: list[Stage] = []
    i = 0
    while i < len(leaves):
        name, m = leaves[i]
        nxt = [leaf for _, leaf in leaves[i + 1 : i + 4]]
        if _is_plain_linear(m):
            activation, used = "identity", 1
            if nxt and type(nxt[0]) in _ACTIVATIONS:
                activation, used = _ACTIVATIONS[type(nxt[0])], 2
            stages.append(LinearStage(_param_name(name, m, "weight"), _param_name(name, m, "bias"), activation))
            i += used
        elif _is_plain_conv(m):
            if len(nxt) < 2 or type(nxt[0]) is not nn.BatchNorm2d or type(nxt[1]) is not nn.ReLU:
                return None
            bn_name = leaves[i + 1][0]
            bn = nxt[0]
            if bn.num_features != m.out_channels:
                return None
            pool = len(nxt) > 2 and _is_pool2(nxt[2])
            stages.append(
                ConvStage(
                    weight=_param_name(name, m, "weight"),
                    bias=_param_name(name, m, "bias"),
                    bn_weight=_param_name(bn_name, bn, "weight"),
                    bn_bias=_param_name(bn_name, bn, "bias"),
                    stride=m.stride[0],
                    padding=m.padding[0],
                    eps=float(bn.eps),
                    pool=pool,
                )
            )
            i += 4 if pool else 3
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            stages.append(FlattenStage())
            i += 1
        else:
            return None
    return tuple(stages)


def mlp_spec(module: nn.Module, stages: tuple[Stage, ...] | None) -> MlpSpec | None:
    """The whole-MLP description when the plan is Linear layers with one hidden activation and a linear head."""
    if not stages or not all(isinstance(s, LinearStage) for s in stages):
        return None
    hidden = {s.activation for s in stages[:-1]}
    if stages[-1].activation != "identity" or len(hidden) > 1 or any(s.bias is None for s in stages):
        return None
    params = dict(module.named_parameters())
    widths = [params[stages[0].weight].shape[1]] + [params[s.weight].shape[0] for s in stages]
    names = tuple(n for s in stages for n in (s.weight, s.bias))
    return MlpSpec(tuple(int(w) for w in widths), hidden.pop() if hidden else "identity", names)


def _task_tensor(
    name: str | None, params: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor], num_tasks: int
) -> torch.Tensor | None:
    """The [T, *shape] per-task tensor of a parameter; a shared (not adapted) one is broadcast without a copy."""
    if name is None:
        return None
    if name in params:
        return params[name]
    value = shared[name]
    return value.unsqueeze(0).expand(num_tasks, *value.shape)


def run_plan(
    stages: tuple[Stage, ...], module: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Runs the fused stages on [T, N, ...] inputs with per-task parameters (missing names are shared)."""
    from ..ops.conv_block import conv_block
    from ..ops.task_linear import task_linear

    shared = dict(module.named_parameters())
    num_tasks = x.shape[0]
    for stage in stages:
        if isinstance(stage, LinearStage):
            weight = _task_tensor(stage.weight, params, shared, num_tasks)
            bias = _task_tensor(stage.bias, params, shared, num_tasks)
            lead = x.shape[:-1]
            x = task_linear(x.reshape(num_tasks, -1, x.shape[-1]), weight, bias, stage.activation)
            x = x.reshape(*lead, x.shape[-1])
        elif isinstance(stage, ConvStage):
            x = conv_block(
                x,
                _task_tensor(stage.weight, params, shared, num_tasks),
                _task_tensor(stage.bias, params, shared, num_tasks),
                _task_tensor(stage.bn_weight, params, shared, num_tasks),
                _task_tensor(stage.bn_bias, params, shared, num_tasks),
                stride=stage.stride,
                padding=stage.padding,
                eps=stage.eps,
                pool=stage.pool,
            )
        else:
            x = x.reshape(x.shape[0], x.shape[1], -1)
    return x
