"""Reference of metakernels::pcgrad: the classic per-pair PCGrad loop over gradient vectors.

For each task i, in the order orders[i] over the tasks j (j = i skipped unless include_self), the partly
projected g_i is tested against the ORIGINAL g_j and projected off it when they conflict:

    if g_i . g_j < 0:   g_i <- g_i - (g_i . g_j) / (||g_j||^2 + eps) * g_j

The update is the sum (reduction="sum", the paper) or the mean ("mean") of the projected g_i over the
shared columns, and the plain sum of the task gradients over the task-specific columns (shared_mask
False). Alongside, the loop tracks the coefficients: projected g_i = sum_k W[i, k] g_k, W starting at the
identity, each projection subtracting its factor from W[i, j] (LibMTL's ``batch_weight`` is 1^T W).

This is the test oracle (it never forms the Gram matrix, so it checks the fused kernels' coefficient
recurrence independently), the CPU kernel when the C++ extension is absent, and the benchmark's baseline:
the loop everyone writes, in the input's working precision (float32 for float32/bf16/half inputs).

The three stages the fused kernels use (Gram, coefficients from the Gram, combine) are mirrored here too
in plain torch, for the stage ops and for a distributed PCGrad that all-reduces the Gram between them.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_floating, check_task_batch, shape_str

REDUCTIONS = ("sum", "mean")


# --- argument checks (shared with the Triton kernels; the C++ checks in csrc/cpu/pcgrad.cpp say the same) --


def check_grads(op: str, grads: torch.Tensor) -> None:
    check_task_batch(op, "grads", grads)
    check_floating(op, "grads", grads)


def check_shared_mask(op: str, shared_mask: torch.Tensor | None, grads: torch.Tensor) -> None:
    if shared_mask is None:
        return
    if shared_mask.dtype != torch.bool:
        raise TypeError(f"metakernels.{op}: shared_mask must be a bool tensor, got dtype {shared_mask.dtype}")
    if shared_mask.dim() != 1 or shared_mask.shape[0] != grads.shape[1]:
        raise ValueError(
            f"metakernels.{op}: shared_mask must be a 1-D [P] tensor with P = {grads.shape[1]} (the columns of "
            f"grads), got shape {shape_str(shared_mask)}"
        )
    if shared_mask.device != grads.device:
        raise ValueError(f"metakernels.{op}: shared_mask is on {shared_mask.device} but grads is on {grads.device}")


def check_orders(op: str, orders: torch.Tensor, num_tasks: int, device: torch.device) -> list[list[int]]:
    """Validates orders ([T, T] int64, each row a permutation of 0..T-1); returns it as lists (one host read)."""
    if orders.dtype != torch.int64:
        raise TypeError(f"metakernels.{op}: orders must be an int64 tensor, got dtype {orders.dtype}")
    if orders.dim() != 2 or orders.shape[0] != num_tasks or orders.shape[1] != num_tasks:
        raise ValueError(
            f"metakernels.{op}: orders must be a [T, T] tensor with T = {num_tasks} (the tasks of grads), got shape "
            f"{shape_str(orders)}"
        )
    if orders.device != device:
        raise ValueError(f"metakernels.{op}: orders is on {orders.device} but grads is on {device}")
    rows = orders.tolist()
    for i, row in enumerate(rows):
        if sorted(row) != list(range(num_tasks)):
            raise ValueError(
                f"metakernels.{op}: orders row {i} must be a permutation of 0..T-1 (T = {num_tasks}), got {row}"
            )
    return rows


def check_options(op: str, reduction: str, eps: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"metakernels.{op}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"metakernels.{op}: eps must be finite and >= 0, got {eps}")


def non_finite_task_message(op: str, task: int, value: float) -> str:
    return (
        f"metakernels.{op}: grads has a non-finite squared norm ({value}) in task {task}: it contains NaN or inf "
        "(or values too large to square)"
    )


def non_finite_unshared_message(op: str) -> str:
    return f"metakernels.{op}: grads has NaN or inf in its task-specific columns (shared_mask False)"


def check_gram_diagonal(op: str, name: str, gram: torch.Tensor) -> None:
    """Raises if a squared norm on the Gram's diagonal is NaN or inf (one host read of T values)."""
    diag = torch.diagonal(gram).tolist()
    for task, value in enumerate(diag):
        if not math.isfinite(value):
            if name == "grads":
                raise ValueError(non_finite_task_message(op, task, value))
            raise ValueError(f"metakernels.{op}: {name} has a non-finite diagonal entry ({value}) at task {task}")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the op: the vector form -------------------------------------------------------------------------------


