"""Worker for tests/test_pcgrad_distributed.py, started by torchrun (gloo): one process per rank.

Every rank builds the same whole [T, P] problem from a seed, takes its shard (a random uneven split of the
columns, or of the tasks), runs metakernels.distributed.pcgrad, and compares its result with the
single-process metakernels.pcgrad of the whole problem. Runs every case on the default group and on
subgroups (whose ranks differ from the global ranks), then checks that data-dependent errors raise on every
rank alike (and the group stays usable). Writes <out_dir>/rank<r>.json; exits 1 on any failure.

    torchrun --standalone --nproc_per_node=3 tests/_pcgrad_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import metakernels as mk
from metakernels.distributed import pcgrad as distributed_pcgrad
from metakernels.distributed import shard_columns

TOL64 = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(1, 1), (2, 3), (3, 1), (4, 2), (5, 13), (7, 50), (6, 97)]


def problem(num_tasks, num_params, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, num_params, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(num_params, generator=g) < 0.7
    orders = torch.stack([torch.randperm(num_tasks, generator=g) for _ in range(num_tasks)])
    return grads, mask, orders


def random_split(total, parts, seed):
    """`parts` non-negative sizes summing to `total`, uneven, zeros allowed."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, total + 1, (parts - 1,), generator=g).tolist())
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def run_case(case, group, group_rank, world, log):
    (num_tasks, num_params), sharding, reduction, include_self, with_mask, gather, order_source, seed = case
    grads, mask, orders = problem(num_tasks, num_params, seed)
    shared = mask if with_mask else None
    kwargs = dict(reduction=reduction, include_self=include_self, return_coefficients=True)
    if order_source == "orders":
        expected, expected_w = mk.pcgrad(grads, orders=orders, shared_mask=shared, **kwargs)
        # Only rank 0's orders count: the others pass different (valid) orders, or none.
        mine = orders if group_rank == 0 else (orders.flip(1) if group_rank % 2 else None)
        call = dict(orders=mine)
    else:
        expected, expected_w = mk.pcgrad(grads, generator=torch.Generator().manual_seed(seed), shared_mask=shared,
                                         **kwargs)
        call = dict(generator=torch.Generator().manual_seed(seed) if group_rank == 0 else None)
    if sharding == "parameters":
        sizes = random_split(num_params, world, seed + 1)
        start = sum(sizes[:group_rank])
        stop = start + sizes[group_rank]
        local = grads[:, start:stop]
        local_mask = None if shared is None else shared[start:stop]
    else:
        counts = random_split(num_tasks, world, seed + 2)
        first = sum(counts[:group_rank])
        local = grads[first : first + counts[group_rank]]
        local_mask = shared
        start, stop = shard_columns(num_params, world, group_rank)
    # Every other case enters through the op's front door (metakernels.pcgrad forwards process_group=).
    # (There, None means "not distributed", so the default group is named explicitly.)
    front_door = seed % 2 == 1
    entry = mk.pcgrad if front_door else distributed_pcgrad
    pg = (dist.group.WORLD if group is None else group) if front_door else group
    update, weights = entry(local.clone(), process_group=pg, sharding=sharding, shared_mask=local_mask,
                            gather=gather, **kwargs, **call)
    torch.testing.assert_close(weights, expected_w, **TOL64)
    torch.testing.assert_close(update, expected if gather else expected[start:stop], **TOL64)
    log["cases"] += 1


def all_cases(seed0):
    combos = itertools.product(SHAPES, ("parameters", "tasks"))
    options = itertools.cycle(itertools.product(("sum", "mean"), (False, True), (False, True), (False, True),
                                                ("orders", "generator")))
    for k, (shape, sharding) in enumerate(combos):
        for _ in range(2):
            reduction, include_self, with_mask, gather, order_source = next(options)
            yield shape, sharding, reduction, include_self, with_mask, gather, order_source, seed0 + 17 * k + _


def expect_error(fn, match, log, what):
    try:
        fn()
    except ValueError as exc:
        if match not in str(exc):
            raise AssertionError(f"{what}: wrong message {exc}") from exc
        log["errors"].append(what)
        return
    raise AssertionError(f"{what}: no error")


