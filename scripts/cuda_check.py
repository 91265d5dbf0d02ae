"""Checks and times every Triton kernel of metakernels on a CUDA GPU (or, for a dry run, on the CPU through the
Triton interpreter).

Checks (one line each: op, dtype, shape, max error, tolerance, PASS/FAIL): every op that has a Triton kernel, run on
device copies of the inputs, is compared on the CPU with its float64/working-precision reference
(metakernels/reference/<op>.py) using the comparison helpers and the rounding-error tolerances of tests/test_<op>.py,
imported from there (nothing is re-derived or loosened here). "max err" is the largest |kernel - reference| over the
compared outputs; "tol" is the elementwise tolerance at the element with the worst err/tol ratio, shown as "ratio".
Also torch.library.opcheck on device inputs, and gradcheck/gradgradcheck in float64 on the device for the ops the
tests gradcheck (inner_step, reptile_update, task_linear, mlp_loss_grad, conv_block).

Timing (--bench): medians of >= 20 repetitions timed with CUDA events: inner_step and cg_step against a torch copy
and triad measured in the same run (the HBM roofline), pcgrad against a plain-torch Gram version, conv_block
forward+backward against per-task torch conv + batch_norm + relu + max_pool2d.

Usage:
    METAKERNELS_NO_EXTENSION=1 python scripts/cuda_check.py --bench                # on the GPU machine
    METAKERNELS_NO_EXTENSION=1 python scripts/cuda_check.py --device cpu --quick   # interpreter dry run here
Exits non-zero if any check fails (or errors).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OP_GROUPS = ("inner_step", "cg_step", "reptile_update", "task_linear", "mlp_loss_grad", "conv_block", "pcgrad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cuda: the real kernels; cpu: the Triton interpreter on CPU tensors (dry run)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases (and a tiny bench)")
    parser.add_argument("--bench", action="store_true", help="also run the timing section (after the checks)")
    parser.add_argument("--no-checks", action="store_true", help="skip the checks (timing only)")
    parser.add_argument("--only", choices=OP_GROUPS, action="append", help="run the checks of these ops only")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="op groups checked in parallel subprocesses (default: 7 on cuda, 1 on cpu)",
    )
    parser.add_argument("--json", help="(internal) write this process's check results to this file")
    parser.add_argument("--out", default=None, help="directory for cuda_check.json/.md (default: $OUT or /tmp)")
    parser.add_argument("--commit", default=None, help="git commit to record (the device copy has no .git)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds from the start after which unfinished check processes are stopped and reported "
        "as INCOMPLETE (the results files are still written)",
    )
    return parser.parse_args(argv)


ARGS = parse_args()
# Must precede the first import of triton (it reads TRITON_INTERPRET at import) and of tests/conftest.py, which
# setdefault()s TRITON_INTERPRET=1: on the GPU the real compiler must run.
os.environ["TRITON_INTERPRET"] = "1" if ARGS.device == "cpu" else "0"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
import triton  # noqa: E402

import metakernels  # noqa: E402
from metakernels import _backend  # noqa: E402

DEVICE = torch.device(ARGS.device)
ON_CPU = ARGS.device == "cpu"
if ON_CPU:
    _backend.set_cpu_backend("triton")  # CPU tensors -> the Triton kernels, interpreted
OPS = torch.ops.metakernels

# --- moving inputs to the device and outputs back ----------------------------------------------------------------


def dev(x):
    """x (tensors nested in lists/tuples/dicts) as fresh copies on DEVICE; leaves keep requires_grad."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(DEVICE, copy=True).requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(dev(v) for v in x)
    if isinstance(x, dict):
        return {k: dev(v) for k, v in x.items()}
    return x


def host(x):
    """x as detached CPU copies (strides preserved: .to keeps the layout of dense tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, (list, tuple)):
        return type(x)(host(v) for v in x)
    return x


class DeviceOps:
    """Stands in for torch.ops.metakernels in a test module: runs the op on device copies, returns CPU copies."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.metakernels, name)

        def call(*args):
            out = op(*dev(args))
            assert_on_device(out)
            return host(out)

        return call


def assert_on_device(out) -> None:
    for t in out if isinstance(out, (list, tuple)) else (out,):
        if isinstance(t, torch.Tensor) and t.numel():
            assert t.device.type == DEVICE.type, f"output on {t.device}, expected {DEVICE}"


@contextlib.contextmanager
def patched(module, **attrs):
    saved = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


# --- recording the comparisons the test helpers make ----------------------------------------------------------

RECORDED: list[tuple[float, float | None, float | None]] = []  # (max err, tol at the worst ratio, worst err/tol)


def record(actual, expected, tol) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or e.numel() == 0:
        return
    tol = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(e)
    err = (a - e).abs()
    err = torch.where(torch.isnan(a) & torch.isnan(e), 0.0, err)
    err = torch.nan_to_num(err, nan=math.inf)
    ratio = torch.where(tol > 0, err / tol, torch.where(err > 0, math.inf, 0.0))
    i = int(ratio.reshape(-1).argmax())
    RECORDED.append((float(err.max()), float(tol.reshape(-1)[i]), float(ratio.reshape(-1)[i])))


def recording(fn: Callable) -> Callable:
    """Wraps a test module's assert_within(actual, expected, tol, what): records, then asserts as before."""

    def wrapper(actual, expected, tol, what, *rest, **kwargs):
        record(actual, expected, tol)
        return fn(actual, expected, tol, what, *rest, **kwargs)

    return wrapper


def recording_close64(fn: Callable) -> Callable:
    """test_conv_block.close64(actual, expected, what): rtol 1e-10, atol 1e-10 * max(1, max|expected|)."""

    def wrapper(actual, expected, what):
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        record(actual, expected, 1e-10 * scale + 1e-10 * expected.double().abs())
        return fn(actual, expected, what)

    return wrapper


# --- the check runner ----------------------------------------------------------------------------------------


class Skip(Exception):
    """A case that cannot be checked as constructed (said so in the output; never counted as a pass)."""


RESULTS: list[dict] = []


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "-"


def run_check(op: str, what: str, dtype, shape, fn: Callable[[], object]) -> None:
    RECORDED.clear()
    t0 = time.perf_counter()
    status, message = "PASS", ""
    try:
        fn()
    except Skip as exc:
        status, message = "SKIP", str(exc)
    except AssertionError as exc:
        status, message = "FAIL", str(exc) or traceback.format_exc(limit=3)
    except Exception as exc:  # an op that raised: a failure too, with its cause
        status, message = "ERROR", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    seconds = time.perf_counter() - t0
    err = max((r[0] for r in RECORDED), default=None)
    worst = max((r for r in RECORDED if r[2] is not None), key=lambda r: r[2], default=None)
    row = dict(
        op=op,
        check=what,
        dtype=dtype_name(dtype),
        shape=str(shape),
        max_err=err,
        tol=worst[1] if worst else None,
        ratio=worst[2] if worst else None,
        status=status,
        message=message[:2000],
        seconds=round(seconds, 3),
    )
    RESULTS.append(row)
    if ARGS.json:  # a child process: one JSON line per check, so a process killed at the deadline keeps its rows
        with open(ARGS.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(format_row(row), flush=True)
    if status in ("FAIL", "ERROR"):
        print("    " + message.strip().replace("\n", "\n    "), flush=True)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_row(row: dict) -> str:
    return (
        f"{row['op']:<15} {row['check']:<34} {row['dtype']:<8} {row['shape']:<24} err={fmt(row['max_err'])} "
        f"tol={fmt(row['tol'])} ratio={fmt(row['ratio'])} {row['status']} ({row['seconds']:.1f}s)"
    )


def sizes() -> list[tuple[int, int]]:
    """(T, P): tasks 1 and 5; sizes 1, 127 (no vector width or block divides it) and 300007 (a prime, many blocks
    plus a masked tail)."""
    if ARGS.quick:
        return [(1, 1), (5, 127)]
    return [(1, 1), (5, 1), (1, 127), (5, 127), (1, 300007), (5, 300007)]


DTYPES = [torch.float32, torch.float64]


def gradchecks(fn, inputs, full_second: bool = True) -> None:
    """gradcheck and gradgradcheck on the device in float64; full Jacobians on the GPU, projected ones (fast mode,
    as the tests do for the interpreter) on the CPU dry run. full_second=False: gradgradcheck in fast mode
    everywhere, as the tests do for the ops whose second derivative is a reference composition."""
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=ON_CPU)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=ON_CPU or not full_second)


