"""GradientLearner: the shared machinery of the MAML family.

All tasks adapt together: their fast weights are one [T, P] tensor (TaskParams), the model runs
task-batched, and each inner step of every task and every layer is one fused `inner_step` call. The
subclasses only say which parameters adapt, at which rate, and how the outer loss is formed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..functional.batched_call import fused_dtype_supported, task_batched_call
from ..functional.fused_model import build_plan, mlp_spec, run_plan
from ..functional.hessian_penalty import hessian_penalty
from ..functional.task_params import ParameterLayout, TaskParams
from ..ops.inner_step import inner_step
from ._inputs import check_episode, check_pair
from ._losses import LossFn, per_task_losses, standard_loss

Rate = tuple[torch.Tensor | float, torch.Tensor | None]  # (lr, segment_offsets)

NONFINITE_MODES = ("raise", "skip")
META_GRADIENT_MODES = ("auto", "unroll", "hvp")


class _FiniteTracker:
    """Per-task finiteness of every inner loss, inner gradient and query loss, checked with one host sync.

    Each record keeps one number per task, the sum of its values: NaN or inf when any value is, so one
    cheap reduction per record and one isfinite over all records at the end. (On the sinusoid MLP,
    isfinite().all() per record took 147 us and an inf-norm 195 us, against 6 us for the sum: more than
    the fused inner step itself.) A sum can also overflow: a task whose finite values sum beyond the
    dtype's range (|values| ~ 1e38 / P in float32, a diverged task anyway) is reported as non-finite.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.whats: list[str] = []
        # One [capacity, T] buffer, doubled when full, rather than a fresh [T] tensor per record: those small
        # tensors stay alive through the whole inner loop, one pair per step, between the step's large
        # temporaries, and with glibc's allocator they pinned the heap: peak RSS of a conv iMAML step grew
        # with the number of inner steps (1.23x from k = 5 to 100) although its live memory did not.
        self._capacity = max(1, int(capacity))
        self._sums: torch.Tensor | None = None

    def record(self, what: str, values: torch.Tensor) -> None:
        values = values.detach()
        per_task = values.reshape(values.shape[0], -1)
        row = len(self.whats)
        if self._sums is None:
            self._sums = per_task.new_empty((self._capacity, per_task.shape[0]))
        elif row == self._sums.shape[0]:
            grown = self._sums.new_empty((2 * row, self._sums.shape[1]))
            grown[:row] = self._sums
            self._sums = grown
        self._sums[row].copy_(per_task.sum(1))
        self.whats.append(what)

    def _finite(self) -> torch.Tensor:
        if self._sums is None:
            raise RuntimeError("_FiniteTracker: no record yet, so the number of tasks is unknown")
        return torch.isfinite(self._sums[: len(self.whats)])  # [records, T]

    def good_tasks(self) -> torch.Tensor:
        return self._finite().all(0)

    def describe(self, good: torch.Tensor) -> str:
        bad = (~good).nonzero().flatten().tolist()
        for what, flags in zip(self.whats, self._finite(), strict=True):
            first = (~flags).nonzero().flatten().tolist()
            if first:
                return f"tasks {bad} produced NaN/inf (first seen in the {what} of tasks {first})"
        return f"tasks {bad} produced NaN/inf"


