"""Times the op cases: warm-up, median of repetitions, and the metrics against the machine's rooflines."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import BANDWIDTH_BOUNDS, Built, Case
from .machine import best_bandwidth, regime, time_median


@dataclass(frozen=True)
class Repetitions:
    """How long to time each case.

    Attributes:
        reps: timed samples per case (the median is reported).
        warmup: untimed calls first.
        min_sample_s: a sample repeats the call until it lasts this long (microsecond calls).
        big_reps: samples for a case whose working set exceeds the L3 (each call is tens of ms).
        reference_reps: samples of the reference at such sizes (it allocates its temporaries: slow; PCGrad's
            reference loop takes ~2 s per call at 2.5x the L3).
        reference_warmup: untimed reference calls first at such sizes. The reference allocates fresh
            temporaries on every call (large blocks go back to the OS, so their page faults recur), so a
            warm-up changes little there.
    """

    reps: int
    warmup: int
    min_sample_s: float
    big_reps: int
    reference_reps: int
    reference_warmup: int


REPETITIONS = {
    "full": Repetitions(reps=11, warmup=3, min_sample_s=0.05, big_reps=5, reference_reps=3, reference_warmup=1),
    "quick": Repetitions(reps=5, warmup=2, min_sample_s=0.01, big_reps=3, reference_reps=2, reference_warmup=0),
    "tiny": Repetitions(reps=3, warmup=1, min_sample_s=0.0, big_reps=3, reference_reps=2, reference_warmup=0),
}


def _time(fn: Callable[[], object], reps: Repetitions, big: bool, reference: bool) -> dict:
    if big and reference:
        return time_median(fn, reps.reference_reps, warmup=reps.reference_warmup, min_sample_s=0.0)
    if big:
        return time_median(fn, reps.big_reps, warmup=1, min_sample_s=0.0)
    return time_median(fn, reps.reps, warmup=reps.warmup, min_sample_s=reps.min_sample_s)


def measure_case(case: Case, machine: dict, reps: Repetitions, reference: bool = True) -> dict:
    """Times one case (and its reference) and computes its row of the profile.

    Args:
        case: the case (its inputs are built here and freed on return).
        machine: a measure_machine() result: the rooflines.
        reps: the repetition policy.
        reference: also time the reference call (the speedup column).

    Returns:
        The row: op, case, via, params, bytes and FLOPs per call, times (us), rate (GB/s or GFLOP/s), the
        regime and the bound it is measured against, % of that bound, and the speedup over the reference.
    """
    built: Built = case.make()
    read, written, flops = built.bytes_read, built.bytes_written, built.flops
    ws = read + written
    where = regime(ws, int(machine.get("l3_bytes") or 0) or None)
    big = where != "cache"
    t_ref, reference_error = None, None
    with torch.no_grad():  # the ops' inputs need no grad: this only keeps autograd bookkeeping out
        try:
            t = _time(built.call, reps, big, reference=False)
        except Exception as exc:  # noqa: BLE001  (one failing case must not cost the rest of the profile)
            return error_row(case, f"{type(exc).__name__}: {_first_line(exc)}", read, written, flops)
        if reference and built.reference is not None:
            # A broken reference costs the speedup column of this case, not the profile.
            try:
                t_ref = _time(built.reference, reps, big, reference=True)
            except Exception as exc:  # noqa: BLE001
                reference_error = f"{type(exc).__name__}: {_first_line(exc)}"
    del built
    _collect_if_big(ws)
    seconds = t["median_s"]
    gbps = ws / seconds / 1e9
    gflops = flops / seconds / 1e9 if flops else None
    if case.bound == "gemm":
        bound_name, bound_value, unit, rate = "gemm_fp32", machine["gemm_fp32"]["gflops"], "GFLOP/s", gflops
        where = "gemm"
    elif case.bound in BANDWIDTH_BOUNDS:
        level = "cache" if where == "cache" else "dram"
        bound_name, bound_value, unit, rate = f"{level}.{case.bound}", machine[level][case.bound]["gbps"], "GB/s", gbps
    else:
        raise ValueError(f"metakernels profile: case {case.op} {case.label!r} has an unknown bound {case.bound!r}")
    return {
        "op": case.op,
        "case": case.label,
        "via": case.via,
        "params": case.params,
        "bytes_read": read,
        "bytes_written": written,
        "ws_bytes": ws,
        "flops": flops,
        "t_median_us": seconds * 1e6,
        "t_min_us": t["min_s"] * 1e6,
        "t_max_us": t["max_s"] * 1e6,
        "reps": t["reps"],
        "calls_per_sample": t["calls_per_sample"],
        "gbps": gbps,
        "gflops": gflops,
        "rate": rate,
        "rate_unit": unit,
        "regime": where,
        "bound": bound_name,
        "bound_value": bound_value,
        "pct_of_bound": 100 * rate / bound_value,
        "pct_best_bandwidth": None if case.bound == "gemm" else 100 * gbps / best_bandwidth(machine, ws),
        "reference_us": t_ref["median_s"] * 1e6 if t_ref else None,
        "speedup_vs_reference": t_ref["median_s"] / seconds if t_ref else None,
        "reference_error": reference_error,
        "error": None,
    }


# The numeric fields of a row, None in the row of a case whose op call failed.
_TIMED_FIELDS = ("t_median_us", "t_min_us", "t_max_us", "reps", "calls_per_sample", "gbps", "gflops", "rate",
                 "rate_unit", "regime", "bound", "bound_value", "pct_of_bound", "pct_best_bandwidth", "reference_us",
                 "speedup_vs_reference", "reference_error")


def error_row(case: Case, error: str, read: int, written: int, flops: float) -> dict:
    """The row of a case whose op call raised: the sizes, the error, no timings."""
    return {"op": case.op, "case": case.label, "via": case.via, "params": case.params, "bytes_read": read,
            "bytes_written": written, "ws_bytes": read + written, "flops": flops,
            **dict.fromkeys(_TIMED_FIELDS), "error": error}


def _first_line(exc: BaseException) -> str:
    # Dispatcher errors list every dispatch key over dozens of lines; the first says what went wrong.
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _collect_if_big(ws_bytes: int) -> None:
    # A case's tensors are freed when its Built goes (no reference cycles); a collection makes sure before
    # the next large allocation, and costs ~0.1-0.4 s with torch loaded: only after large cases.
    if ws_bytes >= 64 * 2**20:
        gc.collect()


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads (None: leave torch's default, all cores) and returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"metakernels profile: threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_cases(
    cases: list[Case],
    machine: dict,
    grid: str,
    reference: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Times every case, one at a time (only one case's inputs alive), in order.

    Args:
        cases: from build_cases().
        machine: a measure_machine() result.
        grid: the grid the cases come from ("full", "quick", "tiny"): sets the repetitions.
        reference: also time the references.
        progress: called with a line per case (e.g. print), or None.

    Returns:
        One row per case (see measure_case).
    """
    reps = REPETITIONS[grid]
    rows = []
    for i, case in enumerate(cases):
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.op}: {case.label}")
        rows.append(measure_case(case, machine, reps, reference))
    return rows


def trace_pass(cases: list[Case], path: str | os.PathLike, reference: bool = True) -> Path:
    """Runs every case once under torch.profiler and writes a chrome trace (chrome://tracing, Perfetto).

    Each case's input building, op call and reference call sit in record_function ranges named
    "<op> | <case> | inputs|op|reference"; inside them the ops appear as "metakernels::<op>".
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for case in cases:
            name = f"{case.op} | {case.label}"
            with record_function(f"{name} | inputs"):
                built = case.make()
            with torch.no_grad():
                built.call()  # warm: first-call costs out of the traced call
                with record_function(f"{name} | op"):
                    built.call()
                if reference and built.reference is not None:
                    with record_function(f"{name} | reference"):
                        try:
                            built.reference()
                        except Exception:  # noqa: BLE001  (reported by the timed pass)
                            pass
            ws = built.bytes_read + built.bytes_written
            del built
            _collect_if_big(ws)
    prof.export_chrome_trace(str(path))
    return path