# --- inner_step ---------------------------------------------------------------------------------------------------


def checks_inner_step() -> None:
    import test_inner_step as TI

    variants = [
        ("scalar", None, 0.0, 0.0),
        ("per_coordinate", "shared", 0.7, -0.05),
        ("segmented", "per_task", 0.7, -0.05),
        ("segmented_empty", "shared", 0.0, 0.1),
    ]
    if ARGS.quick:
        variants = variants[1:3]
    with patched(TI, assert_within=recording(TI.assert_within)):
        for t, p in sizes():
            for dtype in DTYPES:
                for lr_mode, t0_mode, prox, wd in variants:
                    case = TI.make_case(t, p, dtype, lr_mode, t0_mode, prox, wd, seed=p + t)
                    label = f"{lr_mode}/theta0={t0_mode}"

                    def forward(case=case):
                        out = metakernels.inner_step(*dev((case.theta, case.grad, case.lr)), **dev(case.kwargs()))
                        assert_on_device(out)
                        TI.check_forward(host(out), case)

                    def backward(case=case):
                        grad_out = TI.random_like(case.theta, seed=case.theta.shape[1] + 1)
                        outs = OPS.inner_step_backward(*dev((grad_out, *case.args(), TI.FULL_MASK)))
                        assert_on_device(outs)
                        TI.check_backward(host(outs), case, grad_out)

                    def out_in_place(case=case):
                        buf = dev(case.theta)
                        OPS.inner_step_out(buf, *dev(case.args()[1:]), buf)
                        TI.check_forward(host(buf), case, "inner_step_out (in place)")

                    run_check("inner_step", f"fwd {label}", dtype, (t, p), forward)
                    run_check("inner_step", f"bwd {label}", dtype, (t, p), backward)
                    if lr_mode == "per_coordinate":
                        run_check("inner_step", f"out= in place {label}", dtype, (t, p), out_in_place)

    modes = TI.GRADCHECK_MODES[:2] if ARGS.quick else TI.GRADCHECK_MODES
    for lr_mode, t0_mode in modes:
        names = [n for n in TI.DIFFERENTIABLE if n != "theta0" or t0_mode is not None]
        run_check(
            "inner_step",
            f"gradcheck {lr_mode}/theta0={t0_mode}",
            torch.float64,
            (2, 3),
            lambda lr_mode=lr_mode, t0_mode=t0_mode, names=names: inner_gradcheck(TI, lr_mode, t0_mode, names),
        )
    if not ARGS.quick:
        for names, t0_mode in [(("theta",), "shared"), (("lr",), "per_task"), (("grad", "theta0"), "per_task")]:
            run_check(
                "inner_step",
                f"gradcheck masked {'+'.join(names)}",
                torch.float64,
                (2, 3),
                lambda names=names, t0_mode=t0_mode: inner_gradcheck(TI, "segmented_empty", t0_mode, names),
            )
        run_check(
            "inner_step",
            "gradcheck identity d_theta",
            torch.float64,
            (2, 3),
            lambda: inner_gradcheck(TI, "per_coordinate", "per_task", ("theta", "grad", "lr", "theta0"), 0.0, 0.0),
        )
    for lr_mode, t0_mode in [("scalar", None), ("segmented_empty", "shared")]:
        for requires_grad in (False, True):
            run_check(
                "inner_step",
                f"opcheck {lr_mode} rg={requires_grad}",
                torch.float64,
                (2, 5),
                lambda lr_mode=lr_mode, t0_mode=t0_mode, rg=requires_grad: inner_opcheck(TI, lr_mode, t0_mode, rg),
            )


def inner_gradcheck(TI, lr_mode, t0_mode, names, prox=0.6, weight_decay=0.15) -> None:
    case = TI._gradcheck_case(lr_mode, t0_mode, names, prox, weight_decay)
    d = replace(case, **{f: dev(getattr(case, f)) for f in ("theta", "grad", "lr", "segment_offsets", "theta0")})

    def fn(*xs):
        return OPS.inner_step(*replace(d, **dict(zip(names, xs, strict=True))).args())

    gradchecks(fn, tuple(getattr(d, n) for n in names))


def inner_opcheck(TI, lr_mode, t0_mode, requires_grad) -> None:
    case = TI.make_case(2, 5, torch.float64, lr_mode, t0_mode, 0.3, 0.1, seed=14)
    if requires_grad:
        case = TI.with_grad(case, TI.DIFFERENTIABLE)
    args = dev(case.args())
    torch.library.opcheck(OPS.inner_step.default, args)
    grad_out = dev(TI.random_like(case.theta, seed=15).requires_grad_(requires_grad))
    for mask in (TI.FULL_MASK, [False, True, False, True]):
        torch.library.opcheck(OPS.inner_step_backward.default, (grad_out, *args, mask))
    torch.library.opcheck(OPS.inner_step_out.default, (*args, torch.empty_like(args[0].detach())))


# --- cg_step ---------------------------------------------------------------------------------------------------


def checks_cg_step() -> None:
    import test_cg_step as TC

    from metakernels.ops import cg_step
    from metakernels.reference.cg_step import cg_step as reference_cg_step

    def one(before, stop):
        state = dev(before)
        cg_step(*state, stop_on_negative_curvature=stop)
        assert_on_device(state)
        after = host(state)
        # the numbers for the report (the pass/fail decision is TC.check's)
        expected = TC.clone(before)
        reference_cg_step(*expected, stop)
        tols = TC.tolerances(before, expected)
        stepped = expected[6] != before[6]
        for i in range(3):
            if stepped.any():
                record(after[i][stepped], expected[i][stepped], tols[i][stepped])
        if stepped.any():
            record(after[4][stepped], expected[4][stepped], tols[3][stepped])
        TC.check(after, before, stop=stop)

    cases = []
    for t, p in sizes():
        if t == 5:
            cases.append((len(TC.KINDS), p, None))  # every kind of task once (7 tasks)
        cases.append((t, p, ["step", "negative", "converges", "nonfinite", "breakdown"][:t]))
    for num_tasks, p, kinds in cases:
        for dtype in TC.DTYPES:
            for stop in TC.RULES:
                before = TC.make_state(num_tasks, p, dtype, seed=p + num_tasks, kinds=kinds)
                run_check(
                    "cg_step",
                    f"step {'stop' if stop else 'continue'}",
                    dtype,
                    (num_tasks, p),
                    lambda before=before, stop=stop: one(before, stop),
                )
    for stop in (None, True, False):

        def opcheck(stop=stop):
            state = dev(TC.make_state(len(TC.KINDS), 13, torch.float64, seed=5))
            torch.library.opcheck(OPS.cg_step.default, tuple(state) if stop is None else (*state, stop))

        run_check("cg_step", f"opcheck stop={stop}", torch.float64, (7, 13), opcheck)


