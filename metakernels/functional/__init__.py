"""Task-batched parameters and model calls: TaskParams ([T, P] + layout) and the task-batched forward."""

from .batched_call import batch_statistics, task_batched_call
from .cg import CGResult, batched_cg
from .hessian_penalty import hessian_penalty
from .task_params import ParameterLayout, TaskParams

__all__ = [
    "CGResult",
    "ParameterLayout",
    "TaskParams",
    "batch_statistics",
    "batched_cg",
    "hessian_penalty",
    "task_batched_call",
]