class GradientLearner(nn.Module):
    """Base of the MAML-family learners.

    Args:
        model: the network; every parameter that requires grad is meta-learned; those selected by
            ``adapt_filter`` (default: all of them) are also adapted per task in the inner loop.
        inner_steps: number of inner gradient steps k (0: no adaptation, the multi-task baseline).
        loss_fn: loss(pred [N, ...], target [N, ...]) -> scalar, applied to each task separately.
        first_order: drop the second-order terms (FOMAML): inner gradients are treated as constants.
        weight_decay: L2 coefficient inside each inner step.
        nonfinite: "raise" (default) raises on a NaN/inf loss or gradient of any task; "skip" drops such
            tasks from the meta-batch (with a warning) and averages over the rest.
        fused: run recognised models (Linear/activation stacks, conv+BatchNorm+ReLU+max-pool blocks) through
            the fused layer kernels (default); False forces the generic torch.func.vmap path. Both compute the
            same meta-gradient.
        hessian_penalty: weight w >= 0 of the Hessian Frobenius penalty added to the meta-loss:
            w * mean_t ||H[L(theta'_t, support_t)]||_F^2 at the adapted weights theta' (Hutchinson estimate,
            see metakernels.functional.hessian_penalty). 0 (default): not computed, the plain meta-loss.
        hessian_probes: Rademacher probes per task for that estimate (drawn from torch's global generator).
        meta_gradient: how the second-order meta-gradient is computed. "unroll": autograd through the unrolled
            inner loop (the double backward of every layer). "hvp": reverse accumulation with Hessian-vector
            products by the conv-net R-operator or the fused MLP one, no graph kept (learners/_hvp_route.py;
            plain MAML steps on a conv net or whole MLP those operators cover, every meta-learned parameter
            adapted; raises otherwise). "auto" (default): "hvp" where it applies, else "unroll". Both give the
            same meta-gradient up to rounding; only "unroll"'s can be differentiated again.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int,
        loss_fn: LossFn,
        first_order: bool = False,
        weight_decay: float = 0.0,
        nonfinite: str = "raise",
        adapt_filter: Callable[[str, nn.Parameter], bool] | None = None,
        fused: bool = True,
        hessian_penalty: float = 0.0,
        hessian_probes: int = 1,
        meta_gradient: str = "auto",
    ):
        super().__init__()
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"{type(self).__name__}: inner_steps must be an integer >= 0, got {inner_steps!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"{type(self).__name__}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if not callable(loss_fn):
            raise TypeError(f"{type(self).__name__}: loss_fn must be callable")
        self.model = model
        self.inner_steps = inner_steps
        self.loss_fn = loss_fn
        self.first_order = first_order
        self.weight_decay = float(weight_decay)
        self.nonfinite = nonfinite
        self.layout = ParameterLayout.from_module(model, adapt_filter)
        self._who = f"metakernels.{type(self).__name__}"
        # The fused plan is built once: like the layout, it assumes the model's structure does not change.
        self.fused = bool(fused)
        self._stages = build_plan(model) if self.fused else None
        spec = mlp_spec(model, self._stages)
        # The whole-MLP kernel needs every MLP parameter adapted, in the layout order it expects.
        self._mlp = spec if spec is not None and tuple(self.layout.names) == spec.parameter_names else None
        self._standard_loss = standard_loss(loss_fn)
        self._init_hessian_penalty(hessian_penalty, hessian_probes)
        if meta_gradient not in META_GRADIENT_MODES:
            raise ValueError(f"{self._who}: meta_gradient must be one of {META_GRADIENT_MODES}, got {meta_gradient!r}")
        self.meta_gradient = meta_gradient

    def _init_hessian_penalty(self, weight: float, probes: int) -> None:
        # Issue 5: the penalty is one extra term of _meta_loss below; a learner with its own _meta_loss
        # (Reptile: no differentiated meta-loss) would silently ignore it, so a non-zero weight is refused there.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{self._who}: hessian_penalty must be a finite weight >= 0, got {weight!r}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"{self._who}: hessian_probes must be an integer >= 1, got {probes!r}")
        if weight != 0 and type(self)._meta_loss is not GradientLearner._meta_loss:
            raise ValueError(f"{self._who}: hessian_penalty is not supported by this learner (own meta-loss)")
        self.hessian_penalty = float(weight)
        self.hessian_probes = probes

    # --- what subclasses choose -------------------------------------------------------------------

    def inner_rate(self, step: int) -> Rate:
        """The learning rate of inner step ``step``: (lr, segment_offsets) as inner_step takes them."""
        raise NotImplementedError

    def step_loss_weights(self) -> list[float] | None:
        """Weights of the query loss after each inner step (MAML++'s multi-step loss); None: final only."""
        return None

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Work done once per input batch, outside the inner loop (ANIL computes its features here)."""
        return x

    def forward_tasks(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [T, N, ...] of every task on prepared inputs x with fast weights flat [T, P]."""
        if self._stages is not None and fused_dtype_supported(x, flat):
            return run_plan(self._stages, self.model, self.layout.views(flat), x)
        return task_batched_call(self.model, self.layout.views(flat), x, fused=False)

    def _fused_mlp_loss_grad(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-task inner losses and their gradients from the whole-MLP kernel, when it covers this case."""
        mlp, kind = self._mlp, self._standard_loss
        if mlp is None or kind is None or not fused_dtype_supported(x, flat):
            return None
        if type(self).forward_tasks is not GradientLearner.forward_tasks or x.dim() != 3:
            return None
        if kind == "mse" and (y.shape != x.shape[:2] + (mlp.widths[-1],) or y.dtype != flat.dtype):
            return None
        if kind == "cross_entropy" and (y.shape != x.shape[:2] or y.dtype != torch.int64):
            return None
        from ..ops.mlp_loss_grad import mlp_loss_grad

        return mlp_loss_grad(flat, x, y, list(mlp.widths), activation=mlp.activation, loss=kind)

    def _detached_loss_grad(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task losses [T] and gradients [T, P] at flat, without a graph (prepared inputs x)."""
        with torch.no_grad():
            fused = self._fused_mlp_loss_grad(flat, x, y)
        if fused is not None:
            return fused
        with torch.enable_grad():
            theta = flat.detach().requires_grad_()
            losses = per_task_losses(self.loss_fn, self.forward_tasks(theta, x), y)
            (grad,) = torch.autograd.grad(losses.sum(), theta, allow_unused=True, materialize_grads=True)
        return losses.detach(), grad

    # --- the inner loop -----------------------------------------------------------------------------

    def _reference_param(self) -> torch.Tensor:
        return self.layout.parameters(self.model)[0]

    def _adapt(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        create_graph: bool,
        tracker: _FiniteTracker | None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        flat = TaskParams.from_module(self.model, x.shape[0], self.layout).flat
        record_update = torch.is_grad_enabled()
        for step in range(steps):
            with torch.enable_grad():
                if not flat.requires_grad:  # evaluation under no_grad, or a model with frozen weights
                    flat = flat.detach().requires_grad_()
                with torch.set_grad_enabled(create_graph):  # the fused op records a graph only when needed
                    fused = self._fused_mlp_loss_grad(flat, x, y)
                if fused is not None:
                    losses, grad = fused
                else:
                    losses = per_task_losses(self.loss_fn, self.forward_tasks(flat, x), y)
                    (grad,) = torch.autograd.grad(losses.sum(), flat, create_graph=create_graph)
            if tracker is not None:
                tracker.record(f"inner loss at step {step}", losses)
                tracker.record(f"inner gradient at step {step}", grad)
            lr, offsets = self.inner_rate(step)
            with torch.set_grad_enabled(record_update):
                flat = inner_step(flat, grad, lr, segment_offsets=offsets, weight_decay=self.weight_decay)
            if on_step is not None:
                on_step(step, flat)
        return flat

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> TaskParams:
        """Adapts every task to its support set.

        Args:
            xs: [T, N, ...] support inputs; ys: [T, N, ...] support targets.
            steps: inner steps (default: the learner's inner_steps).

        Returns:
            TaskParams with [T, P] fast weights, differentiable in the meta-parameters when grad is enabled
            (second order unless first_order).
        """
        check_pair(self._who, xs, ys, self._reference_param())
        steps = self.inner_steps if steps is None else steps
        create_graph = torch.is_grad_enabled() and not self.first_order
        flat = self._adapt(self.prepare_inputs(xs), ys, steps, create_graph, None)
        return TaskParams(flat, self.layout)

    def predict(self, fast: TaskParams, xq: torch.Tensor) -> torch.Tensor:
        """Query outputs [T, N, ...] of the adapted tasks."""
        if xq.shape[0] != fast.num_tasks:
            raise ValueError(f"{self._who}: xq has {xq.shape[0]} tasks but the fast weights have {fast.num_tasks}")
        return self.forward_tasks(fast.flat, self.prepare_inputs(xq))

    # --- the outer loss -------------------------------------------------------------------------------

    def meta_loss(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """(1/T) sum_t loss_fn(f(phi_t, xq_t), yq_t), phi_t adapted on (xs_t, ys_t).

        ``loss.backward()`` accumulates the exact meta-gradient into the model's parameters (and any
        learned inner rates).
        """
        check_episode(self._who, xs, ys, xq, yq, self._reference_param())
        tracker = _FiniteTracker()
        loss = self._meta_loss(xs, ys, xq, yq, tracker)
        good = tracker.good_tasks()
        if bool(good.all()):
            return loss
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{self._who}.meta_loss: {tracker.describe(good)}; pass nonfinite='skip' to drop such tasks"
            )
        if not bool(good.any()):
            raise FloatingPointError(f"{self._who}.meta_loss: every task produced NaN/inf; nothing to learn from")
        warnings.warn(f"{self._who}.meta_loss: skipping {tracker.describe(good)}", RuntimeWarning, stacklevel=2)
        keep = good.nonzero().flatten()
        return self._meta_loss(xs[keep], ys[keep], xq[keep], yq[keep], None)

    def _meta_loss(self, xs, ys, xq, yq, tracker: _FiniteTracker | None) -> torch.Tensor:
        create_graph = torch.is_grad_enabled() and not self.first_order
        if create_graph and self.meta_gradient != "unroll":
            from ._hvp_route import hvp_route_case, hvp_route_meta_loss

            case = hvp_route_case(self, xs, ys)  # or why the route does not apply
            if not isinstance(case, str):
                return hvp_route_meta_loss(self, case, xs, ys, xq, yq, tracker)
            if self.meta_gradient == "hvp":
                raise ValueError(f"{self._who}: meta_gradient='hvp' does not apply here: {case}")
        xs_in, xq_in = self.prepare_inputs(xs), self.prepare_inputs(xq)
        weights = self.step_loss_weights()
        step_losses: list[torch.Tensor] = []

        def query_loss(flat: torch.Tensor, what: str) -> torch.Tensor:
            losses = per_task_losses(self.loss_fn, self.forward_tasks(flat, xq_in), yq)
            if tracker is not None:
                tracker.record(what, losses)
            return losses.mean()

        on_step = None
        if weights is not None and self.inner_steps > 0:

            def on_step(step: int, flat: torch.Tensor) -> None:
                step_losses.append(query_loss(flat, f"query loss after step {step}"))

        flat = self._adapt(xs_in, ys, self.inner_steps, create_graph, tracker, on_step)
        if step_losses:
            loss = sum(w * step_loss for w, step_loss in zip(weights, step_losses, strict=False))
        else:
            loss = query_loss(flat, "query loss")
        if self.hessian_penalty != 0:
            # Issue 5, Hessian regularisation: + w * mean_t ||H[L(theta'_t, support_t)]||_F^2 at the final fast
            # weights. hvp evaluates self.model on the raw support inputs: the function forward_tasks computes
            # (ANIL's cached body features are the same body applied to the same inputs).
            adapted = TaskParams(flat, self.layout)
            penalty = hessian_penalty(
                self.model, adapted, xs, ys, loss_fn=self.loss_fn, probes=self.hessian_probes, fused=self.fused
            )
            if tracker is not None:
                tracker.record("Hessian penalty", penalty)
            loss = loss + self.hessian_penalty * penalty.mean()
        return loss

    def extra_repr(self) -> str:
        text = f"inner_steps={self.inner_steps}, first_order={self.first_order}, adapted={self.layout}"
        if self.meta_gradient != "auto":
            text += f", meta_gradient={self.meta_gradient!r}"
        if self.hessian_penalty:
            text += f", hessian_penalty={self.hessian_penalty}, hessian_probes={self.hessian_probes}"
        return text
