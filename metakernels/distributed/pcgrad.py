"""PCGrad over task gradients that live on several processes (torch.distributed).

The projection needs only the T x T Gram matrix K = G G^T (see metakernels/ops/pcgrad.py), and Grams of
disjoint column ranges add up. So no process ever needs all T x P gradients:

- parameter-sharded input (each rank holds [T, P_rank], the columns of its parameter shard, as with
  FSDP/ZeRO): each rank computes its partial Gram (pcgrad_gram), ONE all_reduce of the T x T partial Grams
  gives K everywhere, every rank derives the same coefficients W (pcgrad_coefficients, with rank 0's
  orders, which ride in the same all_reduce), and each rank combines its own columns into its shard of the
  update (pcgrad_combine). Communication: T^2 + T^2 + world + 2 numbers per rank, whatever P is.
- task-sharded input (each rank holds whole gradients of its own tasks [T_rank, P], as a data-parallel
  meta-batch does): one all_gather of two integers (every rank's T_rank and P), then one all_to_all turns
  the layout into the parameter-sharded one (rank r gets all T tasks for its column range
  shard_columns(P, world, r)), then the path above. Each rank sends and receives about T_rank x P and
  T x P / world numbers: the gradients once, never more.

Optionally (gather=True) an all_gather of the update shards gives every rank the whole [P] update.

gloo (torch 2.13) has all_to_all_single, used here, and an all_gather whose tensors must all have the same
size, so update shards of uneven sizes are padded to the largest for the gather.

Errors that depend on data held by one rank (NaN/inf gradients, rank 0's orders) are carried through the
all_reduce, so every rank raises the same error instead of some ranks waiting forever on a collective.
Errors in the arguments themselves (a 1-D grads, an unknown sharding) are raised at once, before any
collective: pass the same kinds of arguments on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..ops.pcgrad import pcgrad as local_pcgrad
from ..ops.pcgrad import pcgrad_coefficients, pcgrad_combine, pcgrad_gram
from ..reference.pcgrad import check_orders

_WHO = "metakernels.distributed.pcgrad"
SHARDINGS = ("parameters", "tasks")
REDUCTIONS = ("sum", "mean")


def shard_columns(num_params: int, world_size: int, rank: int) -> tuple[int, int]:
    """The column range [start, stop) that rank ``rank`` holds after a task-sharded pcgrad's all_to_all.

    The P columns are split into world_size contiguous ranges whose sizes differ by at most one, the first
    P % world_size ranks taking one column more (torch.tensor_split's split; ranges may be empty if P <
    world_size).

    Args:
        num_params: P, the number of columns.
        world_size: the number of ranks in the process group.
        rank: the rank in the process group (0..world_size-1).

    Returns:
        (start, stop).
    """
    if world_size < 1 or not 0 <= rank < world_size or num_params < 0:
        raise ValueError(f"metakernels.distributed.shard_columns: need 0 <= rank < world_size and P >= 0, got "
                         f"P = {num_params}, world_size = {world_size}, rank = {rank}")
    base, extra = divmod(num_params, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def pcgrad(
    grads: torch.Tensor,
    *,
    process_group: Any = None,
    sharding: str = "parameters",
    reduction: str = "sum",
    include_self: bool = False,
    orders: torch.Tensor | Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    eps: float = 0.0,
    shared_mask: torch.Tensor | None = None,
    gather: bool = False,
    return_coefficients: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """metakernels.pcgrad over task gradients distributed across the ranks of a process group.

    The result equals metakernels.pcgrad on the whole [T, P] gradient matrix (same semantics, same
    arguments), up to the rounding of the Gram's cross-rank sum, while no rank holds more than its share.
    Call it on every rank of the group.

    Args:
        grads: this rank's gradients. sharding="parameters": [T, P_rank], every rank the same T tasks and
            its own column range (the whole matrix is the ranks' blocks side by side, in rank order;
            P_rank may differ between ranks and may be 0). sharding="tasks": [T_rank, P], every rank the
            whole gradients of its own tasks (the whole matrix is the ranks' blocks stacked, in rank order:
            rank 0's tasks are tasks 0..T_0-1, and so on; T_rank may differ and may be 0, T >= 1 in all).
        process_group: the torch.distributed process group (None: the default group; if torch.distributed
            is not initialized, this process is the whole world and the call is metakernels.pcgrad).
        sharding: "parameters" or "tasks", see grads.
        reduction, include_self, eps: as metakernels.pcgrad.
        orders: [T, T] projection orders over the global task indices; only rank 0's are used (the other
            ranks' are ignored), and they reach every rank within the Gram's all_reduce.
        generator: without orders, rank 0 draws row i as ``torch.randperm(T, generator=generator)`` for
            i = 0..T-1 (None: its global generator), as metakernels.pcgrad does.
        shared_mask: optional bool mask of the shared (projected) columns, as metakernels.pcgrad's:
            sharding="parameters": this rank's [P_rank] part; sharding="tasks": the whole [P] mask (the
            same on every rank).
        gather: also all_gather the shards, so every rank returns the whole [P] update.
        return_coefficients: also return W [T, T] float64 (identical on every rank).

    Returns:
        The update: this rank's shard (sharding="parameters": [P_rank], its own columns; "tasks": the
        columns shard_columns(P, world_size, rank)), or the whole [P] update with gather=True; in grads'
        dtype. With return_coefficients, (update, W).

    Raises:
        ValueError/TypeError naming the argument, as metakernels.pcgrad; on every rank alike when a rank's
        gradients hold NaN/inf or rank 0's orders are invalid.
    """
    _check_arguments(grads, sharding, reduction, eps, gather)
    group_rank, world = _group(process_group)
    if world == 0:  # torch.distributed not initialized and no group given: this process is the whole world
        return local_pcgrad(grads, reduction=reduction, include_self=include_self, eps=eps, shared_mask=shared_mask,
                            orders=None if orders is None else _as_orders(orders), generator=generator,
                            return_coefficients=return_coefficients)
    if sharding == "tasks":
        local, mask, num_tasks, column_sizes = _tasks_to_parameters(grads, shared_mask, process_group, group_rank,
                                                                    world)
    else:
        if grads.shape[0] == 0:
            raise ValueError(f"{_WHO}: grads is an empty task batch (T = 0)")
        local, num_tasks, column_sizes = grads, grads.shape[0], None  # column sizes: from the all_reduce
        mask = None if shared_mask is None else _check_mask(
            shared_mask, grads.shape[1], grads.device, "this rank's [P_rank] part with sharding='parameters'")
    update, weights, reduced_sizes = _project_columns(local, mask, num_tasks, process_group, group_rank, world,
                                                      reduction, include_self, eps, orders, generator)
    if gather:
        update = _gather(update, column_sizes if column_sizes is not None else reduced_sizes, process_group)
    return (update, weights) if return_coefficients else update


# --- the parameter-sharded path -------------------------------------------------------------------------


def _project_columns(
    local: torch.Tensor,
    mask: torch.Tensor | None,
    num_tasks: int,
    process_group: Any,
    group_rank: int,
    world: int,
    reduction: str,
    include_self: bool,
    eps: float,
    orders: Any,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Partial Gram, one all_reduce (Gram + rank 0's orders + error flags + column counts), W, combine."""
    device = local.device
    t2 = num_tasks * num_tasks
    # [partial K (T^2) | orders (T^2, rank 0 only) | bad-orders flag | non-finite count | P_rank per rank]
    buffer = torch.zeros(2 * t2 + 2 + world, dtype=torch.float64, device=device)
    has_columns = local.shape[1] > 0 and (mask is None or bool(mask.any()))
    if has_columns:
        buffer[:t2] = pcgrad_gram(local, mask).reshape(-1)
    if mask is not None and not bool(mask.all()):
        # The task-specific columns stay out of the Gram: count their non-finite values here instead.
        buffer[2 * t2 + 1] = (~torch.isfinite(local[:, ~mask])).sum()
    buffer[2 * t2 + 2 + group_rank] = local.shape[1]
    orders_error = None
    if group_rank == 0:
        try:
            drawn = _draw_orders(num_tasks, orders, generator)
            check_orders("distributed.pcgrad", drawn, num_tasks, drawn.device)
            buffer[t2 : 2 * t2] = drawn.reshape(-1).to(device=device, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            orders_error = exc
            buffer[2 * t2] = 1.0
    dist.all_reduce(buffer, group=process_group)

    if buffer[2 * t2].item() != 0.0:
        if orders_error is not None:
            raise orders_error
        raise ValueError(f"{_WHO}: rank 0's orders are invalid (rank 0 raised the details)")
    gram = buffer[:t2].view(num_tasks, num_tasks)
    diag = torch.diagonal(gram).tolist()
    for task, value in enumerate(diag):
        if not math.isfinite(value):
            raise ValueError(
                f"{_WHO}: grads has a non-finite squared norm ({value}) in task {task}: it contains NaN or inf (or "
                "values too large to square) on some rank"
            )
    if buffer[2 * t2 + 1].item() != 0.0:
        raise ValueError(f"{_WHO}: grads has NaN or inf in its task-specific columns (shared_mask False) on some rank")
    all_orders = buffer[t2 : 2 * t2].view(num_tasks, num_tasks).round().to(torch.int64)
    weights = pcgrad_coefficients(gram.contiguous(), all_orders, include_self, eps)
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    combine_weights = weights.sum(0) * scale
    if local.shape[1] > 0:
        update = pcgrad_combine(local, combine_weights.to(local.device), mask)
    else:
        update = local.new_empty((0,))
    column_sizes = [int(size) for size in buffer[2 * t2 + 2 :].tolist()]
    return update, weights, column_sizes


def _draw_orders(num_tasks: int, orders: Any, generator: torch.Generator | None) -> torch.Tensor:
    if orders is not None:
        if generator is not None:
            raise ValueError(f"{_WHO}: pass orders or generator, not both (orders fixes every row)")
        return _as_orders(orders).cpu()
    # Row by row, exactly as metakernels.pcgrad draws them: the same generator state gives the same orders.
    return torch.stack([torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)])


