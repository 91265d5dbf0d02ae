"""metakernels::mlp_loss_grad: an MLP's loss and its gradient for T tasks with their own weights, in one call.

    loss[t], grad[t] = L_t(theta[t]), dL_t/dtheta[t]       theta [T, P] (nn.Sequential parameter order)

An MLP inner step of MAML is then mlp_loss_grad followed by metakernels.inner_step (which applies the
learning rate, per-layer rates or Meta-SGD rates): two op calls per step for all tasks and layers.

Autograd: d theta[t] = g_loss[t] * grad[t] + H_t g_grad[t], H_t the Hessian of L_t: what second-order MAML's
backward through an inner step needs. Without create_graph that is the fused op
metakernels::mlp_loss_grad_backward (the Hessian-vector product by the R-operator, in C++ on the CPU); with
create_graph it is autograd through the reference composition (loss and hand-written backprop in
differentiable torch ops), so the op is differentiable to any order. Gradients in x (and an mse target)
always come from the composition. As for task_linear, the C++ autograd kernel serves CPU tensors when the
extension is loaded and the Python one here the rest; mlp_loss_grad_backward's own autograd differentiates
the reference R-operator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..reference import mlp_loss_grad as R
from ._library import LIBRARY
from .task_linear import differentiate

LIBRARY.define(
    "mlp_loss_grad(Tensor theta, Tensor x, Tensor target, int[] widths, str activation, str loss) -> (Tensor, Tensor)"
)
LIBRARY.define(
    "mlp_loss_grad_backward(Tensor? grad_loss, Tensor grad_grad, Tensor theta, Tensor x, Tensor target, "
    "int[] widths, str activation, str loss) -> Tensor"
)

_MLP_LOSS_GRAD = torch.ops.metakernels.mlp_loss_grad.default
_MLP_LOSS_GRAD_BACKWARD = torch.ops.metakernels.mlp_loss_grad_backward.default


def mlp_loss_grad(
    theta: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    widths: Sequence[int],
    activation: str = "relu",
    loss: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task loss and gradient of an MLP for all tasks, as one fused kernel.

    Args:
        theta: [T, P] flat weights of T tasks: per layer, weight [out, in] row-major then bias [out], in the
            order of nn.Sequential(Linear(w0, w1), act, ..., Linear(w_{L-1}, w_L)).named_parameters().
        x: [T, N, w0] inputs, theta's dtype (float32 or float64).
        target: [T, N, w_L] regression targets (loss "mse"), or [T, N] int64 class indices in [0, w_L)
            (loss "cross_entropy").
        widths: [w0, w1, ..., w_L] layer widths (P must equal sum of w_{l+1} * w_l + w_{l+1}).
        activation: "relu", "tanh" or "identity", after every layer but the last.
        loss: "mse" (F.mse_loss, mean over N * w_L) or "cross_entropy" (F.cross_entropy, mean over N).

    Returns:
        (loss [T], grad [T, P]) with grad[t] = d loss[t] / d theta[t]; differentiable in theta (by a fused
        Hessian-vector product), x and an mse target, to any order.
    """
    return _MLP_LOSS_GRAD(theta, x, target, [int(w) for w in widths], activation, loss)


@torch.library.register_fake("metakernels::mlp_loss_grad")
def _mlp_loss_grad_fake(theta, x, target, widths, activation, loss):
    R.check_mlp_loss_grad_args("mlp_loss_grad", theta, x, target, widths, activation, loss, check_values=False)
    return theta.new_empty(theta.shape[0]), theta.new_empty(theta.shape)


@torch.library.register_fake("metakernels::mlp_loss_grad_backward")
def _mlp_loss_grad_backward_fake(grad_loss, grad_grad, theta, x, target, widths, activation, loss):
    R.check_mlp_loss_grad_backward_args(
        grad_loss, grad_grad, theta, x, target, widths, activation, loss, check_values=False
    )
    return theta.new_empty(theta.shape)


# --- autograd of mlp_loss_grad (mirrored in C++ by MlpLossGradFunction in csrc/cpu/mlp_loss_grad.cpp) ------


def _setup_context(ctx, inputs, output) -> None:
    theta, x, target, widths, activation, loss = inputs
    ctx.save_for_backward(theta, x, target, output[1])
    ctx.widths, ctx.activation, ctx.loss = list(widths), activation, loss
    ctx.set_materialize_grads(False)  # an unused loss (the usual inner loop) has no cotangent


def _backward(ctx, g_loss, g_grad):
    theta, x, target, grad = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = [need[0], need[1], ctx.loss == "mse" and need[2]]
    nothing = (None,) * 6
    if (g_loss is None and g_grad is None) or not any(want):
        return nothing

    def composition(th, xx, tg):
        return R.loss_and_grad(th, xx, tg, ctx.widths, ctx.activation, ctx.loss)

    if torch.is_grad_enabled():  # create_graph: autograd through differentiable ops, any order
        return *differentiate(composition, (theta, x, target), want, (g_loss, g_grad)), None, None, None
    d_theta = None
    if want[0]:
        if g_grad is not None:
            d_theta = _MLP_LOSS_GRAD_BACKWARD(g_loss, g_grad, theta, x, target, ctx.widths, ctx.activation, ctx.loss)
        else:
            d_theta = g_loss[:, None] * grad
    _, d_x, d_target = differentiate(composition, (theta, x, target), [False, want[1], want[2]], (g_loss, g_grad))
    return d_theta, d_x, d_target, None, None, None


torch.library.register_autograd("metakernels::mlp_loss_grad", _backward, setup_context=_setup_context)


# --- autograd of mlp_loss_grad_backward: differentiate the reference R-operator ----------------------------


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_loss, grad_grad, theta, x, target, widths, activation, loss = inputs
    ctx.save_for_backward(grad_loss, grad_grad, theta, x, target)
    ctx.widths, ctx.activation, ctx.loss = list(widths), activation, loss


def _double_backward(ctx, g):
    def reference(grad_loss, grad_grad, theta, x, target):
        return (R.loss_grad_vjp(grad_loss, grad_grad, theta, x, target, ctx.widths, ctx.activation, ctx.loss),)

    saved = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:5])
    wanted[4] = wanted[4] and ctx.loss == "mse"
    return *differentiate(reference, saved, wanted, (g,)), None, None, None


torch.library.register_autograd(
    "metakernels::mlp_loss_grad_backward", _double_backward, setup_context=_backward_setup_context
)
