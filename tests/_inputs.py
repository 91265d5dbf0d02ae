"""Input helpers shared by the op tests: hypothesis sizes and non-contiguous layouts."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

# Parameter counts: 1, small primes (no vector width divides them), 97, and 1031, a prime just past the
# Triton BLOCK of 1024 (a full block plus a masked tail), or anything up to 300.
SIZES = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 31, 97, 1031]), st.integers(1, 300))

LAYOUTS_2D = ["contiguous", "transposed", "row_stride", "column_step"]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in non-contiguous storage: column-major ("transposed"), rows padded so the row stride
    exceeds P ("row_stride"), or every other column ("column_step"; for 1-D tensors "row_stride" means the
    same). The padding is NaN, so a kernel that reads it produces NaN."""
    if layout == "contiguous":
        return x
    if layout == "transposed":
        return x.t().contiguous().t() if x.dim() == 2 else x
    if layout == "row_stride":
        if x.dim() == 1:
            return with_layout(x, "column_step")
        buf = torch.full((x.shape[0], x.shape[1] + 3), float("nan"), dtype=x.dtype)
        buf[:, : x.shape[1]] = x
        return buf[:, : x.shape[1]]
    if layout == "column_step":
        buf = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype)
        buf[..., ::2] = x
        return buf[..., ::2]
    raise AssertionError(layout)


def random_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal values in x's shape and dtype (drawn in float64, rounded once), contiguous."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
