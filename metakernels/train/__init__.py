"""Meta-training jobs: the sinusoid regression run behind `metakernels train` / `metakernels evaluate`.

One job per module: config (what a run is), loop (training with exact resumption), checkpoint (atomic
files), evaluation (held-out MSE and its confidence interval), plotting (adapted curves), report (metrics.json,
table, PNG), literature (published protocol and the status of published numbers).
"""

from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from .config import ALGORITHMS, DEFAULT_INNER_STEPS, TrainConfig, build_learner
from .evaluation import Summary, heldout_mse, mean_ci95
from .loop import Run, TrainResult, build_run, train
from .report import METRICS_NAME, PLOT_NAME, evaluate_run, load_run

__all__ = [
    "ALGORITHMS",
    "CHECKPOINT_NAME",
    "DEFAULT_INNER_STEPS",
    "METRICS_NAME",
    "PLOT_NAME",
    "CheckpointError",
    "Run",
    "Summary",
    "TrainConfig",
    "TrainResult",
    "build_learner",
    "build_run",
    "evaluate_run",
    "heldout_mse",
    "load_checkpoint",
    "load_run",
    "mean_ci95",
    "save_checkpoint",
    "train",
]