# --- reptile_update -------------------------------------------------------------------------------------------


def checks_reptile_update() -> None:
    import test_reptile_update as TR

    with patched(TR, assert_within=recording(TR.assert_within)):
        for t, p in sizes():
            for dtype in DTYPES:
                for eps in (0.25, -0.5, 1.7):
                    theta, fast = TR.make_inputs(t, p, dtype, seed=p + t)

                    def fn(theta=theta, fast=fast, eps=eps):
                        out = metakernels.reptile_update(*dev((theta, fast)), eps)
                        assert_on_device(out)
                        TR.check(host(out), theta, fast, eps)

                    run_check("reptile_update", f"eps={eps}", dtype, (t, p), fn)
    for eps, t in [(0.3, 1), (-0.5, 3)]:

        def gc(eps=eps, t=t):
            theta, fast = dev(TR.make_inputs(t, 4, torch.float64, seed=7))
            gradchecks(lambda th, f: OPS.reptile_update(th, f, eps), (theta.requires_grad_(), fast.requires_grad_()))

        run_check("reptile_update", f"gradcheck eps={eps}", torch.float64, (t, 4), gc)
    for rg in (False, True):

        def oc(rg=rg):
            theta, fast = dev(TR.make_inputs(3, 5, torch.float64, seed=8))
            torch.library.opcheck(OPS.reptile_update.default, (theta.requires_grad_(rg), fast.requires_grad_(rg), 0.3))

        run_check("reptile_update", f"opcheck rg={rg}", torch.float64, (3, 5), oc)


# --- task_linear ---------------------------------------------------------------------------------------------


def checks_task_linear() -> None:
    import test_task_linear as TL

    from metakernels.reference import task_linear as R

    shapes = list(TL.PATH_SHAPES) + [(5, 127, 33, 17), (1, 300, 127, 65)]
    if ARGS.quick:
        shapes = [(1, 1, 1, 1), (4, 7, 13, 3)]
    acts = ["tanh", "relu"] if ARGS.quick else TL.ACTIVATIONS
    with patched(TL, assert_within=recording(TL.assert_within)):
        for shape in shapes:
            for dtype in DTYPES:
                for act in acts:
                    x, weight, bias = TL.make_inputs(*shape, dtype=dtype, seed=2)

                    def fwd(x=x, weight=weight, bias=bias, act=act):
                        out = metakernels.task_linear(*dev((x, weight, bias)), act)
                        assert_on_device(out)
                        TL.check_forward(host(out), x, weight, bias, act)

                    def bwd(x=x, weight=weight, bias=bias, act=act, dtype=dtype):
                        out = R.task_linear(x, weight, bias, act)
                        grad_out = torch.randn(
                            out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
                        ).to(dtype)
                        outs = OPS.task_linear_backward(*dev((grad_out, x, weight, out)), act, TL.FULL_MASK)
                        assert_on_device(outs)
                        TL.check_backward(host(outs), grad_out, x, weight, out, act)

                    run_check("task_linear", f"fwd {act}", dtype, shape, fwd)
                    run_check("task_linear", f"bwd {act}", dtype, shape, bwd)
    combos = (
        [("tanh", True), ("relu", False)] if ARGS.quick else [(a, b) for a in TL.ACTIVATIONS for b in (True, False)]
    )
    for act, with_bias in combos:

        def gc(act=act, with_bias=with_bias):
            x, weight, bias = dev(TL.make_inputs(2, 3, 2, 3, seed=11, bias=with_bias))
            inputs = tuple(t.requires_grad_() for t in (x, weight, bias) if t is not None)
            gradchecks(lambda *ts: OPS.task_linear(ts[0], ts[1], ts[2] if with_bias else None, act), inputs)

        run_check("task_linear", f"gradcheck {act} bias={with_bias}", torch.float64, (2, 3, 2, 3), gc)

    def gc_backward():
        x, weight, _ = TL.make_inputs(2, 2, 3, 2, seed=12)
        out = R.task_linear(x, weight, None, "tanh")
        grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
        inputs = tuple(t.requires_grad_() for t in dev((grad_out, x, weight, out)))
        gradchecks(lambda *ts: OPS.task_linear_backward(*ts, "tanh", TL.FULL_MASK), inputs)

    run_check("task_linear", "gradcheck task_linear_backward", torch.float64, (2, 2, 3, 2), gc_backward)
    for rg, with_bias in [(True, True), (False, False)]:

        def oc(rg=rg, with_bias=with_bias):
            x, weight, bias = TL.make_inputs(2, 3, 4, 5, seed=14, bias=with_bias)
            out = R.task_linear(x, weight, bias, "tanh")
            x, weight, bias, out = dev((x, weight, bias, out))
            x.requires_grad_(rg)
            weight.requires_grad_(rg)
            torch.library.opcheck(OPS.task_linear.default, (x, weight, bias, "tanh"))
            grad_out = torch.randn(out.shape, dtype=torch.float64, device=DEVICE).requires_grad_(rg)
            mask = TL.FULL_MASK if rg else [False, True, False]
            torch.library.opcheck(OPS.task_linear_backward.default, (grad_out, x, weight, out, "tanh", mask))

        run_check("task_linear", f"opcheck rg={rg} bias={with_bias}", torch.float64, (2, 3, 4, 5), oc)


# --- mlp_loss_grad -------------------------------------------------------------------------------------------


