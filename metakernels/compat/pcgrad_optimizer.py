"""PCGrad(optimizer): the drop-in wrapper interface (zero_grad / pc_backward / step) on the fused PCGrad op.

The wrapper most PyTorch multi-task code uses (the "Pytorch-PCGrad" project) has this interface and this
algorithm, which is what PCGrad below reproduces by default:

1. for each loss in turn, a backward pass gives that task's gradient of every optimizer parameter,
   flattened into one vector; a parameter the task does not reach gets zeros there, and the task's
   "has gradient" flag for that parameter is False;
2. each task's gradient g_i is projected, in a random order over ALL tasks (j = i included), against
   every ORIGINAL g_j it conflicts with (g_i . g_j < 0): g_i <- g_i - (g_i . g_j) / ||g_j||^2 g_j. The dot
   products run over all parameters, task heads included;
3. a parameter is "shared" when every task has a gradient for it; shared parameters receive the MEAN
   of the projected gradients, the others (task heads) their SUM;
4. the merged vector is unflattened into p.grad (zeros for a parameter no task reaches), and step()
   calls the optimizer's step.

Here step 2 and the sum are one call of metakernels.pcgrad (two passes over the [T, P] gradients instead
of the loop's O(T^2)); the op's own shared_mask semantics differ from step 3 (its task-specific columns
are left out of the projection and receive the plain sum of the UNPROJECTED gradients, as LibMTL does),
so the wrapper asks the op for the sum of the projected gradients over every column and divides the
shared parameters' part by T itself. ``project="shared"`` gives the op's (LibMTL's) semantics instead.

Differences from that wrapper, all deliberate:
- the orders come from a torch generator (``seed``/``generator``; None: torch's global generator, so
  ``torch.manual_seed`` makes a run reproducible) instead of Python's ``random.shuffle``, and a call
  can fix them (``pc_backward(losses, orders=...)``);
- parameters with requires_grad=False are skipped (the wrapper writes a zero .grad into them, which a
  weight-decaying optimizer then applies to the frozen weights);
- gradients come from torch.autograd.grad, so nothing outside the optimizer's parameters has its
  .grad touched, and the graph is freed after the last loss unless ``retain_graph=True``;
- ``reduction="sum"`` really sums (the wrapper tests ``if self._reduction:``, true for "sum" too, so it
  always averages the shared parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..ops.pcgrad import pcgrad

_WHO = "metakernels.PCGrad"
PROJECTIONS = ("all", "shared")
REDUCTIONS = ("mean", "sum")


class PCGrad:
    """Projecting conflicting gradients around any torch.optim optimizer (drop-in for the PyTorch wrapper).

    Usage, as with the wrapper::

        pc = metakernels.PCGrad(torch.optim.Adam(model.parameters()))
        pc.zero_grad()
        pc.pc_backward([loss_a, loss_b, loss_c])   # one scalar loss per task
        pc.step()

    Args:
        optimizer: the torch.optim optimizer whose parameters get the projected gradient.
        reduction: how the projected gradients of the shared parameters (those every task reaches) are
            combined: "mean" (default, the wrapper) or "sum" (the paper). Parameters not reached by every
            task (task heads) always receive the sum.
        include_self: also test g_i against its own original g_i during its projections (default True, as
            the wrapper does: a partly projected g_i can have a negative dot product with the original
            g_i, so this is not a no-op). The paper skips j = i (False).
        project: "all" (default, the wrapper): every parameter enters the dot products and is projected;
            "shared": only the shared parameters do, and the task-specific ones receive the plain sum of
            the unprojected task gradients (LibMTL's semantics). Identical when every task reaches every
            parameter.
        seed: seeds a private torch.Generator for the projection orders (reproducible runs).
        generator: a torch.Generator to draw the orders from (not both with seed). Neither: torch's global
            generator. Task i's order is ``torch.randperm(T, generator=...)``, drawn for i = 0..T-1.
        eps: added to ||g_j||^2 in the projection's denominator (0, as in the wrapper and the paper).

    The paper's semantics are ``PCGrad(opt, reduction="sum", include_self=False)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        reduction: str = "mean",
        include_self: bool = True,
        project: str = "all",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        eps: float = 0.0,
    ):
        if not hasattr(optimizer, "param_groups") or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"{_WHO}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{_WHO}: reduction must be 'mean' or 'sum', got {reduction!r}")
        if project not in PROJECTIONS:
            raise ValueError(f"{_WHO}: project must be 'all' or 'shared', got {project!r}")
        if seed is not None and generator is not None:
            raise ValueError(f"{_WHO}: pass seed or generator, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        if not (isinstance(eps, (int, float)) and eps >= 0.0 and eps != float("inf")):
            raise ValueError(f"{_WHO}: eps must be finite and >= 0, got {eps!r}")
        self._optim = optimizer
        self.reduction = reduction
        self.include_self = bool(include_self)
        self.project = project
        self.generator = generator
        self.eps = float(eps)

    # --- the wrapper's interface ------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._optim

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (so LR schedulers can be pointed at either)."""
        return self._optim.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the optimizer's parameters (to None by default, as the wrapper does)."""
        self._optim.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer on the gradients pc_backward wrote; returns what it returns."""
        return self._optim.step() if closure is None else self._optim.step(closure)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict (the wrapper keeps no state of its own worth saving; a seeded
        generator is not saved: reseed it on resumption if the orders must continue exactly)."""
        return self._optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the wrapped optimizer's state_dict."""
        self._optim.load_state_dict(state_dict)

    def pc_backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        orders: torch.Tensor | Sequence[Sequence[int]] | None = None,
        retain_graph: bool = False,
    ) -> None:
        """Writes the PCGrad-combined gradient of the task losses into p.grad of the optimizer's parameters.

        Args:
            losses: one scalar loss per task (a list/tuple, or a 1-D tensor of T losses).
            orders: optional [T, T] projection orders (row i: the order in which task i visits the tasks,
                a permutation of 0..T-1); default: drawn from the generator (see the class).
            retain_graph: keep the autograd graph after the last loss (it is freed by default).

        Every optimizer parameter with requires_grad=True gets its .grad overwritten (zeros where no task
        reaches it, as the wrapper does); parameters with requires_grad=False are not touched.

        Raises:
            ValueError: empty losses, a loss with more than one element, a NaN/inf loss or gradient, bad
                orders. TypeError: a loss that is not a floating tensor or does not require grad.
        """
        losses = self._check_losses(losses)
        params = self._parameters()
        num_tasks = len(losses)
        dtype, device = _common_dtype_device(params)
        sizes = [p.numel() for p in params]
        grads = torch.zeros(num_tasks, sum(sizes), dtype=dtype, device=device)
        reached = [[False] * len(params) for _ in range(num_tasks)]
        for i, loss in enumerate(losses):
            keep = retain_graph or i < num_tasks - 1  # later losses usually share this graph (the trunk)
            task_grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
            offset = 0
            for k, (g, n) in enumerate(zip(task_grads, sizes, strict=True)):
                if g is not None:
                    if g.is_sparse:  # nn.Embedding(sparse=True): densified, as .grad would be by to_dense()
                        g = g.to_dense()
                    grads[i, offset : offset + n].copy_(g.reshape(-1))
                    reached[i][k] = True
                offset += n
        shared = [all(reached[i][k] for i in range(num_tasks)) for k in range(len(params))]
        update = self._combine(grads, sizes, shared, orders)
        offset = 0
        with torch.no_grad():
            for p, n in zip(params, sizes, strict=True):
                g = update[offset : offset + n].view(p.shape)
                # A view of the fresh update vector: no copy when dtype and device already match.
                p.grad = g.to(device=p.device, dtype=p.dtype)
                offset += n

    # --- internals -------------------------------------------------------------------------------------

    def _combine(
        self,
        grads: torch.Tensor,
        sizes: list[int],
        shared: list[bool],
        orders: torch.Tensor | Sequence[Sequence[int]] | None,
    ) -> torch.Tensor:
        num_tasks = grads.shape[0]
        kwargs: dict[str, Any] = dict(include_self=self.include_self, eps=self.eps)
        if orders is not None:
            kwargs["orders"] = orders if isinstance(orders, torch.Tensor) else torch.as_tensor(orders)
        else:
            kwargs["generator"] = self.generator
        all_shared, none_shared = all(shared), not any(shared)
        if self.project == "shared":
            mask = None
            if not all_shared:
                mask = torch.repeat_interleave(
                    torch.tensor(shared, device=grads.device), torch.tensor(sizes, device=grads.device)
                )
            return _call(grads, reduction=self.reduction, shared_mask=mask, **kwargs)
        # project == "all": the wrapper projects every column and reduces per parameter: mean over the shared
        # ones, sum over the others. The op's reduction applies to all columns alike (its shared_mask would
        # also take the task-specific columns out of the projection), so where the two differ, sum here and
        # scale the shared parameters by 1/T.
        if self.reduction == "sum" or none_shared:
            return _call(grads, reduction="sum", **kwargs)
        if all_shared:
            return _call(grads, reduction="mean", **kwargs)
        update = _call(grads, reduction="sum", **kwargs)
        offset = 0
        for n, is_shared in zip(sizes, shared, strict=True):
            if is_shared:
                update[offset : offset + n].div_(num_tasks)
            offset += n
        return update

    def _parameters(self) -> list[torch.Tensor]:
        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for group in self._optim.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError(f"{_WHO}: the optimizer has no parameter that requires grad")
        for p in params:
            if not p.dtype.is_floating_point:
                raise TypeError(f"{_WHO}: parameters must be floating-point (real), got dtype {p.dtype}")
        return params

    @staticmethod
    def _check_losses(losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(losses, torch.Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    f"{_WHO}.pc_backward: losses must be a list of scalar losses or a 1-D tensor of them, got a "
                    f"tensor of shape {list(losses.shape)}"
                )
            losses = list(losses.unbind(0))
        elif not isinstance(losses, Sequence):
            raise TypeError(f"{_WHO}.pc_backward: losses must be a list of scalar loss tensors, got "
                            f"{type(losses).__name__}")
        losses = list(losses)
        if not losses:
            raise ValueError(f"{_WHO}.pc_backward: losses is empty (need one loss per task)")
        for i, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"{_WHO}.pc_backward: losses[{i}] must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(
                    f"{_WHO}.pc_backward: losses[{i}] must be a scalar, got shape {list(loss.shape)} (reduce it, "
                    "e.g. with .mean())"
                )
            if not loss.dtype.is_floating_point:
                raise TypeError(f"{_WHO}.pc_backward: losses[{i}] must be floating-point, got dtype {loss.dtype}")
            if not loss.requires_grad:
                raise TypeError(
                    f"{_WHO}.pc_backward: losses[{i}] does not require grad (computed under no_grad, or from no "
                    "parameter)"
                )
        # One host read for all T values.
        device = losses[0].device
        finite = torch.isfinite(torch.stack([loss.detach().reshape(()).to(device, torch.float64) for loss in losses]))
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"{_WHO}.pc_backward: losses {bad} are NaN or inf")
        return losses

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reduction={self.reduction!r}, include_self={self.include_self}, "
            f"project={self.project!r}, eps={self.eps}, optimizer={self._optim!r})"
        )


def _call(grads: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    try:
        return pcgrad(grads, **kwargs)
    except ValueError as exc:
        # The op names its grads rows "tasks"; say which pc_backward argument they came from.
        raise ValueError(f"{_WHO}.pc_backward: {exc} (task i is losses[i])") from exc


def _common_dtype_device(params: list[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype, params[0].device
