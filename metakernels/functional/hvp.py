"""Hessian-vector products of every task's loss at once: H_t v_t on the task-batched model.

    hvp(model, params, x, y, v)[t] = H_t v_t,    H_t = d^2/dtheta_t^2 loss_fn(model(x_t; theta_t), y_t)

A function over the model, not a registered op (an op schema cannot take a module). Four paths, all
computing the same products (tests/test_hvp.py checks them against dense per-task Hessians in float64):

- whole MLP (nn.Sequential of Linear layers with one hidden activation, every parameter in params, loss
  F.mse_loss or F.cross_entropy): one call of the fused R-operator metakernels::mlp_loss_grad_backward per
  product (C++ on the CPU). No graph at all: the kernel recomputes the forward inside, which costs less than
  walking a saved double-backward graph of ~20 small ops.
- conv nets (conv + BatchNorm + ReLU [+ max-pool] blocks, Flatten, Linear layers; every parameter in params, loss
  F.mse_loss or F.cross_entropy): the conv-net R-operator of conv_rop.py, forward and gradient once per
  hvp_operator, then one R-forward and one R-backward per product (grouped convolutions over the tasks). On the
  Omniglot 4-conv net (64 channels, 28x28, T = 8, 5 support images, float32, 1 thread, interleaved medians on the
  shared machine) a product took 112 ms against 259 ms for double backward through the fused ops, and the
  one-off build 68 ms against 153 ms: the double-backward graph is dominated by aten's BatchNorm double
  backward and by convolution double backwards.
- other recognised models (Linear stacks with other losses or a parameter subset, conv nets with shared
  parameters) and create_graph=True: reverse-over-reverse (double backward) through the fused layer ops, which
  are differentiable to any order.
- anything else: the same double backward through torch.func.vmap over functional_call.

Why not forward-over-reverse (torch.func.jvp of grad): in torch 2.13 it fails on common losses (F.mse_loss and
F.cross_entropy's decompositions raise "ZeroTensors are immutable"); where it runs (torch.autograd.forward_ad over
the conv net's reference composition) a product took 457 ms against 335 ms for double backward (same Omniglot
setting, interleaved medians), since it redoes the forward and backward for every product.

hvp_operator builds the per-task gradient graph once and returns v -> H v, one backward per call: the matvec of
a conjugate-gradient loop (iMAML), where the same Hessian is applied several times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._validation import shape_str
from .batched_call import cached_plan, fused_dtype_supported, task_batched_call
from .conv_rop import ConvNetHessian, conv_rop_supported
from .fused_model import mlp_spec
from .losses import LossFn, per_task_losses, standard_loss
from .task_params import ParameterLayout, TaskParams

__all__ = ["hvp", "hvp_operator"]


def _resolve(who: str, model: nn.Module, params: torch.Tensor | TaskParams) -> tuple[torch.Tensor, ParameterLayout]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"metakernels.{who}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(params, TaskParams):
        flat, layout = params.flat, params.layout
    elif isinstance(params, torch.Tensor):
        flat, layout = params, ParameterLayout.from_module(model)
    else:
        raise TypeError(f"metakernels.{who}: params must be a [T, P] tensor or TaskParams, got {type(params).__name__}")
    if flat.dim() != 2:
        raise ValueError(f"metakernels.{who}: params must be a 2-D [T, P] tensor, got shape {shape_str(flat)}")
    if not flat.is_floating_point():
        raise TypeError(f"metakernels.{who}: params must be floating point, got dtype {flat.dtype}")
    if flat.shape[0] == 0:
        raise ValueError(f"metakernels.{who}: params is an empty task batch (T = 0)")
    if flat.shape[1] != layout.num_params:
        raise ValueError(
            f"metakernels.{who}: params has P = {flat.shape[1]} columns but the model's adapted parameters "
            f"({layout}) need P = {layout.num_params}"
        )
    return flat, layout


def _check_data(who: str, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> None:
    if not callable(loss_fn):
        raise TypeError(f"metakernels.{who}: loss_fn must be callable")
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"metakernels.{who}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"metakernels.{who}: {name} must be [T, N, ...] (tasks first), got shape {shape_str(t)}")
        if t.shape[0] != flat.shape[0]:
            raise ValueError(f"metakernels.{who}: {name} has {t.shape[0]} tasks but params has T = {flat.shape[0]}")
        if t.device != flat.device:
            raise ValueError(f"metakernels.{who}: {name} is on {t.device} but params is on {flat.device}")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"metakernels.{who}: y has {y.shape[1]} examples per task but x has {x.shape[1]}")


def _check_v(who: str, flat: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"metakernels.{who}: v must be a tensor, got {type(v).__name__}")
    if v.shape != flat.shape:
        raise ValueError(f"metakernels.{who}: v must have the shape of params {shape_str(flat)}, got {shape_str(v)}")
    if v.dtype != flat.dtype:
        raise TypeError(f"metakernels.{who}: v has dtype {v.dtype} but params has dtype {flat.dtype}")
    if v.device != flat.device:
        raise ValueError(f"metakernels.{who}: v is on {v.device} but params is on {flat.device}")


def fused_mlp_case(
    model: nn.Module, layout: ParameterLayout, loss_fn: LossFn, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[int], str, str] | None:
    """(widths, activation, loss) when mlp_loss_grad and its fused R-operator compute this model's loss, else None.

    The whole-MLP kernels need: a plain MLP plan, every one of its parameters in the layout in nn.Sequential
    order, F.mse_loss / F.cross_entropy with default settings, and inputs/targets of the shapes they take.
    """
    kind = standard_loss(loss_fn)
    if kind is None or x.dim() != 3 or not fused_dtype_supported(x, flat):
        return None
    spec = mlp_spec(model, cached_plan(model))
    if spec is None or tuple(layout.names) != spec.parameter_names:
        return None
    if kind == "mse" and (y.shape != x.shape[:2] + (spec.widths[-1],) or y.dtype != flat.dtype):
        return None
    if kind == "cross_entropy" and (y.shape != x.shape[:2] or y.dtype != torch.int64):
        return None
    return list(spec.widths), spec.activation, kind


def conv_rop_case(
    model: nn.Module, layout: ParameterLayout, loss_fn: LossFn, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor
):
    """(plan, loss kind) when the conv-net R-operator (conv_rop.ConvNetHessian) computes this model's products."""
    kind = standard_loss(loss_fn)
    if kind is None or not fused_dtype_supported(x, flat):
        return None
    stages = cached_plan(model)
    return (stages, kind) if conv_rop_supported(stages, layout, kind, x, y) else None