def checks_mlp_loss_grad() -> None:
    import test_mlp_loss_grad as TM

    # (tasks, samples, widths, loss): the MAML sinusoid net, a depth-3 net through a width-1 layer, a 7-class head,
    # an awkward sample count, and the benchmarks' larger layers.
    cases = [
        (5, 10, TM.SINUSOID, "mse"),
        (1, 10, [3, 1, 2, 4], "cross_entropy"),
        (5, 7, [5, 13, 7], "cross_entropy"),
        (1, 127, TM.SINUSOID, "mse"),
        (2, 5, [784, 256, 128, 5], "cross_entropy"),
    ]
    acts = TM.ACTIVATIONS
    if ARGS.quick:
        cases, acts = [(1, 5, TM.SINUSOID, "mse"), (2, 3, [3, 1, 2, 4], "cross_entropy")], ["relu", "tanh"]
    with patched(TM, assert_within=recording(TM.assert_within)):
        for tasks, samples, widths, loss in cases:
            for dtype in DTYPES:
                for act in acts:
                    run_check(
                        "mlp_loss_grad",
                        f"{loss} {act} widths={widths}",
                        dtype,
                        (tasks, samples),
                        lambda t=tasks, n=samples, w=widths, ls=loss, a=act, d=dtype: mlp_case(TM, t, n, w, ls, a, d),
                    )
    gc_cases = [("tanh", "mse"), ("relu", "cross_entropy"), ("identity", "mse")]
    for act, loss in gc_cases[:1] if ARGS.quick else gc_cases:

        def gc(act=act, loss=loss):
            widths = [2, 3, 2]
            theta, x, target = dev(TM.make_inputs(2, 2, widths, loss, seed=25))
            diff = [theta.requires_grad_(), x.requires_grad_()] + ([target.requires_grad_()] if loss == "mse" else [])

            def fn(*ts):
                return OPS.mlp_loss_grad(ts[0], ts[1], ts[2] if loss == "mse" else target, widths, act, loss)

            gradchecks(fn, tuple(diff), full_second=False)  # the tests' choice: second derivatives in fast mode

        run_check("mlp_loss_grad", f"gradcheck {act} {loss}", torch.float64, (2, 2), gc)

    def gc_backward():
        widths = [2, 3, 2]
        theta, x, target = TM.make_inputs(2, 2, widths, seed=26)
        v, g_loss = TM.random_like(theta, 27), TM.random_like(theta[:, 0], 28)
        inputs = tuple(t.requires_grad_() for t in dev((g_loss, v, theta, x, target)))
        assert torch.autograd.gradcheck(
            lambda *ts: OPS.mlp_loss_grad_backward(*ts, widths, "tanh", "mse"), inputs, fast_mode=ON_CPU
        )

    run_check("mlp_loss_grad", "gradcheck mlp_loss_grad_backward", torch.float64, (2, 2), gc_backward)

    def oc():
        widths = [3, 4, 2]
        theta, x, target = dev(TM.make_inputs(2, 3, widths, "mse", seed=29))
        torch.library.opcheck(OPS.mlp_loss_grad.default, (theta.requires_grad_(), x, target, widths, "tanh", "mse"))
        theta, x, labels = TM.make_inputs(2, 3, widths, "cross_entropy", seed=30)
        v, g_loss = TM.random_like(theta, 30), TM.random_like(theta[:, 0], 31)
        g_loss, v, theta, x, labels = dev((g_loss, v, theta, x, labels))
        torch.library.opcheck(
            OPS.mlp_loss_grad_backward.default,
            (g_loss, v.requires_grad_(), theta, x, labels, widths, "tanh", "cross_entropy"),
        )
        torch.library.opcheck(
            OPS.mlp_loss_grad_backward.default, (None, v.detach(), theta, x, labels, widths, "relu", "cross_entropy")
        )

    run_check("mlp_loss_grad", "opcheck", torch.float64, (2, 3), oc)


def mlp_case(TM, tasks, samples, widths, loss, act, dtype) -> None:
    seed = 11
    if act == "relu" and dtype == torch.float32:  # as the float32 tests: no hidden unit within rounding of 0
        for seed in range(11, 60):
            theta, x, target = TM.make_inputs(tasks, samples, widths, loss, dtype, seed=seed)
            if TM.min_abs_preactivation(theta, x, widths) > 1e-4:
                break
        else:
            raise Skip("no seed in 11..59 keeps every relu pre-activation 1e-4 away from 0")
    theta, x, target = TM.make_inputs(tasks, samples, widths, loss, dtype, seed=seed)
    outs = OPS.mlp_loss_grad(*dev((theta, x, target)), widths, act, loss)
    assert_on_device(outs)
    TM.check_loss_grad(host(outs), theta, x, target, widths, act, loss)
    v, g_loss = TM.random_like(theta, seed + 1), TM.random_like(theta[:, 0], seed + 2)
    for gl in (g_loss, None):
        got = OPS.mlp_loss_grad_backward(*dev((gl, v, theta, x, target)), widths, act, loss)
        assert_on_device(got)
        TM.check_backward(host(got), gl, v, theta, x, target, widths, act, loss)


# --- conv_block ---------------------------------------------------------------------------------------------


def checks_conv_block() -> None:
    import test_conv_block as TB

    geometries = TB.GEOMETRIES[:2] if ARGS.quick else TB.GEOMETRIES
    with patched(TB, OPS=DeviceOps(), close64=recording_close64(TB.close64)):
        for cin, size, k, stride, padding in geometries:
            for pool in (True, False):
                case = TB.make_case(2, 3, cin, size, 4, k, stride, padding, pool, seed=3)
                shape = (2, 3, cin, *size, f"k{k}s{stride}p{padding}", "pool" if pool else "nopool")
                run_check("conv_block", "fwd", torch.float64, shape, lambda case=case: TB.check_forward(case))
                grad_out = torch.randn(
                    case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(11)
                )
                run_check(
                    "conv_block", "bwd", torch.float64, shape, lambda case=case, g=grad_out: TB.check_backward(case, g)
                )
        # awkward task counts (1 and 5), a wide block (the stored path, 20 channels), a masked backward
        extra = [
            ((1, 2, 3, (7, 5), 4, 3, 1, 1, True), TB.FULL_MASK),
            ((5, 3, 7, (11, 13), 20, 3, 2, 1, True), TB.FULL_MASK),
            ((2, 2, 4, (6, 6), 3, 3, 1, 1, True), [False, True, False, True, True]),
        ]
        for params, mask in extra[:1] if ARGS.quick else extra:
            case = TB.make_case(*params, seed=22)
            grad_out = torch.randn(case.out_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(23))
            shape = (*params[:4], f"cout{params[4]}k{params[5]}s{params[6]}")
            run_check("conv_block", "fwd", torch.float64, shape, lambda case=case: TB.check_forward(case))
            run_check(
                "conv_block",
                f"bwd mask={''.join('1' if m else '0' for m in mask)}",
                torch.float64,
                shape,
                lambda case=case, g=grad_out, m=mask: TB.check_backward(case, g, m),
            )
        f32 = [(2, 2, cin, (9, 9), 17, pool) for cin in (1, 8) for pool in (True, False)] + [
            (5, 2, 8, (9, 9), 17, True),
            (1, 3, 8, (11, 13), 33, True),
        ]
        for tasks, images, cin, size, cout, pool in f32[:2] if ARGS.quick else f32:
            shape = (tasks, images, cin, *size, f"cout{cout}", "pool" if pool else "nopool")
            for part in ("fwd", "bwd"):
                run_check(
                    "conv_block",
                    f"{part} Float32Bounds",
                    torch.float32,
                    shape,
                    lambda a=(tasks, images, cin, size, cout, pool), part=part: conv_float32(TB, *a, part),
                )
    cases = [(1, True, 1), (4, True, 1), (2, False, 2)]
    for cin, pool, stride in cases[:1] if ARGS.quick else cases:

        def gc(cin=cin, pool=pool, stride=stride):
            case = TB.make_case(2, 2, cin, (5, 4), 2, 3, stride, 1, pool, seed=16)
            case.eps = 0.1
            tensors = tuple(None if t is None else dev(t).requires_grad_() for t in case.tensors())
            gradchecks(lambda *ts: metakernels.conv_block(*ts, **case.kwargs()), tensors, full_second=False)

        run_check("conv_block", f"gradcheck cin={cin} pool={pool} s={stride}", torch.float64, (2, 2, cin, 5, 4), gc)
    for cin, rg in [(1, True), (4, True), (4, False)][: 1 if ARGS.quick else 3]:

        def oc(cin=cin, rg=rg):
            case = TB.make_case(2, 2, cin, (6, 5), 3, seed=18)
            args = list(dev(case.args()))
            if rg:
                args[:5] = [None if t is None else t.requires_grad_() for t in args[:5]]
            torch.library.opcheck(OPS.conv_block.default, tuple(args))
            plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
            _, conv_out, mean, invstd = OPS.conv_block(*plain)
            grad_out = torch.randn(case.out_shape(), dtype=torch.float64, device=DEVICE)
            x, w, _, g, bb = plain[:5]
            for mask in (TB.FULL_MASK, [False, True, False, True, False]):
                torch.library.opcheck(
                    OPS.conv_block_backward.default, (grad_out, x, w, g, bb, conv_out, mean, invstd, 1, 1, True, mask)
                )

        run_check("conv_block", f"opcheck cin={cin} rg={rg}", torch.float64, (2, 2, cin, 6, 5), oc)


