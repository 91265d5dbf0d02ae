"""Modular meta-learning with shrinkage (Chen, Friesen, Behbahani, Doucet, Budden, Hoffman, de Freitas 2019,
"Modular Meta-Learning with Shrinkage", arXiv:1909.05557): iMAML with a learned prior variance per module.

Model. Each module m (a parameter tensor, or all the parameter tensors of one layer) has a task-independent
centre theta_m and a prior variance sigma_m^2; task t's weights phi_t,m ~ N(theta_m, sigma_m^2 I). The paper writes
phi for the centre and theta_t for the task weights; here theta is the centre (the model's parameters) and phi the
task weights, as in iMAML. With lambda_m = 1 / sigma_m^2 and Lam = diag(lambda_m on module m's coordinates), the
MAP inner problem of task t is iMAML's proximal problem with a per-module Lam:

    phi_t = argmin_phi  L_train,t(phi) + sum_m lambda_m / 2 ||phi_m - theta_m||^2

(k steps of gradient descent from phi = theta, as iMAML: "exact" below means at a stationary point).
A small sigma_m^2 pins module m to its shared value (the module is "reused"); a large one lets it adapt freely
(sigma^2 -> infinity for every module is MAML/Reptile-like adaptation without a prior). The outer loss is the
query loss (1/T) sum_t L_test,t(phi_t), minimised over theta and the log-variances.

Implicit gradients. Stationarity of the inner problem: F(phi, theta, lambda) = grad L_train(phi) + Lam (phi - theta)
= 0. Differentiating, with H = Hessian of L_train at phi (symmetric) and E_m the projection on module m's coordinates:

    (H + Lam) d phi = Lam d theta - sum_m d lambda_m E_m (phi - theta)

so d phi / d theta = (H + Lam)^-1 Lam and d phi / d lambda_m = -(H + Lam)^-1 E_m (phi - theta). With
g = grad L_test(phi) and y the solution of the symmetric system (H + Lam) y = g (one CG solve per task, iMAML's):

    dL_test / d theta    = Lam (H + Lam)^-1 g = Lam y                     (Lam and H + Lam symmetric)
    dL_test / d lambda_m = -g^T (H + Lam)^-1 E_m (phi - theta) = -y_m^T (phi_m - theta_m)

Parametrisation. The learned quantity is s_m = log sigma_m^2 (``log_variance``): sigma^2 = exp(s) stays positive
whatever the outer optimizer does, and lambda_m = exp(-s_m), so d lambda_m / d s_m = -lambda_m and

    dL_test / d s_m = lambda_m y_m^T (phi_m - theta_m).

The meta-gradients are averaged over the tasks like the loss. The theta part is iMAML's own (its custom backward);
the s part enters through a surrogate term (s . d_s) - (s . d_s).detach(): exactly 0 in value, d_s in gradient, so
loss.backward() accumulates both and any grad_output scaling applies to both.

Conditions (as iMAML's): the formulas are exact at the inner optimum (many inner steps with a stable step size,
inner_lr * (largest eigenvalue of H + Lam) < 2: a shrinking sigma^2 makes lambda, and so the needed number of steps
and the stability limit on inner_lr, grow) with a converged CG solve (see ``last_solve``); H + Lam must be
positive definite for CG (iMAML warns when it stops on negative curvature; negative_curvature="continue" runs
plain CG instead, which reaches (H + Lam)^-1 g on an indefinite but nonsingular system given enough iterations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..functional.task_params import TaskParams
from .base import LossFn, _FiniteTracker
from .imaml import iMAML

ModuleSpec = str | Callable[[str], str]
MODULE_MODES = ("parameter", "layer")


def _layer_of(name: str) -> str:
    """'features.0.weight' -> 'features.0' (the owning submodule); a top-level parameter -> its own name."""
    owner, _, _ = name.rpartition(".")
    return owner or name


class ShrinkageIMAML(iMAML):
    """iMAML whose proximal weights are per-module precisions 1 / sigma_m^2, meta-learned by implicit gradients.

    Args:
        model: the network; every parameter that requires grad is meta-learned and adapted.
        inner_lr: step size of the inner gradient descent (> 0; see the module docstring for stability).
        inner_steps: inner steps k.
        init_variance: initial prior variance sigma^2 of every module (> 0).
        cg_steps: CG iterations of the implicit solve (>= 1).
        loss_fn: per-task loss (train and test).
        modules: "parameter" (one module per parameter tensor, default), "layer" (one per submodule owning
            parameters, e.g. a Linear's weight and bias together), or a callable parameter name -> module name.
        tol, negative_curvature, nonfinite, fused, residual_warning: see iMAML. The system solved is iMAML's
            undamped one (cg_damping = lam_damping = 0), the one whose solution the implicit gradients above need;
            negative_curvature="continue" runs plain CG through p^T (H + Lam) p < 0 (imaml_dev's / TorchOpt's CG).

    Attributes:
        log_variance: nn.Parameter [M], s_m = log sigma_m^2 in ``module_names`` order; an optimizer over
            learner.parameters() learns it with the model.
        module_names: the M module names; ``variances()`` maps them to sigma^2.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        init_variance: float,
        cg_steps: int,
        loss_fn: LossFn,
        modules: ModuleSpec = "parameter",
        tol: float = 1e-10,
        negative_curvature: str = "stop",
        nonfinite: str = "raise",
        fused: bool = True,
        residual_warning: float | None = None,
    ):
        who = f"metakernels.{type(self).__name__}"
        if (
            isinstance(init_variance, bool)
            or not isinstance(init_variance, (int, float))
            or not math.isfinite(init_variance)
            or init_variance <= 0
        ):
            raise ValueError(f"{who}: init_variance must be a finite number > 0, got {init_variance!r}")
        if isinstance(modules, str) and modules not in MODULE_MODES:
            raise ValueError(f"{who}: modules must be one of {MODULE_MODES} or a callable, got {modules!r}")
        if not isinstance(modules, str) and not callable(modules):
            raise TypeError(f"{who}: modules must be one of {MODULE_MODES} or a callable name -> module name")
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            lam=1.0 / init_variance,
            cg_steps=cg_steps,
            loss_fn=loss_fn,
            tol=tol,
            negative_curvature=negative_curvature,
            nonfinite=nonfinite,
            fused=fused,
            residual_warning=residual_warning,
        )
        key = {"parameter": lambda name: name, "layer": _layer_of}.get(modules, modules)  # type: ignore[arg-type]
        segment_keys = [str(key(name)) for name in self.layout.names]
        self.module_names: list[str] = list(dict.fromkeys(segment_keys))  # first-appearance order
        ref = self._reference_param()
        # segment (parameter tensor) -> module index, and coordinate -> segment, for the [P] <-> [M] maps
        # (buffers, so learner.to(device) moves them; not saved: they follow from the model and ``modules``).
        module_of_segment = [self.module_names.index(k) for k in segment_keys]
        sizes = torch.tensor([s.numel for s in self.layout.specs], device=ref.device)
        segment_of_coordinate = torch.repeat_interleave(torch.arange(len(segment_keys), device=ref.device), sizes)
        self.register_buffer("_module_of_segment", torch.tensor(module_of_segment, device=ref.device), persistent=False)
        self.register_buffer("_segment_of_coordinate", segment_of_coordinate, persistent=False)
        self.log_variance = nn.Parameter(
            torch.full((len(self.module_names),), math.log(init_variance), dtype=ref.dtype, device=ref.device)
        )
        self._last_phi: torch.Tensor | None = None
        self._last_keep: torch.Tensor | None = None

    def variances(self) -> dict[str, float]:
        """module name -> current prior variance sigma^2 = exp(log_variance)."""
        return dict(zip(self.module_names, self.log_variance.detach().exp().tolist(), strict=True))

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> TaskParams:
        """iMAML.adapt with the current prior variances (the proximal inner loop; detached fast weights)."""
        self._refresh_lam()
        return super().adapt(xs, ys, steps)

    def _refresh_lam(self) -> torch.Tensor:
        """Sets iMAML's per-tensor lam from the current log-variances; returns the [M] precisions lambda_m."""
        precision = torch.exp(-self.log_variance.detach())
        # One value per parameter tensor, the form iMAML takes; read once per call (a host copy of S numbers).
        self.lam = tuple(precision[self._module_of_segment].tolist())
        return precision

    # --- hooks into iMAML's machinery --------------------------------------------------------------------------
    # iMAML reads a per-tensor lam as a tuple of floats (self.lam) and expands it with _per_coordinate; its
    # meta_loss keeps neither phi nor the kept-task indices. The overrides below feed it the current precisions
    # and record what the variance gradient needs, without changing what iMAML computes.

    def _per_coordinate(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        # iMAML caches one vector per distinct tuple of values; the learned precisions change every outer step,
        # so that cache would grow without bound here: build the vector each time (three small ops per meta_loss).
        table = torch.tensor(values, dtype=like.dtype, device=like.device)
        return table[self._segment_of_coordinate]

    def _inner_loop(self, theta, xs, ys, steps, tracker: _FiniteTracker | None) -> torch.Tensor:
        phi = super()._inner_loop(theta, xs, ys, steps, tracker)
        self._last_phi = phi
        return phi

    def _check(self, tracker, result):
        keep = super()._check(tracker, result)
        self._last_keep = keep
        return keep

    # --- the outer loss -------------------------------------------------------------------------------------------

    def meta_loss(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """(1/T) sum_t L_test,t(phi_t); ``loss.backward()`` accumulates the implicit gradients of the model's
        parameters (Lam y, iMAML's) and of ``log_variance`` (lambda_m y_m^T (phi_m - theta_m)), task-averaged."""
        precision = self._refresh_lam()
        self._last_phi, self._last_keep = None, None
        loss = super().meta_loss(xs, ys, xq, yq)
        result, phi, keep = self.last_solve, self._last_phi, self._last_keep
        self._last_phi, self._last_keep = None, None  # not kept alive until the next call
        if result is None or phi is None or not self.log_variance.requires_grad:
            return loss  # no solve (no grad wanted): nothing to add
        with torch.no_grad():
            theta = self.layout.flatten_module(self.model)
            lam = self._per_coordinate(self.lam, phi)
            y = result.x / lam  # iMAML scaled its CG solution y in place to x = Lam y
            contrib = y * (phi - theta)  # [T, P]: y_i (phi_i - theta_i)
            if keep is not None:
                contrib = contrib[keep]
            per_segment = contrib.new_zeros(contrib.shape[0], len(self.layout)).index_add_(
                1, self._segment_of_coordinate, contrib
            )
            per_module = per_segment.new_zeros(per_segment.shape[0], len(self.module_names)).index_add_(
                1, self._module_of_segment, per_segment
            )
            d_log_variance = precision * per_module.mean(0)  # dL/ds_m = lambda_m y_m^T (phi_m - theta_m)
        surrogate = (self.log_variance * d_log_variance).sum()
        return loss + (surrogate - surrogate.detach())  # value: exactly loss; gradient: d_log_variance

    def extra_repr(self) -> str:
        variances = ", ".join(f"{n}: {v:.4g}" for n, v in self.variances().items())
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, cg_steps={self.cg_steps}, tol={self.tol}, "
            f"negative_curvature={self.negative_curvature!r}, variances={{{variances}}}, adapted={self.layout}"
        )
