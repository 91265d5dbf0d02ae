"""TaskParams: the fast weights of T tasks as one contiguous [T, P] tensor plus a static layout.

Each adapted parameter tensor owns the contiguous column range [offset, offset + numel) of the [T, P]
batch: one segment. A per-parameter view is a [T, *shape] slice, so a model runs task-batched on it, and
one inner_step call updates every task and every layer, with one learning rate per segment if wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    shape: torch.Size
    offset: int
    numel: int


class ParameterLayout:
    """Where each adapted parameter tensor lives in the flat [P] (or [T, P]) vector."""

    def __init__(self, named_shapes: list[tuple[str, torch.Size]]):
        if not named_shapes:
            raise ValueError("metakernels: no parameters to adapt (the layout is empty)")
        specs, offset = [], 0
        for name, shape in named_shapes:
            numel = int(torch.Size(shape).numel())
            specs.append(ParameterSpec(name, torch.Size(shape), offset, numel))
            offset += numel
        self.specs: tuple[ParameterSpec, ...] = tuple(specs)
        self.num_params = offset
        self._by_name = {s.name: i for i, s in enumerate(specs)}
        self._offsets_cache: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_module(
        cls, module: nn.Module, include: Callable[[str, nn.Parameter], bool] | None = None
    ) -> ParameterLayout:
        """Layout of the module's parameters that require grad (and pass ``include``), in registration order."""
        named = [
            (n, p.shape)
            for n, p in module.named_parameters()
            if p.requires_grad and (include is None or include(n, p))
        ]
        return cls(named)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def num_segments(self) -> int:
        return len(self.specs)

    def segment(self, name: str) -> int:
        return self._by_name[name]

    def segment_offsets(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[S + 1] int64 column boundaries of the segments, for inner_step's segmented rates (cached)."""
        device = torch.device(device)
        if device not in self._offsets_cache:
            bounds = [s.offset for s in self.specs] + [self.num_params]
            self._offsets_cache[device] = torch.tensor(bounds, dtype=torch.int64, device=device)
        return self._offsets_cache[device]

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[P] vector from a name -> tensor mapping (differentiable)."""
        return torch.cat([tensors[s.name].reshape(-1) for s in self.specs])

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        own = dict(module.named_parameters())
        return [own[s.name] for s in self.specs]

    def flatten_module(self, module: nn.Module) -> torch.Tensor:
        """The module's adapted parameters as one [P] vector (differentiable in them)."""
        return torch.cat([p.reshape(-1) for p in self.parameters(module)])

    @torch.no_grad()
    def write_to_module(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copies a [P] vector into the module's parameters in place."""
        for spec, param in zip(self.specs, self.parameters(module), strict=False):
            param.copy_(flat[spec.offset : spec.offset + spec.numel].view(spec.shape))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> [T, *shape] views of a [T, P] tensor (differentiable, no copies)."""
        num_tasks = flat.shape[0]
        return {
            s.name: flat[:, s.offset : s.offset + s.numel].view(num_tasks, *s.shape) for s in self.specs
        }

    def __iter__(self) -> Iterator[ParameterSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"ParameterLayout({len(self.specs)} tensors, P={self.num_params})"


@dataclass
class TaskParams:
    """Fast weights of T tasks: ``flat`` is [T, P]; ``layout`` maps names to column ranges."""

    flat: torch.Tensor
    layout: ParameterLayout

    @classmethod
    def from_module(cls, module: nn.Module, num_tasks: int, layout: ParameterLayout | None = None) -> TaskParams:
        """Every task starts from the module's parameters; the result is differentiable in them."""
        if num_tasks < 1:
            raise ValueError(f"metakernels: num_tasks must be >= 1 (empty task batch), got {num_tasks}")
        layout = layout or ParameterLayout.from_module(module)
        base = layout.flatten_module(module)
        return cls(base.unsqueeze(0).expand(num_tasks, layout.num_params), layout)

    @property
    def num_tasks(self) -> int:
        return self.flat.shape[0]

    def views(self) -> dict[str, torch.Tensor]:
        return self.layout.views(self.flat)

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self.layout.specs[self.layout.segment(name)]
        return self.flat[:, s.offset : s.offset + s.numel].view(self.num_tasks, *s.shape)

    def detach(self) -> TaskParams:
        return TaskParams(self.flat.detach(), self.layout)
