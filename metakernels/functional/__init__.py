"""Task-batched parameters and model calls: TaskParams ([T, P] + layout) and the task-batched forward."""

from .batched_call import batch_statistics, task_batched_call
from .task_params import ParameterLayout, TaskParams

__all__ = ["ParameterLayout", "TaskParams", "batch_statistics", "task_batched_call"]
