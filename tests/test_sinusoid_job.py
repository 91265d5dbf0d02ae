"""The sinusoid job: task sampler, `metakernels train` / `evaluate`, checkpoints and exact resumption.

Fast by design (the whole file runs in well under a minute on 2 cores): runs are tens of iterations, and the
held-out set is shrunk where only the plumbing is under test.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metakernels.cli import main
from metakernels.tasks import HELDOUT_TASKS, SinusoidTasks, derive_seed, sinusoid, task_generator
from metakernels.train import (
    ALGORITHMS,
    CHECKPOINT_NAME,
    METRICS_NAME,
    PLOT_NAME,
    CheckpointError,
    TrainConfig,
    build_run,
    heldout_mse,
    load_checkpoint,
    mean_ci95,
    save_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_global_state(restore_threads):
    """Training seeds torch's global RNG and sets the thread count: give both back after each test."""
    rng = torch.get_rng_state()
    yield
    torch.set_rng_state(rng)


def small(**kw) -> TrainConfig:
    base = dict(iterations=40, checkpoint_every=10, log_every=5, heldout_tasks=30, eval_steps=(0, 1, 10),
                plot_tasks=0, meta_batch=5)
    base.update(kw)
    return TrainConfig(**base)


def assert_same_state(a, b) -> None:
    """Bitwise equality of two state_dicts (tensors) or nested containers of them."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


# --- the task sampler --------------------------------------------------------------------------------------


def test_sampler_ranges_shapes_and_targets():
    ep = SinusoidTasks().sample(2000, 10, 7, task_generator("train", 0, 0))
    assert ep.xs.shape == (2000, 10, 1) and ep.ys.shape == (2000, 10, 1)
    assert ep.xq.shape == (2000, 7, 1) and ep.yq.shape == (2000, 7, 1)
    assert ep.xs.dtype == torch.float32 and ep.amplitude.shape == (2000,)
    assert 0.1 <= ep.amplitude.min() and ep.amplitude.max() < 5.0
    assert 0.0 <= ep.phase.min() and ep.phase.max() < math.pi
    x = torch.cat([ep.xs, ep.xq], 1)
    assert -5.0 <= x.min() and x.max() < 5.0
    # Uniform statistics: means within ~5 standard errors of the interval midpoints, spreads near (b-a)/sqrt(12).
    assert abs(ep.amplitude.mean().item() - 2.55) < 5 * 4.9 / math.sqrt(12 * 2000)
    assert abs(ep.phase.mean().item() - math.pi / 2) < 5 * math.pi / math.sqrt(12 * 2000)
    assert abs(x.mean().item()) < 5 * 10 / math.sqrt(12 * x.numel())
    assert abs(ep.amplitude.std().item() - 4.9 / math.sqrt(12)) < 0.05
    # Targets are A sin(x - phase), computed in float64 and then rounded.
    expect = sinusoid(ep.xs.double(), ep.amplitude.double(), ep.phase.double())
    torch.testing.assert_close(ep.ys.double(), expect, rtol=0, atol=1e-5)
    # Support and query points of a task come from the same sine.
    torch.testing.assert_close(ep.yq, sinusoid(ep.xq, ep.amplitude, ep.phase), rtol=1e-5, atol=1e-5)


def test_sampler_is_a_function_of_seed_and_iteration():
    tasks = SinusoidTasks()
    a = tasks.batch(seed=3, iteration=17, num_tasks=25, num_support=10, num_query=10)
    b = tasks.batch(seed=3, iteration=17, num_tasks=25, num_support=10, num_query=10)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for other in (tasks.batch(3, 18, 25, 10, 10), tasks.batch(4, 17, 25, 10, 10)):
        assert not torch.equal(a.amplitude, other.amplitude)
    # Unrelated streams for neighbouring seeds and iterations, and between training and held-out.
    seeds = {derive_seed("train", s, i) for s in range(5) for i in range(5)} | {derive_seed("heldout", 1, 0)}
    assert len(seeds) == 26
    # float64 draws the same tasks as float32, to float32 rounding.
    c = tasks.batch(3, 17, 25, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(c.amplitude.float(), a.amplitude, rtol=0, atol=0)


def test_heldout_set_is_fixed_and_separate_from_training():
    tasks = SinusoidTasks()
    h1, h2 = tasks.heldout(), tasks.heldout()
    assert h1.num_tasks == HELDOUT_TASKS == 600
    for x, y in zip(h1, h2, strict=True):
        assert torch.equal(x, y)
    train_batch = tasks.batch(seed=1, iteration=0, num_tasks=600, num_support=10, num_query=10)
    assert not torch.equal(h1.amplitude, train_batch.amplitude)
    assert not torch.equal(tasks.heldout(seed=2).amplitude, h1.amplitude)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_support"):
        SinusoidTasks().sample(4, 0, 5, torch.Generator())
    with pytest.raises(ValueError, match="amplitude range"):
        SinusoidTasks(amplitude=(5.0, 0.1))


# --- evaluation statistics ---------------------------------------------------------------------------------


def test_mean_ci95_matches_the_maml_authors_statistic():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = mean_ci95(values)
    # np.mean, np.std (ddof 0), 1.96 * std / sqrt(n), as in cbfinn/maml main.py test().
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(1.25), rel=1e-15)
    assert s.ci95 == pytest.approx(1.96 * math.sqrt(1.25) / 2, rel=1e-15)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(600, generator=g, dtype=torch.float64) * 3
    s = mean_ci95(v)
    assert s.ci95 == pytest.approx(1.96 * v.std(unbiased=False).item() / math.sqrt(600), rel=1e-12)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_heldout_mse_is_the_per_task_query_mse():
    cfg = small()
    run = build_run(cfg)
    ep = SinusoidTasks().heldout(8)
    per_task = heldout_mse(run.learner, ep, (0, 2), cfg.inner_lr)
    with torch.no_grad():
        pred0 = run.model(ep.xq.reshape(-1, 1)).reshape(ep.yq.shape)
    # Both sides are float32 evaluations of the same MSE in different summation orders (task-batched kernels
    # vs the module's forward): equal to a few float32 ulps, so the float32 tolerances apply, not float64's.
    torch.testing.assert_close(per_task[0].float(), ((pred0 - ep.yq) ** 2).mean((1, 2)))
    # Two steps of plain gradient descent per task at lr 0.01, written out by hand.
    for t in range(2):
        params = [p.detach().clone().requires_grad_() for p in run.model.parameters()]

        def f(x, ps):
            h = torch.relu(x @ ps[0].T + ps[1])
            h = torch.relu(h @ ps[2].T + ps[3])
            return h @ ps[4].T + ps[5]

        for _ in range(2):
            loss = ((f(ep.xs[t], params) - ep.ys[t]) ** 2).mean()
            grads = torch.autograd.grad(loss, params)
            params = [(p - 0.01 * g).detach().requires_grad_() for p, g in zip(params, grads, strict=True)]
        expect = ((f(ep.xq[t], params) - ep.yq[t]) ** 2).mean().double()
        torch.testing.assert_close(per_task[2][t], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_and_evaluates(tmp_path, algorithm):
    cfg = small(algorithm=algorithm, iterations=6, checkpoint_every=3, eval_steps=(0, 1, 3))
    result = train(cfg, tmp_path, progress=False, log=lambda s: None)
    assert result.run.state.iteration == 6
    per_task = heldout_mse(result.run.learner, SinusoidTasks().heldout(10), cfg.eval_steps, cfg.inner_lr)
    assert all(torch.isfinite(v).all() for v in per_task.values())
    # Adaptation changes the predictions for every learner (the multi-task baseline is fine-tuned at inner_lr;
    # MAML++ trained with 1 step adapts for 3 with its last learned rates).
    assert not torch.equal(per_task[0], per_task[3])


# --- checkpoints and exact resumption ----------------------------------------------------------------------


def test_checkpoint_write_is_atomic_and_cleans_stale_temporaries(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    stale = tmp_path / f".{CHECKPOINT_NAME}.tmp-99999"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint({"x": torch.arange(3)}, path)
    assert not stale.exists()
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("algorithm", ["maml", "maml++"])
def test_resume_equals_uninterrupted(tmp_path, algorithm):
    # maml++ carries learned per-step rates, a saved epoch and annealed loss weights: epoch_length 7 makes the
    # annealing move inside the run, and the split at 20 falls mid-epoch.
    kw = dict(algorithm=algorithm, inner_steps=2, epoch_length=7, annealing_epochs=3) if algorithm == "maml++" else {}
    full = train(small(**kw), tmp_path / "full", progress=False, log=lambda s: None)

    first = train(small(iterations=20, **kw), tmp_path / "split", progress=False, log=lambda s: None)
    assert first.run.state.iteration == 20
    second = train(small(**kw), tmp_path / "split", progress=False, log=lambda s: None)
    assert second.resumed_from == tmp_path / "split" / CHECKPOINT_NAME
    assert second.iterations_this_process == 20

    assert_same_state(full.run.learner.state_dict(), second.run.learner.state_dict())
    assert_same_state(full.run.optimizer.state_dict(), second.run.optimizer.state_dict())
    assert full.run.state.history == second.run.state.history
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(second.checkpoint)
    assert_same_state(a["rng"]["torch"], b["rng"]["torch"])
    assert a["iteration"] == b["iteration"] == 40


def test_resume_refuses_a_different_run(tmp_path):
    train(small(iterations=10), tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(CheckpointError, match="seed: checkpoint 0 vs requested 1"):
        train(small(iterations=20, seed=1), tmp_path, progress=False, log=lambda s: None)
    # Settings that do not change training may differ (more iterations, another checkpoint interval).
    result = train(small(iterations=20, checkpoint_every=7), tmp_path, progress=False, log=lambda s: None)
    assert result.run.state.iteration == 20


def _checkpoint_iteration(path: Path) -> int:
    try:
        return load_checkpoint(path)["iteration"]
    except CheckpointError:
        return -1


def test_sigkill_mid_run_then_resume_loses_nothing(tmp_path):
    iterations = 200
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "metakernels", "train", "--out", str(out), "--iterations", str(iterations),
           "--checkpoint-every", "10", "--log-every", "5", "--meta-batch", "5", "--no-eval", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_iteration(out / CHECKPOINT_NAME) < 30:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint_iteration(out / CHECKPOINT_NAME)
    assert 30 <= killed_at < iterations, killed_at

    cfg = TrainConfig(iterations=iterations, checkpoint_every=10, log_every=5, meta_batch=5)
    resumed = train(cfg, out, progress=False, log=lambda s: None)
    assert resumed.iterations_this_process == iterations - killed_at  # resumed exactly at the last checkpoint
    reference = train(cfg, tmp_path / "reference", progress=False, log=lambda s: None)
    assert_same_state(reference.run.learner.state_dict(), resumed.run.learner.state_dict())
    assert_same_state(reference.run.optimizer.state_dict(), resumed.run.optimizer.state_dict())
    assert reference.run.state.history == resumed.run.state.history


# --- the command line --------------------------------------------------------------------------------------


def test_cli_quick_run_writes_checkpoint_metrics_and_plot(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["train", "--quick", "--iterations", "30", "--out", str(out), "--no-progress",
                 "--heldout-tasks", "50", "--eval-steps", "0", "1", "10"]) == 0
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "inner steps" in printed
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["iteration"] == 30 and ckpt["config"]["checkpoint_every"] == 100  # --quick's interval
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["iteration"] == 30 and metrics["heldout"]["num_tasks"] == 50
    assert set(metrics["mse"]) == {"0", "1", "10"}
    for s in metrics["mse"].values():
        assert s["n"] == 50 and s["ci95"] == pytest.approx(1.96 * s["std"] / math.sqrt(50))
    assert metrics["timing"]["seconds_per_iteration"] > 0
    assert metrics["literature"] and "config" in metrics
    png = (out / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # `evaluate` re-evaluates the checkpoint with other held-out settings.
    assert main(["evaluate", "--out", str(out), "--heldout-tasks", "20", "--eval-steps", "1", "--no-plot"]) == 0
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert set(metrics["mse"]) == {"1"} and metrics["mse"]["1"]["n"] == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "{out}", "--iterations", "0"], "--iterations: must be an integer >= 1, got 0"),
        (["train", "--out", "{out}", "--algorithm", "mamll"], "invalid choice: 'mamll'"),
        (["train", "--out", "{out}", "--inner-lr", "nan"], "--inner-lr: must be a finite number"),
        (["train", "--out", "{out}", "--outer-lr", "-1"], "--outer-lr: must be a finite number > 0"),
        (["train", "--out", "{out}", "--meta-batch", "x"], "--meta-batch: must be an integer >= 1, got 'x'"),
        (["train", "--out", "{out}", "--algorithm", "multitask", "--inner-steps", "3"], "no inner loop"),
        (["train", "--out", "{out}", "--algorithm", "reptile", "--first-order"], "first_order does not apply"),
        (["train", "--out", "{out}", "--resume", "{out}/missing.pt"], "no such file"),
        (["train", "--iterations", "5"], "the following arguments are required: --out"),
        (["evaluate", "--out", "{out}"], "no checkpoint at"),
        ([], "required: COMMAND"),
    ],
)
def test_cli_bad_arguments_give_clear_errors(tmp_path, capsys, argv, message):
    argv = [a.format(out=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_resume_with_other_settings(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path), "--iterations", "4", "--meta-batch", "3", "--no-eval", "--no-progress"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exc:
        main([*args, "--seed", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "seed: checkpoint 0 vs requested 5" in err and "another --out directory" in err
