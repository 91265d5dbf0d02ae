"""Argument checks for the ops' Python paths (reference and Triton kernels).

The messages match the C++ checks in csrc/cpu/*.cpp word for word where they can, so a user sees the
same error whichever backend serves an op: each names the argument at fault. ValueError for bad
shapes/values/devices and TypeError for bad dtypes, as TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise.
"""

from __future__ import annotations

import math

import torch


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"metakernels.{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def check_like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"metakernels.{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"metakernels.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_task_batch(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"metakernels.{op}: {name} must be a 2-D [T, P] tensor, got shape {shape_str(t)}")
    if t.shape[0] == 0:
        raise ValueError(f"metakernels.{op}: {name} is an empty task batch (T = 0)")
    if t.shape[1] == 0:
        raise ValueError(f"metakernels.{op}: {name} has no parameters (P = 0)")


def check_finite_scalar(op: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"metakernels.{op}: {name} must be finite, got {value}")


def check_inner_step_args(
    theta: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    segment_offsets: torch.Tensor | None,
    theta0: torch.Tensor | None,
    prox: float,
    weight_decay: float,
) -> str:
    """Validates inner_step's arguments; returns the rate mode: "scalar", "per_coordinate" or "segmented"."""
    op = "inner_step"
    check_task_batch(op, "theta", theta)
    check_floating(op, "theta", theta)
    if grad.shape != theta.shape:
        raise ValueError(
            f"metakernels.inner_step: grad must have the shape of theta {shape_str(theta)}, got {shape_str(grad)}"
        )
    check_like(op, "grad", grad, "theta", theta)
    check_like(op, "lr", lr, "theta", theta)
    check_finite_scalar(op, "prox", prox)
    check_finite_scalar(op, "weight_decay", weight_decay)
    num_params = theta.shape[1]
    if segment_offsets is not None:
        if segment_offsets.dtype != torch.int64:
            raise TypeError(
                f"metakernels.inner_step: segment_offsets must be an int64 tensor, got dtype {segment_offsets.dtype}"
            )
        if segment_offsets.dim() != 1:
            raise ValueError(
                "metakernels.inner_step: segment_offsets must be a 1-D tensor [S + 1], got shape "
                f"{shape_str(segment_offsets)}"
            )
        if segment_offsets.device != theta.device:
            raise ValueError(
                f"metakernels.inner_step: segment_offsets is on {segment_offsets.device} but theta is on {theta.device}"
            )
        if lr.dim() != 1 or segment_offsets.numel() != lr.numel() + 1:
            raise ValueError(
                f"metakernels.inner_step: with segment_offsets of shape {shape_str(segment_offsets)} lr must be a "
                f"1-D table of {segment_offsets.numel() - 1} rates, got shape {shape_str(lr)}"
            )
        # One host read of S + 1 integers; on CUDA this synchronises, the price of never indexing out of range.
        offsets = segment_offsets.tolist()
        if offsets[0] != 0 or offsets[-1] != num_params:
            raise ValueError(
                f"metakernels.inner_step: segment_offsets must start at 0 and end at P = {num_params}, "
                f"got {offsets[0]} and {offsets[-1]}"
            )
        for a, b in zip(offsets[:-1], offsets[1:], strict=False):
            if a > b:
                raise ValueError(f"metakernels.inner_step: segment_offsets must be non-decreasing, got {a} before {b}")
        mode = "segmented"
    elif lr.dim() == 0:
        mode = "scalar"
    else:
        if lr.dim() != 1 or lr.numel() != num_params:
            raise ValueError(
                "metakernels.inner_step: lr must be a scalar, a [P] tensor of per-coordinate rates "
                f"(P = {num_params}), or an [S] table with segment_offsets; got shape {shape_str(lr)}"
            )
        mode = "per_coordinate"
    if theta0 is not None:
        check_like(op, "theta0", theta0, "theta", theta)
        if not ((theta0.dim() == 1 and theta0.shape[0] == num_params) or theta0.shape == theta.shape):
            raise ValueError(
                f"metakernels.inner_step: theta0 must be [P] or [T, P] like theta {shape_str(theta)}, "
                f"got {shape_str(theta0)}"
            )
    elif prox != 0.0:
        raise ValueError(f"metakernels.inner_step: theta0 is required when prox != 0 (prox = {prox})")
    return mode


def check_inner_step_out(theta: torch.Tensor, out: torch.Tensor) -> None:
    if out.shape != theta.shape or not out.is_contiguous():
        raise ValueError(
            f"metakernels.inner_step: out must be a contiguous tensor of theta's shape {shape_str(theta)}, "
            f"got {shape_str(out)}" + ("" if out.is_contiguous() else " (non-contiguous)")
        )
    check_like("inner_step", "out", out, "theta", theta)


def check_inner_step_backward_args(grad_out: torch.Tensor, theta: torch.Tensor, output_mask: list[bool]) -> None:
    if grad_out.shape != theta.shape:
        raise ValueError(
            "metakernels.inner_step_backward: grad_out must have the shape of theta "
            f"{shape_str(theta)}, got {shape_str(grad_out)}"
        )
    check_like("inner_step_backward", "grad_out", grad_out, "theta", theta)
    if len(output_mask) != 4:
        raise ValueError("metakernels.inner_step_backward: output_mask must have 4 entries")


def check_reptile_update_args(theta: torch.Tensor, fast_weights: torch.Tensor, epsilon: float) -> None:
    op = "reptile_update"
    check_task_batch(op, "fast_weights", fast_weights)
    check_floating(op, "fast_weights", fast_weights)
    check_like(op, "theta", theta, "fast_weights", fast_weights)
    if theta.dim() != 1 or theta.shape[0] != fast_weights.shape[1]:
        raise ValueError(
            f"metakernels.reptile_update: theta must be [P] with P = {fast_weights.shape[1]} "
            f"(the columns of fast_weights), got shape {shape_str(theta)}"
        )
    check_finite_scalar(op, "epsilon", epsilon)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory t's elements occupy (conservative for strided tensors)."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True) if stride > 0)
    first = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True) if stride < 0)
    return (t.data_ptr() + first * t.element_size(), t.data_ptr() + (last + 1) * t.element_size())


