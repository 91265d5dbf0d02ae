"""Held-out evaluation: post-adaptation MSE after k inner steps, mean and 95% confidence interval.

The statistic is the MAML authors' (github.com/cbfinn/maml, main.py test()): over n held-out tasks, the mean
of the per-task query MSE, its standard deviation with ddof 0 (np.std), and ci95 = 1.96 * std / sqrt(n).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..learners import MAML, GradientLearner, MAMLPlusPlus, MultiTaskBaseline
from ..tasks.sinusoid import SinusoidEpisode


@dataclass(frozen=True)
class Summary:
    """Mean, population standard deviation, 95% half-width and count of per-task values."""

    mean: float
    std: float
    ci95: float
    n: int


def mean_ci95(values: torch.Tensor | Sequence[float]) -> Summary:
    """Summary of per-task values: mean, std (ddof 0), ci95 = 1.96 * std / sqrt(n), in float64."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci95: no values")
    mean = v.mean()
    std = ((v - mean) ** 2).mean().sqrt()
    return Summary(float(mean), float(std), float(1.96 * std / math.sqrt(n)), n)


def evaluation_adapter(learner: GradientLearner, inner_lr: float) -> GradientLearner:
    """The learner that adapts at test time.

    Every learner adapts with its own (possibly learned) rates, except the multi-task baseline, which has no
    inner loop: it is fine-tuned at test time by plain gradient descent at ``inner_lr`` (the "pretrained"
    baseline of MAML's Figure 3).
    """
    if isinstance(learner, MultiTaskBaseline):
        return MAML(learner.model, inner_lr=inner_lr, inner_steps=1, loss_fn=learner.loss_fn)
    return learner


@contextlib.contextmanager
def _rates_beyond_training(learner: GradientLearner, steps: int) -> Iterator[None]:
    """Lets a MAML++ learner trained with k steps adapt for more: steps >= k reuse step k-1's learned rates.

    MAMLPlusPlus.inner_rate indexes its [k, S] rate table by step and raises IndexError past k (see the
    report of this job); evaluation after 10 steps of a 1-step MAML++ needs a rule, and this is the simplest.
    """
    if not isinstance(learner, MAMLPlusPlus) or steps <= learner.inner_steps:
        yield
        return
    last = learner.inner_steps - 1
    original = learner.inner_rate
    learner.inner_rate = lambda step: original(min(step, last))  # instance attribute shadows the method
    try:
        yield
    finally:
        del learner.inner_rate


def adapt_and_predict(
    adapter: GradientLearner, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, steps: int
) -> torch.Tensor:
    """Predictions [T, N, ...] on xq after ``steps`` inner steps on (xs, ys); no graph is kept."""
    with torch.no_grad(), _rates_beyond_training(adapter, steps):
        fast = adapter.adapt(xs, ys, steps=steps)
        return adapter.predict(fast, xq)


def heldout_mse(
    learner: GradientLearner, episode: SinusoidEpisode, steps: Sequence[int], inner_lr: float
) -> dict[int, torch.Tensor]:
    """Per-task query MSE [T] on a held-out episode after each number of inner steps in ``steps``."""
    adapter = evaluation_adapter(learner, inner_lr)
    was_training = learner.training
    learner.eval()
    try:
        out = {}
        for k in steps:
            pred = adapt_and_predict(adapter, episode.xs, episode.ys, episode.xq, k)
            out[int(k)] = ((pred - episode.yq) ** 2).flatten(1).mean(1).double()
        return out
    finally:
        learner.train(was_training)


def summarise(per_task: dict[int, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{"k": Summary as dict} for every k, JSON-ready."""
    return {str(k): asdict(mean_ci95(v)) for k, v in sorted(per_task.items())}


def format_table(metrics: dict[str, Any], literature: list[dict[str, Any]] | None = None) -> str:
    """The human-readable result table printed at the end of training / evaluation."""
    cfg = metrics["config"]
    held = metrics["heldout"]
    lines = [
        f"held-out MSE, {held['num_tasks']} sinusoid tasks (K={held['k_support']} support, {held['k_query']} query "
        f"points each), {cfg['algorithm']} after {metrics['iteration']} meta-iterations, inner lr "
        f"{metrics['eval_inner_lr']}:",
        f"  {'inner steps':>11}  {'mean MSE':>9}  {'95% CI (1.96 std/sqrt n)':>24}  {'std':>7}",
    ]
    for k, s in metrics["mse"].items():
        lines.append(f"  {k:>11}  {s['mean']:9.4f}  {'+/- ' + format(s['ci95'], '.4f'):>24}  {s['std']:7.4f}")
    timing = metrics.get("timing") or {}
    if timing.get("seconds_per_iteration"):
        lines.append(f"  training: {timing['seconds_per_iteration'] * 1e3:.2f} ms per meta-iteration over "
                     f"{timing['iterations_timed']} timed iterations ({timing['threads']} thread(s))")
    for ref in literature or []:
        status = "values: " + ref["mse_status"] if ref.get("mse") is None else f"MSE {ref['mse']}"
        lines.append(f"  literature: {ref['source']}; {status}")
    return "\n".join(lines)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """JSON to ``path`` via a temporary file and os.replace (never a half-written metrics file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
