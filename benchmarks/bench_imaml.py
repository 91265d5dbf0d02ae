"""Benchmark of one iMAML meta-step: metakernels.iMAML against the ways people write it today, and its memory.

A meta-step is the meta-loss forward (every task's inner loop, the query loss) plus the backward that leaves the
implicit meta-gradient in the meta-parameters, in float32, with no optimizer step. The definition every
implementation computes (the same as metakernels.iMAML with cg_damping = lam_damping = 0):

    phi_t = theta, then k steps phi_t <- phi_t - inner_lr (grad L_train,t(phi_t) + lam (phi_t - theta)), no graph;
    meta-gradient (1/T) sum_t x_t, x_t after cg_steps CG iterations from x0 = 0 on (I + H_t/lam) x =
    grad L_test,t(phi_t), H_t the Hessian of L_train,t (without the proximal term) at phi_t; no early stop unless
    a residual is exactly zero (metakernels.iMAML is run with tol=0.0 for that reason: its default tol=1e-10 would
    stop a task whose relative residual fell below 1e-10, which 5 iterations do not reach on these workloads);
    meta-loss value (1/T) sum_t L_test,t(phi_t).

Workloads (issue 5: 5 inner steps, 5 CG iterations, lam = 2):
  sinusoid  MLP 1-40-40-1 (ReLU) of the MAML paper, MSE, K = 10 support + 10 query points, T = 25, inner lr 0.01;
  conv      4 x [conv3x3 64 (padding 1), BatchNorm2d(64) (batch statistics), ReLU, maxpool 2], Flatten,
            Linear(64, 5), 28x28x1 random pixels, 5-way 1-shot, 15 queries per class, cross-entropy, T = 8,
            inner lr 0.1.
The networks, their seeded weights and the episodes are bench_maml.py's (bench_maml.Workload).

Implementations: loop, torchopt, vmap (jvp(grad) HVPs), vmap_rr (grad-of-grad HVPs): see _imaml_peers.py;
  metakernels: metakernels.iMAML(model, inner_lr, inner_steps, lam, cg_steps, loss_fn, tol=0.0)
               .meta_loss(xs, ys, xq, yq).backward(): the public API only (imported when first used);
  metakernels_continue: the same with negative_curvature="continue" (plain CG, the peers' rule).

Indefinite Hessians: on the sinusoid workload 20 of the 25 tasks have Hessian eigenvalues below -lam (measured in
float64: smallest eigenvalues of H_t at phi_t between -1.1 and -13.6, largest 13 to 65), so I + H_t/lam is
indefinite there and CG meets p^T A p <= 0 within its 5 iterations. CG is still defined (the peers carry on); a CG
that stops such a task (metakernels' batched CG by default, notes/imaml_api.md) returns a different meta-gradient
(0.72 relative to the plain one on that workload). Both references are computed; see cross_check: metakernels (the
default stop rule) is judged against loop_stop, metakernels_continue (negative_curvature="continue") against the
plain loop like the peers. The conv workload meets no non-positive curvature (smallest ratio ~1.05).

Before timing, a cross-check in float64 on the same workloads (the conv net with --check-tasks tasks): every
implementation's meta-gradient and meta-loss against the loop's, relative deviation (max |g - g_loop| over all
parameters / max |g_loop|) <= 1e-9. An implementation that disagrees is flagged loudly, left out of "fastest
peer", and makes the script exit with status 1 (unless it is a documented torch limitation: KNOWN_WRONG). The
loop also reports the smallest CG curvature p^T A p / p^T p it met (A = I + H/lam): a value <= 0 is where a
solver that stops on non-positive curvature (metakernels' batched CG does) parts from the plain definition.

Timing: float32, per torch thread count (--threads, default 1 and 2, reported separately), warm-up, then rounds
in which every implementation runs one meta-step, the order rotated each round (the machine is shared: a load
change then hits all implementations alike; the repetition counts are bench_maml's plan); median and
interquartile range per implementation; ratio against the fastest peer that passed the cross-check, as the ratio
of medians and as the median over rounds of the per-round ratio, all in the same run. Load averages at start, end
and after each workload are recorded.

--memory: peak memory against the number of inner steps k (5, 20, 100): one fresh subprocess per (workload,
allocator, algorithm, k) runs a few meta-steps (float32, 1 thread) of metakernels.iMAML, of second-order
metakernels.MAML (same model, same k, same inner lr) and of the loop peer (iMAML per task, for reference). Each
reports the peak RSS of its meta-steps (the high-water mark VmHWM, which getrusage's ru_maxrss follows, reset to
the current RSS after imports, model, data and learner were set up: the imports' transient peak would otherwise
hide a flat algorithm's), the increment of that peak over the RSS after setup, and the whole process's
ru_maxrss (peak_process_mib). Growth = value(k = 100) / value(k = 5), for the peak and for the increment. Two
allocator settings (ALLOCATORS): glibc's defaults, and a fixed 128 KiB mmap threshold under which the RSS follows
the live tensors instead of the heap's fragmentation. A run whose linear extrapolation from its k = 5 and k = 20
increments exceeds --memory-cap-gb is not started and is reported as capped.

    python benchmarks/bench_imaml.py --quick                 # tiny workloads, few repetitions: imaml_quick.*
    python benchmarks/bench_imaml.py                         # full: results/imaml.{json,csv}
    python benchmarks/bench_imaml.py --memory                # results/imaml_memory.{json,csv}
    python benchmarks/bench_imaml.py --tasks-filter sinusoid --threads 1 --impls loop,vmap_rr
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _imaml_peers as peers  # noqa: E402
import _machine as M  # noqa: E402
from _peers import deviation, import_peer, peer_versions  # noqa: E402
from bench_maml import RepPlan, Workload, meta_gradient, rep_plan  # noqa: E402
from bench_maml import _record_origin as record_origin  # noqa: E402

import metakernels  # noqa: E402

CHECK_RTOL = 1e-9
REFERENCE = "loop"
# metakernels' default stops a task on p^T A p <= 0 (its contract: judged against the loop with that rule);
# metakernels_continue runs plain CG, the peers' rule, and is judged against the plain loop. See cross_check.
REFERENCE_OF = {"metakernels": "loop_stop", "metakernels_continue": "loop"}
CHECK_ONLY = {"loop_stop": peers.build_loop_stop}
PEER_NAMES = ("loop", "torchopt", "vmap", "vmap_rr")
OURS = ("metakernels", "metakernels_continue")  # never a "peer" in the speed ratios
IMPL_NAMES = (*PEER_NAMES, *OURS)
# (workload net, implementation) -> the documented reason it cannot agree; any other disagreement is fatal.
KNOWN_WRONG: dict[tuple[str, str], str] = {}
# (workload net, implementation) -> a substring of the error torch 2.13 raises, documented in _imaml_peers.py.
KNOWN_ERRORS = {("mlp", "vmap"): "ZeroTensors are immutable"}
SHARED_MACHINE_NOTE = (
    "2-core VM shared with other jobs while measuring: timings are noisy and pessimistic; see load_average_start/end"
)
MEMORY_KS = (5, 20, 100)
# "maml": second-order MAML by autograd through the unrolled inner loop (meta_gradient="unroll"), the baseline
# whose memory grows with k; "maml_hvp": the same meta-gradient by reverse Hessian-vector products
# (meta_gradient="hvp", conv nets only), which keeps no graph.
MEMORY_ALGOS = ("imaml", "maml", "maml_hvp", "imaml_loop")
MEMORY_REPEATS = 3
# Allocator settings of the memory workers. "glibc": the defaults, what a user gets. "mmap128k": every allocation of
# 128 KiB or more is its own mmap, returned to the system when freed, so the RSS follows the live tensors. With the
# defaults glibc raises its mmap threshold after freeing large blocks (up to 32 MiB), serves later ones from the
# heap, and the heap's fragmentation depends on the allocation history: measured on the conv net, iMAML's peak
# increment was 211 MiB at k = 5 and 286 MiB at k = 100 with the defaults, 133.4 and 133.7 MiB with mmap128k.
ALLOCATORS: dict[str, dict[str, str]] = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MetaStep = Callable[[], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class IWorkload(Workload):
    """bench_maml's Workload (network, episode, inner loop) plus iMAML's proximal weight and CG iterations."""

    lam: float = 2.0
    cg_steps: int = 5

    @property
    def label(self) -> str:
        return f"{super().label}, lam={self.lam:g}, {self.cg_steps} CG"


def paper_workloads() -> list[IWorkload]:
    """Issue 5's configurations."""
    return [
        IWorkload("sinusoid", "mlp", num_tasks=25, inner_steps=5, inner_lr=0.01),
        IWorkload("conv", "conv", num_tasks=8, inner_steps=5, inner_lr=0.1),
    ]


