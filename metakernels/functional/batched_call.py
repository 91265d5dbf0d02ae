"""The task-batched model call: one forward of T tasks, each with its own fast weights.

Generic path: torch.func.functional_call under vmap over the task dimension. BatchNorm normalises with
per-task batch statistics (the support batch during the inner loop, the query batch at query time, as
in MAML's Omniglot experiments); running statistics are neither used nor updated while meta-learning,
because a running average across tasks is not what the meta-objective differentiates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm in ``module`` uses batch statistics and tracks nothing.

    The running buffers are detached for the duration and restored afterwards, untouched.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked, m.track_running_stats))
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, mean, var, count, track in saved:
            m.running_mean, m.running_var, m.num_batches_tracked, m.track_running_stats = mean, var, count, track


def task_batched_call(
    module: nn.Module, params: Mapping[str, torch.Tensor] | None, *inputs: torch.Tensor
) -> torch.Tensor:
    """module(inputs[t]) with parameters params[name][t] for every task t at once.

    Args:
        module: the model; parameters not in ``params`` are shared by all tasks (used as they are).
        params: name -> [T, *shape] per-task parameters (e.g. TaskParams.views()), or None.
        inputs: [T, N, ...] tensors.

    Returns:
        [T, N, ...] outputs.
    """
    params = dict(params or {})

    def one_task(task_params: dict[str, torch.Tensor], *task_inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(module, task_params, task_inputs)

    with batch_statistics(module):
        return vmap(one_task, in_dims=(0,) + (0,) * len(inputs), randomness="different")(params, *inputs)
