"""The sinusoid regression task of MAML (Finn, Abbeel & Levine, ICML 2017, section 5.1).

Each task is y = A sin(x - phase) with A ~ U[0.1, 5.0], phase ~ U[0, pi] and inputs x ~ U[-5, 5]; a
K-shot episode gives K support points to adapt on and separate query points of the same sine to score the
adapted model. These ranges and the form A sin(x - phase) are those of the authors' code
(github.com/cbfinn/maml, data_generator.py); the model is their MLP 1-40-40-1 with ReLU.

Sampling is a pure function of (seed, iteration): every meta-batch draws from its own torch.Generator seeded
from a hash of (stream, seed, iteration). A resumed run therefore sees exactly the tasks an uninterrupted
run would have seen, with no sampler state to checkpoint, and the held-out set (stream "heldout") shares no
generator with training whatever seeds are chosen.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

#: The held-out evaluation set: 600 tasks, the number of test tasks in the MAML authors' code (NUM_TEST_POINTS).
HELDOUT_TASKS = 600
#: Seed of the held-out set. Distinct from any training seed by construction (a different stream, see task_generator).
HELDOUT_SEED = 1


class SinusoidEpisode(NamedTuple):
    """T tasks: support (xs, ys) and query (xq, yq) sets, all [T, N, 1], with each task's amplitude and phase [T]."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.xs.shape[0]


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """A sin(x - phase), with amplitude and phase [T] broadcast over x [T, N, 1]."""
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def derive_seed(stream: str, seed: int, iteration: int) -> int:
    """A 63-bit generator seed for one (stream, seed, iteration): sha256, so nearby seeds give unrelated streams."""
    digest = hashlib.sha256(f"metakernels.sinusoid/{stream}/{int(seed)}/{int(iteration)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def task_generator(stream: str, seed: int, iteration: int) -> torch.Generator:
    """The CPU torch.Generator that samples meta-batch ``iteration`` of ``stream`` ("train", "heldout", ...)."""
    return torch.Generator().manual_seed(derive_seed(stream, seed, iteration))


@dataclass(frozen=True)
class SinusoidTasks:
    """The task distribution. Ranges are [low, high) pairs; the defaults are MAML's.

    Args:
        amplitude: range of A.
        phase: range of the phase.
        x: range of the inputs.
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("amplitude", "phase", "x"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"SinusoidTasks: {name} range must be finite with low < high, got {(low, high)}")

    def sample(
        self,
        num_tasks: int,
        num_support: int,
        num_query: int,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
    ) -> SinusoidEpisode:
        """Draws ``num_tasks`` tasks and, for each, support and query inputs from the same sine.

        Args:
            num_tasks: T. num_support: K (support points per task). num_query: query points per task.
            generator: the CPU torch.Generator to draw from (see task_generator).
            dtype: floating dtype of the returned tensors (drawn in float64, then cast, so the tasks do not
                depend on dtype).

        Returns:
            SinusoidEpisode with xs, ys [T, K, 1] and xq, yq [T, num_query, 1].
        """
        for name, value, minimum in (("num_tasks", num_tasks, 1), ("num_support", num_support, 1),
                                     ("num_query", num_query, 1)):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"SinusoidTasks.sample: {name} must be an integer >= {minimum}, got {value!r}")

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

        amplitude = uniform((num_tasks,), self.amplitude)
        phase = uniform((num_tasks,), self.phase)
        x = uniform((num_tasks, num_support + num_query, 1), self.x)
        y = sinusoid(x, amplitude, phase)
        x, y = x.to(dtype), y.to(dtype)
        return SinusoidEpisode(
            x[:, :num_support], y[:, :num_support], x[:, num_support:], y[:, num_support:],
            amplitude.to(dtype), phase.to(dtype),
        )

    def batch(
        self, seed: int, iteration: int, num_tasks: int, num_support: int, num_query: int,
        dtype: torch.dtype = torch.float32,
    ) -> SinusoidEpisode:
        """Meta-batch ``iteration`` of the training stream of ``seed``: the same tasks every time it is asked for."""
        return self.sample(num_tasks, num_support, num_query, task_generator("train", seed, iteration), dtype)

    def heldout(
        self, num_tasks: int = HELDOUT_TASKS, num_support: int = 10, num_query: int = 10, seed: int = HELDOUT_SEED,
        dtype: torch.dtype = torch.float32,
    ) -> SinusoidEpisode:
        """The fixed held-out evaluation set (its own "heldout" stream, never used for training)."""
        return self.sample(num_tasks, num_support, num_query, task_generator("heldout", seed, 0), dtype)


def sinusoid_mlp(hidden: tuple[int, ...] = (40, 40)) -> nn.Sequential:
    """MAML's regression network: 1 -> 40 -> 40 -> 1 with ReLU (PyTorch's default initialisation)."""
    layers: list[nn.Module] = []
    width = 1
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)
