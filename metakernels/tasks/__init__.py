"""Task distributions for meta-learning experiments."""

from .sinusoid import (
    HELDOUT_SEED,
    HELDOUT_TASKS,
    SinusoidEpisode,
    SinusoidTasks,
    derive_seed,
    sinusoid,
    sinusoid_mlp,
    task_generator,
)

__all__ = [
    "HELDOUT_SEED",
    "HELDOUT_TASKS",
    "SinusoidEpisode",
    "SinusoidTasks",
    "derive_seed",
    "sinusoid",
    "sinusoid_mlp",
    "task_generator",
]