def pcgrad(
    grads: torch.Tensor,
    orders: torch.Tensor,
    shared_mask: torch.Tensor | None,
    include_self: bool,
    reduction: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic per-pair PCGrad loop; same arguments and results as metakernels::pcgrad.

    Returns:
        (update [P] in grads' dtype, coefficients W [T, T] float64).
    """
    op = "pcgrad"
    check_grads(op, grads)
    num_tasks = grads.shape[0]
    rows = check_orders(op, orders, num_tasks, grads.device)
    check_shared_mask(op, shared_mask, grads)
    check_options(op, reduction, eps)
    g = grads.to(math_dtype(grads.dtype))
    shared = g if shared_mask is None else g[:, shared_mask]
    sq_norms = (shared * shared).sum(1)
    for task, value in enumerate(sq_norms.tolist()):
        if not math.isfinite(value):
            raise ValueError(non_finite_task_message(op, task, value))
    denominators = (sq_norms + eps).tolist()
    weights = torch.eye(num_tasks, dtype=torch.float64)
    projected = shared.clone()
    for i in range(num_tasks):
        g_i = projected[i]
        for j in rows[i]:
            if j == i and not include_self:
                continue
            dot = float(torch.dot(g_i, shared[j]))
            # d < 0 implies g_j != 0 in exact arithmetic; the denominator test guards 0/0 all the same
            # (a g_j whose square underflows to 0).
            if dot < 0.0 and denominators[j] > 0.0:
                factor = dot / denominators[j]
                g_i.sub_(shared[j], alpha=factor)
                weights[i, j] -= factor
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    combined = projected.sum(0) * scale
    if shared_mask is None:
        update = combined
    else:
        update = g.sum(0)  # task-specific columns: the plain sum of the task gradients
        if not bool(torch.isfinite(update[~shared_mask]).all()):
            raise ValueError(non_finite_unshared_message(op))
        update[shared_mask] = combined
    return update.to(grads.dtype).contiguous(), weights.to(grads.device)


def pcgrad_out(
    grads: torch.Tensor,
    orders: torch.Tensor,
    shared_mask: torch.Tensor | None,
    include_self: bool,
    reduction: str,
    eps: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """pcgrad writing the update into ``out`` ([P], grads' dtype, contiguous); returns the coefficients."""
    check_out(grads, out)
    update, weights = pcgrad(grads, orders, shared_mask, include_self, reduction, eps)
    out.copy_(update)
    return weights


def check_out(grads: torch.Tensor, out: torch.Tensor) -> None:
    check_grads("pcgrad", grads)
    if out.dim() != 1 or out.shape[0] != grads.shape[1] or not out.is_contiguous():
        raise ValueError(
            f"metakernels.pcgrad: out must be a contiguous 1-D [P] tensor with P = {grads.shape[1]}, got shape "
            f"{shape_str(out)}" + ("" if out.is_contiguous() else " (non-contiguous)")
        )
    if out.dtype != grads.dtype:
        raise TypeError(f"metakernels.pcgrad: out has dtype {out.dtype} but grads has dtype {grads.dtype}")
    if out.device != grads.device:
        raise ValueError(f"metakernels.pcgrad: out is on {out.device} but grads is on {grads.device}")


# --- the three stages in plain torch -----------------------------------------------------------------------


def pcgrad_gram(grads: torch.Tensor, shared_mask: torch.Tensor | None) -> torch.Tensor:
    """K = G_s G_s^T over the shared columns, float64 [T, T] (products and sums in float64)."""
    op = "pcgrad_gram"
    check_grads(op, grads)
    check_shared_mask(op, shared_mask, grads)
    g = grads.to(torch.float64)
    if shared_mask is not None:
        g = g[:, shared_mask]
    gram = g @ g.t()
    # Mirror the upper triangle: BLAS does not promise a symmetric result for g @ g.t() (on an AVX2 EPYC its
    # float64 kernel summed the two triangles in different orders), and the coefficient recurrence reads K
    # by columns and rows, so an asymmetry of one rounding would change which projections fire.
    upper = torch.triu(gram)
    return upper + torch.triu(gram, 1).t()


def coefficient_recurrence(gram: torch.Tensor, rows: list[list[int]], include_self: bool, eps: float) -> torch.Tensor:
    """W from K alone: W = I; for each i, for j in rows[i]: d = W[i] . K[:, j]; if d < 0 (and the
    denominator K[j, j] + eps > 0): W[i, j] -= d / (K[j, j] + eps). float64, on the CPU."""
    k = gram.detach().to(device="cpu", dtype=torch.float64).tolist()
    num_tasks = len(k)
    weights = [[float(a == b) for b in range(num_tasks)] for a in range(num_tasks)]
    for i in range(num_tasks):
        w = weights[i]
        for j in rows[i]:
            if j == i and not include_self:
                continue
            d = math.fsum(w[m] * k[m][j] for m in range(num_tasks))
            denominator = k[j][j] + eps
            if d < 0.0 and denominator > 0.0:
                w[j] -= d / denominator
    return torch.tensor(weights, dtype=torch.float64, device=gram.device)


def pcgrad_coefficients(gram: torch.Tensor, orders: torch.Tensor, include_self: bool, eps: float) -> torch.Tensor:
    """The coefficient matrix W [T, T] float64 from the Gram matrix K (see coefficient_recurrence)."""
    op = "pcgrad_coefficients"
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(
            f"metakernels.{op}: gram must be a square [T, T] tensor with T >= 1, got shape {shape_str(gram)}"
        )
    if gram.dtype != torch.float64:
        raise TypeError(f"metakernels.{op}: gram must be a float64 tensor, got dtype {gram.dtype}")
    rows = check_orders(op, orders, gram.shape[0], gram.device)
    check_options(op, "sum", eps)
    check_gram_diagonal(op, "gram", gram)
    return coefficient_recurrence(gram, rows, include_self, eps)


def pcgrad_combine(grads: torch.Tensor, weights: torch.Tensor, shared_mask: torch.Tensor | None) -> torch.Tensor:
    """update = weights^T G over the shared columns and 1^T G over the others; [P] in grads' dtype.

    weights is the [T] vector r * 1^T W (any floating dtype; used in float64 here)."""
    op = "pcgrad_combine"
    check_grads(op, grads)
    check_shared_mask(op, shared_mask, grads)
    check_weights(op, weights, grads)
    g = grads.to(torch.float64)
    update = weights.to(device=grads.device, dtype=torch.float64) @ g
    if shared_mask is not None:
        update = torch.where(shared_mask, update, g.sum(0))
    return update.to(grads.dtype).contiguous()


def check_weights(op: str, weights: torch.Tensor, grads: torch.Tensor) -> None:
    if weights.dim() != 1 or weights.shape[0] != grads.shape[0]:
        raise ValueError(
            f"metakernels.{op}: weights must be a 1-D [T] tensor with T = {grads.shape[0]} (the tasks of grads), "
            f"got shape {shape_str(weights)}"
        )
    check_floating(op, "weights", weights)
    if weights.device != grads.device:
        raise ValueError(f"metakernels.{op}: weights is on {weights.device} but grads is on {grads.device}")
