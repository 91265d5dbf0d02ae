"""MAML on the sinusoid regression task of Finn et al. (2017), written against metakernels' public API only.

    python python/sinusoid_maml.py                       # MAML for 2000 meta-iterations, then the other learners
    python python/sinusoid_maml.py --iterations 70000    # the paper's length (about 20 min on one CPU core)

The same experiment with checkpoints, exact resumption, metrics.json and a figure is the command
`metakernels train --algorithm maml --out runs/sinusoid-maml`; this script shows the plain research loop.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import metakernels
from metakernels.tasks import SinusoidEpisode, SinusoidTasks, sinusoid_mlp


def meta_train(learner, tasks: SinusoidTasks, iterations: int, meta_batch: int, k: int, seed: int,
               outer_lr: float = 1e-3) -> float:
    """Adam on the meta-loss; meta-batch ``it`` is the same tasks for a given (seed, it), run after run."""
    opt = torch.optim.Adam(learner.parameters(), lr=outer_lr)  # includes learned inner rates (Meta-SGD, MAML++)
    loss = torch.tensor(float("nan"))
    for it in range(iterations):
        ep = tasks.batch(seed, it, num_tasks=meta_batch, num_support=k, num_query=k)
        opt.zero_grad()
        loss = learner.meta_loss(ep.xs, ep.ys, ep.xq, ep.yq)  # [T, K, 1] tensors; all tasks adapt at once
        loss.backward()
        opt.step()
    return loss.item()


def heldout_mse(learner, heldout: SinusoidEpisode, steps: int) -> tuple[float, float]:
    """Mean query MSE over the held-out tasks after ``steps`` inner steps, and its 95% half-width."""
    with torch.no_grad():  # adapt() still differentiates the inner loss; no graph is kept across steps
        fast = learner.adapt(heldout.xs, heldout.ys, steps=steps)
        pred = learner.predict(fast, heldout.xq)
    per_task = ((pred - heldout.yq) ** 2).mean(dim=(1, 2))
    n = per_task.numel()
    return per_task.mean().item(), 1.96 * per_task.std(unbiased=False).item() / math.sqrt(n)


def report(name: str, learner, heldout: SinusoidEpisode, steps=(1, 10), seconds: float | None = None) -> None:
    cells = []
    for k in steps:
        mean, ci = heldout_mse(learner, heldout, k)
        cells.append(f"{k:>2} step{'s' if k != 1 else ' '}: {mean:.3f} +/- {ci:.3f}")
    timing = f"   ({seconds:.1f} s)" if seconds is not None else ""
    print(f"{name:<28} " + "   ".join(cells) + timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000, help="MAML meta-iterations (paper: 70000)")
    parser.add_argument("--others", type=int, default=300, help="meta-iterations for each other learner (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The 1-40-40-1 MLP is far too small to split across threads; one thread is much faster on a busy machine.
    torch.set_num_threads(1)

    tasks = SinusoidTasks()  # A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]
    heldout = tasks.heldout(num_tasks=600, num_support=10, num_query=10)  # fixed, separate from training
    k, meta_batch = 10, 25
    print(f"metakernels {metakernels.__version__}, CPU backend {metakernels.cpu_backend()}; held-out MSE on "
          f"{heldout.num_tasks} tasks, K = {k}, mean +/- 95% CI")

    # MAML, second order, one inner step at lr 0.01 during training (the paper's setup).
    torch.manual_seed(args.seed)
    maml = metakernels.MAML(sinusoid_mlp(), inner_lr=0.01, inner_steps=1, first_order=False, loss_fn=F.mse_loss)
    report("MAML before meta-training", maml, heldout)
    t0 = time.perf_counter()
    meta_train(maml, tasks, args.iterations, meta_batch, k, args.seed)
    report(f"MAML, {args.iterations} iterations", maml, heldout, seconds=time.perf_counter() - t0)
    if args.others <= 0:
        return

    n = args.others
    learners = {
        "FOMAML": lambda m: metakernels.FOMAML(m, inner_lr=0.01, inner_steps=1),
        "Meta-SGD": lambda m: metakernels.MetaSGD(m, inner_lr=0.01, inner_steps=1),  # learned per-weight rates
        "ANIL": lambda m: metakernels.ANIL(m, inner_lr=0.01, inner_steps=1),  # adapts the last layer only
        "MAML++ (2 steps)": lambda m: metakernels.MAMLPlusPlus(m, inner_lr=0.01, inner_steps=2),
    }
    for name, make in learners.items():
        torch.manual_seed(args.seed)
        learner = make(sinusoid_mlp())
        t0 = time.perf_counter()
        meta_train(learner, tasks, n, meta_batch, k, args.seed)
        # MAML++ learns one rate per layer and per step: it adapts for the steps it was trained with.
        steps = (learner.inner_steps,) if isinstance(learner, metakernels.MAMLPlusPlus) else (1, 10)
        report(f"{name}, {n} iterations", learner, heldout, steps, time.perf_counter() - t0)

    # Reptile: its own batched update theta <- theta + eps (mean_t phi_t - theta), one fused kernel.
    torch.manual_seed(args.seed)
    reptile = metakernels.Reptile(sinusoid_mlp(), inner_lr=0.01, inner_steps=5)
    t0 = time.perf_counter()
    for it in range(n):
        ep = tasks.batch(args.seed, it, meta_batch, k, k)
        reptile.batched_step(torch.cat([ep.xs, ep.xq], 1), torch.cat([ep.ys, ep.yq], 1), epsilon=0.1)
    report(f"Reptile, {n} iterations", reptile, heldout, seconds=time.perf_counter() - t0)

    # The multi-task baseline trains one model on all tasks with no inner loop; at test time it is fine-tuned
    # by plain gradient descent, here by wrapping its model in a MAML learner with the same inner lr.
    torch.manual_seed(args.seed)
    baseline = metakernels.MultiTaskBaseline(sinusoid_mlp())
    t0 = time.perf_counter()
    meta_train(baseline, tasks, n, meta_batch, k, args.seed)
    finetune = metakernels.MAML(baseline.model, inner_lr=0.01, inner_steps=1)
    report(f"multi-task + fine-tuning, {n}", finetune, heldout, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
