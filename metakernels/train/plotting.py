"""A figure of adapted curves on a few held-out tasks (in the spirit of MAML's Figure 2)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..learners import GradientLearner
from ..tasks.sinusoid import SinusoidEpisode, SinusoidTasks, sinusoid
from .evaluation import adapt_and_predict, evaluation_adapter


def plot_adapted_curves(
    learner: GradientLearner,
    episode: SinusoidEpisode,
    path: str | os.PathLike,
    inner_lr: float,
    num_tasks: int = 4,
    steps: Sequence[int] = (1, 10),
    title: str = "",
    tasks: SinusoidTasks | None = None,
) -> Path:
    """Saves a PNG: for each of the first ``num_tasks`` tasks of ``episode``, the true sine, the support points,
    the prediction before adaptation and after each number of ``steps``.

    matplotlib is imported here, with the Agg backend (no display needed), so training never requires it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = tasks or SinusoidTasks()
    n = min(num_tasks, episode.num_tasks)
    if n < 1:
        raise ValueError("plot_adapted_curves: nothing to plot (num_tasks < 1)")
    sel = slice(0, n)
    xs, ys = episode.xs[sel], episode.ys[sel]
    grid = torch.linspace(*tasks.x, 200, dtype=xs.dtype).view(1, -1, 1).expand(n, -1, -1).contiguous()
    truth = sinusoid(grid, episode.amplitude[sel], episode.phase[sel])

    adapter = evaluation_adapter(learner, inner_lr)
    was_training = learner.training
    learner.eval()
    try:
        curves = {k: adapt_and_predict(adapter, xs, ys, grid, k) for k in (0, *steps)}
    finally:
        learner.train(was_training)

    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    styles = {0: dict(color="tab:gray", linestyle="--", label="before adaptation (0 steps)")}
    palette = ["tab:green", "tab:red", "tab:purple", "tab:orange"]
    for i, k in enumerate(steps):
        styles[k] = dict(color=palette[i % len(palette)], linestyle="-",
                         label=f"after {k} step{'s' if k != 1 else ''}")
    g = grid[0, :, 0].numpy()
    for t in range(rows * cols):
        ax = axes[t // cols][t % cols]
        if t >= n:
            ax.axis("off")
            continue
        ax.plot(g, truth[t, :, 0].numpy(), color="black", linewidth=2.5, alpha=0.35, label="true function")
        for k, pred in curves.items():
            ax.plot(g, pred[t, :, 0].numpy(), linewidth=1.6, **styles[k])
        ax.scatter(xs[t, :, 0].numpy(), ys[t, :, 0].numpy(), color="black", marker="^", s=40, zorder=5,
                   label=f"{xs.shape[1]} support points")
        ax.set_title(f"held-out task {t}: A = {float(episode.amplitude[t]):.2f}, "
                     f"phase = {float(episode.phase[t]):.2f}", fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