def _mlp_hvp(case: tuple[list[int], str, str], flat, x, y, v) -> torch.Tensor:
    # grad_loss = None: the op returns H v alone (its g_loss * grad term is absent, not multiplied by zero).
    widths, activation, kind = case
    return torch.ops.metakernels.mlp_loss_grad_backward(None, v, flat, x, y, widths, activation, kind)


def _gradient_graph(
    model: nn.Module, layout: ParameterLayout, theta: torch.Tensor, x, y, loss_fn: LossFn, fused: bool
) -> torch.Tensor:
    """Per-task gradients [T, P] of the per-task losses at theta, with their graph (create_graph=True)."""
    with torch.enable_grad():
        losses = per_task_losses(loss_fn, task_batched_call(model, layout.views(theta), x, fused=fused), y)
        if losses.shape != (theta.shape[0],):
            raise ValueError(f"metakernels.hvp: expected one loss per task, got shape {shape_str(losses)}")
        # Tasks are independent (task t's loss reads only theta[t]), so the gradient of the sum is the
        # per-task gradients, and the vector-Jacobian product of that gradient with v is H_t v_t per row.
        if not losses.requires_grad:
            return torch.zeros_like(theta)
        (grad,) = torch.autograd.grad(losses.sum(), theta, create_graph=True, allow_unused=True, materialize_grads=True)
    return grad


def _backward_product(
    grad: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, create_graph: bool, retain_graph: bool
) -> torch.Tensor:
    if not grad.requires_grad:  # the loss is linear in theta (or constant): H = 0
        return torch.zeros_like(theta)
    with torch.enable_grad():
        (hv,) = torch.autograd.grad(
            grad,
            theta,
            v,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
            materialize_grads=True,
        )
    return hv