def conv_float32(TB, tasks, images, cin, size, cout, pool, part: str) -> None:
    """test_float32_within_rounding_bounds on the device. part "fwd": the output against the Float32Bounds forward
    bound (recorded elementwise); "bwd": the gradients against its backward bounds (max errors recorded; the
    bounds are local to Float32Bounds.check_backward, which decides pass/fail)."""
    for seed in range(100, 140):  # as the test: the first seed whose pooling windows all have a clear winner
        case = TB.make_case(tasks, images, cin, size, cout, 3, 1, 1, pool, dtype=torch.float32, seed=seed)
        bounds = TB.Float32Bounds(case)
        if bounds.window_gap_ok():
            break
    else:
        raise Skip("no seed in 100..139 with unambiguous pooling windows")
    out, conv_out, mean, invstd = TB.OPS.conv_block(*case.args())
    assert out.dtype == torch.float32
    if part == "fwd":
        expected = TB.conv_block_reference(*bounds.c64.args())
        record(out, expected, bounds.per_channel(bounds.out_tol).expand_as(expected))
        bounds.check_forward(out)
        return
    grad_out = torch.randn(case.out_shape(), generator=torch.Generator().manual_seed(19))
    x, w, _, g, bb = case.tensors()
    outs = TB.OPS.conv_block_backward(grad_out, x, w, g, bb, conv_out, mean, invstd, 1, 1, pool, TB.FULL_MASK)
    got = dict(zip(TB.NAMES, outs, strict=True))
    exp = TB.reference_grads(bounds.c64, grad_out.double())
    for name, value in got.items():
        if name in exp:
            RECORDED.append((float((value.double() - exp[name]).abs().max()), None, None))
    bounds.check_backward(grad_out, got)


# --- pcgrad ----------------------------------------------------------------------------------------------------


def device_pcgrad(grads, **kwargs):
    args = dev({"grads": grads, **kwargs})
    out = metakernels.pcgrad(**args)
    assert_on_device(out)
    return host(out)


def pcgrad_stage(name: str) -> Callable:
    """A pcgrad stage's Triton kernel: through the op on CUDA (which dispatches there); on the CPU dry run the
    Triton function itself, since the stage ops are not in OP_NAMES and their CPU kernel is the plain-torch one."""
    if ON_CPU:
        from metakernels.triton import pcgrad as triton_pcgrad

        return getattr(triton_pcgrad, name)
    return getattr(OPS, name)


class _PcgradOnDevice:
    pcgrad = staticmethod(device_pcgrad)


def checks_pcgrad() -> None:
    import test_pcgrad as TP

    from metakernels.reference import pcgrad as RP

    def check(grads, orders, mask=None, include_self=False, reduction="sum", eps=0.0):
        if grads.dtype != torch.float64:
            *_, robust = TP.tolerances(grads, orders, mask, include_self, reduction, eps, "triton")
            if not robust:
                raise Skip("a projection decision within rounding of 0 (the tests require robust float32 cases)")
        TP.check(grads, orders, mask, include_self, reduction, eps, backend="triton")

    cases = [
        (1, 1, None, False, "sum"),
        (2, 1, None, False, "sum"),
        (5, 127, None, False, "sum"),
        (5, 127, None, True, "mean"),
        (5, 127, "random", False, "sum"),
        (5, 300007, None, False, "sum"),
        (5, 300007, "heads", True, "mean"),
        (16, 1031, None, False, "sum"),
    ]
    if ARGS.quick:
        cases = cases[:3] + cases[4:5]
    with patched(TP, metakernels=_PcgradOnDevice, assert_within=recording(TP.assert_within)):
        for t, p, mask_kind, include_self, reduction in cases:
            for dtype in DTYPES:
                grads = TP.make_grads(t, p, dtype, seed=t + p)
                mask = None if mask_kind is None else TP.make_mask(p, seed=3, kind=mask_kind)
                label = f"vs per-pair loop mask={mask_kind} self={include_self} {reduction}"
                run_check(
                    "pcgrad",
                    label,
                    dtype,
                    (t, p),
                    lambda g=grads, m=mask, s=include_self, r=reduction, t=t: check(g, TP.make_orders(t, 1), m, s, r),
                )
        if not ARGS.quick:
            run_check(
                "pcgrad",
                "vs per-pair loop T=64",
                torch.float64,
                (64, 517),
                lambda: check(TP.make_grads(64, 517, torch.float64, seed=64), TP.make_orders(64, seed=1)),
            )

        def many_tasks_float32():  # test_many_tasks_float32_is_its_stages, on the device
            grads = TP.make_grads(64, 517, torch.float32, seed=64)
            orders = TP.make_orders(64, seed=1)
            update, weights = device_pcgrad(grads, orders=orders, return_coefficients=True)
            gram = host(pcgrad_stage("pcgrad_gram")(dev(grads), None))
            expected_w = RP.coefficient_recurrence(gram, orders.tolist(), False, 0.0)
            record(weights, expected_w, 1e-12 + 1e-12 * expected_w.abs())
            torch.testing.assert_close(weights, expected_w, rtol=1e-12, atol=1e-12)
            coef = expected_w.sum(0)
            expected_u = coef @ grads.double()
            u = torch.finfo(torch.float32).eps / 2
            tol = TP._gamma(64 + 2, u) * (coef.abs() @ grads.double().abs()) + 2 * u * expected_u.abs()
            TP.assert_within(update, expected_u, tol, "update (float32, T = 64)")

        if not ARGS.quick:
            run_check("pcgrad", "T=64 float32 is its stages", torch.float32, (64, 517), many_tasks_float32)
        gram_shapes = [(3, 5), (9, 1031)] if ARGS.quick else [(1, 1), (9, 1031), (64, 1031), (5, 300007)]
        for t, p in gram_shapes:
            for dtype in DTYPES:
                for mask_kind in (None, "heads"):

                    def gram_check(t=t, p=p, dtype=dtype, mask_kind=mask_kind):  # test_gram_stage's bound
                        grads = TP.make_grads(t, p, dtype, seed=30)
                        mask = None if mask_kind is None else TP.make_mask(p, seed=31, kind=mask_kind)
                        gram = host(pcgrad_stage("pcgrad_gram")(*dev((grads, mask))))
                        g = grads.double() if mask is None else grads.double()[:, mask]
                        u = torch.finfo(dtype).eps / 2
                        tol = TP._gamma(TP._chain_length("triton", g.shape[1]) + 2, u) * (g.abs() @ g.abs().t())
                        assert gram.dtype == torch.float64
                        TP.assert_within(gram, g @ g.t(), tol, "gram")
                        assert torch.equal(gram, gram.t()), "gram not symmetric"

                    run_check("pcgrad", f"gram stage mask={mask_kind}", dtype, (t, p), gram_check)

        def combine_check(dtype):  # test_combine_stage's bound
            grads = TP.make_grads(6, 1031, dtype, seed=34)
            mask = TP.make_mask(1031, seed=35)
            weights = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(36))
            out = host(pcgrad_stage("pcgrad_combine")(*dev((grads, weights, mask))))
            g = grads.double()
            exact = torch.where(mask, weights @ g, g.sum(0))
            u = torch.finfo(dtype).eps / 2
            tol = TP._gamma(6 + 2, u) * ((weights.abs() + 1) @ g.abs()) + 2 * u * exact.abs()
            TP.assert_within(out, exact, tol, "combine")

        for dtype in DTYPES:
            run_check("pcgrad", "combine stage mask=random", dtype, (6, 1031), lambda d=dtype: combine_check(d))

        def coefficients_check():
            grads = TP.make_grads(7, 40, torch.float64, seed=32)
            orders = TP.make_orders(7, seed=33)
            gram = grads @ grads.t()
            for include_self in (False, True):
                for eps in (0.0, 0.3):
                    weights = host(pcgrad_stage("pcgrad_coefficients")(*dev((gram, orders)), include_self, eps))
                    expected = RP.coefficient_recurrence(gram, orders.tolist(), include_self, eps)
                    record(weights, expected, 1e-13 + 1e-13 * expected.abs())
                    torch.testing.assert_close(weights, expected, rtol=1e-13, atol=1e-13)

        run_check("pcgrad", "coefficients stage", torch.float64, (7, 40), coefficients_check)
    for dtype in DTYPES:
        for with_mask in (False, True):

            def oc(dtype=dtype, with_mask=with_mask):
                grads = TP.make_grads(3, 11, dtype, seed=40)
                orders = TP.make_orders(3, seed=41)
                mask = TP.make_mask(11, seed=42) if with_mask else None
                grads, orders, mask = dev((grads, orders, mask))
                torch.library.opcheck(OPS.pcgrad.default, (grads, orders, mask, False, "sum", 0.0))
                torch.library.opcheck(
                    OPS.pcgrad_out.default,
                    (grads, orders, mask, True, "mean", 0.1, torch.empty(11, dtype=dtype, device=DEVICE)),
                )
                torch.library.opcheck(OPS.pcgrad_gram.default, (grads, mask))
                torch.library.opcheck(
                    OPS.pcgrad_coefficients.default, (grads.double() @ grads.double().t(), orders, False, 0.0)
                )
                torch.library.opcheck(
                    OPS.pcgrad_combine.default, (grads, torch.ones(3, dtype=torch.float64, device=DEVICE), mask)
                )
                grads.requires_grad_()
                torch.library.opcheck(
                    OPS.pcgrad.default,
                    (grads, orders, mask, False, "sum", 0.0),
                    test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
                )

            run_check("pcgrad", f"opcheck mask={with_mask}", dtype, (3, 11), oc)


