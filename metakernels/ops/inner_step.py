"""metakernels::inner_step: the fused inner-loop update of all tasks and all parameter tensors.

    theta' = theta - L * (grad + prox * (theta - theta0) + weight_decay * theta)        over [T, P]

Autograd: the first backward is the fused op metakernels::inner_step_backward (one pass producing
d_theta, d_grad, d_lr and d_theta0). The backward's own backward is written in differentiable torch ops,
so the op is differentiable to any order: second-order MAML and Hessian-vector products through an inner
step both work. Both autograd formulas are registered in C++ when the extension is loaded (a call through
a Python autograd kernel costs ~20 us more, paid by every backward op call), else from here.
"""

from __future__ import annotations

import torch

from ..reference.inner_step import expand_rate, reduce_to_rate, update_direction
from ._library import LIBRARY

LIBRARY.define(
    "inner_step(Tensor theta, Tensor grad, Tensor lr, Tensor? segment_offsets=None, Tensor? theta0=None, "
    "float prox=0.0, float weight_decay=0.0) -> Tensor"
)
LIBRARY.define(
    "inner_step_backward(Tensor grad_out, Tensor theta, Tensor grad, Tensor lr, Tensor? segment_offsets, "
    "Tensor? theta0, float prox, float weight_decay, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)

# The no-autograd variant writing into a caller's buffer, which may be theta itself (in-place update):
# inner loops run without a graph (FOMAML's, Reptile's, iMAML's) and benchmarks reuse it to avoid
# allocating (and page-faulting) a fresh [T, P] output per call.
LIBRARY.define(
    "inner_step_out(Tensor theta, Tensor grad, Tensor lr, Tensor? segment_offsets, Tensor? theta0, "
    "float prox, float weight_decay, Tensor(a!) out) -> ()"
)

_INNER_STEP = torch.ops.metakernels.inner_step.default
_INNER_STEP_OUT = torch.ops.metakernels.inner_step_out.default

# The extension's unboxed entry to the same dispatcher op (set by metakernels/_backend.py when the extension
# loads). Measured at T*P = 1e4 with autograd recording: 9.1 us against 12.3-13.0 us through the boxed
# torch.ops call. Same kernels, autograd, profiler record and errors; torch.compile traces torch.ops instead.
_fast_entry = None


def set_fast_entry(entry) -> None:
    global _fast_entry
    _fast_entry = entry
_INNER_STEP_BACKWARD = torch.ops.metakernels.inner_step_backward.default


def inner_step(
    theta: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor | float,
    *,
    segment_offsets: torch.Tensor | None = None,
    theta0: torch.Tensor | None = None,
    prox: float = 0.0,
    weight_decay: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One gradient step of every task and every parameter tensor, as one fused kernel.

    Args:
        theta: [T, P] fast weights of T tasks (a TaskParams' ``flat`` tensor).
        grad: [T, P] gradient of each task's inner loss at theta.
        lr: the learning rate: a float or 0-dim tensor; a [P] tensor (one rate per coordinate, Meta-SGD);
            or an [S] table with ``segment_offsets`` (one rate per parameter tensor, MAML++'s per-layer
            rates). Any sign. Gradients flow into a tensor lr.
        segment_offsets: [S + 1] int64 column boundaries of the S segments (TaskParams.layout.offsets).
        theta0: [P] or [T, P] anchor of the proximal term (iMAML-style regularised inner loss).
        prox: weight lambda of the proximal term lambda/2 * ||theta - theta0||^2; needs theta0 when non-zero.
        weight_decay: L2 weight decay coefficient.
        out: optional contiguous [T, P] buffer to write into (may be theta: an in-place update). Not
            differentiable: raises if autograd would need to record the step.

    Returns:
        [T, P] contiguous updated fast weights (``out`` when given), differentiable in theta, grad, lr and
        theta0 to any order.
    """
    if not isinstance(lr, torch.Tensor):
        lr = torch.tensor(float(lr), dtype=theta.dtype, device=theta.device)
    if out is not None:
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (theta, grad, lr, theta0, out)
        ):
            raise ValueError(
                "metakernels.inner_step: out= is not differentiable; call it under torch.no_grad() or on "
                "tensors that do not require grad"
            )
        _INNER_STEP_OUT(theta, grad, lr, segment_offsets, theta0, float(prox), float(weight_decay), out)
        return out
    if _fast_entry is not None and not torch.compiler.is_compiling():
        return _fast_entry(theta, grad, lr, segment_offsets, theta0, float(prox), float(weight_decay))
    return _INNER_STEP(theta, grad, lr, segment_offsets, theta0, float(prox), float(weight_decay))


@torch.library.register_fake("metakernels::inner_step")
def _inner_step_fake(theta, grad, lr, segment_offsets=None, theta0=None, prox=0.0, weight_decay=0.0):
    return theta.new_empty(theta.shape)  # kernels return a contiguous tensor whatever theta's strides


@torch.library.register_fake("metakernels::inner_step_out")
def _inner_step_out_fake(theta, grad, lr, segment_offsets, theta0, prox, weight_decay, out):
    return None


@torch.library.register_fake("metakernels::inner_step_backward")
def _inner_step_backward_fake(grad_out, theta, grad, lr, segment_offsets, theta0, prox, weight_decay, output_mask):
    def maybe(wanted: bool, like: torch.Tensor | None) -> torch.Tensor:
        return theta.new_empty(like.shape) if wanted and like is not None else theta.new_empty(0)

    return (
        maybe(output_mask[0], theta),
        maybe(output_mask[1], theta),
        maybe(output_mask[2], lr),
        maybe(output_mask[3], theta0),
    )


# --- first backward (Python registration; used when the C++ autograd kernel is not loaded) -----------


def _setup_context(ctx, inputs, output) -> None:
    theta, grad, lr, segment_offsets, theta0, prox, weight_decay = inputs
    ctx.save_for_backward(theta, grad, lr, segment_offsets, theta0)
    ctx.prox, ctx.weight_decay = prox, weight_decay


def _backward(ctx, grad_out):
    theta, grad, lr, segment_offsets, theta0 = ctx.saved_tensors
    need = ctx.needs_input_grad
    identity_theta = ctx.prox + ctx.weight_decay == 0.0  # then d_theta is grad_out: skip a pass
    mask = [need[0] and not identity_theta, need[1], need[2], theta0 is not None and need[4]]
    d_theta = d_grad = d_lr = d_theta0 = None
    if any(mask):
        outs = _INNER_STEP_BACKWARD(
            grad_out, theta, grad, lr, segment_offsets, theta0, ctx.prox, ctx.weight_decay, mask
        )
        d_theta, d_grad, d_lr, d_theta0 = (o if m else None for o, m in zip(outs, mask, strict=False))
    if need[0] and identity_theta:
        d_theta = grad_out
    return d_theta, d_grad, d_lr, None, d_theta0, None, None


def register_python_autograd(lib: torch.library.Library | None = None) -> None:
    """Registers the autograd of inner_step and of inner_step_backward (used when the extension is absent)."""
    torch.library.register_autograd("metakernels::inner_step", _backward, setup_context=_setup_context, lib=lib)
    torch.library.register_autograd(
        "metakernels::inner_step_backward", _double_backward, setup_context=_backward_setup_context, lib=lib
    )


# --- backward of the backward (mirrored by InnerStepBackwardFunction in csrc/cpu/inner_step.cpp) ---------


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_out, theta, grad, lr, segment_offsets, theta0, prox, weight_decay, output_mask = inputs
    ctx.save_for_backward(grad_out, theta, grad, lr, segment_offsets, theta0)
    ctx.prox, ctx.weight_decay, ctx.output_mask = prox, weight_decay, list(output_mask)


def _double_backward(ctx, g_d_theta, g_d_grad, g_d_lr, g_d_theta0):
    """Cotangents of (d_theta, d_grad, d_lr, d_theta0) -> cotangents of (grad_out, theta, grad, lr, theta0).

    With c = prox + weight_decay, L the expanded rate, E(x) expand_rate, R(x) reduce_to_rate:
      d_theta  = go (1 - L c)      d_grad   = -L go
      d_lr     = -R(go u)          d_theta0 = prox L go      (u = grad + prox (theta - theta0) + wd theta)
    """
    grad_out, theta, grad, lr, offsets, theta0 = ctx.saved_tensors
    prox, wd, mask = ctx.prox, ctx.weight_decay, ctx.output_mask
    num_params = theta.shape[1]
    rate = expand_rate(lr, offsets, num_params)
    c = prox + wd

    def used(g: torch.Tensor | None, m: bool) -> bool:
        return m and g is not None and g.numel() > 0

    zero = torch.zeros_like(theta)
    g_go, g_theta, g_grad, g_rate, g_t0 = zero, zero, zero, zero, zero
    if used(g_d_theta, mask[0]):
        g_go = g_go + g_d_theta * (1 - rate * c)
        g_rate = g_rate - c * g_d_theta * grad_out
    if used(g_d_grad, mask[1]):
        g_go = g_go - rate * g_d_grad
        g_rate = g_rate - g_d_grad * grad_out
    if used(g_d_lr, mask[2]):
        e = expand_rate(g_d_lr, offsets, num_params)
        g_go = g_go - e * update_direction(theta, grad, theta0, prox, wd)
        g_theta = g_theta - c * e * grad_out
        g_grad = g_grad - e * grad_out
        if theta0 is not None:
            g_t0 = g_t0 + prox * e * grad_out
    if theta0 is not None and used(g_d_theta0, mask[3]):
        g_go = g_go + prox * rate * g_d_theta0
        g_rate = g_rate + prox * g_d_theta0 * grad_out
    g_lr = reduce_to_rate(g_rate, lr, offsets)
    if theta0 is not None and theta0.dim() == 1:
        g_t0 = g_t0.sum(0)
    return g_go, g_theta, g_grad, g_lr, None, (g_t0 if theta0 is not None else None), None, None, None