def hvp(
    model: nn.Module,
    params: torch.Tensor | TaskParams,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    *,
    loss_fn: LossFn,
    create_graph: bool = False,
    fused: bool = True,
) -> torch.Tensor:
    """Hessian-vector products of every task's loss, H_t v_t for all T tasks at once.

    Args:
        model: the network; its parameters not in ``params`` are shared by all tasks (used as they are).
        params: [T, P] per-task parameters (the model's parameters that require grad, in registration order)
            or TaskParams (any layout, e.g. a learner's adapted subset).
        x: [T, N, ...] inputs; y: [T, N, ...] targets.
        v: [T, P] one direction per task (params' shape, dtype and device).
        loss_fn: loss(pred [N, ...], target [N, ...]) -> scalar, applied to each task.
        create_graph: make the result differentiable (in params, v, x, y and the model's shared parameters):
            for training terms built from H v (third derivatives of the loss).
        fused: use the fused layer kernels where the model is recognised (default); False forces the generic
            torch.func.vmap path. Same result.

    Returns:
        [T, P] tensor, row t = H_t v_t with H_t the Hessian of loss_fn(model(x_t; params_t), y_t) in params_t.
        Not differentiable unless create_graph.
    """
    flat, layout = _resolve("hvp", model, params)
    _check_data("hvp", flat, x, y, loss_fn)
    _check_v("hvp", flat, v)
    differentiable = bool(create_graph) and torch.is_grad_enabled()
    case = fused_mlp_case(model, layout, loss_fn, flat, x, y) if fused else None
    if case is not None:
        with torch.set_grad_enabled(differentiable):
            return _mlp_hvp(case, flat, x, y, v)
    conv = conv_rop_case(model, layout, loss_fn, flat, x, y) if fused and not differentiable else None
    if conv is not None:
        return ConvNetHessian(conv[0], layout, flat, x, y, conv[1])(v.detach())
    if differentiable:
        theta = flat if flat.requires_grad else flat.detach().requires_grad_()
    else:
        theta, v = flat.detach().requires_grad_(), v.detach()
    grad = _gradient_graph(model, layout, theta, x, y, loss_fn, fused)
    hv = _backward_product(grad, theta, v, create_graph=differentiable, retain_graph=differentiable)
    return hv if differentiable else hv.detach()


def hvp_operator(
    model: nn.Module,
    params: torch.Tensor | TaskParams,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn,
    fused: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> hvp(model, params, x, y, v) for a fixed point, with the work that does not depend on v done once.

    The per-task gradient graph is built here, once; each call is one backward through it (or one fused
    R-operator call for a whole MLP). Meant for conjugate-gradient loops: the products are not
    differentiable, and params, x and y are read as they are now (detached).

    Args: as hvp (without v and create_graph).

    Returns:
        matvec(v [T, P]) -> [T, P] H_t v_t.
    """
    flat, layout = _resolve("hvp_operator", model, params)
    _check_data("hvp_operator", flat, x, y, loss_fn)
    flat, x, y = flat.detach(), x.detach(), y.detach()
    case = fused_mlp_case(model, layout, loss_fn, flat, x, y) if fused else None
    if case is not None:

        def mlp_matvec(v: torch.Tensor) -> torch.Tensor:
            _check_v("hvp_operator", flat, v)
            with torch.no_grad():
                return _mlp_hvp(case, flat, x, y, v)

        return mlp_matvec

    conv = conv_rop_case(model, layout, loss_fn, flat, x, y) if fused else None
    if conv is not None:
        hessian = ConvNetHessian(conv[0], layout, flat, x, y, conv[1])

        def conv_matvec(v: torch.Tensor) -> torch.Tensor:
            _check_v("hvp_operator", flat, v)
            return hessian(v.detach())

        return conv_matvec

    theta = flat.requires_grad_()  # flat is a fresh detached alias: the caller's tensor is untouched
    grad = _gradient_graph(model, layout, theta, x, y, loss_fn, fused)

    def graph_matvec(v: torch.Tensor) -> torch.Tensor:
        _check_v("hvp_operator", flat, v)
        return _backward_product(grad, theta, v.detach(), create_graph=False, retain_graph=True).detach()

    return graph_matvec
