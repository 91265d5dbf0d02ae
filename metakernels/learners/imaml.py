"""iMAML (Rajeswaran, Finn, Kakade, Levine 2019): meta-learning with implicit gradients.

Inner loop, per task t, from phi = theta, with no graph kept (memory does not grow with inner_steps):

    phi <- phi - inner_lr * (grad L_train,t(phi) + Lam (phi - theta))          inner_steps times

i.e. gradient descent on L_train,t(phi) + 1/2 (phi - theta)^T Lam (phi - theta), Lam = lam I (scalar lam) or
diagonal with one lam per parameter tensor. At the inner optimum, d phi / d theta = (H_t + Lam)^-1 Lam (H_t the
Hessian of L_train,t at phi_t), so the meta-gradient of L_test,t(phi_t) is

    Lam (H_t + Lam)^-1 g_t,   g_t = grad L_test,t(phi_t)          (= (I + H_t / lam)^-1 g_t for a scalar lam)

System solved, with D = Lam + lam_damping I and c = cg_damping:

    ((1 + c) I + H_t D^-1) x_t = g_t,   computed as the symmetric  (H_t + (1 + c) D) y_t = g_t,  x_t = D y_t

by conjugate gradient from y = 0 (metakernels.functional.cg.batched_cg, cg_steps iterations, all tasks in
lockstep; H_t v by metakernels.hvp_operator). For a scalar lam this is ((1 + c) I + H_t / (lam + lam_damping)) x_t
= g_t, the form both references write:
  - the paper's system (default): cg_damping = 0, lam_damping = 0:  x_t = lam (H_t + lam I)^-1 g_t.
  - imaml_dev (aravindr93/imaml_dev, learner_model.py `matrix_evaluator`, regu_coef=1.0, lam_damping=10.0 in
    examples/omniglot_implicit_maml.py): cg_damping = 1.0, lam_damping = 10.0, i.e. (2 I + H_t / (lam + 10)) x = g.
    Its inner loop still uses lam (the damping only changes the linear system), as here.
Negative curvature: the Hessians of ReLU/tanh networks are indefinite, and where H_t has eigenvalues below
-(1 + c) D the system is indefinite too. negative_curvature="stop" (default) stops such a task's CG on the first
direction with p^T A p <= 0 and keeps its iterate (each step taken decreased 1/2 y^T A y - g^T y); "continue" runs
plain CG through it with negative step lengths, as imaml_dev's utils.cg_solve and TorchOpt's solve_cg do, so code
ported from them gets their meta-gradient (the two can differ a lot: 0.72 relative on the sinusoid MLP of
benchmarks/bench_imaml.py at lam = 2, where 20 of 25 tasks meet p^T A p <= 0 within 5 iterations).
For a per-tensor Lam the symmetric form is the exact implicit gradient D (H + (1 + c) D)^-1 g (with c = 0,
lam_damping = 0: Lam (H + Lam)^-1 g); note that the left-preconditioned form ((1 + c) I + D^-1 H) x = g would give
(H + (1 + c) D)^-1 D g instead, which is not the transpose of d phi / d theta when D is not a multiple of I.

The meta-gradient accumulated by loss.backward() is (1/T) sum_t x_t (first_order=True: (1/T) sum_t g_t, no
solve), reshaped into model.parameters() by a custom autograd.Function, scaled by the backward's grad_output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..functional.cg import CG_NEGATIVE_CURVATURE, CG_NONFINITE, NEGATIVE_CURVATURE_MODES, CGResult, batched_cg
from ..functional.hvp import hvp_operator
from ..functional.task_params import TaskParams
from ..ops.inner_step import inner_step
from ._inputs import check_episode, check_pair
from ._losses import LossFn, per_task_losses
from ._precomputed import PrecomputedGradient
from .base import GradientLearner, Rate, _FiniteTracker

LamSpec = float | Mapping[str, float] | Sequence[float]


def _positive(who: str, name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative(who: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class iMAML(GradientLearner):  # noqa: N801  (the method's name)
    """Implicit MAML: proximal inner loop without a graph, implicit meta-gradient by conjugate gradient.

    Args:
        model: the network; every parameter that requires grad is meta-learned and adapted.
        inner_lr: step size of the inner gradient descent (> 0).
        inner_steps: inner steps k (>= 0). Memory does not depend on k (no graph is kept).
        lam: the proximal weight lambda (> 0): a number, or one per parameter tensor (a dict name -> value over
            every adapted parameter, or a sequence in model.parameters() order): Lam diagonal.
        cg_steps: CG iterations (>= 1; 0 is refused unless first_order, since CG from 0 would return 0).
        loss_fn: per-task loss, e.g. F.mse_loss or F.cross_entropy (train and test).
        tol: CG stops a task once ||r|| <= tol ||g_t|| (0: always cg_steps iterations).
        cg_damping, lam_damping: the damped system of the module docstring (0, 0: the paper; 1, 10: imaml_dev).
        negative_curvature: what CG does on a direction p with p^T A p <= 0 (A = H_t + (1 + c) D indefinite).
            "stop" (default): the task stops there and keeps its iterate (a CG that only ever steps along
            directions of positive curvature). "continue": plain CG, which steps on with a negative step length
            and stops only on p^T A p == 0 exactly; this reproduces imaml_dev (aravindr93/imaml_dev utils.cg_solve)
            and TorchOpt (torchopt.linear_solve.solve_cg), whose CG has no curvature test. Both agree wherever A
            is positive definite along every direction CG meets.
        first_order: the first-order approximation (1/T) sum_t grad L_test,t(phi_t) (no solve).
        nonfinite: "raise" (default) raises on a NaN/inf inner loss or gradient, query loss or gradient, or a CG
            solve that met non-finite Hessian-vector products; "skip" drops such tasks (with a warning).
        fused: fused layer kernels for recognised models (default); False: the generic vmap path. Same result.
        residual_warning: when set, a RuntimeWarning names the tasks whose CG relative residual exceeds it.

    After each meta_loss with grad enabled, ``last_solve`` holds the CGResult of every task (iterations,
    residual norms, relative residuals, status), including tasks then skipped; None for first_order.
    Tasks whose CG stopped on negative curvature (H_t + (1 + c) D not positive definite; with
    negative_curvature="continue" only a breakdown, p^T A p == 0) raise a RuntimeWarning naming them; their
    implicit gradient is the CG iterate reached. In "continue" mode a task that merely met p^T A p < 0 is not
    warned about: it carried on, as the peers' CG does.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        lam: LamSpec,
        cg_steps: int,
        loss_fn: LossFn,
        tol: float = 1e-10,
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        negative_curvature: str = "stop",
        first_order: bool = False,
        nonfinite: str = "raise",
        fused: bool = True,
        residual_warning: float | None = None,
    ):
        super().__init__(
            model, inner_steps=inner_steps, loss_fn=loss_fn, first_order=first_order, nonfinite=nonfinite, fused=fused
        )
        who = self._who
        self.inner_lr = _positive(who, "inner_lr", inner_lr)
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 0:
            raise ValueError(f"{who}: cg_steps must be an integer >= 0, got {cg_steps!r}")
        if cg_steps == 0 and not first_order:
            raise ValueError(
                f"{who}: cg_steps=0 would return a zero meta-gradient (CG starts from 0); pass first_order=True "
                "for the first-order approximation"
            )
        self.cg_steps = cg_steps
        self.tol = _non_negative(who, "tol", tol)
        self.cg_damping = _non_negative(who, "cg_damping", cg_damping)
        self.lam_damping = _non_negative(who, "lam_damping", lam_damping)
        if not isinstance(negative_curvature, str) or negative_curvature not in NEGATIVE_CURVATURE_MODES:
            raise ValueError(
                f"{who}: negative_curvature must be one of {NEGATIVE_CURVATURE_MODES}, got {negative_curvature!r}"
            )
        self.negative_curvature = negative_curvature
        self.residual_warning = (
            None if residual_warning is None else _non_negative(who, "residual_warning", residual_warning)
        )
        self.lam = self._parse_lam(lam)  # a float, or a tuple with one value per parameter tensor
        self.last_solve: CGResult | None = None
        self._vectors: dict[tuple, torch.Tensor] = {}

    def _parse_lam(self, lam: LamSpec) -> float | tuple[float, ...]:
        who, names = self._who, self.layout.names
        if isinstance(lam, Mapping):
            missing = [n for n in names if n not in lam]
            extra = [n for n in lam if n not in names]
            if missing or extra:
                raise ValueError(
                    f"{who}: lam must give one value per adapted parameter tensor {names}; "
                    + (f"missing {missing}" if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"unknown {extra}" if extra else "")
                )
            values = tuple(_positive(who, f"lam[{n!r}]", lam[n]) for n in names)
        elif isinstance(lam, Sequence) and not isinstance(lam, str):
            if len(lam) != len(names):
                raise ValueError(
                    f"{who}: lam has {len(lam)} values but the model has {len(names)} adapted parameter tensors {names}"
                )
            values = tuple(_positive(who, f"lam[{i}]", v) for i, v in enumerate(lam))
        else:
            return _positive(who, "lam", lam)
        # One value for every tensor is a scalar lam: the fused proximal inner step serves it.
        return values[0] if len(set(values)) == 1 else values

    # --- per-coordinate vectors of a per-tensor lam ----------------------------------------------------------

    def _per_coordinate(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        key = (values, like.dtype, like.device)
        if key not in self._vectors:
            sizes = torch.tensor([s.numel for s in self.layout.specs], device=like.device)
            table = torch.tensor(values, dtype=like.dtype, device=like.device)
            self._vectors[key] = torch.repeat_interleave(table, sizes)
        return self._vectors[key]

    def _shift(self, like: torch.Tensor) -> float | torch.Tensor:
        """(1 + cg_damping) D, D = Lam + lam_damping: the diagonal added to H in the symmetric system."""
        if isinstance(self.lam, float):
            return (1.0 + self.cg_damping) * (self.lam + self.lam_damping)
        return self._per_coordinate(tuple((1.0 + self.cg_damping) * (v + self.lam_damping) for v in self.lam), like)

    def _scale(self, like: torch.Tensor) -> float | torch.Tensor:
        """D = Lam + lam_damping: x = D y."""
        if isinstance(self.lam, float):
            return self.lam + self.lam_damping
        return self._per_coordinate(tuple(v + self.lam_damping for v in self.lam), like)

    # --- the inner loop (no graph) -------------------------------------------------------------------------------

    def inner_rate(self, step: int) -> Rate:
        return self.inner_lr, None

    def _inner_loop(
        self, theta: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, steps: int, tracker: _FiniteTracker | None
    ) -> torch.Tensor:
        """phi [T, P] after ``steps`` proximal gradient steps from theta [P] (detached; updated in place)."""
        phi = theta.unsqueeze(0).expand(xs.shape[0], -1).clone()
        lr = torch.tensor(self.inner_lr, dtype=theta.dtype, device=theta.device)
        lam = None if isinstance(self.lam, float) else self._per_coordinate(self.lam, theta)
        for step in range(steps):
            losses, grad = self._detached_loss_grad(phi, xs, ys)
            if tracker is not None:
                tracker.record(f"inner loss at step {step}", losses)
                tracker.record(f"inner gradient at step {step}", grad)
            with torch.no_grad():
                if lam is None:  # the fused step applies the proximal term itself
                    inner_step(phi, grad, lr, theta0=theta, prox=self.lam, out=phi)
                else:
                    grad = grad.addcmul_(lam, phi - theta) if grad.is_contiguous() else grad + lam * (phi - theta)
                    inner_step(phi, grad, lr, out=phi)
        return phi

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> TaskParams:
        """Adapts every task to its support set (the proximal inner loop).

        Returns:
            TaskParams with [T, P] fast weights, detached: iMAML never differentiates through the inner loop
            (its meta-gradient comes from meta_loss's implicit solve).
        """
        check_pair(self._who, xs, ys, self._reference_param())
        steps = self.inner_steps if steps is None else steps
        with torch.no_grad():
            theta = self.layout.flatten_module(self.model)
        return TaskParams(self._inner_loop(theta, xs, ys, steps, None), self.layout)

    # --- the outer loss ----------------------------------------------------------------------------------------------

    def meta_loss(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """(1/T) sum_t loss_fn(f(phi_t, xq_t), yq_t), phi_t the proximal inner solution on (xs_t, ys_t).

        ``loss.backward()`` accumulates the implicit meta-gradient (1/T) sum_t x_t (module docstring) into the
        model's parameters. One host synchronisation: the finiteness (and CG status) check.
        """
        check_episode(self._who, xs, ys, xq, yq, self._reference_param())
        params = self.layout.parameters(self.model)
        with torch.no_grad():
            theta = self.layout.flatten_module(self.model)
        tracker = _FiniteTracker()
        phi = self._inner_loop(theta, xs, ys, self.inner_steps, tracker)
        solve = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if solve:
            query_losses, g_test = self._detached_loss_grad(phi, xq, yq)
        else:  # evaluation (no_grad, or nothing to learn): the loss only
            with torch.no_grad():
                query_losses = per_task_losses(self.loss_fn, self.forward_tasks(phi, xq), yq)
        tracker.record("query loss", query_losses)
        result, direction = None, None
        if solve:
            tracker.record("query gradient", g_test)
            if self.first_order:
                direction = g_test
            else:
                result = self._solve(phi, xs, ys, g_test)
                nonfinite = torch.where(result.status == CG_NONFINITE, math.nan, 0.0)
                tracker.record("Hessian-vector products of the CG solve", nonfinite)
                direction = result.x.mul_(self._scale(g_test))  # x = D y
        self.last_solve = result
        keep = self._check(tracker, result)
        if keep is not None:
            query_losses = query_losses[keep]
            direction = None if direction is None else direction[keep]
        value = query_losses.mean()
        if direction is None:
            return value
        return PrecomputedGradient.apply(value, direction.mean(0), self.layout, *params)

    def _solve(self, phi: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, g: torch.Tensor) -> CGResult:
        """CG on (H_t + (1 + c) D) y_t = g_t for every task; result.x holds y (scaled to x by the caller)."""
        hessian = hvp_operator(self.model, TaskParams(phi, self.layout), xs, ys, loss_fn=self.loss_fn, fused=self.fused)
        shift = self._shift(g)

        if isinstance(shift, float):

            def matvec(p: torch.Tensor) -> torch.Tensor:
                return hessian(p).add_(p, alpha=shift)

        else:

            def matvec(p: torch.Tensor) -> torch.Tensor:
                return hessian(p).addcmul_(shift, p)

        return batched_cg(matvec, g, max_iter=self.cg_steps, tol=self.tol, negative_curvature=self.negative_curvature)

    def _check(self, tracker: _FiniteTracker, result: CGResult | None) -> torch.Tensor | None:
        """Raises, warns or picks the tasks to keep; returns their indices, or None to keep all. One host sync."""
        good = tracker.good_tasks()
        rows = [good.to(torch.float64)]
        if result is not None:  # the solve's flags and residuals come back in the same transfer
            rows += [(result.status == CG_NEGATIVE_CURVATURE).to(torch.float64), result.relative_residual]
        flags = torch.stack(rows).tolist()  # the one synchronisation
        flags[0] = [bool(f) for f in flags[0]]
        good_list = flags[0]
        if not all(good_list):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"{self._who}.meta_loss: {tracker.describe(good)}; pass nonfinite='skip' to drop such tasks"
                )
            if not any(good_list):
                raise FloatingPointError(f"{self._who}.meta_loss: every task produced NaN/inf; nothing to learn from")
        if result is not None:
            self._warn_solve(flags, good_list)
        if all(good_list):
            return None
        warnings.warn(f"{self._who}.meta_loss: skipping {tracker.describe(good)}", RuntimeWarning, stacklevel=3)
        return good.nonzero().flatten()

    def _warn_solve(self, flags: list[list], good: list[bool]) -> None:
        negative, relative = flags[1], flags[2]
        tasks = [t for t, (bad, ok) in enumerate(zip(negative, good, strict=True)) if bad and ok]
        if tasks:
            # The status means p^T A p <= 0 under "stop" and only p^T A p == 0 (a breakdown) under "continue".
            why = "<= 0" if self.negative_curvature == "stop" else "== 0, a breakdown of plain CG"
            warnings.warn(
                f"{self._who}.meta_loss: the CG solve stopped on negative curvature (p^T (H + (1 + cg_damping)"
                f"(lam + lam_damping)) p {why}) for tasks {tasks}; their implicit gradients are the CG iterates "
                f"reached (relative residuals {[f'{relative[t]:.3g}' for t in tasks]}; see .last_solve). A larger "
                "lam or cg_damping makes the system positive definite.",
                RuntimeWarning,
                stacklevel=4,
            )
        if self.residual_warning is not None:
            high = [t for t, (r, ok) in enumerate(zip(relative, good, strict=True)) if ok and r > self.residual_warning]
            if high:
                warnings.warn(
                    f"{self._who}.meta_loss: CG did not reach residual_warning={self.residual_warning:g} for tasks "
                    f"{high} after cg_steps={self.cg_steps} (relative residuals "
                    f"{[f'{relative[t]:.3g}' for t in high]}; see .last_solve)",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _meta_loss(self, xs, ys, xq, yq, tracker):  # the base's second-order path does not apply
        raise NotImplementedError("iMAML computes its meta-loss in meta_loss")

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, lam={self.lam}, cg_steps={self.cg_steps}, "
            f"tol={self.tol}, cg_damping={self.cg_damping}, lam_damping={self.lam_damping}, "
            f"negative_curvature={self.negative_curvature!r}, first_order={self.first_order}, adapted={self.layout}"
        )