def error_cases(group, group_rank, world, log):
    grads, mask, orders = problem(4, 11, 99)
    sizes = random_split(11, world, 5)
    start = sum(sizes[:group_rank])
    local = grads[:, start : start + sizes[group_rank]].clone()
    local_mask = mask[start : start + sizes[group_rank]]
    last = world - 1
    widest = max(range(world), key=lambda r: sizes[r])
    if group_rank == widest:
        local[2, 0] = float("nan")  # one rank's NaN: every rank must raise
    if sizes[widest]:
        expect_error(lambda: distributed_pcgrad(local, process_group=group, orders=orders), "non-finite squared norm",
                     log, "NaN on one rank")
    # A NaN in a task-specific column (outside the Gram) of one rank, found by the count in the all_reduce.
    local = grads[:, start : start + sizes[group_rank]].clone()
    unshared = (~local_mask).nonzero().flatten()
    has_unshared = torch.tensor([int(unshared.numel() > 0)])
    dist.all_reduce(has_unshared, group=group)
    if unshared.numel():
        local[1, unshared[0]] = float("inf")
    if int(has_unshared):
        expect_error(lambda: distributed_pcgrad(local, process_group=group, orders=orders, shared_mask=local_mask),
                     "task-specific columns", log, "inf in a task-specific column")
    # Invalid orders on rank 0 (the others pass valid ones): every rank raises.
    local = grads[:, start : start + sizes[group_rank]].clone()
    bad = orders.clone()
    if group_rank == 0:
        bad[1, 0] = bad[1, 1]
    expect_error(lambda: distributed_pcgrad(local, process_group=group, orders=bad), "orders", log, "bad orders")
    # Task sharding with a different P on one rank.
    width = 5 + (1 if group_rank == last and world > 1 else 0)
    if world > 1:
        expect_error(lambda: distributed_pcgrad(torch.randn(1, width, dtype=torch.float64), process_group=group,
                                                sharding="tasks"), "same P", log, "P differs")
    # The group is still in step after all that: a good call works.
    update = distributed_pcgrad(grads[:, start : start + sizes[group_rank]], process_group=group, orders=orders)
    torch.testing.assert_close(update, mk.pcgrad(grads, orders=orders)[start : start + sizes[group_rank]], **TOL64)
    log["cases"] += 1


def float32_case(group, group_rank, world, log):
    grads, _, orders = problem(5, 40, 123, dtype=torch.float32)
    counts = random_split(5, world, 7)
    first = sum(counts[:group_rank])
    update = distributed_pcgrad(grads[first : first + counts[group_rank]], process_group=group, sharding="tasks",
                                orders=orders, gather=True)
    expected = mk.pcgrad(grads, orders=orders)
    assert update.dtype == torch.float32
    # Same decisions, rounding only: the Gram's float32 products summed in another grouping (~1e-7 relative).
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    log["cases"] += 1


def main() -> int:
    out_dir = sys.argv[1]
    started = time.perf_counter()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, size = dist.get_rank(), dist.get_world_size()
    log = {"rank": rank, "world": size, "cases": 0, "errors": [], "groups": [], "failures": []}
    # The default group, a two-rank subgroup of the highest ranks (group rank != global rank when size > 2), and
    # a one-rank group. new_group is collective: every rank creates every group.
    groups = [(None, list(range(size)))]
    if size > 2:
        groups.append((dist.new_group([1, 2]), [1, 2]))
    groups.append((dist.new_group([size - 1]), [size - 1]))
    for index, (group, members) in enumerate(groups):
        if rank not in members:
            continue
        group_rank, world = dist.get_rank(group), dist.get_world_size(group)
        log["groups"].append(members)
        for case in all_cases(1000 * index):
            try:
                run_case(case, group, group_rank, world, log)
            except Exception:  # noqa: BLE001 (reported per case, then the run fails)
                log["failures"].append(f"group {members} case {case}: {traceback.format_exc()}")
        for check in (error_cases, float32_case):
            try:
                check(group, group_rank, world, log)
            except Exception:  # noqa: BLE001
                log["failures"].append(f"group {members} {check.__name__}: {traceback.format_exc()}")
    dist.barrier()
    log["seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(log, f)
    dist.destroy_process_group()
    return 1 if log["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