def tiny_workloads() -> list[IWorkload]:
    """Small versions for the test: T = 2, 3 inner steps, a 3-block conv net with 4 channels on 8x8 inputs; the
    inner rates are larger, so the inner loop moves phi far from theta and H differs from its value at theta."""
    return [
        IWorkload("tiny_sinusoid", "mlp", num_tasks=2, inner_steps=3, inner_lr=0.05, shots=5, queries=5),
        IWorkload(
            "tiny_conv",
            "conv",
            num_tasks=2,
            inner_steps=3,
            inner_lr=0.4,
            ways=3,
            queries_per_class=2,
            channels=4,
            blocks=3,
            image_size=8,
        ),
    ]


def memory_test_workloads() -> list[IWorkload]:
    """For the memory harness's test: an MLP wide enough (1-256-256-1, 50 points, T = 8) that second-order MAML's
    per-step graph (~MBs) stands out of allocator noise within a second or two."""
    return [
        IWorkload(
            "mem_mlp", "mlp", num_tasks=8, inner_steps=5, inner_lr=0.001, sizes=(1, 256, 256, 1), shots=50, queries=50
        )
    ]


def all_workloads() -> dict[str, IWorkload]:
    return {w.name: w for w in paper_workloads() + tiny_workloads() + memory_test_workloads()}


# --- metakernels -----------------------------------------------------------------------------------------------


def imaml_class() -> tuple[type | None, str | None]:
    """metakernels.iMAML, imported when first needed (its learner may not exist in this checkout yet)."""
    cls = getattr(metakernels, "iMAML", None)
    if cls is not None:
        return cls, None
    try:
        from metakernels.learners.imaml import iMAML
    except Exception as exc:
        return None, f"metakernels.iMAML not importable: {type(exc).__name__}: {exc}"
    return iMAML, None


