"""The `metakernels` command line: `metakernels train` and `metakernels evaluate` (sinusoid regression),
`metakernels profile` (the ops against this machine's rooflines).

    metakernels train --algorithm maml --out runs/sinusoid-maml          # the MAML paper's setup, 70k iterations
    metakernels train --quick --out /tmp/mk-quick                         # a few hundred iterations, for CI
    metakernels evaluate --out runs/sinusoid-maml                         # re-evaluate out/checkpoint.pt
    metakernels profile --quick                                           # runs/profile/profile.{json,csv,png}

`train` resumes automatically from OUT/checkpoint.pt (or --resume PATH) and continues exactly where the
checkpoint left off; it refuses a checkpoint written with different training settings.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from .profiler.command import add_profile_parser, run_profile_command
from .train.config import ALGORITHMS, DEFAULT_INNER_STEPS

QUICK = {"iterations": 300, "checkpoint_every": 100, "log_every": 50}

# One thread by default. The sinusoid MLP's layers are [25 tasks x 10 points x 40] GEMMs: far too small to
# split across threads, and on this 2-core machine (shared with other jobs, load average ~6) a second thread
# made one MAML iteration (1 inner step, meta-batch 25, torch 2.13) take 72-507 ms instead of 5-21 ms with one
# thread, over several measurements: OpenMP threads wait on a busy core.
DEFAULT_THREADS = 1


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _finite_float(positive: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite number{' > 0' if positive else ''}, got {text!r}")
        return value

    return parse


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--heldout-tasks", type=_int_at_least(1), default=None,
                   help="held-out tasks to evaluate on (default 600, the MAML authors' count)")
    g.add_argument("--heldout-seed", type=int, default=None, help="seed of the held-out set (default 1)")
    g.add_argument("--eval-steps", type=_int_at_least(0), nargs="+", default=None, metavar="K",
                   help="inner-step counts to evaluate after (default 0 1 ... 10)")
    g.add_argument("--plot-tasks", type=_int_at_least(0), default=None,
                   help="held-out tasks shown in adapted_curves.png (default 4; 0: no plot)")
    g.add_argument("--no-plot", action="store_true", help="do not write adapted_curves.png")
    g.add_argument("--threads", type=_int_at_least(1), default=None,
                   help=f"torch threads (default {DEFAULT_THREADS}: the model is too small to gain from more)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metakernels", description="metakernels meta-learning jobs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train", help="meta-train on sinusoid regression, then evaluate on held-out tasks",
        description="Meta-train a learner on the sinusoid regression task of MAML (Finn et al. 2017), "
                    "checkpointing to OUT and resuming from it, then evaluate on held-out tasks.",
    )
    t.add_argument("--out", required=True, help="output directory: checkpoint.pt, metrics.json, adapted_curves.png")
    t.add_argument("--algorithm", choices=ALGORITHMS, default="maml", help="learner (default maml)")
    t.add_argument("--task", choices=("sinusoid",), default="sinusoid", help="task distribution (default sinusoid)")
    t.add_argument("--iterations", type=_int_at_least(1), default=None,
                   help="total meta-iterations (default 70000; 300 with --quick)")
    t.add_argument("--inner-steps", type=_int_at_least(0), default=None,
                   help="inner steps during training (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_INNER_STEPS.items()) + ")")
    t.add_argument("--inner-lr", type=_finite_float(), default=0.01,
                   help="inner learning rate; the initial value for learned rates (default 0.01)")
    t.add_argument("--outer-lr", type=_finite_float(positive=True), default=1e-3, help="Adam learning rate (1e-3)")
    t.add_argument("--first-order", action="store_true", help="drop second-order terms (maml, metasgd, maml++, anil)")
    t.add_argument("--k-shot", type=_int_at_least(1), default=10, help="support points per task, K (default 10)")
    t.add_argument("--k-query", type=_int_at_least(1), default=10, help="query points per task (default 10)")
    t.add_argument("--meta-batch", type=_int_at_least(1), default=25, help="tasks per meta-iteration (default 25)")
    t.add_argument("--hidden", type=_int_at_least(1), nargs="+", default=None, metavar="WIDTH",
                   help="hidden layer widths (default 40 40)")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the task stream (0)")
    t.add_argument("--epoch-length", type=_int_at_least(1), default=None,
                   help="maml++: iterations per epoch of the multi-step-loss annealing (default 500)")
    t.add_argument("--annealing-epochs", type=_int_at_least(1), default=None,
                   help="maml++: epochs over which the multi-step loss anneals to the last step (default 10)")
    t.add_argument("--checkpoint-every", type=_int_at_least(1), default=None,
                   help="iterations between checkpoints (default 1000; 100 with --quick)")
    t.add_argument("--log-every", type=_int_at_least(1), default=None,
                   help="iterations per point of the loss history (default 100; 50 with --quick)")
    t.add_argument("--resume", default=None, metavar="PATH",
                   help="resume from this checkpoint (default: OUT/checkpoint.pt when it exists)")
    t.add_argument("--quick", action="store_true",
                   help="a small run for CI: 300 iterations unless --iterations is given (well under a minute)")
    t.add_argument("--no-eval", action="store_true", help="train only; skip the held-out evaluation")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_eval_options(t)

    e = sub.add_parser(
        "evaluate", help="evaluate a checkpoint on held-out tasks",
        description="Evaluate the checkpoint in OUT (or --checkpoint PATH) on held-out sinusoid tasks; writes "
                    "OUT/metrics.json and OUT/adapted_curves.png.",
    )
    e.add_argument("--out", required=True, help="directory with checkpoint.pt; results are written here")
    e.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint to evaluate (default OUT/checkpoint.pt)")
    _add_eval_options(e)
    add_profile_parser(sub)
    return parser


def _eval_overrides(args: argparse.Namespace) -> dict:
    o = {}
    for name in ("heldout_tasks", "heldout_seed", "plot_tasks", "threads"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    if args.eval_steps is not None:
        o["eval_steps"] = tuple(args.eval_steps)
    return o


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.checkpoint import CheckpointError
    from .train.config import TrainConfig
    from .train.loop import train
    from .train.report import evaluate_run

    fields = dict(
        algorithm=args.algorithm, task=args.task, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
        outer_lr=args.outer_lr, first_order=args.first_order, k_shot=args.k_shot, k_query=args.k_query,
        meta_batch=args.meta_batch, seed=args.seed, threads=DEFAULT_THREADS,
    )
    for name in ("iterations", "checkpoint_every", "log_every"):
        value = getattr(args, name)
        if value is None and args.quick:
            value = QUICK[name]
        if value is not None:
            fields[name] = value
    for name in ("epoch_length", "annealing_epochs"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.hidden is not None:
        fields["hidden"] = tuple(args.hidden)
    fields.update(_eval_overrides(args))
    try:
        config = TrainConfig(**fields)
    except ValueError as exc:
        parser.error(f"train: {exc}")
    try:
        result = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    except CheckpointError as exc:
        parser.error(f"train: {exc}")
    run = result.run
    print(f"trained {config.algorithm} to iteration {run.state.iteration} "
          f"({result.iterations_this_process} in this process); checkpoint {result.checkpoint}")
    if run.state.iteration > config.iterations:
        print(f"note: the checkpoint was already past --iterations {config.iterations}")
    if not args.no_eval:
        evaluate_run(run, args.out, plot=not args.no_plot)
    return 0


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from .train.checkpoint import CHECKPOINT_NAME, CheckpointError
    from .train.report import evaluate_run, load_run

    path = Path(args.checkpoint) if args.checkpoint else Path(args.out) / CHECKPOINT_NAME
    try:
        run = load_run(path, **_eval_overrides(args))
    except CheckpointError as exc:
        parser.error(f"evaluate: {exc}")
    except ValueError as exc:
        parser.error(f"evaluate: {exc}")
    evaluate_run(run, args.out, plot=not args.no_plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args, parser)
    if args.command == "profile":
        return run_profile_command(args, parser)
    return _evaluate(args, parser)


if __name__ == "__main__":
    sys.exit(main())
