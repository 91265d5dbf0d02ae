"""Evaluates a trained run on the held-out tasks and writes its results: metrics.json, a table, a PNG."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__, cpu_backend, extension_available
from ..tasks.sinusoid import SinusoidTasks
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .evaluation import format_table, heldout_mse, summarise, write_json_atomic
from .literature import literature_summary
from .loop import Run, build_run, restore

METRICS_NAME = "metrics.json"
PLOT_NAME = "adapted_curves.png"


def evaluate_run(
    run: Run,
    out: str | os.PathLike,
    plot: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Held-out MSE after each of config.eval_steps inner steps; writes out/metrics.json (and the PNG).

    The held-out set is config.heldout_tasks tasks from the "heldout" stream with seed config.heldout_seed,
    K = config.k_shot support and config.k_query query points each; every learner adapts with the inner
    rates it was trained with (the multi-task baseline: plain gradient descent at config.inner_lr).
    """
    cfg = run.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        tasks = SinusoidTasks()
        episode = tasks.heldout(cfg.heldout_tasks, cfg.k_shot, cfg.k_query, cfg.heldout_seed)
        per_task = heldout_mse(run.learner, episode, cfg.eval_steps, cfg.inner_lr)
        state = run.state
        metrics: dict[str, Any] = {
            "task": "sinusoid",
            "algorithm": cfg.algorithm,
            "iteration": state.iteration,
            "config": cfg.to_dict(),
            "heldout": {"num_tasks": cfg.heldout_tasks, "seed": cfg.heldout_seed, "stream": "heldout",
                        "k_support": cfg.k_shot, "k_query": cfg.k_query},
            "eval_inner_lr": _eval_rate_description(run),
            "statistic": "per-task query MSE; mean, std (ddof 0), ci95 = 1.96 * std / sqrt(n)",
            "mse": summarise(per_task),
            "timing": {
                "seconds_per_iteration": state.train_seconds / state.timed_iterations if state.timed_iterations
                else None,
                "iterations_timed": state.timed_iterations,
                "train_seconds": state.train_seconds,
                "threads": cfg.threads,
                "note": "wall time inside meta-iterations, summed over all processes of the run (resumes "
                        "included); excludes checkpointing and evaluation",
            },
            "loss_history": state.history,
            "literature": literature_summary(),
            "environment": {
                "metakernels": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
                "cpu_backend": cpu_backend(), "extension_available": extension_available(),
                "machine": platform.machine(), "cpus": os.cpu_count(),
            },
        }
        if plot and cfg.plot_tasks > 0:
            from .plotting import plot_adapted_curves

            shown = tuple(k for k in (1, 10) if k in cfg.eval_steps) or (max(cfg.eval_steps),)
            png = plot_adapted_curves(
                run.learner, episode, out / PLOT_NAME, cfg.inner_lr, num_tasks=cfg.plot_tasks, steps=shown,
                title=f"{cfg.algorithm} on sinusoid regression, K = {cfg.k_shot}, after {state.iteration} "
                      f"meta-iterations",
            )
            metrics["plot"] = str(png)
        write_json_atomic(metrics, out / METRICS_NAME)
        log(format_table(metrics, metrics["literature"]))
        log(f"wrote {out / METRICS_NAME}" + (f" and {metrics['plot']}" if "plot" in metrics else ""))
        return metrics
    finally:
        torch.set_num_threads(threads_before)


def _eval_rate_description(run: Run) -> float | str:
    cfg = run.config
    if cfg.algorithm in ("maml", "fomaml", "anil", "reptile"):
        return cfg.inner_lr
    if cfg.algorithm == "multitask":
        return f"{cfg.inner_lr} (plain gradient descent fine-tuning of the jointly trained model)"
    return f"learned ({cfg.algorithm}; initialised at {cfg.inner_lr})"


def load_run(checkpoint: str | os.PathLike, **overrides: Any) -> Run:
    """Rebuilds the run a checkpoint came from (its own configuration, with evaluation-only overrides)."""
    ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict({**ckpt["config"], **overrides})
    run = build_run(config)
    restore(run, ckpt, checkpoint)
    return run
