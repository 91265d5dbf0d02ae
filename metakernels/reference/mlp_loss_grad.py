"""Reference of metakernels::mlp_loss_grad and mlp_loss_grad_backward: an MLP's per-task loss, its gradient,
and the gradient's vector-Jacobian product (a Hessian-vector product), for T tasks with their own weights.

Model: nn.Sequential(Linear(w0, w1), act, Linear(w1, w2), act, ..., Linear(w_{L-1}, w_L)) with task t's
parameters in theta[t] ([T, P]), layer by layer: weight [out, in] row-major, then bias [out] (the order of
nn.Sequential.named_parameters()). Losses: "mse" (F.mse_loss: mean over N * w_L of (pred - target)^2) and
"cross_entropy" (F.cross_entropy: mean over N of -log_softmax(pred)[target], int64 targets).

    mlp_loss_grad(theta, ...)                     -> (loss [T], grad [T, P]),  grad[t] = d loss[t] / d theta[t]
    mlp_loss_grad_backward(g_loss, g_grad, ...)   -> g_loss[:, None] * grad + H g_grad   (H per task)

Both are written in batched torch ops (bmm) with the backpropagation spelled out, and are differentiable by
plain autograd in every input; the backward is Pearlmutter's R-operator (forward-over-reverse) written out
for the MLP (the math is in csrc/kernels/mlp_loss_grad.h).
"""

from __future__ import annotations

import torch

from .._validation import check_like, check_task_batch, shape_str
from .task_linear import activation_backward, activation_forward, check_activation, check_layer_dtype

LOSSES = ("mse", "cross_entropy")


def num_params(widths: list[int]) -> int:
    """P of an MLP with these layer widths: sum over layers of out * in + out."""
    return sum(o * i + o for i, o in zip(widths[:-1], widths[1:], strict=True))


def _widths_str(widths) -> str:
    return "[" + ", ".join(str(w) for w in widths) + "]"


def check_mlp_loss_grad_args(
    op: str,
    theta: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    widths,
    activation: str,
    loss: str,
    check_values: bool = True,
) -> list[int]:
    """Validates the arguments (messages as csrc/cpu/mlp_loss_grad.cpp); returns the widths as ints.

    check_values=False skips the class-index range check, which reads the data (fake kernels).
    """
    check_activation(op, activation)
    if loss not in LOSSES:
        raise ValueError(f"metakernels.{op}: loss must be 'mse' or 'cross_entropy', got '{loss}'")
    widths = [int(w) for w in widths]
    if len(widths) < 2:
        raise ValueError(
            f"metakernels.{op}: widths must list at least 2 layer widths [in, ..., out], got {_widths_str(widths)}"
        )
    if any(w <= 0 for w in widths):
        raise ValueError(f"metakernels.{op}: widths must be positive, got {_widths_str(widths)}")
    check_task_batch(op, "theta", theta)
    check_layer_dtype(op, "theta", theta)
    tasks = theta.shape[0]
    p = num_params(widths)
    if theta.shape[1] != p:
        raise ValueError(
            f"metakernels.{op}: theta has P = {theta.shape[1]} columns but widths {_widths_str(widths)} need P = {p} "
            "(each layer's weight [out, in] then its bias [out])"
        )
    if x.dim() != 3:
        raise ValueError(f"metakernels.{op}: x must be a 3-D [T, N, in] tensor, got shape {shape_str(x)}")
    check_like(op, "x", x, "theta", theta)
    if x.shape[0] != tasks:
        raise ValueError(f"metakernels.{op}: x has {x.shape[0]} tasks but theta has T = {tasks}")
    if x.shape[1] == 0:
        raise ValueError(f"metakernels.{op}: x has no samples (N = 0)")
    if x.shape[2] != widths[0]:
        raise ValueError(f"metakernels.{op}: x has {x.shape[2]} features but widths[0] = {widths[0]}")
    samples, out = x.shape[1], widths[-1]
    if loss == "mse":
        check_like(op, "target", target, "theta", theta)
        if list(target.shape) != [tasks, samples, out]:
            raise ValueError(
                f"metakernels.{op}: target must be [T, N, w_L] = [{tasks}, {samples}, {out}] for loss='mse', "
                f"got shape {shape_str(target)}"
            )
    else:
        if target.dtype != torch.int64:
            raise TypeError(
                f"metakernels.{op}: target must be an int64 tensor of class indices for loss='cross_entropy', "
                f"got dtype {target.dtype}"
            )
        if target.device != theta.device:
            raise ValueError(f"metakernels.{op}: target is on {target.device} but theta is on {theta.device}")
        if list(target.shape) != [tasks, samples]:
            raise ValueError(
                f"metakernels.{op}: target must be [T, N] = [{tasks}, {samples}] for loss='cross_entropy', "
                f"got shape {shape_str(target)}"
            )
        if check_values:
            # One host read (a sync on CUDA): the price of never indexing out of range.
            bad = (target < 0) | (target >= out)
            if bool(bad.any()):
                value = int(target[bad].reshape(-1)[0])
                raise ValueError(
                    f"metakernels.{op}: target must hold class indices in [0, w_L) = [0, {out}), got {value}"
                )
    return widths


