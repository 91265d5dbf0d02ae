"""The benchmarks' side of the machine measurement: result files and the shared command-line options.

The measurement itself (STREAM bandwidths at cache-resident and DRAM working sets, the fp32 GEMM rate, the
byte-counting convention and the regimes) lives in metakernels.profiler.machine, shared with
`metakernels profile`; its names are re-exported here so the benchmark scripts use one module.

Use:
    python benchmarks/_machine.py [--quick] [--json PATH]   # print (and save) the measurement
    import _machine as M; M.measure_machine(), M.bandwidth_fields(...), M.write_results(...)
"""

from __future__ import annotations

import argparse
import csv
import json  # noqa: F401  (the benchmark scripts use M.json)
import os  # noqa: F401  (the benchmark scripts use M.os)
import sys
from pathlib import Path

import torch

from metakernels.profiler.machine import (  # noqa: F401  (re-exported for the benchmark scripts)
    MIB,
    PATTERNS,
    bandwidth_fields,
    best_bandwidth,
    cache_working_set,
    dram_working_set,
    fmt_bytes,
    fmt_n,
    format_machine,
    l3_bytes,
    l3_info,
    load_json,
    machine_info,
    measure_bandwidth,
    measure_gemm,
    measure_machine,
    regime,
    roofline,
    save_json,
    time_median,
    wait_for_quiet,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# DESIGN.md's L3 figure for the host. No bound uses it any more (the L3 is read from sysfs/lscpu, see
# l3_info); kept because bench_pcgrad.py falls back to it when sysfs cannot be read.
L3_BYTES_DESIGN = 504 * MIB


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--quick, --threads, --wait-quiet and --machine-json, shared by every benchmark script."""
    parser.add_argument("--quick", action="store_true", help="a smaller grid and fewer repetitions (~1 minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for the 1-minute load average to fall below 0.5",
    )
    parser.add_argument(
        "--machine-json",
        type=Path,
        default=None,
        help="reuse a measurement written by _machine.py instead of measuring now",
    )


def machine_from_arguments(args: argparse.Namespace) -> dict:
    """Applies --threads and --wait-quiet, then measures (or loads) the machine's bounds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    wait_for_quiet(args.wait_quiet)
    return load_json(args.machine_json) if args.machine_json else measure_machine(quick=args.quick)


def write_results(name: str, machine: dict, config: dict, rows: list[dict], summary: dict) -> tuple[Path, Path]:
    """results/<name>.json (machine, config, summary, rows) and results/<name>.csv (rows, one header
    comment line naming the machine, versions and commit)."""
    base = RESULTS / name
    save_json(
        {"benchmark": name, "machine": machine, "config": config, "summary": summary, "results": rows},
        base.with_suffix(".json"),
    )
    fields = list(dict.fromkeys(k for r in rows for k in r))
    info = machine["info"]
    with base.with_suffix(".csv").open("w", newline="") as f:
        dirty = " dirty" if info["git_dirty"] else ""
        f.write(
            f"# {name} | {info['cpu_model']} | torch {info['torch_version']} | metakernels "
            f"{info.get('metakernels_version')} | commit {info['git_commit']}{dirty} | {info['date']} | "
            f"load {info['load_average_1m']:.2f}\n"
        )
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return base.with_suffix(".json"), base.with_suffix(".csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure this machine's bandwidth and GEMM rate.")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~5 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--json", type=Path, default=RESULTS / "machine.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    m = measure_machine(quick=args.quick, threads=args.threads)
    print(format_machine(m))
    save_json(m, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
