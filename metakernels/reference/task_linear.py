"""Reference of metakernels::task_linear: a Linear layer and activation with one weight per task.

    out[t] = act(x[t] @ weight[t]^T + bias[t])       x [T, N, in], weight [T, out, in], bias [T, out] or None

and of its backward, whose activation derivative is read from the saved output (relu: out > 0;
tanh: 1 - out^2), as torch's own relu/tanh backward do. float32 and float64.

The argument checks live here and are shared by the Triton launchers and the fake kernels; their messages
match csrc/cpu/task_linear.cpp word for word.
"""

from __future__ import annotations

import torch

from .._validation import check_like, shape_str

ACTIVATIONS = ("identity", "relu", "tanh")
LAYER_DTYPES = (torch.float32, torch.float64)


def check_activation(op: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"metakernels.{op}: activation must be one of 'identity', 'relu', 'tanh', got '{activation}'")


def check_layer_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in LAYER_DTYPES:
        raise TypeError(f"metakernels.{op}: {name} must be a float32 or float64 tensor, got dtype {t.dtype}")


def check_task_linear_args(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> tuple[int, int, int, int]:
    """Validates task_linear's arguments; returns (T, N, in, out)."""
    check_activation(op, activation)
    if x.dim() != 3:
        raise ValueError(f"metakernels.{op}: x must be a 3-D [T, N, in] tensor, got shape {shape_str(x)}")
    check_layer_dtype(op, "x", x)
    if weight.dim() != 3:
        raise ValueError(f"metakernels.{op}: weight must be a 3-D [T, out, in] tensor, got shape {shape_str(weight)}")
    check_like(op, "weight", weight, "x", x)
    tasks, samples, fan_in = x.shape
    fan_out = weight.shape[1]
    if tasks == 0:
        raise ValueError(f"metakernels.{op}: x is an empty task batch (T = 0)")
    if samples == 0:
        raise ValueError(f"metakernels.{op}: x has no samples (N = 0)")
    if weight.shape[0] != tasks:
        raise ValueError(f"metakernels.{op}: weight has {weight.shape[0]} tasks but x has T = {tasks}")
    if weight.shape[2] != fan_in:
        raise ValueError(
            f"metakernels.{op}: weight [T, out, in] has in = {weight.shape[2]} but x has {fan_in} features"
        )
    if fan_in == 0 or fan_out == 0:
        raise ValueError(f"metakernels.{op}: weight must have in > 0 and out > 0, got shape {shape_str(weight)}")
    if bias is not None:
        check_like(op, "bias", bias, "x", x)
        if bias.dim() != 2 or bias.shape[0] != tasks or bias.shape[1] != fan_out:
            raise ValueError(
                f"metakernels.{op}: bias must be [T, out] = [{tasks}, {fan_out}], got shape {shape_str(bias)}"
            )
    return tasks, samples, fan_in, fan_out


def check_task_linear_backward_args(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, activation: str
) -> tuple[int, int, int, int]:
    op = "task_linear_backward"
    tasks, samples, fan_in, fan_out = check_task_linear_args(op, x, weight, None, activation)
    shape = [tasks, samples, fan_out]
    if list(grad_out.shape) != shape:
        raise ValueError(f"metakernels.{op}: grad_out must be [T, N, out] = {shape}, got shape {shape_str(grad_out)}")
    check_like(op, "grad_out", grad_out, "x", x)
    if list(out.shape) != shape:
        raise ValueError(f"metakernels.{op}: out must be [T, N, out] = {shape}, got shape {shape_str(out)}")
    check_like(op, "out", out, "x", x)
    return tasks, samples, fan_in, fan_out


def activation_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


def activation_backward(grad: torch.Tensor, out: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(z), the derivative read from out = act(z); differentiable in grad and out to any order."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    return grad


def task_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    check_task_linear_args("task_linear", x, weight, bias, activation)
    if bias is None:
        z = torch.bmm(x, weight.transpose(1, 2))
    else:
        z = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return activation_forward(z, activation).contiguous()


def task_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    activation: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_weight, d_bias); an output whose mask entry is False is an empty [0] tensor."""
    check_task_linear_backward_args(grad_out, x, weight, out, activation)
    dz = activation_backward(grad_out, out, activation)
    d_x = torch.bmm(dz, weight).contiguous() if output_mask[0] else x.new_empty(0)
    d_w = torch.bmm(dz.transpose(1, 2), x).contiguous() if output_mask[1] else x.new_empty(0)
    d_b = dz.sum(1) if output_mask[2] else x.new_empty(0)
    return d_x, d_w, d_b
