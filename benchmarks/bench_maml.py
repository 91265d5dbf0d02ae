"""Benchmark of one second-order MAML meta-step: metakernels.MAML against the ways people write it today.

A meta-step here is the meta-loss forward (every task's inner loop, the query loss) plus the backward to the
meta-parameters, in float32, with no optimizer step: what every implementation below must do per meta-batch.

Workloads (the MAML paper's, Finn et al. 2017):
  sinusoid   MLP 1-40-40-1 (ReLU), MSE, K = 10 support + 10 query points per task, T = 25, inner lr 0.01,
             1 and 5 inner steps;
  omniglot   4 x [conv3x3 64 (padding 1), BatchNorm2d(64), ReLU, maxpool 2], Flatten, Linear(64, 5), on
             28x28x1 random pixels, 5-way 1-shot (5 support images), 15 queries per class (75 query
             images), cross-entropy, 1 inner step of 0.4, T = 8 and T = 32.

Implementations (each a builder returning a meta-step closure; all start from the same weights, same data):
  loop         a per-task loop in plain torch: torch.func.functional_call + autograd.grad(create_graph=True),
               query loss / T backpropagated per task (graphs freed task by task);
  vmap         torch.func, as in functorch's MAML-Omniglot example: the per-task function (inner steps with
               torch.func.grad of a functional_call loss) under torch.func.vmap over tasks, BatchNorm made
               vmap-compatible with torch.func.replace_all_batch_norm_modules_, one backward of the mean.
               Exact on the MLP; on the conv net its meta-gradient is WRONG in torch 2.13 (0.5-3% off in float64,
               against the loop and against finite differences of the meta-loss): second order through
               training-mode BatchNorm with torch.func.grad nested in vmap. The cross-check reports it;
  vmap_autograd  vmap for the task-batched forward only: meta-parameters expanded to [T, *shape], vmap over
               functional_call, inner gradients by torch.autograd.grad(create_graph=True) outside vmap; exact
               with BatchNorm (this is also what metakernels' generic path does);
  learn2learn  l2l.algorithms.MAML(model, lr, first_order=False): clone() + adapt() per task, per-task backward
               (learn2learn's Omniglot example);
  higher       higher.innerloop_ctx(model, SGD, copy_initial_weights=False) per task, differentiable SGD
               steps, per-task backward (higher's Omniglot example);
  torchopt     torchopt.MetaSGD stepping the module in place, extract/recover_state_dict around each task,
               one backward of the mean query loss (torchopt's few-shot Omniglot example);
  metakernels  metakernels.MAML(model, inner_lr, inner_steps, first_order=False, loss_fn)
               .meta_loss(xs, ys, xq, yq).backward(): the public API only.

BatchNorm: every implementation normalises with per-task batch statistics. The peers and the loop run the
module in training mode as it is (it tracks running statistics; updating them does not touch the
meta-gradient), vmap uses the torch.func-documented replacement (no running statistics), metakernels ignores
them. The conv net's running statistics are set to non-trivial values, so an implementation that normalised
with them would fail the cross-check.

Before timing, a cross-check: every implementation's meta-loss and meta-gradient in float64 on the same
workloads (the conv net with fewer tasks: --check-tasks), against the plain loop (the oracle); agreement means
a relative deviation <= 1e-8 (max |g - g_loop| over all parameters / max |g_loop|). A peer that disagrees is
timed and reported with its deviation, flagged, and left out of "fastest other".

The float32 timing run also records each meta-gradient's relative deviation from the float32 loop's
(fp32_grad_rel_dev_vs_loop), for information only. The conv workload is ill-conditioned in float32 (inner lr
0.4, BatchNorm over 5 support images): measured at T = 32 against float64 on the same data, the loop (oneDNN
convolutions) is 1.4e-3 off and the vmapped paths (grouped convolutions on torch's native kernels) 2.1e-2; with
oneDNN disabled the loop gives the vmapped figure exactly, and in float64 all agree to 2e-15 at T = 32. The
spread grows with T (3e-6 at T = 8, 4e-4 at 16): rounding amplified by harder tasks, not a bug.

Timing: warm-up calls, then the median and interquartile range of timed meta-steps (the count adapts to a
time budget between a minimum and a maximum per workload), per torch thread count (--threads, default 1 and
2, reported separately). The machine is shared: the load average at the start and end is in the output.
--bf16 adds metakernels on the conv net under torch.autocast("cpu", dtype=torch.bfloat16): its time, and its
meta-gradient's and query loss's deviation from the float32 result.

    python benchmarks/bench_maml.py --quick          # a few minutes; writes results/maml_quick.{json,csv}
    python benchmarks/bench_maml.py [--bf16]         # full; writes results/maml.{json,csv}
    python benchmarks/bench_maml.py --threads 1 --workloads sinusoid_k1 --impls loop,metakernels --name x

Prints markdown tables (rows: workload; columns: implementations) for README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine as M  # noqa: E402
from _peers import deviation, import_peer, peer_versions  # noqa: E402

import metakernels  # noqa: E402

CHECK_RTOL = 1e-8  # float64 agreement: relative to the largest meta-gradient entry
REFERENCE = "loop"
IMPL_NAMES = ("loop", "vmap", "vmap_autograd", "learn2learn", "higher", "torchopt", "metakernels")
SHARED_MACHINE_NOTE = (
    "2-core VM shared with other jobs while measuring: timings are noisy and pessimistic; "
    "see load_average_start/end"
)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MetaStep = Callable[[], torch.Tensor]


# --- workloads -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """One MAML configuration: the network, the episode shapes and the inner loop.

    Args:
        name: short key (CLI, result rows).
        net: "mlp" (sinusoid regression) or "conv" (few-shot classification).
        num_tasks: T, tasks per meta-batch.
        inner_steps: k, inner SGD steps per task.
        inner_lr: inner step size.
        sizes: MLP layer sizes.
        shots, queries: sinusoid points per task in the support and query sets.
        ways, shots_per_class, queries_per_class: the classification episode.
        channels, blocks, image_size: the conv net (blocks of conv3x3 + BatchNorm + ReLU + maxpool 2).
    """

    name: str
    net: str
    num_tasks: int
    inner_steps: int
    inner_lr: float
    sizes: tuple[int, ...] = (1, 40, 40, 1)
    shots: int = 10
    queries: int = 10
    ways: int = 5
    shots_per_class: int = 1
    queries_per_class: int = 15
    channels: int = 64
    blocks: int = 4
    image_size: int = 28

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return F.mse_loss if self.net == "mlp" else F.cross_entropy

    @property
    def label(self) -> str:
        """The workload as a table row."""
        step = f"{self.inner_steps} step{'s' if self.inner_steps != 1 else ''}"
        if self.net == "mlp":
            arch = "-".join(map(str, self.sizes))
            return f"sinusoid MLP {arch}, K={self.shots}+{self.queries}, T={self.num_tasks}, {step}"
        hw = self.image_size
        return (
            f"conv {self.blocks}x{self.channels}ch {hw}x{hw}, {self.ways}-way {self.shots_per_class}-shot "
            f"{self.queries_per_class}q, T={self.num_tasks}, {step}"
        )

    def with_tasks(self, num_tasks: int) -> Workload:
        return dataclasses.replace(self, num_tasks=num_tasks)

    def make_model(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The network with seeded weights, in training mode."""
        torch.manual_seed(seed)
        if self.net == "mlp":
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
                layers.append(nn.Linear(a, b))
                if i < len(self.sizes) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers).to(dtype).train()
        layers = []
        side, cin = self.image_size, 1
        for _ in range(self.blocks):
            layers += [nn.Conv2d(cin, self.channels, 3, padding=1), nn.BatchNorm2d(self.channels), nn.ReLU(),
                       nn.MaxPool2d(2)]
            cin, side = self.channels, side // 2
        if side < 1:
            raise ValueError(f"{self.name}: {self.blocks} pooling blocks do not fit a {self.image_size}px image")
        net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(self.channels * side * side, self.ways)).to(dtype)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    # Non-trivial affine parameters, so their meta-gradients are not special cases, and running
                    # statistics far from any batch's: normalising with them would fail the cross-check.
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-1.0, 1.0)
                    m.running_var.uniform_(2.0, 4.0)
        return net.train()

    def make_batch(self, dtype: torch.dtype = torch.float32, seed: int = 1) -> Batch:
        """(xs, ys, xq, yq), each [T, N, ...]."""
        g = torch.Generator().manual_seed(seed)
        T = self.num_tasks
        if self.net == "mlp":
            # The paper's task distribution: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].
            amp = torch.rand(T, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
            phase = torch.rand(T, 1, 1, generator=g, dtype=dtype) * math.pi
            x = torch.rand(T, self.shots + self.queries, 1, generator=g, dtype=dtype) * 10 - 5
            y = amp * torch.sin(x - phase)
            return x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :]
        hw = self.image_size
        ns, nq = self.ways * self.shots_per_class, self.ways * self.queries_per_class
        xs = torch.rand(T, ns, 1, hw, hw, generator=g, dtype=dtype)  # random pixels: the timing needs no data
        xq = torch.rand(T, nq, 1, hw, hw, generator=g, dtype=dtype)
        ys = torch.arange(self.ways).repeat_interleave(self.shots_per_class).expand(T, -1).contiguous()
        yq = torch.arange(self.ways).repeat_interleave(self.queries_per_class).expand(T, -1).contiguous()
        return xs, ys, xq, yq


