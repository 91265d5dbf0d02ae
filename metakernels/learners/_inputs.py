"""Validation of the task batches the learners receive: every error names the argument at fault."""

from __future__ import annotations

import torch

from .._validation import shape_str


def check_pair(
    who: str, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor, x_name: str = "xs", y_name: str = "ys"
) -> int:
    """Checks an input/target pair of shape [T, N, ...]; returns T. ``reference`` is a model parameter."""
    for name, t in ((x_name, x), (y_name, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{who}: {name} must be [T, N, ...] (tasks first), got shape {shape_str(t)}")
        if t.device != reference.device:
            raise ValueError(f"{who}: {name} is on {t.device} but the model's parameters are on {reference.device}")
    if x.shape[0] == 0:
        raise ValueError(f"{who}: {x_name} is an empty task batch (T = 0)")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{who}: {y_name} has {y.shape[0]} tasks but {x_name} has {x.shape[0]}")
    if x.shape[1] == 0:
        raise ValueError(f"{who}: {x_name} has no examples per task (N = 0)")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"{who}: {y_name} has {y.shape[1]} examples per task but {x_name} has {x.shape[1]}")
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise TypeError(f"{who}: {x_name} has dtype {x.dtype} but the model's parameters are {reference.dtype}")
    for name, t in ((x_name, x), (y_name, y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{who}: {name} contains NaN or inf")
    return x.shape[0]


def check_episode(
    who: str, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, reference: torch.Tensor
) -> int:
    """Checks the support and query sets of one meta-batch; returns T."""
    num_tasks = check_pair(who, xs, ys, reference, "xs", "ys")
    check_pair(who, xq, yq, reference, "xq", "yq")
    if xq.shape[0] != num_tasks:
        raise ValueError(
            f"{who}: support and query sets have different task counts: xs has T = {num_tasks}, "
            f"xq has T = {xq.shape[0]}"
        )
    if xq.shape[2:] != xs.shape[2:]:
        raise ValueError(f"{who}: xq's examples have shape {list(xq.shape[2:])} but xs's have {list(xs.shape[2:])}")
    return num_tasks
