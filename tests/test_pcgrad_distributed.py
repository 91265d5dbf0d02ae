"""metakernels.distributed.pcgrad: equal to the single-process op, in several gloo processes started by torchrun.

The multi-process cases run in tests/_pcgrad_dist_worker.py (see its docstring): both shardings, uneven
column splits (empty shards included), T not divisible by the world size (ranks without tasks included),
masks, gather, orders from rank 0 only, subgroups, and data-dependent errors raised on every rank alike.
A 3-process run covers world sizes 3, 2 (a subgroup whose ranks differ from the global ones) and 1; a
2-process run covers the default group of two. Each launch costs a few seconds, mostly importing torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metakernels as mk
from metakernels.distributed import pcgrad as distributed_pcgrad
from metakernels.distributed import shard_columns

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_pcgrad_dist_worker.py")


def torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_matches_single_process_under_torchrun(tmp_path, nproc):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the worker uses the default CPU kernels
    command = [*torchrun(), "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    logs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    failures = [f for log in logs for f in log["failures"]]
    assert result.returncode == 0 and not failures, (
        f"torchrun exited {result.returncode}\n" + "\n".join(failures) + "\n" + result.stderr[-4000:]
    )
    assert len(logs) == nproc
    by_rank = {log["rank"]: log for log in logs}
    # Every rank ran the cases of every group it belongs to, and saw every error case raise.
    expected_groups = {0: 1, 1: 1 + (nproc > 2), 2: 3}
    for rank, log in by_rank.items():
        groups = expected_groups[rank] if nproc == 3 else (1 if rank == 0 else 2)
        assert len(log["groups"]) == groups
        assert log["cases"] == 30 * groups
    seen = {what for log in logs for what in log["errors"]}
    assert seen == {"NaN on one rank", "inf in a task-specific column", "bad orders", "P differs"}


def test_without_torch_distributed_is_the_local_op():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 23, generator=g, dtype=torch.float64)
    mask = torch.rand(23, generator=g) < 0.6
    orders = torch.stack([torch.randperm(5, generator=g) for _ in range(5)])
    for sharding in ("parameters", "tasks"):
        ours, w = distributed_pcgrad(grads, sharding=sharding, orders=orders.int(), shared_mask=mask,
                                     reduction="mean", include_self=True, return_coefficients=True, gather=True)
        expected, expected_w = mk.pcgrad(grads, orders=orders, shared_mask=mask, reduction="mean", include_self=True,
                                         return_coefficients=True)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        torch.testing.assert_close(w, expected_w, rtol=0, atol=0)
    seeded = distributed_pcgrad(grads, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(seeded, mk.pcgrad(grads, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)


@pytest.mark.parametrize("num_params", [0, 1, 2, 7, 10, 31])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_columns_is_tensor_split(num_params, world):
    ranges = [shard_columns(num_params, world, r) for r in range(world)]
    splits = torch.arange(num_params).tensor_split(world)
    for (start, stop), piece in zip(ranges, splits, strict=True):
        assert list(range(start, stop)) == piece.tolist()


def test_bad_input_before_any_collective():
    grads = torch.randn(3, 4, dtype=torch.float64)
    cases = [
        (dict(grads=torch.randn(4, dtype=torch.float64)), ValueError, "2-D"),
        (dict(grads=torch.ones(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(grads=[[1.0]]), TypeError, "must be a tensor"),
        (dict(sharding="columns"), ValueError, "sharding must be"),
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(gather=1), TypeError, "gather must be a bool"),
        (dict(orders=torch.zeros(3, 3, dtype=torch.int64)), ValueError, "orders row"),
    ]
    for kwargs, error, match in cases:
        kwargs = dict(kwargs)
        g = kwargs.pop("grads", grads)
        with pytest.raises(error, match=match):
            distributed_pcgrad(g, **kwargs)
    with pytest.raises(ValueError, match="shard_columns"):
        shard_columns(5, 2, 2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            distributed_pcgrad(grads, process_group=object())
