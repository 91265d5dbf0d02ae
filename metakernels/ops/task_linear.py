"""metakernels::task_linear: a Linear layer and activation with one weight (and bias) per task.

    out[t] = act(x[t] @ weight[t]^T + bias[t])       x [T, N, in], weight [T, out, in], bias [T, out] or None

The task-batched layer of an MLP's query forward in MAML: one call per layer for all tasks, where
torch.func.vmap or a Python loop would dispatch per task or per primitive.

Autograd: without create_graph the backward is the fused op metakernels::task_linear_backward (d_x, d_weight,
d_bias in one call; the activation derivative read from the saved output). With create_graph the same
backward is computed in differentiable torch ops, so second-order MAML can differentiate through it (the
double backward is autograd's). On CPU tensors with the extension loaded the autograd kernel is C++
(csrc/cpu/task_linear.cpp, AutogradCPU); the Python one here (Autograd alias key) serves CUDA tensors and
CPU tensors without the extension. task_linear_backward's own autograd differentiates the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..reference import task_linear as R
from ._library import LIBRARY

LIBRARY.define("task_linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor")
LIBRARY.define(
    "task_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, str activation, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)

_TASK_LINEAR = torch.ops.metakernels.task_linear.default
_TASK_LINEAR_BACKWARD = torch.ops.metakernels.task_linear_backward.default


def task_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "identity"
) -> torch.Tensor:
    """act(x[t] @ weight[t]^T + bias[t]) for every task t, as one fused kernel.

    Args:
        x: [T, N, in] inputs of T tasks (float32 or float64).
        weight: [T, out, in] per-task weights (e.g. a layer's [T, out * in] slice of TaskParams.flat, viewed).
        bias: [T, out] per-task biases, or None.
        activation: "identity", "relu" or "tanh".

    Returns:
        [T, N, out] contiguous outputs, differentiable in x, weight and bias to any order.
    """
    return _TASK_LINEAR(x, weight, bias, activation)


@torch.library.register_fake("metakernels::task_linear")
def _task_linear_fake(x, weight, bias, activation):
    tasks, samples, _, fan_out = R.check_task_linear_args("task_linear", x, weight, bias, activation)
    return x.new_empty((tasks, samples, fan_out))


@torch.library.register_fake("metakernels::task_linear_backward")
def _task_linear_backward_fake(grad_out, x, weight, out, activation, output_mask):
    tasks, _, _, fan_out = R.check_task_linear_backward_args(grad_out, x, weight, out, activation)
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        x.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
        x.new_empty((tasks, fan_out)) if output_mask[2] else x.new_empty(0),
    )


# --- differentiating a reference (the backward ops' own backward) ----------------------------------------


def differentiate(
    fn: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor | None],
    wanted: Sequence[bool],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of sum_i <cotangents[i], fn(*inputs)[i]> in the inputs flagged by `wanted`.

    Inside a backward with create_graph (grad mode on) the reference runs on the saved inputs themselves, so
    the result is differentiable in them and in the cotangents (any order); otherwise on detached copies.
    None cotangents and empty (masked) outputs contribute nothing.
    """
    create_graph = torch.is_grad_enabled()
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if not any(wanted):
        return result
    with torch.enable_grad():
        if create_graph:
            args = list(inputs)
        else:
            args = [
                None if t is None else (t.detach().requires_grad_() if w else t.detach())
                for t, w in zip(inputs, wanted, strict=True)
            ]
        outs = fn(*args)
        pairs = [(o, c) for o, c in zip(outs, cotangents, strict=True) if c is not None and o.requires_grad]
        wrt = [a for a, w in zip(args, wanted, strict=True) if w]
        if not pairs:
            return result
        grads = torch.autograd.grad(
            [o for o, _ in pairs], wrt, [c for _, c in pairs], create_graph=create_graph, allow_unused=True
        )
    it = iter(grads)
    for i, w in enumerate(wanted):
        if w:
            result[i] = next(it)
    return result


# --- autograd of task_linear (mirrored in C++ by TaskLinearFunction in csrc/cpu/task_linear.cpp) -----------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.activation, ctx.has_bias = activation, bias is not None


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2]]
    if grad is None or not any(mask):
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph: differentiable ops (same math as the fused backward)
        dz = R.activation_backward(grad, out, ctx.activation)
        d_x = torch.bmm(dz, weight) if mask[0] else None
        d_w = torch.bmm(dz.transpose(1, 2), x) if mask[1] else None
        d_b = dz.sum(1) if mask[2] else None
        return d_x, d_w, d_b, None
    outs = _TASK_LINEAR_BACKWARD(grad, x, weight, out, ctx.activation, mask)
    return *(o if m else None for o, m in zip(outs, mask, strict=True)), None


torch.library.register_autograd("metakernels::task_linear", _backward, setup_context=_setup_context)


# --- autograd of task_linear_backward: differentiate the reference -----------------------------------------


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_out, x, weight, out, activation, output_mask = inputs
    ctx.save_for_backward(grad_out, x, weight, out)
    ctx.activation, ctx.output_mask = activation, list(output_mask)


def _double_backward(ctx, g_dx, g_dw, g_db):
    def reference(grad_out, x, weight, out):
        return R.task_linear_backward(grad_out, x, weight, out, ctx.activation, ctx.output_mask)

    grads = differentiate(reference, ctx.saved_tensors, ctx.needs_input_grad[:4], (g_dx, g_dw, g_db))
    return *grads, None, None


torch.library.register_autograd(
    "metakernels::task_linear_backward", _double_backward, setup_context=_backward_setup_context
)
