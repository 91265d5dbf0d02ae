"""The task-batched model call: one forward of T tasks, each with its own fast weights.

Fused path: models made of the layers meta-learning uses (Linear/activation stacks, conv+BatchNorm+ReLU+
max-pool blocks; see fused_model.py) run as one fused op per layer. Generic path, for everything else:
torch.func.functional_call under vmap over the task dimension. BatchNorm normalises with per-task batch
statistics on both paths (the support batch during the inner loop, the query batch at query time, as in
MAML's Omniglot experiments); running statistics are neither used nor updated while meta-learning,
because a running average across tasks is not what the meta-objective differentiates.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .fused_model import Stage, build_plan, run_plan

# The fused ops' kernels cover these dtypes on the CPU (C++) and CUDA (Triton); others take the generic path.
_FUSED_DTYPES = (torch.float32, torch.float64)

# module -> (structure key, plan): rebuilding a plan walks the module tree, so it is cached per module.
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[Stage, ...] | None]] = weakref.WeakKeyDictionary()


def fused_dtype_supported(x: torch.Tensor, params: torch.Tensor) -> bool:
    """Whether the fused layer ops serve inputs x with parameters of params' dtype and device."""
    return (
        x.dtype == params.dtype
        and params.dtype in _FUSED_DTYPES
        and x.device == params.device
        and params.device.type in ("cpu", "cuda")
    )


def cached_plan(module: nn.Module) -> tuple[Stage, ...] | None:
    """build_plan(module), recomputed only when the set of submodules changes."""
    key = tuple((name, id(m)) for name, m in module.named_modules())
    hit = _PLANS.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = build_plan(module)
    _PLANS[module] = (key, plan)
    return plan


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
    module: nn.Module, params: Mapping[str, torch.Tensor] | None, *inputs: torch.Tensor, fused: bool = True
) -> torch.Tensor:
    """module(inputs[t]) with parameters params[name][t] for every task t at once.

    Args:
        module: the model; parameters not in ``params`` are shared by all tasks (used as they are).
        params: name -> [T, *shape] per-task parameters (e.g. TaskParams.views()), or None.
        inputs: [T, N, ...] tensors.
        fused: use the fused layer ops when the module is one they cover (same result; False forces vmap).

    Returns:
        [T, N, ...] outputs.
    """
    params = dict(params or {})
    reference = next(iter(params.values()), None) if params else next(module.parameters(), None)
    if fused and len(inputs) == 1 and reference is not None:
        stages = cached_plan(module)
        if stages is not None and fused_dtype_supported(inputs[0], reference):
            return run_plan(stages, module, params, inputs[0])

    def one_task(task_params: dict[str, torch.Tensor], *task_inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(module, task_params, task_inputs)

    with batch_statistics(module):
        return vmap(one_task, in_dims=(0,) + (0,) * len(inputs), randomness="different")(params, *inputs)