def _as_orders(orders: Any) -> torch.Tensor:
    orders = orders if isinstance(orders, torch.Tensor) else torch.as_tensor(orders)
    if orders.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        orders = orders.to(torch.int64)
    return orders


# --- the task-sharded path: one all_to_all into the parameter-sharded layout -----------------------------


def _tasks_to_parameters(
    grads: torch.Tensor, shared_mask: torch.Tensor | None, process_group: Any, group_rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor | None, list[int], int]:
    local_tasks, num_params = grads.shape
    header = torch.tensor([local_tasks, num_params], dtype=torch.int64, device=grads.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=process_group)
    counts = [int(h[0]) for h in headers]
    widths = {int(h[1]) for h in headers}
    if len(widths) != 1:
        per_rank = [int(h[1]) for h in headers]
        raise ValueError(f"{_WHO}: with sharding='tasks' every rank's grads must have the same P (columns), got "
                         f"{per_rank} by rank")
    num_tasks = sum(counts)
    if num_tasks == 0:
        raise ValueError(f"{_WHO}: grads is an empty task batch on every rank (T = 0)")
    if num_params == 0:
        raise ValueError(f"{_WHO}: grads has no parameters (P = 0)")
    if shared_mask is not None:
        _check_mask(shared_mask, num_params, grads.device, "the whole [P] mask with sharding='tasks'")
    ranges = [shard_columns(num_params, world, r) for r in range(world)]
    column_sizes = [b - a for a, b in ranges]
    start, stop = ranges[group_rank]
    # Send buffer: the column block of each destination in turn, each block [T_rank, P_dest] row-major.
    # Received: from each source in rank order a [T_source, P_rank] block, which stacked is [T, P_rank].
    send = grads.new_empty((local_tasks * num_params,))
    offset = 0
    for a, b in ranges:  # one copy of the local gradients, straight into the send order
        send[offset : offset + local_tasks * (b - a)].view(local_tasks, b - a).copy_(grads[:, a:b])
        offset += local_tasks * (b - a)
    received = grads.new_empty((num_tasks * column_sizes[group_rank],))
    dist.all_to_all_single(
        received, send,
        output_split_sizes=[c * column_sizes[group_rank] for c in counts],
        input_split_sizes=[local_tasks * w for w in column_sizes],
        group=process_group,
    )
    local = received.view(num_tasks, column_sizes[group_rank])
    mask = None if shared_mask is None else shared_mask[start:stop]
    return local, mask, num_tasks, column_sizes