def paper_workloads() -> list[Workload]:
    """The benchmarked configurations."""
    return [
        Workload("sinusoid_k1", "mlp", num_tasks=25, inner_steps=1, inner_lr=0.01),
        Workload("sinusoid_k5", "mlp", num_tasks=25, inner_steps=5, inner_lr=0.01),
        Workload("omniglot_t8", "conv", num_tasks=8, inner_steps=1, inner_lr=0.4),
        Workload("omniglot_t32", "conv", num_tasks=32, inner_steps=1, inner_lr=0.4),
    ]


def tiny_workloads() -> list[Workload]:
    """Small versions for the smoke test: T = 2, a 3-block conv net with 4 channels on 8x8 inputs, and two
    inner steps with larger rates, so the second-order terms are far from negligible."""
    return [
        Workload("tiny_sinusoid", "mlp", num_tasks=2, inner_steps=2, inner_lr=0.05, shots=5, queries=5),
        Workload("tiny_conv", "conv", num_tasks=2, inner_steps=2, inner_lr=0.4, ways=3, queries_per_class=2,
                 channels=4, blocks=3, image_size=8),
    ]


# --- implementations -------------------------------------------------------------------------------------


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def build_loop(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """Plain torch: one task at a time, functional_call with a dict of fast weights, autograd.grad with
    create_graph=True; each task's query loss / T is backpropagated at once, freeing its graph."""
    xs, ys, xq, yq = batch
    T, loss_fn, lr = xs.shape[0], w.loss_fn, w.inner_lr
    params = dict(model.named_parameters())

    def step() -> torch.Tensor:
        _clear_grads(model)
        total = torch.zeros((), dtype=xs.dtype)
        for t in range(T):
            fast = params
            for _ in range(w.inner_steps):
                loss = loss_fn(functional_call(model, fast, (xs[t],)), ys[t])
                grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=True)
                fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads, strict=True)}
            query = loss_fn(functional_call(model, fast, (xq[t],)), yq[t]) / T
            query.backward()
            total += query.detach()
        return total

    return step


