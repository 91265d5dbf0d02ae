"""The meta-training loop: sample a meta-batch, meta_loss, backward, Adam step; checkpoint; resume exactly.

Exact resumption. Everything a future iteration depends on is either a function of (seed, iteration) -- the
tasks, see metakernels.tasks.sinusoid -- or saved in the checkpoint: the learner's state_dict (weights,
learned rates, MAML++'s epoch), Adam's state, the iteration count, torch's global RNG state, and the loss
accumulators of the log. A run killed at any point and resumed from its last checkpoint therefore computes
bit for bit what the uninterrupted run computes (same machine and thread count; tests/test_sinusoid_job.py
checks it, including with SIGKILL).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..learners import GradientLearner, MAMLPlusPlus
from ..tasks.sinusoid import SinusoidTasks, sinusoid_mlp
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, build_learner


@dataclass
class TrainState:
    """The loop's own state (all of it goes into the checkpoint)."""

    iteration: int = 0  # completed meta-iterations
    history: list[list[float]] = field(default_factory=list)  # [iteration, mean meta-loss over the log window]
    window_sum: float = 0.0
    window_count: int = 0
    running_loss: float | None = None  # exponential average shown in the progress bar
    train_seconds: float = 0.0  # wall time inside iterations (no checkpointing, no evaluation), all processes
    timed_iterations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """A built run: the model, its learner and the outer optimizer."""

    config: TrainConfig
    model: torch.nn.Module
    learner: GradientLearner
    optimizer: torch.optim.Optimizer
    state: TrainState


def build_run(config: TrainConfig) -> Run:
    """Fresh model (initialised from config.seed), learner and Adam over learner.parameters()."""
    torch.manual_seed(config.seed)
    model = sinusoid_mlp(config.hidden)
    learner = build_learner(config, model)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.outer_lr)
    return Run(config, model, learner, optimizer, TrainState())


def checkpoint_state(run: Run) -> dict[str, Any]:
    """What save_checkpoint writes."""
    return {
        "config": run.config.to_dict(),
        "iteration": run.state.iteration,
        "learner": run.learner.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            # The task sampler keeps no state: meta-batch i is drawn from task_generator("train", seed, i).
            "sampler": {"kind": "sha256(stream, seed, iteration)", "seed": run.config.seed},
        },
        "loop": run.state.to_dict(),
        "versions": {"torch": str(torch.__version__)},
    }


def restore(run: Run, ckpt: dict[str, Any], source: str | os.PathLike) -> None:
    """Loads a checkpoint into a freshly built run, after checking it comes from a compatible configuration."""
    try:
        saved = TrainConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: unusable configuration in checkpoint: {exc}") from exc
    diff = saved.differences(run.config)
    if diff:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(
            f"{source} was written by a different run ({listed}); use another --out directory, or repeat the "
            f"checkpoint's settings to resume it"
        )
    run.learner.load_state_dict(ckpt["learner"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.state = TrainState(**ckpt["loop"])
    if run.state.iteration != ckpt["iteration"]:
        raise CheckpointError(f"{source}: inconsistent iteration counts in checkpoint")


def resume_path(out: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: an explicit --resume path, else out/checkpoint.pt if present."""
    if resume is not None:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such file")
        return path
    path = Path(out) / CHECKPOINT_NAME
    return path if path.is_file() else None


@dataclass
class TrainResult:
    run: Run
    checkpoint: Path
    resumed_from: Path | None
    iterations_this_process: int


def train(
    config: TrainConfig,
    out: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Meta-trains up to config.iterations (resuming if a checkpoint exists) and leaves out/checkpoint.pt.

    Args:
        config: the run. out: output directory (created). resume: an explicit checkpoint to resume from.
        progress: show the tqdm bar (on stderr). log: where one-line status messages go.

    Returns:
        TrainResult with the trained run and the final checkpoint's path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        run = build_run(config)
        source = resume_path(out, resume)
        if source is not None:
            restore(run, load_checkpoint(source), source)
            log(f"resuming from {source} at iteration {run.state.iteration}")
        start = run.state.iteration
        _loop(run, ckpt_path, progress)
        if run.state.iteration > start or source is None or source.resolve() != ckpt_path.resolve():
            save_checkpoint(checkpoint_state(run), ckpt_path)  # the final state, always in out/
        return TrainResult(run, ckpt_path, source, run.state.iteration - start)
    finally:
        torch.set_num_threads(threads_before)


def _loop(run: Run, ckpt_path: Path, progress: bool) -> None:
    cfg, state, learner, opt = run.config, run.state, run.learner, run.optimizer
    tasks = SinusoidTasks()
    learner.train()
    bar = tqdm(total=cfg.iterations, initial=state.iteration, disable=not progress, unit="it", dynamic_ncols=True,
               desc=f"{cfg.algorithm} sinusoid", mininterval=0.5)
    try:
        for it in range(state.iteration, cfg.iterations):
            t0 = time.perf_counter()
            ep = tasks.batch(cfg.seed, it, cfg.meta_batch, cfg.k_shot, cfg.k_query)
            if isinstance(learner, MAMLPlusPlus):
                learner.set_epoch(it // cfg.epoch_length)
            opt.zero_grad(set_to_none=True)
            loss = learner.meta_loss(ep.xs, ep.ys, ep.xq, ep.yq)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            state.train_seconds += time.perf_counter() - t0
            state.timed_iterations += 1

            state.iteration = it + 1
            state.window_sum += value
            state.window_count += 1
            state.running_loss = value if state.running_loss is None else 0.98 * state.running_loss + 0.02 * value
            if state.iteration % cfg.log_every == 0:
                state.history.append([state.iteration, state.window_sum / state.window_count])
                state.window_sum, state.window_count = 0.0, 0
            if state.iteration % cfg.checkpoint_every == 0 and state.iteration < cfg.iterations:
                save_checkpoint(checkpoint_state(run), ckpt_path)
            bar.update(1)
            if state.iteration % 20 == 0 or state.iteration == cfg.iterations:
                bar.set_postfix(loss=f"{state.running_loss:.4f}", refresh=False)
    finally:
        bar.close()
