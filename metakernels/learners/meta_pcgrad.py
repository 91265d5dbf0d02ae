"""Meta-PCGrad: PCGrad's projection applied to the per-task (or per-group) meta-gradients of any learner.

A MAML-family learner's meta-gradient is the mean of its tasks' meta-gradients, (1/T) sum_t grad L_t.
Meta-PCGrad splits the meta-batch into G groups of tasks (every task its own group by default), takes
each group's meta-gradient separately, projects the [G, P] stack with metakernels.pcgrad, and writes the
combined gradient into .grad of the learner's meta-parameters (the model's weights and any learned inner
rates), accumulating as loss.backward() does. The outer step is then the user's optimizer, unchanged.

Each group's meta-gradient is the gradient of ``learner.meta_loss`` on that group's slice of the tasks:
one call per group. Tasks adapt independently, so this computes exactly the same per-task work as one
call over all tasks (the same FLOPs, in G smaller batches): a single batched forward would still need G
backward passes through the whole batch to separate the groups, G times the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ops.pcgrad import pcgrad

_WHO = "metakernels.meta_pcgrad_backward"
REDUCTIONS = ("mean", "sum")
Groups = int | Sequence[int] | torch.Tensor | None


def meta_pcgrad_backward(
    learner: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    groups: Groups = None,
    reduction: str = "mean",
    include_self: bool = False,
    generator: torch.Generator | None = None,
    orders: torch.Tensor | Sequence[Sequence[int]] | None = None,
    eps: float = 0.0,
    return_coefficients: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the PCGrad-projected meta-gradient of a meta-batch into the learner's .grad.

    With h_g the meta-gradient of group g (the gradient of ``learner.meta_loss`` on the group's n_g tasks,
    i.e. the mean of its tasks' meta-gradients) and h'_g its PCGrad projection against the other groups'
    h_j (in the order ``orders[g]``), the gradient written is

        reduction="mean" (default):  sum_g (n_g / T) h'_g
        reduction="sum"  (the paper): sum_g h'_g

    The projection is invariant to positive scalings of the h_g, so "mean" equals metakernels.pcgrad
    with reduction="sum" on the rows (n_g / T) h_g, and with equal group sizes it is metakernels.pcgrad's
    reduction="mean" on the h_g. Where no two group meta-gradients conflict (one group, for instance),
    "mean" gives exactly the plain meta-gradient, ``learner.meta_loss(xs, ys, xq, yq).backward()``.

    Args:
        learner: a metakernels learner (anything with ``meta_loss(xs, ys, xq, yq)`` -> scalar and
            ``parameters()``): MAML, FOMAML, ANIL, MetaSGD, MAMLPlusPlus, Reptile, MultiTaskBaseline.
            Its meta-parameters are its parameters that require grad.
        xs, ys, xq, yq: the meta-batch, [T, N, ...] each, as learner.meta_loss takes it.
        groups: None (every task its own group, G = T); an int G (the tasks split into G contiguous groups,
            sizes differing by at most one, as torch.tensor_split splits); or a length-T sequence/tensor of
            group ids in 0..G-1, every id used (groups are ordered by id).
        reduction: "mean" (default) or "sum", see above.
        include_self: also visit j = g in group g's projections (the PyTorch wrapper does; the paper not).
        generator: the orders' torch.Generator: row g is ``torch.randperm(G, generator=generator)``,
            drawn for g = 0..G-1 (None: torch's global generator). Not both with ``orders``.
        orders: optional [G, G] projection orders; row g is a permutation of 0..G-1.
        eps: added to ||h_j||^2 in the projection's denominator (>= 0).
        return_coefficients: also return PCGrad's coefficient matrix W [G, G] (float64): projected
            h'_g = sum_k W[g, k] h_k.

    Returns:
        The meta-loss of the whole batch, sum_g (n_g / T) meta_loss_g (detached); with
        return_coefficients, (meta-loss, W).

    With the learner's ``nonfinite="skip"``, each group's meta_loss (and h_g) is over that group's finite
    tasks, while the group keeps its weight n_g / T (meta_loss does not say how many tasks it kept), and a
    group none of whose tasks is finite raises meta_loss's FloatingPointError.

    Raises:
        TypeError: a learner without meta_loss, or with no meta-parameter that requires grad.
        ValueError: bad groups (naming the problem), bad reduction; the learner's own errors for a bad
            batch; metakernels.pcgrad's errors (e.g. a NaN/inf group meta-gradient, bad orders).
    """
    if not callable(getattr(learner, "meta_loss", None)) or not callable(getattr(learner, "parameters", None)):
        raise TypeError(f"{_WHO}: learner must have meta_loss(xs, ys, xq, yq) and parameters(), got "
                        f"{type(learner).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_WHO}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(xs, torch.Tensor) or xs.dim() < 1:
        raise ValueError(f"{_WHO}: xs must be a [T, N, ...] tensor")
    num_tasks = xs.shape[0]
    if num_tasks == 0:
        raise ValueError(f"{_WHO}: the meta-batch is empty (T = 0)")
    members = _group_members(groups, num_tasks)
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params:
        raise TypeError(f"{_WHO}: the learner has no meta-parameter that requires grad")
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    device = params[0].device
    rows = torch.zeros(len(members), sum(sizes), dtype=dtype, device=device)
    reached = [False] * len(params)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    for g, index in enumerate(members):
        batch = [t[index] for t in (xs, ys, xq, yq)]
        with torch.enable_grad():
            loss = learner.meta_loss(*batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        # Scale by n_g / T ("mean") so the rows sum to the plain meta-gradient; projections commute with it.
        weight = _group_size(index) / num_tasks
        scale = weight if reduction == "mean" else 1.0
        total_loss += weight * loss.detach().to(torch.float64)
        offset = 0
        for k, (grad, n) in enumerate(zip(grads, sizes, strict=True)):
            if grad is not None:
                rows[g, offset : offset + n].copy_(grad.reshape(-1)).mul_(scale)
                reached[k] = True
            offset += n
    kwargs: dict[str, Any] = dict(include_self=include_self, eps=eps, return_coefficients=True)
    if orders is not None:
        kwargs["orders"] = orders if isinstance(orders, torch.Tensor) else torch.as_tensor(orders)
        if generator is not None:
            raise ValueError(f"{_WHO}: pass orders or generator, not both")
    else:
        kwargs["generator"] = generator
    try:
        update, weights = pcgrad(rows, reduction="sum", **kwargs)
    except ValueError as exc:
        raise ValueError(f"{_WHO}: {exc} (task g of metakernels.pcgrad is group g here)") from exc
    offset = 0
    with torch.no_grad():
        for p, n, hit in zip(params, sizes, reached, strict=True):
            if hit:  # a parameter no group reaches keeps its .grad, as backward() leaves it
                g = update[offset : offset + n].view(p.shape).to(device=p.device, dtype=p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            offset += n
    loss_value = total_loss.to(dtype)
    return (loss_value, weights) if return_coefficients else loss_value


class MetaPCGrad:
    """A learner whose outer gradient is PCGrad-projected across tasks or groups of tasks.

    Usage::

        meta = metakernels.MetaPCGrad(metakernels.MAML(model, inner_lr=0.01), groups=4, seed=0)
        opt = torch.optim.Adam(meta.learner.parameters(), lr=1e-3)
        opt.zero_grad()
        loss = meta.backward(xs, ys, xq, yq)   # instead of learner.meta_loss(...).backward()
        opt.step()

    Args:
        learner: any metakernels learner (see meta_pcgrad_backward).
        groups, reduction, include_self, eps: see meta_pcgrad_backward.
        seed: seeds a private torch.Generator for the projection orders (not both with generator).
        generator: a torch.Generator for the orders; neither: torch's global generator.
    """

    def __init__(
        self,
        learner: nn.Module,
        *,
        groups: Groups = None,
        reduction: str = "mean",
        include_self: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        eps: float = 0.0,
    ):
        if not callable(getattr(learner, "meta_loss", None)):
            raise TypeError(f"metakernels.MetaPCGrad: learner must have meta_loss(xs, ys, xq, yq), got "
                            f"{type(learner).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"metakernels.MetaPCGrad: reduction must be 'mean' or 'sum', got {reduction!r}")
        if seed is not None and generator is not None:
            raise ValueError("metakernels.MetaPCGrad: pass seed or generator, not both")
        self.learner = learner
        self.groups = groups
        self.reduction = reduction
        self.include_self = bool(include_self)
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        self.eps = float(eps)

    def backward(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        *,
        orders: torch.Tensor | Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Accumulates the projected meta-gradient into the learner's .grad; returns the (detached) meta-loss.

        Args:
            xs, ys, xq, yq: the meta-batch, [T, N, ...] each.
            orders: optional [G, G] orders for this call (default: drawn from the generator).
        """
        return meta_pcgrad_backward(
            self.learner, xs, ys, xq, yq, groups=self.groups, reduction=self.reduction,
            include_self=self.include_self, generator=None if orders is not None else self.generator,
            orders=orders, eps=self.eps,
        )

    def __repr__(self) -> str:
        return (f"MetaPCGrad(groups={self.groups!r}, reduction={self.reduction!r}, include_self={self.include_self}, "
                f"eps={self.eps}, learner={type(self.learner).__name__})")


def _group_size(index: slice | torch.Tensor) -> int:
    if isinstance(index, slice):
        return index.stop - index.start
    return int(index.numel())


def _group_members(groups: Groups, num_tasks: int) -> list[slice | torch.Tensor]:
    """The tasks of each group: slices (contiguous groups: views of the batch, no copy) or index tensors."""
    if groups is None:
        return [slice(t, t + 1) for t in range(num_tasks)]
    if isinstance(groups, bool):
        raise TypeError(f"{_WHO}: groups must be None, an int or a sequence of group ids, got a bool")
    if isinstance(groups, int):
        if not 1 <= groups <= num_tasks:
            raise ValueError(f"{_WHO}: groups must be between 1 and T = {num_tasks} (tasks), got {groups}")
        base, extra = divmod(num_tasks, groups)
        bounds = [0]
        for g in range(groups):  # the first `extra` groups take one task more, as torch.tensor_split does
            bounds.append(bounds[-1] + base + (1 if g < extra else 0))
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ids = groups if isinstance(groups, torch.Tensor) else torch.as_tensor(groups)
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"{_WHO}: group ids must be integers, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != num_tasks:
        raise ValueError(
            f"{_WHO}: group ids must be a 1-D sequence of length T = {num_tasks} (one id per task), got shape "
            f"{list(ids.shape)}"
        )
    ids = ids.to("cpu", torch.int64)
    num_groups = int(ids.max()) + 1
    if int(ids.min()) < 0:
        raise ValueError(f"{_WHO}: group ids must be >= 0, got {ids.tolist()}")
    members = [(ids == g).nonzero().flatten() for g in range(num_groups)]
    empty = [g for g, m in enumerate(members) if m.numel() == 0]
    if empty:
        raise ValueError(f"{_WHO}: group ids must use every id in 0..G-1 (G = {num_groups}); no task in groups {empty}")
    return members