def build_metakernels(model: nn.Module, w: IWorkload, batch: Batch, negative_curvature: str = "stop") -> MetaStep:
    """metakernels.iMAML(...).meta_loss(...).backward(), tol=0.0 (see the module docstring); negative_curvature
    "stop" (the default, passed only when it is not, so an older iMAML without the option still runs)."""
    cls, why = imaml_class()
    if cls is None:
        raise ImportError(why)
    options = {} if negative_curvature == "stop" else {"negative_curvature": negative_curvature}
    learner = cls(
        model,
        inner_lr=w.inner_lr,
        inner_steps=w.inner_steps,
        lam=w.lam,
        cg_steps=w.cg_steps,
        loss_fn=w.loss_fn,
        tol=0.0,
        **options,
    )

    def step() -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        loss = learner.meta_loss(*batch)
        loss.backward()
        step.learner = learner
        return loss.detach()

    return step


def build_metakernels_continue(model: nn.Module, w: IWorkload, batch: Batch) -> MetaStep:
    """metakernels.iMAML with negative_curvature="continue": plain CG through p^T A p < 0, as the peers run it."""
    return build_metakernels(model, w, batch, negative_curvature="continue")


BUILDERS: dict[str, Callable[[nn.Module, IWorkload, Batch], MetaStep]] = {
    **peers.BUILDERS,
    "metakernels": build_metakernels,
    "metakernels_continue": build_metakernels_continue,
}


def unavailable(impl: str) -> str | None:
    """Why impl cannot run here, or None."""
    if impl in OURS:
        return imaml_class()[1]
    peer = peers.PEER_OF.get(impl)
    return None if peer is None else import_peer(peer)[1]


def run_once(
    impl: str, base: nn.Module, w: IWorkload, batch: Batch, builders: dict | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], MetaStep]:
    """One meta-step of impl on a private copy of base: (meta-loss, meta-gradient, the step closure)."""
    model = copy.deepcopy(base)
    step = (builders or BUILDERS)[impl](model, w, batch)
    loss = step()
    return loss, meta_gradient(model), step


def _solver_report(step: MetaStep) -> dict:
    """What the step's solver says about itself: the loop's smallest curvature, metakernels' CG summary."""
    out: dict = {}
    stats = getattr(step, "stats", None)
    if stats:
        out.update(stats)
    learner = getattr(step, "learner", None)
    solve = getattr(learner, "last_solve", None) if learner is not None else None
    if solve is not None:
        try:
            out["cg_summary"] = solve.summary()
            out["cg_max_relative_residual"] = float(solve.relative_residual.max())
            out["cg_iterations"] = [int(i) for i in solve.iterations.flatten().tolist()]
        except Exception as exc:  # a learner whose report differs from the contract: say so, do not fail the check
            out["cg_summary"] = f"unreadable last_solve: {type(exc).__name__}: {exc}"
    return out


# --- cross-check -----------------------------------------------------------------------------------------------


def cross_check(
    workloads: Sequence[IWorkload],
    impls: Sequence[str],
    dtype: torch.dtype = torch.float64,
    rtol: float = CHECK_RTOL,
    builders: dict | None = None,
) -> list[dict]:
    """Every implementation's meta-loss and meta-gradient against the loop's: same weights, same data.

    Two references run: "loop" (the definition: CG carries on through non-positive curvature) and "loop_stop"
    (CG stops a task on p^T A p <= 0 and keeps its iterate: the rule notes/imaml_api.md gives metakernels'
    batched CG by default). They coincide where CG meets no non-positive curvature. Each implementation is judged
    against its own reference (REFERENCE_OF: metakernels against loop_stop; metakernels_continue, which runs
    plain CG, and the peers against loop); both deviations are recorded.

    Args:
        workloads: configurations to check (built in ``dtype``).
        impls: implementation names ("loop" always runs first).
        dtype: the precision of the check.
        rtol: agreement threshold on the relative deviation of the meta-gradient and of the meta-loss.
        builders: implementation name -> builder (default BUILDERS; the test adds a deliberately wrong one).

    Returns:
        One row per (workload, implementation): loss, grad_scale, grad_rel_dev (vs loop),
        grad_rel_dev_vs_loop_stop, reference (the one judged against), ref_grad_rel_dev, loss_rel_dev, agrees
        (None when the implementation is unavailable or raised: see ``error``), and what the solver reported
        (the loop's min_cg_curvature and tasks_nonpositive_curvature; metakernels' CG summary). The loop's row
        also has stop_rule_rel_dev: how far the two references are apart.
    """
    builders = builders or BUILDERS
    rows = []
    for w in workloads:
        base, batch = w.make_model(dtype), w.make_batch(dtype)
        ref = {name: run_once(name, base, w, batch, {**builders, **CHECK_ONLY}) for name in ("loop", "loop_stop")}
        for impl in impls:
            row = {
                "section": "check",
                "workload": w.name,
                "net": w.net,
                "T": w.num_tasks,
                "dtype": str(dtype).split(".")[-1],
                "impl": impl,
                "reference": REFERENCE_OF.get(impl, REFERENCE),
                "error": None,
                "agrees": None,
            }
            why = unavailable(impl) if impl in BUILDERS else None
            if why is not None:
                rows.append({**row, "error": f"unavailable: {why}"})
                continue
            try:
                loss, grads, step = ref["loop"] if impl == REFERENCE else run_once(impl, base, w, batch, builders)
            except Exception as exc:  # reported (and fatal in main unless documented), not raised here
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
                continue
            dev = {name: deviation(grads, r[1])["rel"] for name, r in ref.items()}
            ref_loss = ref[row["reference"]][0].item()
            loss_rel = abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-300)
            row.update(
                loss=loss.item(),
                grad_scale=deviation(grads, grads)["scale"],
                grad_rel_dev=dev["loop"],
                grad_rel_dev_vs_loop_stop=dev["loop_stop"],
                ref_grad_rel_dev=dev[row["reference"]],
                loss_rel_dev=loss_rel,
                agrees=bool(dev[row["reference"]] <= rtol and loss_rel <= rtol),
                **_solver_report(step),
            )
            if impl == REFERENCE:
                row["stop_rule_rel_dev"] = dev["loop_stop"]
            rows.append(row)
        gc.collect()
    return rows


