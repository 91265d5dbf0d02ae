"""The `metakernels profile` subcommand and its Python entry, profile()."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from . import cases as C
from .machine import MIB, format_machine, load_json, machine_info, measure_machine, wait_for_quiet
from .report import format_table, write_csv, write_json
from .runner import run_cases, set_threads, trace_pass

DEFAULT_OUT = "runs/profile"

# The "tiny" grid (tests): the machine measured at toy sizes too, so the whole run takes seconds. Its bounds
# are then not this machine's rooflines; the JSON's config says so.
TINY_MACHINE = dict(quick=True, cache_ws=1 * MIB, dram_ws=4 * MIB, gemm_n=128)


def profile(
    grid: str = "quick",
    ops: list[str] | None = None,
    threads: int | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    plot: bool = True,
    trace: str | os.PathLike | None = None,
    machine: dict | str | os.PathLike | None = None,
    reference: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict:
    """Measures the machine, times every op case, prints the table and writes profile.{json,csv,png}.

    Args:
        grid: "full", "quick" (~1 minute) or "tiny" (tests: toy sizes and a toy machine measurement).
        ops: op names to profile (default: every available op with cases).
        threads: torch intra-op threads (default: torch's, all cores).
        out: output directory.
        plot: write profile.png (skipped with a message when matplotlib is missing).
        trace: also write a chrome trace of one pass over the grid to this file.
        machine: a measure_machine() result, or the path of a JSON holding one, to reuse instead of measuring.
        reference: time the reference implementations too (the speedup column).
        echo: where progress and the table go (None: silent).

    Returns:
        {"machine", "run", "rows", "ops", "paths", "errors"}: run is this run's identity (commit, date, versions,
        threads, load: machine's "info" is the measurement's, which may come from an earlier run); paths maps
        "json", "csv", "png", "trace" to the files written; errors counts the cases whose op raised.

    Raises:
        ValueError: an unknown grid or op, or threads < 1.
    """
    say = echo or (lambda _line: None)
    if grid not in C.GRIDS:
        raise ValueError(f"metakernels profile: grid must be one of {C.GRIDS}, got {grid!r}")
    n_threads = set_threads(threads)
    cases = C.build_cases(grid, ops)  # validates ops before the (slow) machine measurement
    if isinstance(machine, (str, os.PathLike)):
        machine = load_json(machine)
    if machine is not None and "machine" in machine:
        machine = machine["machine"]  # a profile.json holds the measurement under "machine"
    run = machine_info()  # this run's commit, date and load, whether or not the machine is measured now
    if machine is None:
        say("measuring the machine (bandwidth: cache-resident and DRAM working sets; fp32 GEMM) ...")
        machine = measure_machine(**TINY_MACHINE) if grid == "tiny" else measure_machine(quick=grid != "full")
    say(format_machine(machine))
    load = os.getloadavg()[0]
    if load >= 0.5:
        say(
            f"note: load average {load:.2f}: other work shares the CPUs, so times are pessimistic and noisy "
            "(a busy core stalls every multi-threaded kernel; try --threads 1, or rerun when quiet)"
        )
    op_lists = {
        "available": C.available_ops(),
        "profiled": list(dict.fromkeys(c.op for c in cases)),
        "without_cases": C.ops_without_cases(),
    }
    if op_lists["without_cases"] and ops is None:
        say(
            f"note: no profiler cases for {', '.join(op_lists['without_cases'])} "
            "(add them to metakernels/profiler/cases.py CASE_BUILDERS)"
        )
    say(f"timing {len(cases)} cases ({grid} grid, {n_threads} threads) ...")
    rows = run_cases(cases, machine, grid, reference=reference, progress=say if grid != "tiny" else None)
    run["load_average_1m_end"] = os.getloadavg()[0]
    say("")
    say(format_table(rows))
    out = Path(out)
    config = {
        "grid": grid,
        "threads": n_threads,
        "ops": ops,
        "reference": reference,
        "machine_note": "toy working sets (tiny grid): not this machine's rooflines" if grid == "tiny" else None,
        "dtype": "float32",
        "cpu_backend": _cpu_backend(),
    }
    paths = {
        "json": write_json(out / "profile.json", machine, run, config, rows, op_lists),
        "csv": write_csv(out / "profile.csv", run, rows),
    }
    if plot:
        from .plot import plot_profile

        title = (
            f"metakernels profile ({grid}) | {run['cpu_model']} | {n_threads} threads | torch "
            f"{run['torch_version']} | commit {run['git_commit'][:10]}{' (dirty)' if run['git_dirty'] else ''}"
        )
        png = plot_profile(rows, out / "profile.png", title=title)
        if png is not None:
            paths["png"] = png
    if trace is not None:
        paths["trace"] = trace_pass(cases, trace, reference=reference)
    say("wrote " + " ".join(str(p) for p in paths.values()))
    errors = [r for r in rows if r.get("error")]
    if errors:
        say(f"{len(errors)} of {len(rows)} cases failed (see ERROR above; their rows carry the error)")
    return {"machine": machine, "run": run, "rows": rows, "ops": op_lists, "paths": paths, "errors": len(errors)}


def _cpu_backend() -> str | None:
    try:
        import metakernels

        return metakernels.cpu_backend()
    except Exception:  # noqa: BLE001  (recorded for information only)
        return None


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def add_profile_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the `profile` subcommand to the `metakernels` command line."""
    p = sub.add_parser(
        "profile",
        help="measure this machine's rooflines and time every fused op against them",
        description="Measures this machine's DRAM bandwidth (working set 4x the L3), cache-resident bandwidth "
        "and fp32 GEMM rate, then times every fused op (and metakernels.hvp's product) over a size "
        "grid: median time, GB/s or "
        "GFLOP/s, % of the applicable roofline, speedup over the pure-PyTorch reference. Prints a "
        "table; writes OUT/profile.json, profile.csv and profile.png.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller grid and fewer repetitions (~1 minute)")
    p.add_argument(
        "--ops",
        default=None,
        metavar="A,B",
        help="comma-separated op names (default: every op registered now, and hvp: one Hessian-vector "
        "product of all tasks through metakernels.hvp_operator; the profiler has cases for "
        + ", ".join(C.CASE_BUILDERS)
        + ")",
    )
    p.add_argument("--threads", type=_threads, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="do not write profile.png")
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="also write a chrome trace (torch.profiler) of one pass over the grid to FILE",
    )
    p.add_argument(
        "--machine-json",
        default=None,
        metavar="PATH",
        help="reuse the machine measurement in a profile.json (or benchmarks/_machine.py JSON)",
    )
    p.add_argument("--no-reference", action="store_true", help="do not time the references (no speedup column)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the 1-minute load average to fall below 0.5",
    )
    # Tests only: toy sizes and a toy machine measurement, a few seconds in all.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return p


def run_profile_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs `metakernels profile` with parsed arguments; usage errors go through parser.error."""
    grid = "tiny" if args.tiny else "quick" if args.quick else "full"
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    if args.wait_quiet > 0:
        wait_for_quiet(args.wait_quiet)
    machine = None
    if args.machine_json:
        try:
            machine = load_json(args.machine_json)
        except (OSError, ValueError) as exc:
            parser.error(f"profile: cannot read --machine-json {args.machine_json}: {exc}")
    try:
        result = profile(
            grid=grid,
            ops=ops,
            threads=args.threads,
            out=args.out,
            plot=not args.no_plot,
            trace=args.trace,
            machine=machine,
            reference=not args.no_reference,
        )
    except ValueError as exc:
        parser.error(str(exc).removeprefix("metakernels "))
    return 1 if result["errors"] else 0