CHECKS = {
    "inner_step": checks_inner_step,
    "cg_step": checks_cg_step,
    "reptile_update": checks_reptile_update,
    "task_linear": checks_task_linear,
    "mlp_loss_grad": checks_mlp_loss_grad,
    "conv_block": checks_conv_block,
    "pcgrad": checks_pcgrad,
}


def run_groups_in_subprocesses(groups: list[str], jobs: int, deadline: float | None) -> None:
    """Each op group in its own process, `jobs` at a time: Triton compiles one kernel at a time per process, and
    the compilations, not the GPU, are what the checks wait on. Outputs are printed whole, group by group. At the
    deadline the processes still running are killed; their finished checks are kept and the group is reported
    INCOMPLETE."""
    pending = list(groups)
    running: list[tuple[str, subprocess.Popen, Path, Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cuda_check_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // max(1, jobs))))
    while pending or running:
        while pending and len(running) < jobs:
            group = pending.pop(0)
            log, out = tmp / f"{group}.log", tmp / f"{group}.jsonl"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--device",
                ARGS.device,
                "--only",
                group,
                "--json",
                str(out),
                "--jobs",
                "1",
            ] + (["--quick"] if ARGS.quick else [])
            with log.open("w") as log_file:
                proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            running.append((group, proc, log, out))
        time.sleep(0.2)
        late = deadline is not None and time.monotonic() > deadline
        for item in list(running):
            group, proc, log, out = item
            if proc.poll() is None and not late:
                continue
            killed = proc.poll() is None
            if killed:
                proc.kill()
                proc.wait()
            running.remove(item)
            print(log.read_text(), end="", flush=True)
            if out.exists():
                RESULTS.extend(json.loads(line) for line in out.read_text().splitlines() if line.strip())
            if killed or proc.returncode != 0:
                why = "stopped at the time limit" if killed else f"process exit code {proc.returncode}"
                row = dict(
                    op=group,
                    check="(remaining checks)",
                    dtype="-",
                    shape="-",
                    max_err=None,
                    tol=None,
                    ratio=None,
                    status="INCOMPLETE",
                    message=why,
                    seconds=0.0,
                )
                RESULTS.append(row)
                print(format_row(row) + f" {why}", flush=True)
        if late:
            for group in pending:
                row = dict(
                    op=group,
                    check="(not started)",
                    dtype="-",
                    shape="-",
                    max_err=None,
                    tol=None,
                    ratio=None,
                    status="INCOMPLETE",
                    message="not started before the time limit",
                    seconds=0.0,
                )
                RESULTS.append(row)
            pending.clear()


# --- timing ----------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], reps: int = 20, warmup: int = 3, before: Callable[[], None] | None = None):
    """Median and min seconds of fn over reps calls; CUDA events around each call on the GPU (the device's own
    clock; `before` runs outside the timed interval), perf_counter on the CPU."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    samples = []
    for _ in range(reps):
        if before:
            before()
        if ON_CPU:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "reps": reps}


def bench() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 GEMMs, as the Triton kernels compute
    rows: list[dict] = []
    copy_bw, triad_bw = bench_inner_step(rows)
    bench_cg_step(rows, triad_bw)
    bench_pcgrad(rows)
    bench_conv_block(rows)
    return {"rows": rows, "triad_GB_per_s": triad_bw, "copy_GB_per_s": copy_bw}


def bench_row(
    rows: list[dict], section: str, name: str, stats: dict, nbytes: int | None = None, note: str = ""
) -> dict:
    r = {"section": section, "name": name, **stats, "note": note}
    if nbytes is not None:
        r["bytes"] = nbytes
        r["GB_per_s"] = nbytes / stats["median_s"] / 1e9
    rows.append(r)
    gbs = f"{r['GB_per_s']:8.1f} GB/s" if nbytes is not None else " " * 13
    print(
        f"{section:<12} {name:<46} median {stats['median_s'] * 1e3:9.3f} ms  min {stats['min_s'] * 1e3:9.3f} ms "
        f"{gbs} {note}",
        flush=True,
    )
    return r


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def stream_shape() -> tuple[int, int]:
    return (8, 10_000) if ARGS.quick else (8, 10_000_000)


def bench_inner_step(rows: list[dict]) -> tuple[float, float]:
    """(a) the HBM roofline (torch copy and triad) and inner_step over [8, 10M] float32."""
    torch.manual_seed(0)
    t, p = stream_shape()
    n4 = t * p * 4
    a, b, c, theta0, go = (randn(t, p) for _ in range(5))
    copy = bench_row(rows, "roofline", f"torch copy [{t}, {p}] f32", timed(lambda: a.copy_(b)), 2 * n4)
    triad = bench_row(
        rows,
        "roofline",
        f"torch triad a = b - s*c [{t}, {p}] f32",
        timed(lambda: torch.add(b, c, alpha=-0.01, out=a)),
        3 * n4,
    )
    lr = torch.tensor(0.01, device=DEVICE)
    r1 = bench_row(
        rows, "inner_step", "fwd out=, scalar lr", timed(lambda: metakernels.inner_step(b, c, lr, out=a)), 3 * n4
    )
    r2 = bench_row(
        rows,
        "inner_step",
        "fwd out=, per-task theta0, prox, wd",
        timed(lambda: metakernels.inner_step(b, c, lr, theta0=theta0, prox=0.5, weight_decay=0.01, out=a)),
        4 * n4,
    )
    mask = [True, True, True, False]
    r3 = bench_row(
        rows,
        "inner_step",
        "bwd (d_theta, d_grad, d_lr), wd",
        timed(lambda: OPS.inner_step_backward(go, b, c, lr, None, None, 0.0, 0.01, mask)),
        5 * n4 + 4 * p,
        "allocates its outputs",
    )
    for r in (r1, r2, r3):
        r["vs_triad"] = r["GB_per_s"] / triad["GB_per_s"]
    return copy["GB_per_s"], triad["GB_per_s"]


def bench_cg_step(rows: list[dict], triad_bw: float) -> None:
    """(b) cg_step on [8, 10M] float32: 7 * T * P * 4 bytes counted (read x, r, p, Ap; write x, r, p)."""
    from metakernels.ops import cg_step

    t, p = stream_shape()
    x, r, d, r0, p0 = (randn(t, p) for _ in range(5))
    ap = d.abs_().add_(0.5).mul_(p0)  # Ap = D p with D > 0: p.Ap > 0, every task steps
    pv = p0.clone()
    rs0 = (r0.double() ** 2).sum(1)
    rs, status = rs0.clone(), torch.zeros(t, dtype=torch.int32, device=DEVICE)
    iterations = torch.zeros(t, dtype=torch.int64, device=DEVICE)
    threshold = torch.zeros(t, dtype=torch.float64, device=DEVICE)

    def reset() -> None:  # untimed: every repetition starts from the same active state
        r.copy_(r0)
        pv.copy_(p0)
        rs.copy_(rs0)
        status.zero_()

    cg = bench_row(
        rows,
        "cg_step",
        "step [T, P] (7 T P 4 bytes counted)",
        timed(lambda: cg_step(x, r, pv, ap, rs, status, iterations, threshold), before=reset),
        7 * t * p * 4,
    )
    cg["vs_triad"] = cg["GB_per_s"] / triad_bw
    assert int(status.max()) == 0, f"cg_step bench: tasks stopped (status {status.tolist()})"


def torch_gram_pcgrad(grads: torch.Tensor, orders_host: torch.Tensor) -> torch.Tensor:
    """PCGrad in plain torch through the Gram matrix: K = G G^T on the device, the coefficient loop on the T x T
    numbers on the host (row-batched: step s of every row at once), then w @ G on the device."""
    num_tasks = grads.shape[0]
    gram = (grads @ grads.t()).double().cpu()
    diag = gram.diagonal()
    weights = torch.eye(num_tasks, dtype=torch.float64)
    rows = torch.arange(num_tasks)
    for s in range(num_tasks):
        j = orders_host[:, s]
        d = (weights * gram[:, j].t()).sum(1)
        project = (d < 0) & (j != rows) & (diag[j] > 0)
        weights[rows, j] -= torch.where(project, d / torch.where(diag[j] > 0, diag[j], 1.0), 0.0)
    return weights.sum(0).to(device=grads.device, dtype=grads.dtype) @ grads


def bench_pcgrad(rows: list[dict]) -> None:
    """(c) pcgrad T=16, P=10M and T=64, P=1M float32 vs the plain-torch Gram version."""
    torch.manual_seed(1)
    for t, p in [(16, 10_000), (8, 1_000)] if ARGS.quick else [(16, 10_000_000), (64, 1_000_000)]:
        grads = randn(t, p)
        orders_host = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(i)) for i in range(t)])
        orders = orders_host.to(DEVICE)
        out = torch.empty(p, device=DEVICE)
        ours = bench_row(
            rows,
            "pcgrad",
            f"metakernels.pcgrad out= T={t} P={p}",
            timed(lambda g=grads, o=orders, b=out: metakernels.pcgrad(g, orders=o, out=b)),
            2 * t * p * 4,
            "2 passes over G counted",
        )
        theirs = bench_row(
            rows,
            "pcgrad",
            f"torch Gram version T={t} P={p}",
            timed(lambda g=grads, o=orders_host: torch_gram_pcgrad(g, o)),
            2 * t * p * 4,
        )
        ours["speedup_vs_torch_gram"] = theirs["median_s"] / ours["median_s"]
        expected = torch_gram_pcgrad(grads, orders_host)
        ours["max_rel_diff_vs_torch_gram"] = float((out - expected).abs().max() / expected.abs().max())
        print(
            f"{'':<12} speedup {ours['speedup_vs_torch_gram']:.2f}x, max |ours - torch| / max|torch| = "
            f"{ours['max_rel_diff_vs_torch_gram']:.2e}",
            flush=True,
        )


def per_task_block(x, w, bias, g, bb) -> torch.Tensor:
    """The block as research code writes it: conv2d, batch_norm (batch statistics), relu, max_pool2d, per task."""
    import torch.nn.functional as F

    outs = []
    for i in range(x.shape[0]):
        z = F.conv2d(x[i], w[i], bias[i], padding=1)
        y = F.relu(F.batch_norm(z, None, None, g[i], bb[i], training=True, eps=1e-5))
        outs.append(F.max_pool2d(y, 2))
    return torch.stack(outs)


def bench_conv_block(rows: list[dict]) -> None:
    """(d) conv_block forward + backward at the Omniglot shapes vs per-task torch conv + BN + ReLU + max-pool."""
    from metakernels.reference.conv_block import conv_block_reference

    torch.manual_seed(2)
    layers = [(2, 3, 1, 8, 8), (2, 3, 8, 8, 4)] if ARGS.quick else [(8, 75, 1, 64, 28), (8, 75, 64, 64, 14)]
    for t, n, cin, cout, hw in layers:
        x = randn(t, n, cin, hw, hw).requires_grad_(cin > 1)  # a hidden layer's input needs its gradient
        params = [
            (randn(t, cout, cin, 3, 3) * (cin * 9) ** -0.5).requires_grad_(),
            randn(t, cout).requires_grad_(),
            (1 + 0.1 * randn(t, cout)).requires_grad_(),
            (0.1 * randn(t, cout)).requires_grad_(),
        ]
        leaves = params + ([x] if cin > 1 else [])
        grad_out = randn(t, n, cout, hw // 2, hw // 2)

        def fwd_bwd(block, x=x, params=params, leaves=leaves, grad_out=grad_out):
            return torch.autograd.grad(block(x, *params), leaves, grad_out)

        def ours_block(*a):
            return metakernels.conv_block(*a, padding=1, pool=True)

        def grouped_block(*a):
            return conv_block_reference(*a, 1, 1, 1e-5, True)

        label = f"T={t} N={n} {cin}->{cout}ch {hw}x{hw}"
        torch.backends.cudnn.allow_tf32 = False
        ours = bench_row(rows, "conv_block", f"metakernels fwd+bwd {label}", timed(lambda f=fwd_bwd: f(ours_block)))
        loop = bench_row(
            rows, "conv_block", "  per-task torch loop fwd+bwd (TF32 off)", timed(lambda f=fwd_bwd: f(per_task_block))
        )
        grouped = bench_row(
            rows, "conv_block", "  grouped-conv reference fwd+bwd (TF32 off)", timed(lambda f=fwd_bwd: f(grouped_block))
        )
        torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
        loop_tf32 = bench_row(
            rows,
            "conv_block",
            "  per-task torch loop fwd+bwd (TF32 default)",
            timed(lambda f=fwd_bwd: f(per_task_block)),
        )
        torch.backends.cudnn.allow_tf32 = False
        ours["speedup_vs_loop_fp32"] = loop["median_s"] / ours["median_s"]
        ours["speedup_vs_grouped_fp32"] = grouped["median_s"] / ours["median_s"]
        ours["speedup_vs_loop_tf32"] = loop_tf32["median_s"] / ours["median_s"]
        with torch.no_grad():
            diff = (ours_block(x, *params) - per_task_block(x, *params)).abs().max().item()
        ours["max_abs_diff_vs_loop_fp32"] = diff
        print(
            f"{'':<12} speedup vs loop fp32 {ours['speedup_vs_loop_fp32']:.2f}x, vs grouped "
            f"{ours['speedup_vs_grouped_fp32']:.2f}x, vs loop TF32 {ours['speedup_vs_loop_tf32']:.2f}x; "
            f"max |ours - loop| = {diff:.2e}",
            flush=True,
        )


# --- results ---------------------------------------------------------------------------------------------------


def environment() -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": ARGS.device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "extension_available": metakernels.extension_available(),
        "commit": ARGS.commit,
        "quick": ARGS.quick,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cpu_backend": _backend.cpu_backend(),
    }
    if not ON_CPU:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    return info


def write_markdown(path: Path, env: dict, results: list[dict], timing: dict | None) -> None:
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "ERROR", "SKIP", "INCOMPLETE")}
    lines = ["# metakernels Triton kernels on CUDA: checks and timings (scripts/cuda_check.py)", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        "",
        f"## Checks: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors, "
        f"{counts['SKIP']} skipped, {counts['INCOMPLETE']} incomplete",
        "",
        "err: max |kernel - reference| over the compared outputs; tol: the tests' elementwise tolerance at the "
        "element with the worst err/tol ratio (ratio).",
        "",
        "| op | check | dtype | shape | max err | tol | ratio | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['op']} | {r['check']} | {r['dtype']} | {r['shape']} | {fmt(r['max_err'])} | "
            f"{fmt(r['tol'])} | {fmt(r['ratio'])} | {r['status']} |"
        )
    bad = [r for r in results if r["status"] != "PASS"]
    if bad:
        lines += ["", "### Not passed", ""]
        for r in bad:
            lines += [
                f"- {r['op']} {r['check']} {r['dtype']} {r['shape']}: {r['status']}: "
                f"{r['message'].splitlines()[0] if r['message'] else ''}"
            ]
    if timing:
        lines += [
            "",
            "## Timings (CUDA events, median of 20 after 3 warm-ups)",
            "",
            f"HBM reference in this run: torch copy {timing['copy_GB_per_s']:.0f} GB/s, triad "
            f"{timing['triad_GB_per_s']:.0f} GB/s (bytes read + written).",
            "",
            "| section | case | median ms | min ms | GB/s | vs triad | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in timing["rows"]:
            notes = [r["note"]] if r.get("note") else []
            for key in (
                "speedup_vs_torch_gram",
                "speedup_vs_loop_fp32",
                "speedup_vs_grouped_fp32",
                "speedup_vs_loop_tf32",
            ):
                if key in r:
                    notes.append(f"{key.removeprefix('speedup_')} {r[key]:.2f}x")
            for key in ("max_rel_diff_vs_torch_gram", "max_abs_diff_vs_loop_fp32"):
                if key in r:
                    notes.append(f"{key} {r[key]:.1e}")
            gbs = f"{r['GB_per_s']:.0f}" if "GB_per_s" in r else ""
            vs = f"{r['vs_triad']:.2f}" if "vs_triad" in r else ""
            lines.append(
                f"| {r['section']} | {r['name']} | {r['median_s'] * 1e3:.3f} | {r['min_s'] * 1e3:.3f} | "
                f"{gbs} | {vs} | {'; '.join(notes)} |"
            )
    path.write_text("\n".join(lines) + "\n")


STATUSES = ("PASS", "FAIL", "ERROR", "SKIP", "INCOMPLETE")


def write_results(timing: dict | None) -> None:
    out_dir = Path(ARGS.out or os.environ.get("OUT") or tempfile.gettempdir())
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out_dir / "cuda_check.json").write_text(
        json.dumps({"environment": env, "checks": RESULTS, "timing": timing}, indent=1)
    )
    write_markdown(out_dir / "cuda_check.md", env, RESULTS, timing)
    print(f"wrote {out_dir / 'cuda_check.json'} and {out_dir / 'cuda_check.md'}", flush=True)


def main() -> int:
    start = time.monotonic()
    if not ON_CPU and not torch.cuda.is_available():
        print("cuda_check: no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    timing, bench_failed = None, False
    if ARGS.bench and not ARGS.json:  # first, alone on an idle GPU (the checks run several processes at once)
        try:
            timing = bench()
        except Exception:
            traceback.print_exc()
            bench_failed = True
        write_results(timing)
    groups = ARGS.only or list(OP_GROUPS)
    if not ARGS.no_checks:
        jobs = ARGS.jobs or (1 if ON_CPU else len(groups))
        if jobs > 1 and not ARGS.json:
            deadline = start + ARGS.time_limit if ARGS.time_limit else None
            run_groups_in_subprocesses(groups, jobs, deadline)
        else:
            for group in groups:
                CHECKS[group]()
    if ARGS.json:  # a child process: its rows are in the JSON-lines file
        return 0
    failed = [r for r in RESULTS if r["status"] in ("FAIL", "ERROR", "INCOMPLETE")]
    counts = {s: sum(r["status"] == s for r in RESULTS) for s in STATUSES}
    print("\nchecks: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES), flush=True)
    for r in failed:
        print(f"  NOT PASSED: {format_row(r)}", flush=True)
    write_results(timing)
    return 1 if failed or bench_failed else 0


if __name__ == "__main__":
    sys.exit(main())
