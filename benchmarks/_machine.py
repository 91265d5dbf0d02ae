"""This machine's rooflines and identity, measured with torch ops: the bounds every benchmark reports against.

Byte-counting convention (the STREAM convention, used for both the machine bounds and every kernel):
**bytes the kernel must move** = each input element it reads counts once + each output element it writes
counts once. Write-allocate (RFO) reads of a destination line, evictions and prefetch overshoot are NOT
counted. Consequence: a kernel that writes a separate output with ordinary stores really moves 4 units over
the bus for the 3 it is credited with (theta, grad -> out), so its bound is the STREAM triad measured the
same way (torch.add(b, c, alpha=s, out=a): also 3 counted, 4 moved); an in-place kernel (out=theta) moves
what it is credited with, and its bound is the in-place triad (a.add_(b, alpha=s)). Measured on this VM
(2 threads, 1.2 GB working set): triad ~22 GB/s counted (~30 GB/s on the bus with the RFO), in-place triad
~35 GB/s, read-only (sum) ~21 GB/s: two cores cannot keep enough reads in flight to saturate DRAM alone.

Regimes: a working set <= CACHE_WS_MAX runs from cache and is reported against the cache-resident bound
(measured at CACHE_WS); one >= 2x the L3 against the DRAM bound; the ones between are in the L3/DRAM
transition and reported against the DRAM bound, flagged as such (their % can exceed 100).

Use:
    python benchmarks/_machine.py [--quick] [--json PATH]   # print (and save) the measurement
    from _machine import measure_machine, machine_info, roofline   # from a benchmark or a profiler
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

MIB = 2**20
# The brief's L3 (DESIGN.md); the VM reports 300 MiB in sysfs. The larger one decides what counts as DRAM.
L3_BYTES_DESIGN = 504 * MIB
CACHE_WS = 48 * MIB  # working set of the cache-resident measurement
CACHE_WS_MAX = 64 * MIB  # at or below this a kernel is compared with the cache bound
DRAM_WS = 1536 * MIB  # working set of the DRAM measurement: 3x the largest L3 figure

# STREAM kernels as torch ops on three float32 arrays a, b, c. (bytes counted per element, function)
PATTERNS = ("read", "copy", "triad", "triad_inplace")


def l3_bytes() -> int:
    """The largest L3 figure we know of: sysfs's (the VM's) or DESIGN.md's 504 MiB."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        sysfs = int(text[:-1]) * {"K": 2**10, "M": MIB, "G": 2**30}[text[-1]] if text[-1].isalpha() else int(text)
    except (OSError, ValueError, KeyError):
        sysfs = 0
    return max(sysfs, L3_BYTES_DESIGN)


def regime(working_set_bytes: float) -> str:
    """The regime of a working set: cache, dram, or l3/dram (the transition, reported against DRAM)."""
    if working_set_bytes <= CACHE_WS_MAX:
        return "cache"
    if working_set_bytes >= 2 * l3_bytes():
        return "dram"
    return "l3/dram"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict:
    """Identity of the run: CPU, cores, caches, versions, commit, date and load (other work on a 2-core VM
    shows up in every figure: a load average above ~0.5 before the run means the numbers are pessimistic)."""
    try:
        import metakernels

        mk = {
            "metakernels_version": metakernels.__version__,
            "extension_available": metakernels.extension_available(),
            "cpu_backend": metakernels.cpu_backend(),
        }
    except Exception as exc:  # a broken build must not stop the machine measurement
        mk = {"metakernels_version": None, "metakernels_error": f"{type(exc).__name__}: {exc}"}
    try:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem_total = None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l3_bytes_sysfs_or_design": l3_bytes(),
        "mem_total_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": dirty,
        "load_average_1m": os.getloadavg()[0],
        **mk,
    }


def time_median(fn: Callable[[], object], reps: int, warmup: int = 2, min_sample_s: float = 0.0) -> dict:
    """Median seconds per call of fn over `reps` samples. A sample repeats fn until it lasts min_sample_s
    (so microsecond calls are not timed one perf_counter pair at a time). Returns median/min/max/samples."""
    for _ in range(warmup):
        fn()
    inner = 1
    if min_sample_s > 0:
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(min_sample_s / one))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "reps": reps,
        "calls_per_sample": inner,
    }


def _touched(n: int) -> torch.Tensor:
    # Writing every element now takes the page faults outside the timed region.
    return torch.empty(n, dtype=torch.float32).uniform_(0.5, 1.5)


def measure_bandwidth(pattern: str, working_set_bytes: int, reps: int) -> dict:
    """GB/s of a STREAM kernel over float32 arrays totalling working_set_bytes, bytes counted as above.

    read: a.sum() (1 read); copy: c.copy_(a) (1 read, 1 write); triad: torch.add(b, c, alpha=s, out=a)
    (2 reads, 1 write); triad_inplace: a.add_(b, alpha=s) (2 reads, 1 write to a line already read).
    """
    arrays = {"read": 1, "copy": 2, "triad": 3, "triad_inplace": 2}[pattern]
    n = working_set_bytes // (4 * arrays)
    a, b = _touched(n), _touched(n) if arrays > 1 else None
    c = _touched(n) if arrays > 2 else None
    sign = [1.0]

    def inplace() -> None:  # alternating sign keeps a bounded however many calls
        sign[0] = -sign[0]
        a.add_(b, alpha=1e-3 * sign[0])

    fn, counted = {
        "read": (lambda: a.sum(), 1),
        "copy": (lambda: b.copy_(a), 2),
        "triad": (lambda: torch.add(b, c, alpha=0.5, out=a), 3),
        "triad_inplace": (inplace, 3),
    }[pattern]
    t = time_median(fn, reps, warmup=2, min_sample_s=0.02)
    return {
        "pattern": pattern,
        "working_set_bytes": n * 4 * arrays,
        "bytes_counted": n * 4 * counted,
        "gbps": n * 4 * counted / t["median_s"] / 1e9,
        **t,
    }