def check_mlp_loss_grad_backward_args(
    grad_loss: torch.Tensor | None, grad_grad: torch.Tensor, theta: torch.Tensor, x, target, widths, activation, loss,
    check_values: bool = True,
) -> list[int]:
    op = "mlp_loss_grad_backward"
    widths = check_mlp_loss_grad_args(op, theta, x, target, widths, activation, loss, check_values)
    if grad_grad.shape != theta.shape:
        raise ValueError(
            f"metakernels.{op}: grad_grad must have the shape of theta {shape_str(theta)}, got {shape_str(grad_grad)}"
        )
    check_like(op, "grad_grad", grad_grad, "theta", theta)
    if grad_loss is not None:
        if grad_loss.dim() != 1 or grad_loss.shape[0] != theta.shape[0]:
            raise ValueError(
                f"metakernels.{op}: grad_loss must be [T] = [{theta.shape[0]}], got shape {shape_str(grad_loss)}"
            )
        check_like(op, "grad_loss", grad_loss, "theta", theta)
    return widths


def layer_params(flat: torch.Tensor, widths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(weight [T, out, in], bias [T, out])] views of a [T, P] tensor in nn.Sequential order."""
    params, offset = [], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        w = flat.narrow(1, offset, fan_out * fan_in).unflatten(1, (fan_out, fan_in))
        b = flat.narrow(1, offset + fan_out * fan_in, fan_out)
        params.append((w, b))
        offset += fan_out * fan_in + fan_out
    return params


def _output_grad(z: torch.Tensor, target: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-task loss [T], d loss / d z [T, N, w_L])."""
    samples, classes = z.shape[1], z.shape[2]
    if loss == "mse":
        diff = z - target
        return diff.square().mean((1, 2)), diff * (2.0 / classes) / samples
    logp = torch.log_softmax(z, 2)
    value = -logp.gather(2, target.unsqueeze(2)).squeeze(2).mean(1)
    onehot = torch.nn.functional.one_hot(target, classes).to(z.dtype)
    return value, (logp.exp() - onehot) / samples