def build_vmap(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """torch.func, the functorch MAML-Omniglot recipe: the per-task loss (inner steps by torch.func.grad of a
    functional_call loss) vmapped over tasks; regular autograd differentiates through the grad transform.
    BatchNorm: replace_all_batch_norm_modules_ drops the running statistics (in-place updates of shared
    buffers cannot be vmapped), leaving batch statistics."""
    xs, ys, xq, yq = batch
    loss_fn, lr = w.loss_fn, w.inner_lr
    torch.func.replace_all_batch_norm_modules_(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def task_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    def query_loss(x_s: torch.Tensor, y_s: torch.Tensor, x_q: torch.Tensor, y_q: torch.Tensor) -> torch.Tensor:
        fast = params
        for _ in range(w.inner_steps):
            grads = torch.func.grad(task_loss)(fast, x_s, y_s)
            fast = {n: fast[n] - lr * grads[n] for n in fast}
        return task_loss(fast, x_q, y_q)

    batched = vmap(query_loss)

    def step() -> torch.Tensor:
        _clear_grads(model)
        loss = batched(xs, ys, xq, yq).mean()
        loss.backward()
        return loss.detach()

    return step


def build_vmap_autograd(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """torch.func.vmap for the task-batched forward only: the meta-parameters expanded to [T, *shape] fast
    weights, vmap(functional_call) over tasks, and the inner gradient by torch.autograd.grad(create_graph=True)
    of the summed task losses with respect to the expanded weights (task t's loss depends only on slice t, so
    this is every task's own gradient). The backward of the expand sums the meta-gradient over tasks.

    Not the functorch recipe (that is build_vmap): in torch 2.13 torch.func.grad nested in vmap gives a wrong
    second-order meta-gradient through training-mode BatchNorm (0.5-3% off in float64, against finite
    differences); this formulation keeps vmap out of the double backward's transforms and is exact."""
    xs, ys, xq, yq = batch
    T, loss_fn, lr = xs.shape[0], w.loss_fn, w.inner_lr
    torch.func.replace_all_batch_norm_modules_(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    forward = vmap(lambda p, x: functional_call(model, (p, buffers), (x,)))
    task_losses = vmap(loss_fn)

    def step() -> torch.Tensor:
        _clear_grads(model)
        fast = {n: p.expand(T, *p.shape) for n, p in params.items()}
        for _ in range(w.inner_steps):
            loss = task_losses(forward(fast, xs), ys).sum()
            grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=True)
            fast = {n: f - lr * g for (n, f), g in zip(fast.items(), grads, strict=True)}
        loss = task_losses(forward(fast, xq), yq).mean()
        loss.backward()
        return loss.detach()

    return step


def build_learn2learn(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """learn2learn: MAML wrapper, clone() + adapt() per task, per-task backward of query loss / T."""
    l2l, why = import_peer("learn2learn")
    if l2l is None:
        raise ImportError(why)
    xs, ys, xq, yq = batch
    T, loss_fn = xs.shape[0], w.loss_fn
    maml = l2l.algorithms.MAML(model, lr=w.inner_lr, first_order=False)

    def step() -> torch.Tensor:
        _clear_grads(model)
        total = torch.zeros((), dtype=xs.dtype)
        for t in range(T):
            learner = maml.clone()
            for _ in range(w.inner_steps):
                learner.adapt(loss_fn(learner(xs[t]), ys[t]))
            query = loss_fn(learner(xq[t]), yq[t]) / T
            query.backward()
            total += query.detach()
        return total

    return step


def build_higher(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """higher: innerloop_ctx with a differentiable SGD per task (copy_initial_weights=False, so gradients
    reach the model's own parameters), per-task backward of query loss / T."""
    higher, why = import_peer("higher")
    if higher is None:
        raise ImportError(why)
    xs, ys, xq, yq = batch
    T, loss_fn = xs.shape[0], w.loss_fn
    inner_opt = torch.optim.SGD(model.parameters(), lr=w.inner_lr)

    def step() -> torch.Tensor:
        _clear_grads(model)
        total = torch.zeros((), dtype=xs.dtype)
        for t in range(T):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w.inner_steps):
                    diffopt.step(loss_fn(fmodel(xs[t]), ys[t]))
                query = loss_fn(fmodel(xq[t]), yq[t]) / T
                query.backward()
                total += query.detach()
        return total

    return step


def build_torchopt(model: nn.Module, w: Workload, batch: Batch) -> MetaStep:
    """torchopt: MetaSGD steps the module in place; extract_state_dict / recover_state_dict reset the module
    and the optimizer after each task; one backward of the mean query loss."""
    torchopt, why = import_peer("torchopt")
    if torchopt is None:
        raise ImportError(why)
    xs, ys, xq, yq = batch
    T, loss_fn = xs.shape[0], w.loss_fn
    inner_opt = torchopt.MetaSGD(model, lr=w.inner_lr)

    def step() -> torch.Tensor:
        _clear_grads(model)
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        losses = []
        for t in range(T):
            for _ in range(w.inner_steps):
                inner_opt.step(loss_fn(model(xs[t]), ys[t]))
            losses.append(loss_fn(model(xq[t]), yq[t]))
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss.detach()

    return step


def build_metakernels(model: nn.Module, w: Workload, batch: Batch, autocast: torch.dtype | None = None) -> MetaStep:
    """metakernels' public API: MAML(...).meta_loss(...).backward(). With autocast, the meta-loss (inner loop
    included) runs under torch.autocast("cpu", dtype=autocast); the backward runs outside it, as torch advises."""
    learner = metakernels.MAML(model, inner_lr=w.inner_lr, inner_steps=w.inner_steps, first_order=False,
                               loss_fn=w.loss_fn)

    def step() -> torch.Tensor:
        _clear_grads(model)
        if autocast is None:
            loss = learner.meta_loss(*batch)
        else:
            with torch.autocast("cpu", dtype=autocast):
                loss = learner.meta_loss(*batch)
        loss.backward()
        return loss.detach()

    return step


BUILDERS: dict[str, Callable[[nn.Module, Workload, Batch], MetaStep]] = {
    "loop": build_loop,
    "vmap": build_vmap,
    "vmap_autograd": build_vmap_autograd,
    "learn2learn": build_learn2learn,
    "higher": build_higher,
    "torchopt": build_torchopt,
    "metakernels": build_metakernels,
}
PEER_OF = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt"}


def unavailable(impl: str) -> str | None:
    """Why impl cannot run here (its peer does not import), or None."""
    peer = PEER_OF.get(impl)
    return None if peer is None else import_peer(peer)[1]


def meta_gradient(model: nn.Module) -> list[torch.Tensor]:
    """The meta-gradient a step left in the model's parameters (zeros where none arrived)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def run_once(impl: str, base: nn.Module, w: Workload, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One meta-step of impl on a private copy of base: (meta-loss, meta-gradient)."""
    model = copy.deepcopy(base)
    loss = BUILDERS[impl](model, w, batch)()
    return loss, meta_gradient(model)


# --- cross-check -------------------------------------------------------------------------------------------


def cross_check(workloads: Sequence[Workload], impls: Sequence[str], dtype: torch.dtype = torch.float64,
                rtol: float = CHECK_RTOL) -> list[dict]:
    """Every implementation's meta-loss and meta-gradient against the plain loop's, same weights, same data.

    Args:
        workloads: configurations to check (built in ``dtype``).
        impls: implementation names (the reference, "loop", always runs).
        dtype: the precision of the check.
        rtol: agreement threshold on the relative deviation of the meta-gradient and of the loss.

    Returns:
        One row per (workload, implementation): loss, grad_max_abs_dev, grad_rel_dev, loss_rel_dev,
        agrees (None when the implementation is unavailable or failed: see ``error``).
    """
    rows = []
    for w in workloads:
        base, batch = w.make_model(dtype), w.make_batch(dtype)
        ref_loss, ref_grads = run_once(REFERENCE, base, w, batch)
        for impl in impls:
            row = {"section": "check", "workload": w.name, "T": w.num_tasks, "dtype": str(dtype).split(".")[-1],
                   "impl": impl, "reference": REFERENCE, "error": None, "agrees": None}
            why = unavailable(impl)
            if why is not None:
                row["error"] = f"unavailable: {why}"
                rows.append(row)
                continue
            try:
                loss, grads = (ref_loss, ref_grads) if impl == REFERENCE else run_once(impl, base, w, batch)
            except Exception as exc:  # a peer that breaks on a workload is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            dev = deviation(grads, ref_grads)
            loss_rel = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-300)
            row.update(loss=loss.item(), grad_scale=dev["scale"], grad_max_abs_dev=dev["max_abs"],
                       grad_rel_dev=dev["rel"], loss_rel_dev=loss_rel,
                       agrees=bool(dev["rel"] <= rtol and loss_rel <= rtol))
            rows.append(row)
        gc.collect()
    return rows


def check_workloads(workloads: Sequence[Workload], check_tasks: int) -> tuple[list[Workload], dict[str, str]]:
    """The configurations the cross-check runs: each workload, the conv ones with at most check_tasks tasks
    (the meta-gradient's code path does not depend on T); duplicates dropped.

    Returns:
        The check workloads, and for each given workload the name of the check that covers it.
    """
    out: list[Workload] = []
    covers: dict[str, str] = {}
    for w in workloads:
        c = w.with_tasks(min(w.num_tasks, check_tasks)) if w.net == "conv" else w
        c = dataclasses.replace(c, name=f"{w.name}@T{c.num_tasks}" if c.num_tasks != w.num_tasks else w.name)
        same = [o for o in out if dataclasses.replace(o, name="") == dataclasses.replace(c, name="")]
        if not same:
            out.append(c)
        covers[w.name] = (same[0] if same else c).name
    return out, covers


# --- timing ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RepPlan:
    """How many meta-steps to time: warmup, then budget_s / (one step) repetitions, within [min, max]."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


def rep_plan(w: Workload, quick: bool) -> RepPlan:
    if w.net == "mlp":  # milliseconds per step: many repetitions are cheap
        return RepPlan(warmup=3, min_reps=5, max_reps=15, budget_s=2.0) if quick else RepPlan(3, 20, 50, 10.0)
    # conv: up to seconds per step; slow implementations get fewer repetitions in --quick
    return RepPlan(warmup=1, min_reps=2, max_reps=3, budget_s=6.0) if quick else RepPlan(1, 5, 5, 60.0)


def time_steps(step: MetaStep, plan: RepPlan) -> dict:
    """Warm-up, then the timed repetitions: median, quartiles (IQR), min, max in ms."""
    last = 0.0
    for _ in range(plan.warmup):
        t0 = time.perf_counter()
        step()
        last = time.perf_counter() - t0
    reps = max(plan.min_reps, min(plan.max_reps, int(plan.budget_s / max(last, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    q1, q3 = (statistics.quantiles(samples, n=4, method="inclusive")[i] for i in (0, 2)) if reps > 1 else (
        samples[0], samples[0])
    return {"median_ms": statistics.median(samples), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(samples), "max_ms": max(samples), "reps": reps, "warmup": plan.warmup}


def bench_workload(w: Workload, impls: Sequence[str], threads: int, quick: bool, checked: dict[tuple, bool | None],
                   bf16: bool) -> list[dict]:
    """Timing rows of every implementation on one workload at one thread count (float32).

    The first warm-up call's meta-gradient is compared with the loop's (float32 agreement, for information).
    """
    torch.set_num_threads(threads)
    base, batch = w.make_model(torch.float32), w.make_batch(torch.float32)
    plan = rep_plan(w, quick)
    rows: list[dict] = []
    ref_grads: list[torch.Tensor] | None = None
    mk_result: tuple[torch.Tensor, list[torch.Tensor], float] | None = None
    for impl in impls:
        row = {"section": "timing", "workload": w.name, "label": w.label, "net": w.net, "T": w.num_tasks,
               "inner_steps": w.inner_steps, "threads": threads, "dtype": "float32", "impl": impl, "error": None,
               "agrees_float64": checked.get((w.name, impl))}
        why = unavailable(impl)
        if why is not None:
            rows.append({**row, "error": f"unavailable: {why}"})
            continue
        model = copy.deepcopy(base)
        try:
            step = BUILDERS[impl](model, w, batch)
            loss = step()  # first call: its meta-gradient is the float32 comparison; not timed
            grads = meta_gradient(model)
            timing = time_steps(step, plan)
        except Exception as exc:
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if impl == REFERENCE:
            ref_grads = grads
        row["fp32_grad_rel_dev_vs_loop"] = deviation(grads, ref_grads)["rel"] if ref_grads is not None else None
        row.update(loss=loss.item(), **timing)
        rows.append(row)
        print(f"  [{threads} thr] {w.name:14} {impl:12} {timing['median_ms']:10.2f} ms  (IQR {timing['iqr_ms']:.2f}, "
              f"{timing['reps']} reps)", flush=True)
        if impl == "metakernels":
            mk_result = (loss, grads, timing["median_ms"])
        del model, step
        gc.collect()
    _add_speedups(rows)
    if bf16 and w.net == "conv" and mk_result is not None:
        rows.append(bench_bf16(w, base, batch, plan, threads, mk_result))
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """speedup_mk = this implementation's time / metakernels' (> 1: metakernels is faster); on the
    metakernels row, its speedup over the fastest other implementation that passed the cross-check."""
    timed = {r["impl"]: r for r in rows if r.get("median_ms") is not None}
    mk = timed.get("metakernels")
    if mk is None:
        return
    for r in timed.values():
        r["speedup_mk"] = r["median_ms"] / mk["median_ms"]
    others = [r for name, r in timed.items() if name != "metakernels" and r.get("agrees_float64") is not False]
    if others:
        fastest = min(others, key=lambda r: r["median_ms"])
        mk["fastest_other"] = fastest["impl"]
        mk["speedup_vs_fastest_other"] = fastest["median_ms"] / mk["median_ms"]


def bench_bf16(w: Workload, base: nn.Module, batch: Batch, plan: RepPlan, threads: int,
               fp32: tuple[torch.Tensor, list[torch.Tensor], float]) -> dict:
    """metakernels under bfloat16 autocast: time, and deviation of meta-gradient and query loss from float32."""
    loss32, grads32, ms32 = fp32
    model = copy.deepcopy(base)
    row = {"section": "bf16", "workload": w.name, "label": w.label, "net": w.net, "T": w.num_tasks,
           "inner_steps": w.inner_steps, "threads": threads, "dtype": "bfloat16 autocast", "impl": "metakernels",
           "error": None}
    try:
        step = build_metakernels(model, w, batch, autocast=torch.bfloat16)
        loss = step()
        grads = meta_gradient(model)
        timing = time_steps(step, plan)
    except Exception as exc:
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    dev = deviation(grads, grads32)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten().double() for g in grads]),
                                                torch.cat([g.flatten().double() for g in grads32]), dim=0).item()
    row.update(loss=loss.item(), fp32_loss=loss32.item(), loss_abs_diff=abs(loss.item() - loss32.item()),
               loss_rel_diff=abs(loss.item() - loss32.item()) / abs(loss32.item()), grad_rel_dev_vs_fp32=dev["rel"],
               grad_cosine_vs_fp32=cos, fp32_median_ms=ms32, speedup_vs_fp32=ms32 / timing["median_ms"], **timing)
    print(f"  [{threads} thr] {w.name:14} {'mk bf16':12} {timing['median_ms']:10.2f} ms  grad rel dev "
          f"{dev['rel']:.2e}, loss diff {row['loss_abs_diff']:.2e}", flush=True)
    return row


# --- output ------------------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def timing_table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """Markdown: rows = (workload, threads); cells = median ms and metakernels' speedup over that column."""
    timing = [r for r in rows if r["section"] == "timing"]
    keys = list(dict.fromkeys((r["workload"], r["threads"]) for r in timing))
    head = "| workload | threads | " + " | ".join(impls) + " | metakernels vs fastest other |"
    lines = [head, "|" + " --- |" * (len(impls) + 3)]
    for wname, threads in keys:
        by_impl = {r["impl"]: r for r in timing if r["workload"] == wname and r["threads"] == threads}
        label = next(iter(by_impl.values()))["label"]
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r.get("error"):
                cells.append("n/a" if r is None or str(r.get("error", "")).startswith("unavailable") else "error")
                continue
            cell = f"{_fmt_ms(r['median_ms'])} ms"
            if impl != "metakernels" and r.get("speedup_mk") is not None:
                cell += f" ({r['speedup_mk']:.2f}x)"
            if r.get("agrees_float64") is False:
                cell += " (disagrees)"
            cells.append(cell)
        mk = by_impl.get("metakernels", {})
        best = (f"{mk['speedup_vs_fastest_other']:.2f}x vs {mk['fastest_other']}"
                if mk.get("speedup_vs_fastest_other") is not None else "-")
        lines.append(f"| {label} | {threads} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def check_table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """Markdown: the float64 cross-check, relative meta-gradient deviation from the loop per implementation."""
    check = [r for r in rows if r["section"] == "check"]
    names = list(dict.fromkeys(r["workload"] for r in check))
    lines = ["| float64 check (vs loop) | " + " | ".join(impls) + " |", "|" + " --- |" * (len(impls) + 1)]
    for name in names:
        by_impl = {r["impl"]: r for r in check if r["workload"] == name}
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r.get("error"):
                cells.append("n/a" if r is None or str(r.get("error", "")).startswith("unavailable") else "error")
            elif impl == REFERENCE:
                cells.append("reference")
            else:
                cells.append(f"{r['grad_rel_dev']:.1e}" + ("" if r["agrees"] else " DISAGREES"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bf16_table(rows: Sequence[dict]) -> str:
    bf = [r for r in rows if r["section"] == "bf16" and not r.get("error")]
    if not bf:
        return ""
    lines = ["| metakernels bf16 autocast | threads | fp32 ms | bf16 ms | speedup | meta-grad rel dev | grad cosine "
             "| query loss fp32 / bf16 |", "|" + " --- |" * 8]
    for r in bf:
        lines.append(f"| {r['label']} | {r['threads']} | {_fmt_ms(r['fp32_median_ms'])} | {_fmt_ms(r['median_ms'])} "
                     f"| {r['speedup_vs_fp32']:.2f}x | {r['grad_rel_dev_vs_fp32']:.1e} "
                     f"| {r['grad_cosine_vs_fp32']:.5f} | {r['fp32_loss']:.5f} / {r['loss']:.5f} |")
    return "\n".join(lines)


def summarise(rows: Sequence[dict]) -> dict:
    check = [r for r in rows if r["section"] == "check"]
    max_dev: dict[str, float | str | None] = {}
    for r in check:
        if r.get("error"):
            max_dev.setdefault(r["impl"], r["error"])
        elif r["impl"] != REFERENCE:
            prev = max_dev.get(r["impl"])
            max_dev[r["impl"]] = max(r["grad_rel_dev"], prev if isinstance(prev, float) else 0.0)
    disagree = sorted({r["impl"] for r in check if r.get("agrees") is False})
    speedups = {
        f"{r['workload']} @ {r['threads']} thr": {
            "metakernels_ms": r["median_ms"],
            "vs_fastest_other": r.get("speedup_vs_fastest_other"),
            "fastest_other": r.get("fastest_other"),
            "vs": {o["impl"]: o.get("speedup_mk") for o in rows if o["section"] == "timing"
                   and o["workload"] == r["workload"] and o["threads"] == r["threads"] and o.get("median_ms")
                   and o["impl"] != "metakernels"},
        }
        for r in rows if r["section"] == "timing" and r["impl"] == "metakernels" and r.get("median_ms")
    }
    return {"check_rtol": CHECK_RTOL, "check_max_grad_rel_dev": max_dev, "check_disagreeing": disagree,
            "speedup_metakernels": speedups}


# --- main --------------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


def _record_origin(info: dict) -> None:
    """Which metakernels was measured (its file) and the commit of this checkout (filled in as git_commit when
    the machine info found none, e.g. when metakernels was imported from outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    info["metakernels_file"] = metakernels.__file__
    info["bench_git_commit"] = git("rev-parse", "HEAD")
    info["bench_git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    if not info.get("git_commit"):
        info["git_commit"], info["git_dirty"] = info["bench_git_commit"], info["bench_git_dirty"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller check (a few minutes)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each reported (default 1,2)")
    p.add_argument("--workloads", default=",".join(w.name for w in paper_workloads()))
    p.add_argument("--impls", default=",".join(IMPL_NAMES))
    p.add_argument("--bf16", action="store_true", help="also metakernels on the conv net under bf16 autocast")
    p.add_argument("--check-tasks", type=int, default=None, help="tasks in the conv cross-check (default 4; quick 2)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 cross-check")
    p.add_argument("--no-timing", action="store_true", help="only the cross-check")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for the 1-minute load average to fall below 0.5")
    p.add_argument("--name", default=None, help="result file name (default maml, or maml_quick with --quick)")
    args = p.parse_args(argv)

    known = {w.name: w for w in paper_workloads() + tiny_workloads()}
    bad = [n for n in _csv_list(args.workloads) if n not in known]
    bad += [n for n in _csv_list(args.impls) if n not in BUILDERS]
    if bad:
        p.error(f"unknown workload/implementation {bad}; workloads: {list(known)}, implementations: {IMPL_NAMES}")
    workloads = [known[n] for n in _csv_list(args.workloads)]
    impls = _csv_list(args.impls)
    if REFERENCE not in impls:
        impls.insert(0, REFERENCE)  # the cross-check's oracle and the float32 comparison
    threads_list = [int(t) for t in _csv_list(args.threads)]
    check_tasks = args.check_tasks or (2 if args.quick else 4)

    M.wait_for_quiet(args.wait_quiet)
    load_start = os.getloadavg()
    machine = {"info": M.machine_info(), "note": SHARED_MACHINE_NOTE}
    _record_origin(machine["info"])
    versions = peer_versions()
    print(f"{machine['info']['cpu_model']} | {machine['info']['logical_cpus']} CPUs | commit "
          f"{machine['info']['git_commit'][:10]}{' (dirty)' if machine['info']['git_dirty'] else ''} | "
          f"metakernels {metakernels.__version__} ({machine['info'].get('cpu_backend')}) | "
          + " | ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)} ({SHARED_MACHINE_NOTE})", flush=True)
    for impl in impls:
        why = unavailable(impl)
        if why:
            print(f"  {impl}: unavailable ({why})")

    rows: list[dict] = []
    if not args.no_check:
        torch.set_num_threads(1)  # the check's answer does not depend on it; one thread is fastest here
        print(f"cross-check in float64 against {REFERENCE} (relative tolerance {CHECK_RTOL:g}) ...", flush=True)
        to_check, covers = check_workloads(workloads, check_tasks)
        rows += cross_check(to_check, impls)
        print(check_table(rows, impls), flush=True)
        agrees = {(r["workload"], r["impl"]): r["agrees"] for r in rows}
        checked = {(w.name, impl): agrees.get((covers[w.name], impl)) for w in workloads for impl in impls}
    else:
        checked = {}
    if not args.no_timing:
        for threads in threads_list:
            print(f"timing with {threads} torch thread(s) ...", flush=True)
            for w in workloads:
                rows += bench_workload(w, impls, threads, args.quick, checked, args.bf16)
    load_end = os.getloadavg()
    machine["info"]["load_average_start"] = list(load_start)
    machine["info"]["load_average_end"] = list(load_end)
    machine["info"]["load_average_1m_end"] = load_end[0]

    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in load_end)}")
    if not args.no_timing:
        print("\nms per second-order meta-step (meta-loss forward + backward, float32; median); in parentheses: "
              "metakernels' speedup over that implementation (>1: metakernels faster)\n")
        print(timing_table(rows, impls))
        if args.bf16:
            print()
            print(bf16_table(rows))
    summary = summarise(rows)
    if summary["check_disagreeing"]:
        print(f"\nDISAGREE with the loop in float64: {summary['check_disagreeing']}")
    config = {"quick": args.quick, "threads": threads_list, "workloads": [dataclasses.asdict(w) for w in workloads],
              "impls": impls, "bf16": args.bf16, "check_tasks": check_tasks, "check_rtol": CHECK_RTOL,
              "reference": REFERENCE, "versions": versions, "meta_step": "meta-loss forward + backward to the "
              "meta-parameters, second order, no optimizer step"}
    name = args.name or ("maml_quick" if args.quick else "maml")
    paths = M.write_results(name, machine, config, rows, summary)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
