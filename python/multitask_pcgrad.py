"""PCGrad three ways, written against metakernels' public API only.

    python python/multitask_pcgrad.py                    # 1 and 2 (about half a minute on one core)
    torchrun --standalone --nproc_per_node=2 python/multitask_pcgrad.py --distributed   # 3 (gloo)

1. Multi-task learning with the drop-in optimizer wrapper: ``metakernels.PCGrad(optimizer)`` with
   ``zero_grad()`` / ``pc_backward(losses)`` / ``step()``, the interface of the popular PyTorch wrapper,
   on a shared trunk with three task heads whose tasks partly conflict, against plain summed-loss training.
2. Meta-PCGrad: MAML on sinusoid tasks with its per-group meta-gradients projected before the outer step
   (``metakernels.MetaPCGrad(learner, groups=...)``), against plain MAML.
3. Distributed PCGrad: each rank holds the whole gradients of its own tasks (a data-parallel meta-batch);
   ``metakernels.distributed.pcgrad(..., sharding="tasks")`` projects them without any rank holding all of
   them, and equals the single-process result.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import metakernels
from metakernels.tasks import SinusoidTasks, sinusoid_mlp


class Trunk3(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, tasks: int = 3, hidden: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def multitask_data(n: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three regression targets of the same inputs; task 2 is nearly the negative of task 0 (a conflict).
    The tasks (w) depend on the seed only; the inputs on (seed, split): split 0 trains, split 1 tests."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    w[:, 2] = -w[:, 0] + 0.3 * torch.randn(8, generator=g)
    g = torch.Generator().manual_seed(1000 * seed + 1 + split)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ w / 8**0.5) + 0.05 * torch.randn(n, 3, generator=g)
    return x, y


def train_multitask(use_pcgrad: bool, steps: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    net = Trunk3()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    pc = metakernels.PCGrad(optimizer, seed=seed) if use_pcgrad else None  # the wrapper's semantics by default
    x, y = multitask_data(512, seed, 0)
    for _ in range(steps):
        losses = [F.mse_loss(pred, y[:, t]) for t, pred in enumerate(net(x))]
        if pc is not None:
            pc.zero_grad()
            pc.pc_backward(losses)  # one backward per task, projection, mean/sum merge into p.grad
            pc.step()
        else:
            optimizer.zero_grad()
            sum(losses).backward()
            optimizer.step()
    xt, yt = multitask_data(512, seed, 1)
    with torch.no_grad():
        return [F.mse_loss(pred, yt[:, t]).item() for t, pred in enumerate(net(xt))]


def heldout_mse(learner, episode) -> float:
    with torch.no_grad():
        pred = learner.predict(learner.adapt(episode.xs, episode.ys), episode.xq)
    return F.mse_loss(pred, episode.yq).item()


def train_maml(groups: int | None, project: bool, iterations: int, seed: int) -> float:
    torch.manual_seed(seed)
    learner = metakernels.MAML(sinusoid_mlp(), inner_lr=0.01, inner_steps=1)
    meta = metakernels.MetaPCGrad(learner, groups=groups, seed=seed) if project else None
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    tasks = SinusoidTasks()
    for it in range(iterations):
        ep = tasks.batch(seed, it, num_tasks=16, num_support=10, num_query=10)
        optimizer.zero_grad()
        if meta is not None:
            meta.backward(ep.xs, ep.ys, ep.xq, ep.yq)  # instead of learner.meta_loss(...).backward()
        else:
            learner.meta_loss(ep.xs, ep.ys, ep.xq, ep.yq).backward()
        optimizer.step()
    return heldout_mse(learner, tasks.heldout(num_tasks=200, num_support=10, num_query=10))


def distributed_demo(seed: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    num_tasks, num_params = 7, 10_001
    g = torch.Generator().manual_seed(seed)
    everything = torch.randn(num_tasks, num_params, generator=g, dtype=torch.float64)  # built here to check only
    counts = [len(c) for c in torch.arange(num_tasks).tensor_split(world)]
    first = sum(counts[:rank])
    mine = everything[first : first + counts[rank]]  # this rank's tasks, whole gradients
    orders = torch.stack([torch.randperm(num_tasks, generator=g) for _ in range(num_tasks)])
    shard = metakernels.distributed.pcgrad(mine, sharding="tasks", orders=orders)  # this rank's columns
    start, stop = metakernels.distributed.shard_columns(num_params, world, rank)
    full = metakernels.distributed.pcgrad(mine, sharding="tasks", orders=orders, gather=True)
    expected = metakernels.pcgrad(everything, orders=orders)
    print(f"rank {rank}/{world}: tasks {first}..{first + counts[rank] - 1}, update columns {start}..{stop - 1}; "
          f"max |distributed - single process| = {(shard - expected[start:stop]).abs().max().item():.1e} "
          f"(shard), {(full - expected).abs().max().item():.1e} (gathered)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="multi-task training steps")
    parser.add_argument("--iterations", type=int, default=150, help="MAML meta-iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributed", action="store_true", help="part 3 (start with torchrun)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy machine
    if args.distributed:
        distributed_demo(args.seed)
        return

    print("1. multi-task regression, held-out MSE per task (task 2 conflicts with task 0)")
    train_multitask(True, 2, args.seed)  # untimed: the first optimizer step pays torch's one-time set-up (~3 s here)
    for name, use in (("summed losses", False), ("metakernels.PCGrad", True)):
        t0 = time.perf_counter()
        mse = train_multitask(use, args.steps, args.seed)
        print(f"   {name:<20} " + "  ".join(f"{m:.4f}" for m in mse) + f"   ({time.perf_counter() - t0:.1f} s)")

    print(f"2. MAML on sinusoids, {args.iterations} meta-iterations of 16 tasks, held-out MSE after one step")
    for name, groups, project in (("plain MAML", None, False), ("Meta-PCGrad, 4 groups", 4, True),
                                  ("Meta-PCGrad, per task", None, True)):
        t0 = time.perf_counter()
        mse = train_maml(groups, project, args.iterations, args.seed)
        print(f"   {name:<24} {mse:.3f}   ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