def check_workloads(workloads: Sequence[IWorkload], check_tasks: int) -> tuple[list[IWorkload], dict[str, str]]:
    """The conv workloads with at most check_tasks tasks (the code path does not depend on T); for each given
    workload, the name of the check that covers it."""
    out, covers = [], {}
    for w in workloads:
        c = w.with_tasks(min(w.num_tasks, check_tasks)) if w.net == "conv" else w
        if c.num_tasks != w.num_tasks:
            c = dataclasses.replace(c, name=f"{w.name}@T{c.num_tasks}")
        out.append(c)
        covers[w.name] = c.name
    return out, covers


def check_failures(rows: Sequence[dict]) -> list[str]:
    """Undocumented disagreements and errors of the cross-check: each makes main() exit with status 1."""
    bad = []
    for r in rows:
        if r["section"] != "check" or str(r.get("error") or "").startswith("unavailable"):
            continue
        key = (r["net"], r["impl"])
        if r.get("error"):
            if not (key in KNOWN_ERRORS and KNOWN_ERRORS[key] in r["error"]):
                bad.append(f"{r['workload']}/{r['impl']}: {r['error']}")
        elif not r["agrees"] and key not in KNOWN_WRONG:
            bad.append(
                f"{r['workload']}/{r['impl']}: meta-gradient relative deviation from {r['reference']} "
                f"{r['ref_grad_rel_dev']:.2e}, loss {r['loss_rel_dev']:.2e} (tolerance {CHECK_RTOL:g})"
            )
    return bad


# --- timing ----------------------------------------------------------------------------------------------------


def _stats(samples: list[float]) -> dict:
    q1, q3 = (
        (statistics.quantiles(samples, n=4, method="inclusive")[i] for i in (0, 2))
        if len(samples) > 1
        else (samples[0], samples[0])
    )
    return {
        "median_ms": statistics.median(samples),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": min(samples),
        "max_ms": max(samples),
        "reps": len(samples),
    }


def time_interleaved(steps: dict[str, MetaStep], plan: RepPlan) -> tuple[dict[str, dict], list[dict[str, float]]]:
    """Warm-up of each step, then rounds in which every step runs once (the order rotated each round), so a
    change of the machine's load (other jobs share its 2 cores) hits every implementation alike.

    Returns:
        Per implementation the median, quartiles, min, max in ms and the count; and the per-round times.
    """
    last: dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(plan.warmup):
            t0 = time.perf_counter()
            step()
            last[name] = time.perf_counter() - t0
    per_round = max(sum(last.values()), 1e-6)
    reps = max(plan.min_reps, min(plan.max_reps, int(plan.budget_s * len(steps) / per_round)))
    names = list(steps)
    rounds: list[dict[str, float]] = []
    for i in range(reps):
        times = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name] = (time.perf_counter() - t0) * 1e3
        rounds.append(times)
    out = {name: {**_stats([r[name] for r in rounds]), "warmup": plan.warmup} for name in names}
    return out, rounds


def bench_workload(w: IWorkload, impls: Sequence[str], threads: int, quick: bool, checked: dict) -> list[dict]:
    """Timing rows of every implementation on one workload at one thread count (float32), interleaved (see
    time_interleaved). The first (untimed) call's meta-gradient is compared with the float32 loop's, for
    information."""
    torch.set_num_threads(threads)
    base, batch = w.make_model(torch.float32), w.make_batch(torch.float32)
    plan = rep_plan(w, quick)
    rows: dict[str, dict] = {}
    steps: dict[str, MetaStep] = {}
    ref_grads = None
    for impl in impls:
        row = {
            "section": "timing",
            "workload": w.name,
            "label": w.label,
            "net": w.net,
            "T": w.num_tasks,
            "inner_steps": w.inner_steps,
            "cg_steps": w.cg_steps,
            "lam": w.lam,
            "threads": threads,
            "dtype": "float32",
            "impl": impl,
            "error": None,
            "agrees_float64": checked.get((w.name, impl)),
        }
        rows[impl] = row
        why = unavailable(impl)
        if why is not None:
            row["error"] = f"unavailable: {why}"
            continue
        model = copy.deepcopy(base)
        try:
            step = BUILDERS[impl](model, w, batch)
            loss = step()
            grads = meta_gradient(model)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  [{threads} thr] {w.name:10} {impl:12} error: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if impl == REFERENCE:
            ref_grads = grads
        row["fp32_grad_rel_dev_vs_loop"] = deviation(grads, ref_grads)["rel"] if ref_grads is not None else None
        row["loss"] = loss.item()
        steps[impl] = step
    if steps:
        timings, rounds = time_interleaved(steps, plan)
        for impl, timing in timings.items():
            rows[impl].update(**timing, load_1m_after=os.getloadavg()[0])
            print(
                f"  [{threads} thr] {w.name:10} {impl:12} {timing['median_ms']:10.2f} ms  "
                f"(IQR {timing['iqr_ms']:.2f}, {timing['reps']} interleaved reps)",
                flush=True,
            )
    out = list(rows.values())
    add_ratios(out, rounds if steps else [])
    del steps
    gc.collect()
    return out


