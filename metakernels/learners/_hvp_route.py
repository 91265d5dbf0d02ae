"""Second-order MAML meta-gradients by reverse accumulation with Hessian-vector products (no unrolled graph).

For plain gradient steps phi_{i+1} = phi_i - a_i (g_i + wd phi_i), g_i = grad L_support(phi_i), the exact
meta-gradient of L_query(phi_k) with respect to theta = phi_0 is the transposed Jacobian of every step applied
in reverse (each step's Jacobian is symmetric: I - a_i (H_i + wd I), H_i the support Hessian at phi_i):

    v_k = grad L_query(phi_k);   v_i = v_{i+1} - a_i (H_i v_{i+1} + wd v_{i+1});   d L_query / d theta = v_0

per task, and the meta-loss mean over tasks takes the mean of the v_0. Autograd through the unrolled loop
computes exactly these products, but through the double-backward graph of every layer (aten's BatchNorm and
convolution double backwards) and keeps every step's activation graph alive. Here each H_i v is one call of an
R-operator: on conv nets the conv-net R-operator (functional/conv_rop.py: about two gradients' work, all tasks as
grouped convolutions), on whole MLPs the fused kernel metakernels::mlp_loss_grad_backward (one C++ call for all
tasks). The gradients run without a graph through the fused kernels, and memory holds the k fast weights [T, P]
rather than k activation graphs. On MLPs the gain is bookkeeping: the unrolled path calls the same fused kernels,
but records an autograd graph of ~10 nodes per inner step and walks it back.

Applies to MAML-style learners whose inner rates are plain numbers (no learned rates: Meta-SGD and MAML++ need
d/d(rate) terms), with no per-step query losses, no Hessian penalty, no input preprocessing (ANIL), every
meta-learned parameter adapted, on a model one of the R-operators covers (conv blocks, Flatten, Linear layers;
or a whole MLP, nn.Sequential of Linear layers with one hidden activation; MSE or cross-entropy). Everything
else takes the unrolled path; ``meta_gradient="unroll"`` forces it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..functional.conv_rop import ConvNetHessian
from ..functional.hvp import _mlp_hvp, conv_rop_case, fused_mlp_case
from ..ops.inner_step import inner_step
from ._precomputed import PrecomputedGradient

if TYPE_CHECKING:
    from .base import GradientLearner, _FiniteTracker


@dataclass(frozen=True)
class RouteCase:
    """The R-operator the route runs: a whole MLP's fused kernel (fused_mlp_case) or the conv-net one (conv_rop_case).

    Decided once per meta-loss by hvp_route_case and handed to hvp_route_meta_loss, so the model/loss/data checks
    (~50 us on the sinusoid MLP, ~1% of its meta-step) run once rather than twice.
    """

    mlp: tuple | None = None
    conv: tuple | None = None


def hvp_route_case(learner: GradientLearner, xs: torch.Tensor, ys: torch.Tensor) -> RouteCase | str:
    """The case when the route computes this learner's meta-gradient exactly; otherwise why not (for errors)."""
    from .base import GradientLearner

    cls = type(learner)
    if learner.inner_steps < 1:
        return "no inner steps (nothing second-order to differentiate)"
    own_inputs = cls.prepare_inputs is not GradientLearner.prepare_inputs
    if own_inputs or cls.forward_tasks is not GradientLearner.forward_tasks:
        return f"{cls.__name__} transforms its inputs or its forward pass"
    if learner.step_loss_weights() is not None:
        return "per-step query losses (MAML++ multi-step loss)"
    if learner.hessian_penalty != 0:
        return "a Hessian penalty is part of the meta-loss"
    for step in range(learner.inner_steps):
        lr, offsets = learner.inner_rate(step)
        if offsets is not None or isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            return "the inner learning rates are tensors (learned rates need their own meta-gradient)"
    meta_learned = {name for name, p in learner.model.named_parameters() if p.requires_grad}
    if meta_learned != set(learner.layout.names):
        return "some meta-learned parameters are not adapted in the inner loop"
    if not learner.fused:
        return "fused=False (the R-operator runs on the fused plan)"
    flat = learner._reference_param()
    mlp = fused_mlp_case(learner.model, learner.layout, learner.loss_fn, flat, xs, ys)
    if mlp is not None:
        return RouteCase(mlp=mlp)
    conv = conv_rop_case(learner.model, learner.layout, learner.loss_fn, flat, xs, ys)
    if conv is None:
        return "the model, loss or data is not one the fused MLP or conv-net R-operators cover"
    return RouteCase(conv=conv)


def hvp_route_meta_loss(
    learner: GradientLearner,
    case: RouteCase,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    tracker: _FiniteTracker | None,
) -> torch.Tensor:
    """mean_t L_query,t(phi_k,t), whose backward accumulates the exact second-order meta-gradient."""
    layout = learner.layout
    params = layout.parameters(learner.model)
    with torch.no_grad():
        theta = layout.flatten_module(learner.model)
    phi = theta.unsqueeze(0).expand(xs.shape[0], -1).contiguous()
    points: list[torch.Tensor] = []  # phi_0 .. phi_{k-1}: where the support Hessians are taken
    rates: list[float] = []
    # A whole MLP: the fused R-operator kernel, which recomputes its forward per product (nothing to keep). Else
    # a conv net.
    mlp = case.mlp
    if mlp is None:
        stages, kind = case.conv
    last_hessian = None
    for step in range(learner.inner_steps):
        if mlp is None and step == learner.inner_steps - 1:
            # The last point's Hessian operator is needed first in the reverse pass: built now, its forward and
            # backward also give this step's losses and gradient (one support pass fewer; only this one
            # operator is kept alive, so memory still does not grow with k).
            last_hessian = ConvNetHessian(stages, layout, phi, xs, ys, kind, with_gradient=True)
            losses, grad = last_hessian.losses, last_hessian.gradient
        else:
            losses, grad = learner._detached_loss_grad(phi, xs, ys)
        if tracker is not None:
            tracker.record(f"inner loss at step {step}", losses)
            tracker.record(f"inner gradient at step {step}", grad)
        lr = float(learner.inner_rate(step)[0])
        points.append(phi)
        rates.append(lr)
        with torch.no_grad():
            phi = inner_step(phi, grad, lr, weight_decay=learner.weight_decay)
    query_losses, v = learner._detached_loss_grad(phi, xq, yq)
    if tracker is not None:
        tracker.record("query loss", query_losses)
    wd = learner.weight_decay
    for point, lr in zip(reversed(points), reversed(rates), strict=True):
        if mlp is not None:
            with torch.no_grad():
                hv = _mlp_hvp(mlp, point, xs, ys, v)
        else:
            if last_hessian is not None:
                hessian, last_hessian = last_hessian, None
            else:
                hessian = ConvNetHessian(stages, layout, point, xs, ys, kind)
            hv = hessian(v)
            del hessian
        if wd != 0:
            hv.add_(v, alpha=wd)
        v = v.sub_(hv, alpha=lr) if v.is_contiguous() else v - lr * hv
    return PrecomputedGradient.apply(query_losses.mean(), v.mean(0), layout, *params)