def check_cg_step_args(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    rs: torch.Tensor,
    status: torch.Tensor,
    iterations: torch.Tensor,
    threshold: torch.Tensor,
    stop_on_negative_curvature: bool = True,
) -> None:
    """Validates cg_step's arguments (same messages as csrc/cpu/cg_step.cpp; the op's schema types the bool)."""
    op = "cg_step"
    if not isinstance(stop_on_negative_curvature, bool):
        raise TypeError(
            "metakernels.cg_step: stop_on_negative_curvature must be a bool, got "
            f"{type(stop_on_negative_curvature).__name__}"
        )
    check_task_batch(op, "x", x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"metakernels.cg_step: x must be a float32 or float64 tensor, got dtype {x.dtype}")
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        if t.shape != x.shape:
            raise ValueError(f"metakernels.cg_step: {name} must have the shape of x {shape_str(x)}, got {shape_str(t)}")
        check_like(op, name, t, "x", x)
    for name, t in (("x", x), ("r", r), ("p", p)):
        if not t.is_contiguous():
            raise ValueError(f"metakernels.cg_step: {name} must be contiguous (it is updated in place)")
    num_tasks = x.shape[0]
    for name, t, dtype in (
        ("rs", rs, torch.float64),
        ("threshold", threshold, torch.float64),
        ("status", status, torch.int32),
        ("iterations", iterations, torch.int64),
    ):
        if t.dtype != dtype:
            raise TypeError(f"metakernels.cg_step: {name} must be a {dtype} tensor, got dtype {t.dtype}")
        if t.dim() != 1 or t.shape[0] != num_tasks:
            raise ValueError(
                f"metakernels.cg_step: {name} must be [T] with T = {num_tasks} (the rows of x), "
                f"got shape {shape_str(t)}"
            )
        if t.device != x.device:
            raise ValueError(f"metakernels.cg_step: {name} is on {t.device} but x is on {x.device}")
        if name != "threshold" and not t.is_contiguous():
            raise ValueError(f"metakernels.cg_step: {name} must be contiguous (it is updated in place)")
    vectors = (("x", x), ("r", r), ("p", p), ("Ap", Ap))
    for i, (name_a, a) in enumerate(vectors):
        for name_b, b in vectors[i + 1 :]:
            (a0, a1), (b0, b1) = _span(a), _span(b)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"metakernels.cg_step: {name_a} and {name_b} must not share memory")