# --- helpers --------------------------------------------------------------------------------------------


def _gather(shard: torch.Tensor, sizes: list[int], process_group: Any) -> torch.Tensor:
    """The whole update from every rank's shard (padded to the largest: gloo's all_gather needs equal sizes)."""
    largest = max(sizes)
    padded = shard.new_zeros((largest,))
    padded[: shard.shape[0]] = shard
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=process_group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)])


def _group(process_group: Any) -> tuple[int, int]:
    """(this process's rank in the group, the group's size); (0, 0) without torch.distributed."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 0
    if not dist.is_initialized():
        raise RuntimeError(f"{_WHO}: a process_group was given but torch.distributed is not initialized")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(f"{_WHO}: this process is not a member of process_group")
    return rank, dist.get_world_size(process_group)


def _check_arguments(grads: Any, sharding: str, reduction: str, eps: float, gather: bool) -> None:
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{_WHO}: grads must be a tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"{_WHO}: grads must be a 2-D tensor ([T, P_rank] or [T_rank, P]), got shape "
                         f"{list(grads.shape)}")
    if not grads.dtype.is_floating_point:
        raise TypeError(f"{_WHO}: grads must be a floating-point tensor, got dtype {grads.dtype}")
    if sharding not in SHARDINGS:
        raise ValueError(f"{_WHO}: sharding must be 'parameters' or 'tasks', got {sharding!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_WHO}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < float("inf")):
        raise ValueError(f"{_WHO}: eps must be finite and >= 0, got {eps!r}")
    if not isinstance(gather, bool):
        raise TypeError(f"{_WHO}: gather must be a bool, got {type(gather).__name__}")


def _check_mask(mask: torch.Tensor, num_columns: int, device: torch.device | None, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{_WHO}: shared_mask must be a bool tensor ({what})")
    if mask.dim() != 1 or mask.shape[0] != num_columns:
        raise ValueError(f"{_WHO}: shared_mask must be {what}: a 1-D tensor of {num_columns} entries, got shape "
                         f"{list(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{_WHO}: shared_mask is on {mask.device} but grads is on {device}")
    return mask