def mlp_loss_grad(
    theta: torch.Tensor, x: torch.Tensor, target: torch.Tensor, widths, activation: str, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    widths = check_mlp_loss_grad_args("mlp_loss_grad", theta, x, target, widths, activation, loss)
    return loss_and_grad(theta, x, target, widths, activation, loss)


def loss_and_grad(
    theta: torch.Tensor, x: torch.Tensor, target: torch.Tensor, widths: list[int], activation: str, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """mlp_loss_grad without the argument checks (autograd formulas call it on validated, possibly fake,
    tensors: the class-index check would read data)."""
    params = layer_params(theta, widths)
    hs = [x]
    z = x
    for layer, (w, b) in enumerate(params):
        z = torch.baddbmm(b.unsqueeze(1), hs[-1], w.transpose(1, 2))
        if layer < len(params) - 1:
            hs.append(activation_forward(z, activation))
    value, d = _output_grad(z, target, loss)
    parts: list[torch.Tensor] = [theta] * (2 * len(params))
    for layer in range(len(params) - 1, -1, -1):
        w, _ = params[layer]
        parts[2 * layer] = torch.bmm(d.transpose(1, 2), hs[layer]).flatten(1)
        parts[2 * layer + 1] = d.sum(1)
        if layer > 0:
            d = activation_backward(torch.bmm(d, w), hs[layer], activation)
    return value, torch.cat(parts, 1)


def mlp_loss_grad_backward(
    grad_loss: torch.Tensor | None,
    grad_grad: torch.Tensor,
    theta: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    widths,
    activation: str,
    loss: str,
) -> torch.Tensor:
    """grad_loss[:, None] * grad + H grad_grad per task, by the R-operator (see the module docstring)."""
    widths = check_mlp_loss_grad_backward_args(grad_loss, grad_grad, theta, x, target, widths, activation, loss)
    return loss_grad_vjp(grad_loss, grad_grad, theta, x, target, widths, activation, loss)


def loss_grad_vjp(
    grad_loss: torch.Tensor | None,
    grad_grad: torch.Tensor,
    theta: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    widths: list[int],
    activation: str,
    loss: str,
) -> torch.Tensor:
    """mlp_loss_grad_backward without the argument checks."""
    params = layer_params(theta, widths)
    directions = layer_params(grad_grad, widths)
    last = len(params) - 1
    hs: list[torch.Tensor] = [x]
    rhs: list[torch.Tensor | None] = [None]  # Rh_0 = 0
    z = rz = x
    for layer, ((w, b), (v, c)) in enumerate(zip(params, directions, strict=True)):
        z = torch.baddbmm(b.unsqueeze(1), hs[-1], w.transpose(1, 2))
        rz = torch.baddbmm(c.unsqueeze(1), hs[-1], v.transpose(1, 2))
        if rhs[-1] is not None:
            rz = rz + torch.bmm(rhs[-1], w.transpose(1, 2))
        if layer < last:
            h = activation_forward(z, activation)
            hs.append(h)
            rhs.append(activation_backward(rz, h, activation))
    samples, classes = z.shape[1], z.shape[2]
    _, d = _output_grad(z, target, loss)
    if loss == "mse":
        rd = rz * (2.0 / classes) / samples
    else:
        p = torch.softmax(z, 2)
        rd = p * (rz - (p * rz).sum(2, keepdim=True)) / samples
    parts: list[torch.Tensor] = [theta] * (2 * len(params))
    for layer in range(last, -1, -1):
        w, _ = params[layer]
        v, _ = directions[layer]
        e = rd if grad_loss is None else rd + grad_loss[:, None, None] * d
        gw = torch.bmm(e.transpose(1, 2), hs[layer])
        if rhs[layer] is not None:
            gw = gw + torch.bmm(d.transpose(1, 2), rhs[layer])
        parts[2 * layer] = gw.flatten(1)
        parts[2 * layer + 1] = e.sum(1)
        if layer == 0:
            break
        h, rh = hs[layer], rhs[layer]
        dh = torch.bmm(d, w)
        rdh = torch.bmm(rd, w) + torch.bmm(d, v)
        rd = activation_backward(rdh, h, activation)
        if activation == "tanh":  # act''(z) Rz = -2 h (1 - h^2) Rz = -2 h Rh
            rd = rd - 2 * dh * h * rh
        d = activation_backward(dh, h, activation)
    return torch.cat(parts, 1)
