"""The profiler's registry of op cases: for every fused op, a size grid and how to call it.

A case builds its inputs (and a preallocated output where the op has an out= form, so no page faults land
in the timed calls), the call itself, the same call on the pure-PyTorch reference (the speedup column), and
the work per call: bytes the kernel must move (reads + writes, the STREAM convention of
metakernels.profiler.machine) and/or FLOPs. The bound says which roofline applies: a STREAM pattern
("read", "triad", "triad_inplace"; cache-resident or DRAM by working set) for bandwidth-bound ops, "gemm"
(the measured fp32 GEMM rate) for the layer ops, whose time is matrix products.

An op gets cases only when it is in metakernels.ops.OP_NAMES and registered under torch.ops.metakernels
at run time, so the profiler runs before and after an op lands. A new op joins by adding a function to
CASE_BUILDERS (tests/test_profiler.py fails, naming it, while an op in OP_NAMES has none).

Composite entries (COMPOSITE_OPS) are public functions over a model rather than registered ops, profiled like
one: "hvp" times one Hessian-vector product of all tasks (metakernels.hvp_operator's matvec, what a CG loop
pays per iteration) against the double-backward product. They are available whenever the ops their fast paths
dispatch to are registered.

Grids: "full" (sizes up to ~4x the L3), "quick" (a few sizes, one beyond the L3, ~1 minute with the machine
measurement) and "tiny" (for tests: every case in milliseconds).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .machine import l3_bytes

GRIDS = ("full", "quick", "tiny")
BANDWIDTH_BOUNDS = ("read", "copy", "triad", "triad_inplace")


@dataclass
class Built:
    """A case's inputs, bound into calls.

    Attributes:
        call: the op call to time (no arguments).
        reference: the same computation by metakernels.reference (None when the reference is missing).
        bytes_read, bytes_written: bytes the op must move per call.
        flops: floating-point operations per call (0 for bandwidth-bound ops).
    """

    call: Callable[[], object]
    reference: Callable[[], object] | None
    bytes_read: int
    bytes_written: int
    flops: float = 0.0


@dataclass(frozen=True)
class Case:
    """One point of an op's size grid.

    Attributes:
        op: the torch.ops.metakernels op the call dispatches to (its name in profiler traces), or a composite
            entry of COMPOSITE_OPS (its call then runs in a record_function range "metakernels::<op>" while a
            profiler is active).
        label: what distinguishes the case within the op ("scalar N=1e6", "sinusoid hidden 40x40").
        bound: the roofline that applies: a STREAM pattern (bandwidth-bound) or "gemm".
        via: how the op is called ("metakernels.inner_step(out=buf)", "torch.ops.metakernels.task_linear").
        params: the sizes, recorded in the results.
        make: builds the inputs and returns the Built calls (called only when the case is run, so at most
            one case's tensors are alive at a time).
    """

    op: str
    label: str
    bound: str
    via: str
    params: dict = field(hash=False, compare=False)
    make: Callable[[], Built] = field(hash=False, compare=False, repr=False)


def _reference(op: str) -> Callable | None:
    """metakernels.reference.<file>.<op>, file = op minus a _backward/_out suffix (as metakernels._backend)."""
    file = op.removesuffix("_backward").removesuffix("_out")
    try:
        module = importlib.import_module(f"metakernels.reference.{file}")
    except ImportError:
        return None
    return getattr(module, op, None)


def _op(op: str) -> Callable:
    return getattr(torch.ops.metakernels, op).default


# Dispatch keys whose kernel serves a CPU tensor.
_CPU_KEYS = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")


def op_registered(op: str) -> bool:
    """True when torch.ops.metakernels has the op now and a kernel that serves CPU tensors (a schema whose
    kernel is not built yet, e.g. while the extension is being rebuilt, does not count)."""
    try:
        getattr(torch.ops.metakernels, op)
    except (AttributeError, RuntimeError):
        return False
    name = f"metakernels::{op}"
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in _CPU_KEYS)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _dram_n(l3: int, bytes_per_n: float, factor: float, multiple: int) -> int:
    """An element count whose working set is `factor` L3 sizes: beyond the cache, measured against DRAM."""
    n = factor * l3 / bytes_per_n
    return int(math.ceil(n / multiple) * multiple)


def _fmt(n: int) -> str:
    if n < 1000:
        return str(n)
    e = int(math.floor(math.log10(n)))
    m = n / 10**e
    return f"{m:.3g}e{e}" if abs(m - round(m)) > 1e-9 else f"{round(m)}e{e}"


# --- inner_step, inner_step_out, inner_step_backward ------------------------------------------------------

INNER_STEP_TASKS = 4
INNER_STEP_SEGMENTS = 16  # segmented (MAML++ per-layer) rates: 16 equal segments
RATES = ("scalar", "segmented", "per_coordinate")


def _inner_step_inputs(n: int, rate: str) -> dict:
    T = INNER_STEP_TASKS
    P = max(1, n // T)
    g = _gen()
    theta = torch.rand(T, P, generator=g)
    grad = torch.rand(T, P, generator=g) - 0.5
    offsets = None
    if rate == "per_coordinate":
        lr = torch.full((P,), 1e-3)
    elif rate == "segmented":
        S = min(INNER_STEP_SEGMENTS, P)
        offsets = torch.linspace(0, P, S + 1).round().to(torch.int64)
        lr = torch.full((S,), 1e-3)
    else:
        lr = torch.tensor(1e-3)
    return dict(T=T, P=P, theta=theta, grad=grad, lr=lr, segment_offsets=offsets)


def _inner_step_case(op: str, n: int, rate: str, in_place: bool = False) -> Case:
    """inner_step (allocating, as the learners call it) or inner_step_out (preallocated, or in place)."""

    def make() -> Built:
        c = _inner_step_inputs(n, rate)
        theta, grad, lr, offsets = c["theta"], c["grad"], c["lr"], c["segment_offsets"]
        tp, es = c["T"] * c["P"], theta.element_size()
        read, written = (2 * tp + lr.numel()) * es, tp * es
        ref = _reference(op)
        from .. import inner_step

        if op == "inner_step":

            def call():
                return inner_step(theta, grad, lr, segment_offsets=offsets)

            reference = None if ref is None else (lambda: ref(theta, grad, lr, offsets, None, 0.0, 0.0))
        else:
            # In place, theta drifts by <= 5e-4 per call: bounded for any repetition count used here.
            out = theta if in_place else torch.empty_like(theta).fill_(0.0)  # touched: no faults when timed

            def call():
                return inner_step(theta, grad, lr, segment_offsets=offsets, out=out)

            reference = None if ref is None else (lambda: ref(theta, grad, lr, offsets, None, 0.0, 0.0, out))
        return Built(call, reference, read, written)

    where = " in place" if in_place else ""
    via = "metakernels.inner_step" + ("(out=theta)" if in_place else "(out=buf)" if op == "inner_step_out" else "")
    return Case(
        op=op,
        label=f"{rate}{where} N={_fmt(n)}",
        bound="triad_inplace" if in_place else "triad",
        via=via,
        params={"T": INNER_STEP_TASKS, "P": max(1, n // INNER_STEP_TASKS), "rate": rate},
        make=make,
    )


def inner_step_cases(grid: str, l3: int) -> list[Case]:
    """The allocating forward where the learners call it: T*P up to 1e5 (latency-bound sizes)."""
    sizes = {"full": [1_000, 10_000, 100_000], "quick": [10_000], "tiny": [64]}[grid]
    return [_inner_step_case("inner_step", n, rate) for rate in RATES for n in sizes]


def inner_step_out_cases(grid: str, l3: int) -> list[Case]:
    """The forward into a preallocated buffer, cache-resident sizes to beyond the L3 (bandwidth-bound)."""
    dram = [_dram_n(l3, 12, f, 1_000_000) for f in (2.5, 4.0)]
    grids = {
        "full": {r: [10_000, 100_000, 1_000_000, 10_000_000, *dram] for r in RATES},
        "quick": {"scalar": [10_000, 1_000_000, dram[0]], "segmented": [1_000_000], "per_coordinate": [1_000_000]},
        "tiny": {r: [64] for r in RATES},
    }[grid]
    cases = [_inner_step_case("inner_step_out", n, rate) for rate, sizes in grids.items() for n in sizes]
    in_place = {"full": [1_000_000, dram[0]], "quick": [], "tiny": [64]}[grid]
    cases += [_inner_step_case("inner_step_out", n, "scalar", in_place=True) for n in in_place]
    return cases


def inner_step_backward_cases(grid: str, l3: int) -> list[Case]:
    """The fused backward as second-order MAML with a learned rate calls it: d_grad and d_lr (no decay)."""
    mask = [False, True, True, False]
    dram = _dram_n(l3, 16, 2.5, 1_000_000)
    sizes = {
        "full": [10_000, 100_000, 1_000_000, 10_000_000, dram],
        "quick": [10_000, 1_000_000, dram],
        "tiny": [64],
    }[grid]

    def case(n: int, rate: str) -> Case:
        def make() -> Built:
            c = _inner_step_inputs(n, rate)
            theta, grad, lr, offsets = c["theta"], c["grad"], c["lr"], c["segment_offsets"]
            go = torch.rand_like(theta)
            tp, es = c["T"] * c["P"], theta.element_size()
            # Reads grad_out, theta, grad and the rate; writes d_grad and d_lr. Allocates its outputs (the op
            # has no out= form): their page faults are in the time at large sizes.
            read, written = (3 * tp + lr.numel()) * es, (tp + lr.numel()) * es
            args = (go, theta, grad, lr, offsets, None, 0.0, 0.0, mask)
            op, ref = _op("inner_step_backward"), _reference("inner_step_backward")
            return Built(lambda: op(*args), None if ref is None else (lambda: ref(*args)), read, written)

        return Case(
            op="inner_step_backward",
            label=f"{rate} d_grad,d_lr N={_fmt(n)}",
            bound="triad",
            via="torch.ops.metakernels.inner_step_backward",
            params={"T": INNER_STEP_TASKS, "P": max(1, n // INNER_STEP_TASKS), "rate": rate, "mask": mask},
            make=make,
        )

    cases = [case(n, "scalar") for n in sizes]
    others = {"full": [1_000_000], "quick": [], "tiny": [64]}[grid]
    cases += [case(n, rate) for rate in ("segmented", "per_coordinate") for n in others]
    return cases


# --- reptile_update --------------------------------------------------------------------------------------

REPTILE_TASKS = 16


def reptile_update_cases(grid: str, l3: int) -> list[Case]:
    """theta + eps (mean_t fast_t - theta), T = 16: reads T*P + P, writes P, so bounded by the read bandwidth."""
    T = REPTILE_TASKS
    dram = [_dram_n(l3, 4 * (T + 2) / T, f, 1_600_000) for f in (2.5, 4.0)]
    sizes = {
        "full": [10_000, 100_000, 1_000_000, 10_000_000, *dram],
        "quick": [10_000, 1_000_000, dram[0]],
        "tiny": [64],
    }[grid]

    def case(n: int) -> Case:
        P = max(1, n // T)

        def make() -> Built:
            g = _gen()
            fast = torch.rand(T, P, generator=g)
            theta = torch.rand(P, generator=g)
            es = fast.element_size()
            op, ref = _op("reptile_update"), _reference("reptile_update")
            return Built(
                lambda: op(theta, fast, 0.5),
                None if ref is None else (lambda: ref(theta, fast, 0.5)),
                (T * P + P) * es,
                P * es,
            )

        return Case(
            "reptile_update",
            f"T={T} N={_fmt(n)}",
            "read",
            "torch.ops.metakernels.reptile_update",
            {"T": T, "P": P},
            make,
        )

    return [case(n) for n in sizes]


# --- task_linear, task_linear_backward ---------------------------------------------------------------------


def _linear_shapes(grid: str) -> list[tuple[str, int, int, int, int]]:
    """(name, T, N, in, out): the sinusoid MLP's hidden layer, a 256-wide MLP layer, a wide layer."""
    return {
        "full": [("sinusoid hidden", 25, 10, 40, 40), ("mlp", 8, 75, 256, 256), ("wide", 32, 80, 1024, 1024)],
        "quick": [("sinusoid hidden", 25, 10, 40, 40), ("mlp", 8, 75, 256, 256), ("wide", 32, 80, 1024, 1024)],
        "tiny": [("tiny", 2, 3, 5, 4)],
    }[grid]


def _linear_inputs(T: int, N: int, fin: int, fout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen()
    x = torch.randn(T, N, fin, generator=g)
    w = torch.randn(T, fout, fin, generator=g) / math.sqrt(fin)
    b = torch.randn(T, fout, generator=g) * 0.1
    return x, w, b


def task_linear_cases(grid: str, l3: int) -> list[Case]:
    """Task-batched Linear + activation: x [T, N, in] @ weight[t]^T + bias[t]; 2 T N in out FLOPs."""

    def case(name: str, T: int, N: int, fin: int, fout: int) -> Case:
        def make() -> Built:
            x, w, b = _linear_inputs(T, N, fin, fout)
            op, ref = _op("task_linear"), _reference("task_linear")
            es = x.element_size()
            return Built(
                lambda: op(x, w, b, "relu"),
                None if ref is None else (lambda: ref(x, w, b, "relu")),
                (x.numel() + w.numel() + b.numel()) * es,
                T * N * fout * es,
                flops=2.0 * T * N * fin * fout,
            )

        return Case(
            "task_linear",
            f"{name} T={T} N={N} {fin}x{fout} relu",
            "gemm",
            "torch.ops.metakernels.task_linear",
            {"T": T, "N": N, "in": fin, "out": fout},
            make,
        )

    return [case(*s) for s in _linear_shapes(grid)]


def task_linear_backward_cases(grid: str, l3: int) -> list[Case]:
    """The layer's fused backward (d_x, d_weight, d_bias from grad_out and the saved output): 4 T N in out
    FLOPs (two products of the forward's size)."""
    mask = [True, True, True]

    def case(name: str, T: int, N: int, fin: int, fout: int) -> Case:
        def make() -> Built:
            x, w, b = _linear_inputs(T, N, fin, fout)
            with torch.no_grad():
                out = _op("task_linear")(x, w, b, "relu")
            grad_out = torch.randn(out.shape, generator=_gen())
            args = (grad_out, x, w, out, "relu", mask)
            op, ref = _op("task_linear_backward"), _reference("task_linear_backward")
            es = x.element_size()
            return Built(
                lambda: op(*args),
                None if ref is None else (lambda: ref(*args)),
                (2 * grad_out.numel() + x.numel() + w.numel()) * es,
                (x.numel() + w.numel() + b.numel()) * es,
                flops=4.0 * T * N * fin * fout,
            )

        return Case(
            "task_linear_backward",
            f"{name} T={T} N={N} {fin}x{fout} relu d_x,d_w,d_b",
            "gemm",
            "torch.ops.metakernels.task_linear_backward",
            {"T": T, "N": N, "in": fin, "out": fout, "mask": mask},
            make,
        )

    return [case(*s) for s in _linear_shapes(grid)]


# --- mlp_loss_grad, mlp_loss_grad_backward -----------------------------------------------------------------


def _mlp_shapes(grid: str) -> list[tuple[str, list[int], str, int, int]]:
    """(name, widths, loss, T, N): the sinusoid regression MLP and a 5-way Omniglot MLP."""
    return {
        "full": [
            ("sinusoid", [1, 40, 40, 1], "mse", 25, 10),
            ("omniglot mlp", [784, 256, 128, 5], "cross_entropy", 8, 5),
            ("omniglot mlp", [784, 256, 128, 5], "cross_entropy", 32, 25),
        ],
        "quick": [
            ("sinusoid", [1, 40, 40, 1], "mse", 25, 10),
            ("omniglot mlp", [784, 256, 128, 5], "cross_entropy", 8, 5),
        ],
        "tiny": [("tiny", [3, 4, 2], "mse", 2, 3), ("tiny", [3, 4, 2], "cross_entropy", 2, 3)],
    }[grid]


def _mlp_inputs(widths: list[int], loss: str, T: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen()
    # Per Linear layer: weight [out, in] then bias [out], scaled as a default init would be.
    chunks = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        chunks += [torch.randn(T, b * a, generator=g) / math.sqrt(a), torch.zeros(T, b)]
    theta = torch.cat(chunks, dim=1).contiguous()
    x = torch.randn(T, N, widths[0], generator=g)
    if loss == "cross_entropy":
        target = torch.randint(0, widths[-1], (T, N), generator=g)
    else:
        target = torch.randn(T, N, widths[-1], generator=g)
    return theta, x, target


def _mlp_macs(widths: list[int]) -> tuple[int, int]:
    """(multiply-adds of one sample through all layers, those of the first layer)."""
    layers = [a * b for a, b in zip(widths[:-1], widths[1:], strict=True)]
    return sum(layers), layers[0]


def mlp_loss_grad_cases(grid: str, l3: int) -> list[Case]:
    """Loss and parameter gradient of a task-batched MLP in one call. FLOPs per sample and multiply-add of a
    layer: forward 2, weight gradient 2, input gradient 2 except at the first layer: 6 sum(m_l) - 2 m_0 (the
    ~6 T N sum(w_l w_l+1) of a training step)."""

    def case(name: str, widths: list[int], loss: str, T: int, N: int) -> Case:
        P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
        macs, first = _mlp_macs(widths)

        def make() -> Built:
            theta, x, target = _mlp_inputs(widths, loss, T, N)
            op, ref = _op("mlp_loss_grad"), _reference("mlp_loss_grad")
            es = theta.element_size()
            return Built(
                lambda: op(theta, x, target, widths, "relu", loss),
                None if ref is None else (lambda: ref(theta, x, target, widths, "relu", loss)),
                (theta.numel() + x.numel()) * es + target.numel() * target.element_size(),
                (T + T * P) * es,
                flops=2.0 * T * N * (3 * macs - first),
            )

        return Case(
            "mlp_loss_grad",
            f"{name} {widths} {loss} T={T} N={N}",
            "gemm",
            "torch.ops.metakernels.mlp_loss_grad",
            {"T": T, "N": N, "widths": widths, "loss": loss, "P": P},
            make,
        )

    return [case(*s) for s in _mlp_shapes(grid)]


def _mlp_rop_flops(widths: list[int], T: int, N: int) -> float:
    """FLOPs of one call of the MLP R-operator kernel (mlp_loss_grad_backward, csrc/kernels/mlp_loss_grad.h
    mlp_hvp_task), counting its matrix products (2 FLOPs per multiply-add). Per sample and multiply-add m_l of
    a layer: forward 2 (z = h W^T), R-forward 4 (h V^T, Rh W^T), R-backward weight product 4 (E^T h, d^T Rh;
    E = Rd + g_loss d folds the gradient's own d^T h into the first), input products 6 (d W, Rd W, d V). The
    first layer has no input direction (Rh_0 = 0) and no input gradient: 2 + 2 + 2 = 6 there. In all
    2 T N (8 sum(m_l) - 5 m_0). Elementwise work (activations, loss derivatives, bias sums) is not counted."""
    macs, first = _mlp_macs(widths)
    return 2.0 * T * N * (8 * macs - 5 * first)


def mlp_loss_grad_backward_cases(grid: str, l3: int) -> list[Case]:
    """grad_loss * grad + H grad_grad per task (second-order MAML's backward through an MLP inner step), by
    the R-operator; FLOPs: see _mlp_rop_flops."""

    def case(name: str, widths: list[int], loss: str, T: int, N: int) -> Case:
        P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

        def make() -> Built:
            theta, x, target = _mlp_inputs(widths, loss, T, N)
            g = _gen()
            grad_loss = torch.rand(T, generator=g)
            grad_grad = torch.randn(T, P, generator=g) * 0.01
            args = (grad_loss, grad_grad, theta, x, target, widths, "relu", loss)
            op, ref = _op("mlp_loss_grad_backward"), _reference("mlp_loss_grad_backward")
            es = theta.element_size()
            return Built(
                lambda: op(*args),
                None if ref is None else (lambda: ref(*args)),
                (T + 2 * T * P + x.numel()) * es + target.numel() * target.element_size(),
                T * P * es,
                flops=_mlp_rop_flops(widths, T, N),
            )

        return Case(
            "mlp_loss_grad_backward",
            f"{name} {widths} {loss} T={T} N={N}",
            "gemm",
            "torch.ops.metakernels.mlp_loss_grad_backward",
            {"T": T, "N": N, "widths": widths, "loss": loss, "P": P},
            make,
        )

    return [case(*s) for s in _mlp_shapes(grid)]


# --- conv_block ------------------------------------------------------------------------------------------


CONV_K, CONV_STRIDE, CONV_PADDING, CONV_EPS = 3, 1, 1, 1e-5


def _conv_shapes(grid: str) -> list[tuple[str, int, int, int, int, int]]:
    """(name, T, N, Cin, Cout, H = W) of the conv4 nets' blocks (Omniglot 28x28, MiniImagenet 84x84)."""
    return {
        "full": [
            ("omniglot layer 1", 8, 75, 1, 64, 28),
            ("omniglot layer 2", 8, 75, 64, 64, 14),
            ("miniimagenet layer 2", 4, 75, 32, 32, 42),
        ],
        "quick": [("omniglot layer 1", 8, 75, 1, 64, 28), ("omniglot layer 2", 8, 75, 64, 64, 14)],
        "tiny": [("tiny", 2, 3, 2, 3, 6)],
    }[grid]


def _conv_inputs(T: int, N: int, cin: int, cout: int, hw: int) -> tuple:
    g = _gen()
    k = CONV_K
    x = torch.randn(T, N, cin, hw, hw, generator=g)
    w = torch.randn(T, cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
    b = torch.randn(T, cout, generator=g) * 0.1
    return x, w, b, torch.ones(T, cout), torch.zeros(T, cout)


def _conv_flops(T: int, N: int, cin: int, cout: int, hw: int) -> tuple[float, int]:
    """(FLOPs of the convolution, its output size)."""
    hout = (hw + 2 * CONV_PADDING - CONV_K) // CONV_STRIDE + 1
    return 2.0 * T * N * cout * cin * CONV_K * CONV_K * hout * hout, hout


def conv_block_cases(grid: str, l3: int) -> list[Case]:
    """conv 3x3 (pad 1) + batch norm + ReLU + 2x2 max-pool of the Omniglot/MiniImagenet conv4 nets;
    2 T N Cout Cin k^2 Hout Wout FLOPs (the convolution; the rest is bandwidth)."""

    def case(name: str, T: int, N: int, cin: int, cout: int, hw: int) -> Case:
        flops, hout = _conv_flops(T, N, cin, cout, hw)

        def make() -> Built:
            x, w, b, bn_w, bn_b = _conv_inputs(T, N, cin, cout, hw)
            args = (x, w, b, bn_w, bn_b, CONV_STRIDE, CONV_PADDING, CONV_EPS, True)
            op, ref = _op("conv_block"), _reference("conv_block")
            es = x.element_size()
            return Built(
                lambda: op(*args),
                None if ref is None else (lambda: ref(*args)),
                (x.numel() + w.numel() + 3 * b.numel()) * es,
                T * N * cout * (hout // 2) ** 2 * es,
                flops=flops,
            )

        return Case(
            "conv_block",
            f"{name} T={T} N={N} {cin}->{cout} {hw}x{hw} pool",
            "gemm",
            "torch.ops.metakernels.conv_block",
            {"T": T, "N": N, "Cin": cin, "Cout": cout, "H": hw, "W": hw, "k": CONV_K},
            make,
        )

    return [case(*s) for s in _conv_shapes(grid)]


def conv_block_backward_cases(grid: str, l3: int) -> list[Case]:
    """The block's fused backward at the forward's sizes: d_weight, d_bias, d_bn_weight, d_bn_bias, and d_x
    except on a first layer (MAML needs no gradient of the input images). FLOPs: one convolution's worth
    per d_x and per d_weight."""

    def case(name: str, T: int, N: int, cin: int, cout: int, hw: int) -> Case:
        conv_flops, _ = _conv_flops(T, N, cin, cout, hw)
        mask = [cin not in (1, 3), True, True, True, True]  # no d_x of input images (1 or 3 channels)

        def make() -> Built:
            x, w, b, bn_w, bn_b = _conv_inputs(T, N, cin, cout, hw)
            with torch.no_grad():
                out, conv_out, mean, invstd = _op("conv_block")(
                    x, w, b, bn_w, bn_b, CONV_STRIDE, CONV_PADDING, CONV_EPS, True
                )
            grad_out = torch.randn_like(out)
            args = (grad_out, x, w, bn_w, bn_b, conv_out, mean, invstd, CONV_STRIDE, CONV_PADDING, True, mask)
            op, ref = _op("conv_block_backward"), _reference("conv_block_backward")
            es = x.element_size()
            return Built(
                lambda: op(*args),
                None if ref is None else (lambda: ref(*args)),
                (grad_out.numel() + x.numel() + w.numel() + conv_out.numel()) * es,
                (x.numel() * mask[0] + w.numel() + 3 * b.numel()) * es,
                flops=conv_flops * (mask[0] + mask[1]),
            )

        grads = "d_x,d_w,d_bn" if mask[0] else "d_w,d_bn"
        return Case(
            "conv_block_backward",
            f"{name} T={T} N={N} {cin}->{cout} {hw}x{hw} pool {grads}",
            "gemm",
            "torch.ops.metakernels.conv_block_backward",
            {"T": T, "N": N, "Cin": cin, "Cout": cout, "H": hw, "W": hw, "k": CONV_K, "mask": mask},
            make,
        )

    return [case(*s) for s in _conv_shapes(grid)]


# --- pcgrad, pcgrad_out -----------------------------------------------------------------------------------


def _pcgrad_case(op: str, T: int, P: int) -> Case:
    """PCGrad over [T, P] gradients (the paper's options: j != i, sum, eps 0), all columns shared.

    Bytes counted: G read once + the [P] update written (the STREAM convention). The fused op reads G twice
    (Gram, then combine), so once G is beyond the L3 its ceiling is about half the read bound counted this
    way; the reference loop reads it O(T^2) times.
    """

    def make() -> Built:
        g = _gen()
        grads = torch.randn(T, P, generator=g)
        orders = torch.stack([torch.randperm(T, generator=g) for _ in range(T)])
        es = grads.element_size()
        args = (grads, orders, None, False, "sum", 0.0)
        if op == "pcgrad_out":
            args = (*args, torch.empty(P).fill_(0.0))  # touched: no page faults in the timed calls
        f, ref = _op(op), _reference(op)
        return Built(
            lambda: f(*args),
            None if ref is None else (lambda: ref(*args)),
            T * P * es,
            P * es,
            flops=float(T * T * P + 2 * T * P),  # the symmetric Gram (upper triangle) + the combine GEMV
        )

    return Case(op, f"T={T} P={_fmt(P)} sum", "read", f"torch.ops.metakernels.{op}", {"T": T, "P": P}, make)


def pcgrad_cases(grid: str, l3: int) -> list[Case]:
    """The allocating op at the sizes Meta-PCGrad calls it with (a meta-gradient per task)."""
    shapes = {
        "full": [(8, 10_000), (8, 100_000), (8, 1_000_000), (16, 1_000_000)],
        "quick": [(8, 100_000)],
        "tiny": [(3, 17)],
    }[grid]
    return [_pcgrad_case("pcgrad", T, P) for T, P in shapes]


def pcgrad_out_cases(grid: str, l3: int) -> list[Case]:
    """The update into a preallocated [P] buffer, cache-resident sizes to beyond the L3."""
    dram = {f: _dram_n(l3, 4 * 4, f, 1_000_000) for f in (2.5, 4.0)}  # T = 4: P per working set
    shapes = {
        "full": [
            (8, 10_000),
            (8, 100_000),
            (8, 1_000_000),
            (8, 10_000_000),
            (4, dram[2.5]),
            (4, dram[4.0]),
            (16, _dram_n(l3, 16 * 4, 2.5, 100_000)),
        ],
        "quick": [(8, 1_000_000), (4, dram[2.5])],
        "tiny": [(3, 17)],
    }[grid]
    return [_pcgrad_case("pcgrad_out", T, P) for T, P in shapes]


# --- cg_step ---------------------------------------------------------------------------------------------

CG_TASKS = 8


def cg_periodic_state(num_tasks: int, num_params: int, dtype: torch.dtype = torch.float32) -> dict:
    """A CG state on which cg_step takes a full step on every call, forever, without drifting.

    With x = 0, r = 2a, p = a, rs = r.r and Ap = a, one step gives alpha = 4, beta = 1, x = 4a, r = -2a,
    p = -a, rs unchanged; with Ap = -a the next step returns to the start. Every scaling is by a power of two,
    so the orbit is exact in floating point: timed calls alternate ap[0] and ap[1] and every task stays
    active (threshold 0), reading and writing everything a real iteration does.

    Returns:
        {"x", "r", "p", "ap": (a, -a), "rs", "status", "iterations", "threshold"}, every tensor touched (no
        page faults left for the timed calls).
    """
    a = torch.rand(num_tasks, num_params, generator=_gen(), dtype=dtype) + 0.5
    r = 2 * a
    return {
        "x": torch.zeros_like(a),
        "r": r,
        "p": a.clone(),
        "ap": (a, -a),
        "rs": (r.to(torch.float64) ** 2).sum(1),
        "status": torch.zeros(num_tasks, dtype=torch.int32),
        "iterations": torch.zeros(num_tasks, dtype=torch.int64),
        "threshold": torch.zeros(num_tasks, dtype=torch.float64),
    }


def cg_step_cases(grid: str, l3: int) -> list[Case]:
    """One CG iteration's vector work (x += alpha p, r -= alpha Ap, p = r + beta p and the two dot products),
    T = 8 tasks. Bytes counted: the 4 vectors read (x, r, p, Ap) and the 3 written in place (x, r, p), the
    minimum any implementation moves; the kernel's three passes reread p, r and Ap from cache when a task fits
    in it (csrc/kernels/cg_step.h). In-place writes: the bound is the in-place triad."""
    T = CG_TASKS
    dram = [_dram_n(l3, 28, f, 8_000) for f in (2.5, 4.0)]  # 7 arrays x 4 bytes per element
    sizes = {
        "full": [10_000, 100_000, 1_000_000, 10_000_000, *dram],
        "quick": [100_000, 1_000_000, dram[0]],
        "tiny": [64],
    }[grid]

    def case(n: int) -> Case:
        P = max(1, n // T)

        def make() -> Built:
            s = cg_periodic_state(T, P)
            args = [s["x"], s["r"], s["p"], None, s["rs"], s["status"], s["iterations"], s["threshold"]]
            op, ref = _op("cg_step"), _reference("cg_step")
            parity = [0]

            def run(fn) -> None:
                args[3] = s["ap"][parity[0]]
                parity[0] ^= 1
                fn(*args)

            es = s["x"].element_size()
            return Built(lambda: run(op), None if ref is None else (lambda: run(ref)), 4 * T * P * es, 3 * T * P * es)

        return Case(
            "cg_step", f"T={T} N={_fmt(n)}", "triad_inplace", "torch.ops.metakernels.cg_step", {"T": T, "P": P}, make
        )

    return [case(n) for n in sizes]


# --- hvp (composite: metakernels.hvp over a model, not a torch.ops op) -------------------------------------

HVP_PERTURBATION = 0.01  # per-task parameters = the model's + this * N(0, 1): distinct tasks, as after adaptation


def _hvp_mlp_shapes(grid: str) -> list[tuple[str, list[int], int, int]]:
    """(name, widths, T, N) of the MLP cases (MSE): MAML's sinusoid regression net."""
    return {
        "full": [("sinusoid MLP", [1, 40, 40, 1], 25, 10)],
        "quick": [("sinusoid MLP", [1, 40, 40, 1], 25, 10)],
        "tiny": [("tiny MLP", [1, 8, 8, 1], 3, 4)],
    }[grid]


def _hvp_conv_shapes(grid: str) -> list[tuple[str, int, int, int, int, int, int]]:
    """(name, T, N, channels, blocks, H = W, ways) of the conv-net cases (cross-entropy, one input channel): the
    Omniglot 4-conv net on a 5-way 1-shot support set (N = 5 images per task)."""
    omniglot = ("omniglot conv4", 8, 5, 64, 4, 28, 5)
    return {
        "full": [omniglot, ("omniglot conv4", 32, 5, 64, 4, 28, 5)],
        "quick": [omniglot],
        "tiny": [("tiny conv2", 2, 3, 4, 2, 8, 3)],
    }[grid]


def _conv_net(channels: int, blocks: int, hw: int, ways: int) -> nn.Sequential:
    """blocks x [Conv2d(3x3, pad 1) + BatchNorm2d + ReLU + MaxPool2d(2)], Flatten, Linear(features, ways), on
    one-channel hw x hw images (training mode: batch statistics). Built under a fixed seed."""
    layers: list[nn.Module] = []
    cin, side = 1, hw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(blocks):
            layers += [
                nn.Conv2d(cin, channels, CONV_K, padding=CONV_PADDING),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            cin, side = channels, side // 2
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, ways)).train()


def _mlp_net(widths: list[int]) -> nn.Sequential:
    """Linear layers of the given widths, ReLU between them (the sinusoid net for [1, 40, 40, 1])."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def conv_net_hvp_flops(T: int, N: int, channels: int, blocks: int, hw: int, ways: int, in_channels: int = 1) -> float:
    """FLOPs of one conv-net R-operator product (metakernels/functional/conv_rop.py ConvNetHessian._product) on
    the _conv_net shapes, counting convolutions and matrix products only (2 FLOPs per multiply-add).

    Every convolution-shaped product (forward conv, input gradient convT, weight gradient conv_w) of a block
    costs 2 N Ho Wo Cout Cin k^2 per task (3x3, pad 1, stride 1: Ho, Wo = the block's input size). Per block:
    R-forward conv(x, V) + conv(Rx, W), R-backward conv_w(x, R(dz)) + convT(R(dz), W) + conv_w(Rx, dz) +
    convT(dz, V): 6; the first block has no input direction (Rx = 0) and needs no input gradient (the images):
    conv(x, V) and conv_w(x, R(dz)) only, 2. Per Linear layer (in -> out): 6 products of 2 N in out
    (R-forward Rh W^T + h V^T; R-backward R(dz)^T h + dz^T Rh and R(dz) W + dz V). The forward and the
    gradient are computed once when the operator is built, not per product. Elementwise work (BatchNorm's
    R-terms, ReLU masks, pooling gathers and scatters, the softmax's) is not counted."""
    per_task, cin, side = 0.0, in_channels, hw
    for block in range(blocks):
        conv = 2.0 * N * side * side * channels * cin * CONV_K * CONV_K
        per_task += (2 if block == 0 else 6) * conv
        cin, side = channels, side // 2
    per_task += 6 * 2.0 * N * (channels * side * side) * ways
    return T * per_task


def _timed_hvp(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """matvec(v), in a record_function range "metakernels::hvp" only while a profiler is active. Measured (1
    thread, around a no-op, min of 20 x 5000 calls): the range costs 8.5 us per call even with no profiler
    running, 3-7% of the ~0.3 ms sinusoid product; the check costs 0.06 us (0.02%)."""
    profiler_enabled = torch._C._autograd._profiler_enabled

    def call() -> torch.Tensor:
        if profiler_enabled():
            with record_function("metakernels::hvp"):
                return matvec(v)
        return matvec(v)

    return call


def _hvp_built(model: nn.Module, T: int, x: torch.Tensor, y: torch.Tensor, loss_fn, flops: float) -> Built:
    """The product through metakernels.hvp_operator (fused) and the double-backward product (fused=False), both
    operators built here, outside the timed calls."""
    from .. import ParameterLayout, hvp_operator

    layout = ParameterLayout.from_module(model)
    g = _gen()
    base = layout.flatten_module(model).detach()
    params = (base + HVP_PERTURBATION * torch.randn(T, base.numel(), generator=g)).contiguous()
    v = torch.randn(params.shape, generator=g)
    fused = hvp_operator(model, params, x, y, loss_fn=loss_fn)
    generic = hvp_operator(model, params, x, y, loss_fn=loss_fn, fused=False)
    es = params.element_size()
    # Bytes: parameters, direction and data read, [T, P] written; the conv R-operator also rereads the forward
    # state it saved (inputs, normalised outputs, gradients per block), not counted (a lower bound). The bound
    # is the GEMM rate.
    read = (2 * params.numel() + x.numel()) * es + y.numel() * y.element_size()
    return Built(_timed_hvp(fused, v), lambda: generic(v), read, params.numel() * es, flops=flops)


_HVP_VIA = (
    "metakernels.hvp_operator(model, params, x, y, loss_fn={loss})(v): the product only (the operator is "
    "built once, untimed, as a CG loop builds it once); {path}"
)


def hvp_cases(grid: str, l3: int) -> list[Case]:
    """One Hessian-vector product of all T tasks (H_t v_t) through metakernels.hvp_operator's matvec: the whole
    MLP by the fused R-operator (torch.ops.metakernels.mlp_loss_grad_backward, which recomputes the forward
    and gradient inside: counted, see _mlp_rop_flops), the conv net by conv_rop.py's R-operator (see
    conv_net_hvp_flops). Reference: the same product by double backward (hvp_operator(..., fused=False): one
    backward through the saved torch.func.vmap gradient graph)."""

    def mlp_case(name: str, widths: list[int], T: int, N: int) -> Case:
        P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

        def make() -> Built:
            g = torch.Generator().manual_seed(1)
            x = torch.rand(T, N, widths[0], generator=g) * 10 - 5  # the sinusoid tasks' inputs, [-5, 5]
            y = torch.randn(T, N, widths[-1], generator=g)
            return _hvp_built(_mlp_net(widths), T, x, y, F.mse_loss, _mlp_rop_flops(widths, T, N))

        via = _HVP_VIA.format(loss="F.mse_loss", path="fused MLP R-operator: metakernels::mlp_loss_grad_backward")
        return Case(
            "hvp",
            f"{name} {widths} mse T={T} N={N}",
            "gemm",
            via,
            {"model": "mlp", "T": T, "N": N, "widths": widths, "loss": "mse", "P": P},
            make,
        )

    def conv_case(name: str, T: int, N: int, channels: int, blocks: int, hw: int, ways: int) -> Case:
        model = _conv_net(channels, blocks, hw, ways)  # small: only the parameter count is used until make()
        P = sum(p.numel() for p in model.parameters())

        def make() -> Built:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(T, N, 1, hw, hw, generator=g)
            y = (torch.arange(N) % ways).repeat(T, 1)  # one image per class (N = ways: 1-shot)
            flops = conv_net_hvp_flops(T, N, channels, blocks, hw, ways)
            return _hvp_built(_conv_net(channels, blocks, hw, ways), T, x, y, F.cross_entropy, flops)

        via = _HVP_VIA.format(
            loss="F.cross_entropy", path="conv-net R-operator (functional/conv_rop.py: grouped aten convolutions)"
        )
        return Case(
            "hvp",
            f"{name} {channels}ch {hw}x{hw} cross_entropy T={T} N={N}",
            "gemm",
            via,
            {
                "model": "conv",
                "T": T,
                "N": N,
                "channels": channels,
                "blocks": blocks,
                "H": hw,
                "W": hw,
                "ways": ways,
                "loss": "cross_entropy",
                "P": P,
            },
            make,
        )

    return [mlp_case(*s) for s in _hvp_mlp_shapes(grid)] + [conv_case(*s) for s in _hvp_conv_shapes(grid)]


# Op name -> its grid. An op in OP_NAMES (or COMPOSITE_OPS) gets cases from here when it is available.
CASE_BUILDERS: dict[str, Callable[[str, int], list[Case]]] = {
    "inner_step": inner_step_cases,
    "inner_step_out": inner_step_out_cases,
    "inner_step_backward": inner_step_backward_cases,
    "reptile_update": reptile_update_cases,
    "task_linear": task_linear_cases,
    "task_linear_backward": task_linear_backward_cases,
    "mlp_loss_grad": mlp_loss_grad_cases,
    "mlp_loss_grad_backward": mlp_loss_grad_backward_cases,
    "conv_block": conv_block_cases,
    "conv_block_backward": conv_block_backward_cases,
    "pcgrad": pcgrad_cases,
    "pcgrad_out": pcgrad_out_cases,
    "cg_step": cg_step_cases,
    "hvp": hvp_cases,
}

# Composite entries: public functions over a model, not registered ops (so not in OP_NAMES), profiled like one.
# Name -> the registered ops their fast paths dispatch to: the entry is available when all of these are.
COMPOSITE_OPS: dict[str, tuple[str, ...]] = {
    "hvp": ("mlp_loss_grad_backward",),  # the MLP product; the conv-net R-operator runs on aten convolutions
}


def available_ops() -> list[str]:
    """The ops in metakernels.ops.OP_NAMES registered under torch.ops.metakernels now, in OP_NAMES order, then
    the composite entries (COMPOSITE_OPS) whose ops are registered."""
    from ..ops import OP_NAMES

    ops = [op for op in OP_NAMES if op_registered(op)]
    return ops + [name for name, needs in COMPOSITE_OPS.items() if all(op_registered(op) for op in needs)]


def ops_without_cases() -> list[str]:
    """Available ops the profiler has no grid for (each new op should add one to CASE_BUILDERS; composite
    entries always have one)."""
    return [op for op in available_ops() if op not in CASE_BUILDERS]


def build_cases(grid: str = "quick", ops: list[str] | None = None, l3: int | None = None) -> list[Case]:
    """The cases of the grid for the given ops (default: every available op with a grid).

    Args:
        grid: "full", "quick" or "tiny".
        ops: op names to include; each must be available (see available_ops) and have a grid.
        l3: the L3 size in bytes that the beyond-the-cache sizes are scaled to (default: this machine's).

    Returns:
        The cases, op by op in available_ops() order (OP_NAMES, then the composite entries).

    Raises:
        ValueError: an unknown grid, or an op that is not available or has no grid.
    """
    if grid not in GRIDS:
        raise ValueError(f"metakernels profile: grid must be one of {GRIDS}, got {grid!r}")
    available = available_ops()
    if ops is None:
        selected = [op for op in available if op in CASE_BUILDERS]
    else:
        for op in ops:
            if op not in available:
                raise ValueError(f"metakernels profile: op {op!r} is not available (available: {', '.join(available)})")
            if op not in CASE_BUILDERS:
                raise ValueError(f"metakernels profile: op {op!r} has no profiler cases yet")
        selected = [op for op in available if op in ops]
    l3 = l3 or l3_bytes()
    return [case for op in selected for case in CASE_BUILDERS[op](grid, l3)]