def measure_gemm(n: int, reps: int) -> dict:
    """fp32 GEMM rate of torch.mm(a, b, out=c), n x n, in GFLOP/s (2 n^3 flops)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    t = time_median(lambda: torch.mm(a, b, out=c), reps, warmup=2)
    return {"n": n, "gflops": 2 * n**3 / t["median_s"] / 1e9, **t}


def measure_machine(quick: bool = False, threads: int | None = None) -> dict:
    """Measures the cache and DRAM bandwidth of every STREAM pattern and the fp32 GEMM rate.

    Takes ~10 s (quick: ~5 s) and ~1.6 GB of memory for the DRAM arrays, freed before returning.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    reps = 5 if quick else 11
    out = {
        "info": machine_info(),
        "convention": "bytes the kernel must move: reads + writes, RFO not counted",
        "cache": {},
        "dram": {},
    }
    for p in PATTERNS:
        out["cache"][p] = measure_bandwidth(p, CACHE_WS, reps)
    for p in PATTERNS:
        out["dram"][p] = measure_bandwidth(p, DRAM_WS, reps)
    out["gemm_fp32"] = measure_gemm(2048, 3 if quick else 7)
    out["info"]["load_average_1m_after"] = os.getloadavg()[0]
    return out


def roofline(machine: dict, working_set_bytes: float, pattern: str) -> tuple[str, float, str]:
    """(bound name, GB/s, regime) for a kernel of the given STREAM pattern at this working set."""
    where = regime(working_set_bytes)
    level = "cache" if where == "cache" else "dram"
    return f"{level}.{pattern}", machine[level][pattern]["gbps"], where


def best_bandwidth(machine: dict, working_set_bytes: float) -> float:
    """The highest bandwidth any pattern reached at this level (in practice the in-place triad, the one
    with no hidden RFO traffic): the stricter bound, that credits a kernel nothing for its store pattern."""
    level = "cache" if regime(working_set_bytes) == "cache" else "dram"
    return max(v["gbps"] for v in machine[level].values())



def bandwidth_fields(machine: dict, read: float, written: float, timing: dict, pattern: str) -> dict:
    """The columns every bandwidth row shares: bytes moved, time, GB/s and the roofline it is measured against.

    Args:
        read, written: bytes the kernel must read and write (working set = read + written).
        timing: a time_median() result.
        pattern: the machine pattern that bounds this kernel ("read", "triad", "triad_inplace", ...).
    """
    ws = read + written
    gbps = ws / timing["median_s"] / 1e9
    bound, bound_gbps, where = roofline(machine, ws, pattern)
    return {
        "ws_bytes": ws,
        "bytes_read": read,
        "bytes_written": written,
        "t_median_us": timing["median_s"] * 1e6,
        "t_min_us": timing["min_s"] * 1e6,
        "gbps": gbps,
        "regime": where,
        "bound": bound,
        "bound_gbps": bound_gbps,
        "pct_roofline": 100 * gbps / bound_gbps,
        "pct_best_bandwidth": 100 * gbps / best_bandwidth(machine, ws),
    }


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

def format_machine(m: dict) -> str:
    info = m["info"]
    lines = [
        f"{info['cpu_model']} | {info['logical_cpus']} CPUs, torch threads {info['torch_threads']} | "
        f"torch {info['torch_version']} | metakernels {info.get('metakernels_version')} "
        f"({info.get('cpu_backend')}) | commit {info['git_commit'][:10]}{' (dirty)' if info['git_dirty'] else ''} | "
        f"load {info['load_average_1m']:.2f} -> {info.get('load_average_1m_after', float('nan')):.2f}",
        f"bandwidth, GB/s ({m['convention']}):",
        f"  {'pattern':<14}{'cache ' + str(CACHE_WS // MIB) + ' MiB':>16}{'DRAM ' + str(DRAM_WS // MIB) + ' MiB':>16}",
    ]
    for p in PATTERNS:
        lines.append(f"  {p:<14}{m['cache'][p]['gbps']:>16.1f}{m['dram'][p]['gbps']:>16.1f}")
    g = m["gemm_fp32"]
    lines.append(f"fp32 GEMM {g['n']}^3: {g['gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.5, poll_s: float = 5.0) -> float:
    """Waits (up to max_wait_s) for the 1-minute load average to fall below threshold; returns it.

    Every figure here is of a 2-core machine that other work may share: another process running halves
    the bandwidths and doubles the latencies. The load is recorded in the results either way."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    return load


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fmt_n(n: float) -> str:
    """1e4-style element counts for tables."""
    return f"{n:.0e}".replace("e+0", "e") if n >= 1000 else str(int(n))


def fmt_bytes(b: float) -> str:
    return f"{b / MIB:.0f} MiB" if b >= MIB else f"{b / 1024:.0f} KiB"


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