def add_ratios(rows: list[dict], rounds: Sequence[dict[str, float]] = ()) -> None:
    """On every timed row, ratio_vs_fastest_peer = fastest peer's median / this median (> 1: faster than every
    peer); the fastest peer is the quickest of the peers (not metakernels) that did not fail the float64 check.
    With the interleaved rounds, also round_ratio_vs_fastest_peer: the median over rounds of (that peer's time /
    this time) in the same round (less sensitive to load changes between rounds)."""
    timed = [r for r in rows if r.get("median_ms") is not None]
    peers_ok = [r for r in timed if r["impl"] not in OURS and r.get("agrees_float64") is not False]
    if not peers_ok:
        return
    fastest = min(peers_ok, key=lambda r: r["median_ms"])
    for r in timed:
        r["fastest_peer"] = fastest["impl"]
        r["ratio_vs_fastest_peer"] = fastest["median_ms"] / r["median_ms"]
        per_round = [rd[fastest["impl"]] / rd[r["impl"]] for rd in rounds if r["impl"] in rd and fastest["impl"] in rd]
        if per_round:
            r["round_ratio_vs_fastest_peer"] = statistics.median(per_round)


# --- memory ----------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Resets the high-water mark (VmHWM, which ru_maxrss follows) to the current RSS (Linux >= 4.0:
    /proc/self/clear_refs "5"). Without it the imports' transient peak (~70 MiB above the settled RSS, measured)
    masks the meta-steps' peak of an algorithm whose memory is flat."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: sets up one (workload, algorithm, k), then spec["steps"] meta-steps.

    Returns:
        peak_process_bytes (ru_maxrss at the end without the reset: the whole process's peak, imports included),
        rss_setup_bytes (VmRSS after imports, model, data, learner), peak_steps_bytes (VmHWM over the meta-steps,
        reset to the RSS at the start of them), increment_bytes = peak_steps - rss_setup, hwm_reset (whether the
        reset worked; without it peak_steps is the whole process's peak), and the median seconds per meta-step.
    """
    torch.set_num_threads(spec["threads"])
    w = dataclasses.replace(all_workloads()[spec["workload"]], inner_steps=spec["k"])
    model, batch = w.make_model(torch.float32), w.make_batch(torch.float32)
    algo = spec["algo"]
    if algo == "imaml":
        step = build_metakernels(model, w, batch)
    elif algo in ("maml", "maml_hvp"):
        learner = metakernels.MAML(
            model,
            inner_lr=w.inner_lr,
            inner_steps=w.inner_steps,
            first_order=False,
            loss_fn=w.loss_fn,
            meta_gradient="unroll" if algo == "maml" else "hvp",
        )

        def step() -> torch.Tensor:
            learner.meta_loss(*batch).backward()

    elif algo == "imaml_loop":
        step = peers.build_loop(model, w, batch)
    else:
        raise ValueError(f"memory_worker: unknown algorithm {algo!r}; expected one of {MEMORY_ALGOS}")
    gc.collect()
    peak_setup = _max_rss_bytes()
    hwm_reset = _reset_peak()
    rss_setup = _status_bytes("VmRSS")
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_steps = _status_bytes("VmHWM")
    times.sort()
    return {
        "peak_process_bytes": max(peak_setup, _max_rss_bytes()),
        "peak_setup_bytes": peak_setup,
        "rss_setup_bytes": rss_setup,
        "peak_steps_bytes": peak_steps,
        "increment_bytes": peak_steps - rss_setup,
        "hwm_reset": hwm_reset,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "median_step_s": times[len(times) // 2],
    }


def run_memory_case(spec: dict, timeout_s: float, allocator: str = "glibc") -> dict:
    """memory_worker(spec) in a fresh interpreter with the allocator's environment: (its result or its error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATORS[allocator])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def run_memory(
    workloads: Sequence[IWorkload],
    algos: Sequence[str],
    ks: Sequence[int],
    steps: int,
    cap_bytes: float,
    threads: int = 1,
    timeout_s: float = 3600.0,
    allocators: Sequence[str] = ("glibc",),
    repeats: int = 1,
) -> list[dict]:
    """``repeats`` subprocesses per (workload, allocator, algorithm, k), k ascending; a run whose increment,
    extrapolated linearly from the two smallest k measured, would exceed cap_bytes is skipped and reported as
    capped. With glibc's defaults identical processes differ by up to ~15% in peak RSS (heap fragmentation
    depends on timing: measured 172 and 199 MiB for the same conv iMAML k=5 run), so each figure is the median
    over the repeats, and the row keeps every repeat's value (peak_mib_runs, increment_mib_runs).

    Returns:
        One row per case: peak_mib, increment_mib, rss_setup_mib, median_step_s (or error / capped).
    """
    rows = []
    ks = sorted(ks)
    bad = [a for a in allocators if a not in ALLOCATORS]
    if bad:
        raise ValueError(f"run_memory: unknown allocators {bad}; expected some of {list(ALLOCATORS)}")
    for w, allocator, algo in ((w, a, g) for w in workloads for a in allocators for g in algos):
        why = unavailable("metakernels") if algo in ("imaml", "maml_hvp") else None
        if why is None and algo == "maml_hvp" and w.net != "conv":
            why = "meta_gradient='hvp' applies to conv nets (MLPs keep the fused double-backward kernel)"
        measured: list[tuple[int, float]] = []
        for k in ks:
            row = {"section": "memory", "workload": w.name, "label": w.label, "algo": algo,
                   "allocator": allocator, "k": k, "steps": steps, "threads": threads, "error": None}  # fmt: skip
            if why is not None:
                rows.append({**row, "error": f"unavailable: {why}"})
                continue
            if len(measured) >= 2:
                (k0, m0), (k1, m1) = measured[:2]
                predicted = m1 + (m1 - m0) / (k1 - k0) * (k - k1)
                row["predicted_increment_mib"] = predicted / 2**20
                if predicted > cap_bytes:
                    row["error"] = (
                        f"capped: increment extrapolated from k={k0},{k1} is {predicted / 2**30:.1f} GiB "
                        f"> --memory-cap-gb {cap_bytes / 2**30:g}"
                    )
                    rows.append(row)
                    print(f"  {w.name:10} {allocator:8} {algo:11} k={k:4}  {row['error']}", flush=True)
                    continue
            spec = {"workload": w.name, "algo": algo, "k": k, "steps": steps, "threads": threads}
            runs = [run_memory_case(spec, timeout_s, allocator) for _ in range(max(1, repeats))]
            failed = [r for r in runs if "error" in r]
            if failed:
                rows.append({**row, "error": failed[0]["error"]})
                print(f"  {w.name:10} {allocator:8} {algo:11} k={k:4}  error: {failed[0]['error']}", flush=True)
                continue
            res = _median_run(runs)
            row["repeats"] = len(runs)
            row["peak_mib_runs"] = [r["peak_steps_bytes"] / 2**20 for r in runs]
            row["increment_mib_runs"] = [r["increment_bytes"] / 2**20 for r in runs]
            measured.append((k, res["increment_bytes"]))
            row.update(
                peak_mib=res["peak_steps_bytes"] / 2**20,
                increment_mib=res["increment_bytes"] / 2**20,
                rss_setup_mib=res["rss_setup_bytes"] / 2**20,
                peak_process_mib=res["peak_process_bytes"] / 2**20,
                peak_setup_mib=res["peak_setup_bytes"] / 2**20,
                hwm_reset=res["hwm_reset"],
                malloc_env=res["malloc_env"],
                median_step_s=res["median_step_s"],
            )
            rows.append(row)
            print(
                f"  {w.name:10} {allocator:8} {algo:11} k={k:4}  peak {row['peak_mib']:8.1f} MiB  increment "
                f"{row['increment_mib']:8.1f} MiB  ({row['median_step_s']:.3f} s/step)",
                flush=True,
            )
    add_growth(rows)
    return rows


def _median_run(runs: Sequence[dict]) -> dict:
    """Field by field, the median of the numeric fields over repeated runs (the first run's other fields)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def add_growth(rows: list[dict]) -> None:
    """growth_increment / growth_peak on each (workload, algo)'s largest-k row: value at that k over the value
    at the smallest k (both measured)."""

    def key(r: dict) -> tuple:
        return r["workload"], r.get("allocator", "glibc"), r["algo"]

    for group in dict.fromkeys(key(r) for r in rows if r["section"] == "memory"):
        ok = sorted((r for r in rows if key(r) == group and r.get("peak_mib") is not None), key=lambda r: r["k"])
        if len(ok) < 2:
            continue
        lo = ok[0]
        for r in ok[1:]:
            r[f"growth_peak_vs_k{lo['k']}"] = r["peak_mib"] / lo["peak_mib"]
            r[f"growth_increment_vs_k{lo['k']}"] = r["increment_mib"] / max(lo["increment_mib"], 1e-9)


def memory_table(rows: Sequence[dict]) -> str:
    """Markdown: rows (workload, algorithm); per k the raw peak / increment in MiB; the growth largest/smallest k."""
    mem = [r for r in rows if r["section"] == "memory"]
    ks = sorted(dict.fromkeys(r["k"] for r in mem))
    if not ks:
        return ""
    head = "| workload | allocator | algorithm | " + " | ".join(f"k={k}: peak / incr. MiB" for k in ks)
    head += f" | growth k={ks[-1]}/k={ks[0]} (peak, increment) |"
    lines = [head, "|" + " --- |" * (len(ks) + 4)]

    def key(r: dict) -> tuple:
        return r["workload"], r.get("allocator", "glibc"), r["algo"]

    for group in dict.fromkeys(key(r) for r in mem):
        by_k = {r["k"]: r for r in mem if key(r) == group}
        cells = []
        for k in ks:
            r = by_k.get(k)
            if r is None:
                cells.append("-")
            elif r.get("peak_mib") is None:
                err = str(r.get("error"))
                cells.append("capped" if err.startswith("capped") else ("n/a" if "unavailable" in err else "error"))
            else:
                cells.append(f"{r['peak_mib']:.0f} / {r['increment_mib']:.1f}")
        last = by_k.get(ks[-1], {})
        gp, gi = last.get(f"growth_peak_vs_k{ks[0]}"), last.get(f"growth_increment_vs_k{ks[0]}")
        growth = f"{gp:.2f}x, {gi:.2f}x" if gp is not None else "-"
        lines.append(f"| {' | '.join(group)} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


# --- output ----------------------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def timing_table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """Markdown: rows (workload, threads); cells median ms; last column metakernels / fastest peer."""
    timing = [r for r in rows if r["section"] == "timing"]
    lines = [
        "| workload | threads | " + " | ".join(impls) + " | metakernels vs fastest peer |",
        "|" + " --- |" * (len(impls) + 3),
    ]
    for wname, threads in dict.fromkeys((r["workload"], r["threads"]) for r in timing):
        by_impl = {r["impl"]: r for r in timing if r["workload"] == wname and r["threads"] == threads}
        label = next(iter(by_impl.values()))["label"]
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r.get("error"):
                cells.append("n/a" if r is None or str(r.get("error", "")).startswith("unavailable") else "error")
                continue
            cells.append(f"{_fmt_ms(r['median_ms'])} ms" + (" (disagrees)" if r.get("agrees_float64") is False else ""))
        mk = by_impl.get("metakernels", {})
        best = "-"
        if mk.get("ratio_vs_fastest_peer"):
            best = f"{mk['ratio_vs_fastest_peer']:.2f}x vs {mk['fastest_peer']}"
            if mk.get("round_ratio_vs_fastest_peer"):
                best += f" (per round {mk['round_ratio_vs_fastest_peer']:.2f}x)"
        lines.append(f"| {label} | {threads} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def check_table(rows: Sequence[dict], impls: Sequence[str]) -> str:
    """Markdown: the float64 cross-check, relative meta-gradient deviation from the loop per implementation."""
    check = [r for r in rows if r["section"] == "check"]
    lines = ["| float64 check (vs loop) | " + " | ".join(impls) + " |", "|" + " --- |" * (len(impls) + 1)]
    for name in dict.fromkeys(r["workload"] for r in check):
        by_impl = {r["impl"]: r for r in check if r["workload"] == name}
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r.get("error"):
                cells.append("n/a" if r is None or str(r.get("error", "")).startswith("unavailable") else "error")
            elif impl == REFERENCE:
                curv, nonpos = r.get("min_cg_curvature", float("nan")), r.get("tasks_nonpositive_curvature", [])
                cells.append(
                    f"reference (min CG curvature {curv:.3g}, {len(nonpos)} tasks <= 0; "
                    f"loop_stop {r['stop_rule_rel_dev']:.1e})"
                )
            else:
                vs = "" if r["reference"] == REFERENCE else f" (vs {r['reference']}; vs loop {r['grad_rel_dev']:.1e})"
                cells.append(f"{r['ref_grad_rel_dev']:.1e}{vs}" + ("" if r["agrees"] else " DISAGREES"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows: Sequence[dict]) -> dict:
    check = [r for r in rows if r["section"] == "check"]
    out: dict = {
        "check_rtol": CHECK_RTOL,
        "check_grad_rel_dev": {f"{r['workload']}/{r['impl']}": r.get("grad_rel_dev", r.get("error")) for r in check},
        "check_failures": check_failures(rows),
        "ratios": {},
    }
    for r in rows:
        if r["section"] == "timing" and r["impl"] in OURS and r.get("ratio_vs_fastest_peer"):
            variant = "" if r["impl"] == "metakernels" else f" ({r['impl']})"
            out["ratios"][f"{r['workload']} @ {r['threads']} thr{variant}"] = {
                "metakernels_ms": r["median_ms"],
                "fastest_peer": r["fastest_peer"],
                "ratio_vs_fastest_peer": r["ratio_vs_fastest_peer"],
                "round_ratio_vs_fastest_peer": r.get("round_ratio_vs_fastest_peer"),
            }
    mem = [r for r in rows if r["section"] == "memory"]
    for r in mem:
        for key in [k for k in r if k.startswith("growth_")]:
            name = f"{r['workload']}/{r.get('allocator', 'glibc')}/{r['algo']} k={r['k']} {key}"
            out.setdefault("memory_growth", {})[name] = r[key]
    return out


def _csv_list(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


def _machine_record() -> dict:
    machine = {"info": M.machine_info(), "note": SHARED_MACHINE_NOTE}
    record_origin(machine["info"])
    return machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny workloads, few repetitions (seconds)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each reported (default 1,2)")
    p.add_argument("--tasks-filter", default=None, help="comma-separated workloads (default: sinusoid,conv)")
    p.add_argument("--impls", default=",".join(IMPL_NAMES))
    p.add_argument("--check-tasks", type=int, default=4, help="tasks in the conv cross-check (default 4)")
    p.add_argument(
        "--mk-reference",
        choices=("loop", "loop_stop"),
        default=REFERENCE_OF["metakernels"],
        help="which loop metakernels must match: loop_stop (CG stops a task on p^T A p <= 0, its contract; default)"
        " or loop (CG carries on)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the float64 cross-check")
    p.add_argument("--no-timing", action="store_true", help="only the cross-check")
    p.add_argument("--memory", action="store_true", help="the peak-memory sweep over k instead of the timing")
    p.add_argument("--memory-ks", default=",".join(map(str, MEMORY_KS)))
    p.add_argument("--memory-algos", default=",".join(MEMORY_ALGOS))
    p.add_argument("--memory-allocators", default=",".join(ALLOCATORS), help=f"some of {list(ALLOCATORS)}")
    p.add_argument("--memory-steps", type=int, default=2, help="meta-steps per memory run (default 2)")
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=MEMORY_REPEATS,
        help=f"processes per memory case, the median reported (default {MEMORY_REPEATS})",
    )
    p.add_argument("--memory-cap-gb", type=float, default=8.0, help="skip runs extrapolated beyond this (GiB)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the 1-minute load average to fall below 0.5",
    )
    p.add_argument("--name", default=None, help="result file name (default imaml / imaml_quick / imaml_memory)")
    args = p.parse_args(argv)

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0

    known = all_workloads()
    default = [w.name for w in (tiny_workloads() if args.quick else paper_workloads())]
    names = _csv_list(args.tasks_filter) if args.tasks_filter else default
    impls = _csv_list(args.impls)
    bad = [n for n in names if n not in known] + [i for i in impls if i not in BUILDERS]
    if bad:
        p.error(f"unknown workload/implementation {bad}; workloads: {list(known)}, implementations: {IMPL_NAMES}")
    workloads = [known[n] for n in names]
    if REFERENCE not in impls:
        impls.insert(0, REFERENCE)
    threads_list = [int(t) for t in _csv_list(args.threads)]
    REFERENCE_OF["metakernels"] = args.mk_reference

    M.wait_for_quiet(args.wait_quiet)
    load_start = os.getloadavg()
    machine = _machine_record()
    versions = peer_versions()
    print(
        f"{machine['info']['cpu_model']} | {machine['info']['logical_cpus']} CPUs | commit "
        f"{machine['info']['git_commit'][:10]}{' (dirty)' if machine['info']['git_dirty'] else ''} | "
        + " | ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)} ({SHARED_MACHINE_NOTE})", flush=True)
    rows: list[dict] = []
    config: dict = {"versions": versions, "torchopt_extension": peers.torchopt_extension_status()}

    if args.memory:
        ks = [int(k) for k in _csv_list(args.memory_ks)]
        algos = _csv_list(args.memory_algos)
        print(
            f"peak RSS, {args.memory_repeats} processes per (workload, algorithm, k) (median), "
            f"{args.memory_steps} meta-steps, 1 thread ..."
        )
        allocators = _csv_list(args.memory_allocators)
        rows += run_memory(
            workloads,
            algos,
            ks,
            args.memory_steps,
            args.memory_cap_gb * 2**30,
            allocators=allocators,
            repeats=args.memory_repeats,
        )
        print("\n" + memory_table(rows))
        config.update(
            memory_ks=ks,
            memory_algos=algos,
            memory_steps=args.memory_steps,
            memory_repeats=args.memory_repeats,
            memory_allocators={a: ALLOCATORS[a] for a in allocators},
            memory_cap_gb=args.memory_cap_gb,
            workloads=[dataclasses.asdict(w) for w in workloads],
            measure="peak = getrusage(RUSAGE_SELF).ru_maxrss of a fresh process; increment = peak - VmRSS after "
            "imports, model, data and learner setup; maml is second-order metakernels.MAML with the same k and "
            "inner lr (no proximal term), imaml_loop the per-task autograd iMAML peer",
        )
        name = args.name or "imaml_memory"
    else:
        if not args.no_check:
            torch.set_num_threads(1)
            print(f"cross-check in float64 against {REFERENCE} (relative tolerance {CHECK_RTOL:g}) ...", flush=True)
            to_check, covers = check_workloads(workloads, args.check_tasks)
            rows += cross_check(to_check, impls)
            print(check_table(rows, impls), flush=True)
            agrees = {(r["workload"], r["impl"]): r["agrees"] for r in rows}
            checked = {(w.name, i): agrees.get((covers[w.name], i)) for w in workloads for i in impls}
        else:
            checked = {}
        if not args.no_timing:
            for threads in threads_list:
                print(f"timing with {threads} torch thread(s) ...", flush=True)
                for w in workloads:
                    rows += bench_workload(w, impls, threads, args.quick, checked)
            print("\nms per iMAML meta-step (meta-loss forward + implicit backward, float32; median)\n")
            print(timing_table(rows, impls))
        config.update(
            quick=args.quick,
            threads=threads_list,
            impls=impls,
            check_tasks=args.check_tasks,
            check_rtol=CHECK_RTOL,
            reference=REFERENCE,
            reference_of=dict(REFERENCE_OF),
            workloads=[dataclasses.asdict(w) for w in workloads],
            known_errors={f"{a}/{b}": v for (a, b), v in KNOWN_ERRORS.items()},
            known_wrong={f"{a}/{b}": v for (a, b), v in KNOWN_WRONG.items()},
            meta_step="iMAML meta-loss forward (k proximal SGD steps, no graph) + backward (CG on I + H/lam, x0 = 0)",
            metakernels_options="tol=0.0 (no early stop), cg_damping=0, lam_damping=0",
        )
        name = args.name or ("imaml_quick" if args.quick else "imaml")

    load_end = os.getloadavg()
    machine["info"]["load_average_start"] = list(load_start)
    machine["info"]["load_average_end"] = list(load_end)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in load_end)}")
    summary = summarise(rows)
    paths = M.write_results(name, machine, config, rows, summary)
    print("wrote", *paths)
    if summary["check_failures"]:
        print("\nCROSS-CHECK FAILED (float64, vs the loop):\n  " + "\n  ".join(summary["check_failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
