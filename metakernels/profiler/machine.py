"""This machine's rooflines and identity, measured with torch ops: the bounds the profiler and every benchmark
report against.

Byte-counting convention (the STREAM convention, used for both the machine bounds and every kernel):
**bytes the kernel must move** = each input element it reads counts once + each output element it writes
counts once. Write-allocate (RFO) reads of a destination line, evictions and prefetch overshoot are NOT
counted. Consequence: a kernel that writes a separate output with ordinary stores really moves 4 units over
the bus for the 3 it is credited with (theta, grad -> out), so its bound is the STREAM triad measured the
same way (torch.add(b, c, alpha=s, out=a): also 3 counted, 4 moved); an in-place kernel (out=theta) moves
what it is credited with, and its bound is the in-place triad (a.add_(b, alpha=s)). Measured on the dev VM
(2 threads, 1.5 GB working set): triad ~22 GB/s counted (~30 GB/s on the bus with the RFO), in-place triad
~35 GB/s, read-only (sum) ~21 GB/s: two cores cannot keep enough reads in flight to saturate DRAM alone.

Regimes, with L3 the size read from sysfs (or lscpu; METAKERNELS_L3_BYTES overrides both): a working set
<= L3 is reported against the cache-resident bound (measured at a working set well inside the L3); one
>= 2x the L3 against the DRAM bound (measured at DRAM_WS_FACTOR x the L3); the ones between are in the
L3/DRAM transition and reported against the DRAM bound, flagged as such (their % can exceed 100). On the
dev VM (sysfs L3 300 MiB) inner_step's forward ran at the 48 MiB triad's speed with a 114 MiB working set
(39.3 vs 39.2 GB/s) and slower at 343 MiB (28.9 GB/s; DRAM triad 22.4): the L3 is the line between the bounds.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20
REPO = Path(__file__).resolve().parents[2]

CACHE_WS_MAX = 48 * MIB  # working set of the cache-resident measurement (less when the L3 is small)
DRAM_WS_FACTOR = 4  # the DRAM measurement's working set, in L3 sizes
L3_FALLBACK_BYTES = 256 * MIB  # only when neither sysfs nor lscpu says (recorded as the source "fallback")
GEMM_N = 2048

# STREAM kernels as torch ops on float32 arrays: read (a.sum()), copy, triad, in-place triad.
PATTERNS = ("read", "copy", "triad", "triad_inplace")


def _parse_size(text: str) -> int:
    """'307200K', '300M', '314572800' -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@functools.lru_cache(maxsize=1)
def l3_info() -> tuple[int, str]:
    """(L3 size in bytes, where it came from): METAKERNELS_L3_BYTES, sysfs, lscpu, or a fallback.

    A VM may report less L3 than its host has (DESIGN.md quotes 504 MiB for this host; the dev VM's sysfs
    says 300 MiB): set METAKERNELS_L3_BYTES (e.g. "504M") to override what the VM reports.
    """
    env = os.environ.get("METAKERNELS_L3_BYTES")
    if env:
        try:
            return _parse_size(env), "METAKERNELS_L3_BYTES"
        except ValueError:
            pass
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (index / "level").read_text().strip() == "3":
                return _parse_size((index / "size").read_text()), "sysfs"
    except (OSError, ValueError):
        pass
    try:
        text = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("L3 cache:"):
                return _parse_size(line.split(":", 1)[1].split()[0]), "lscpu"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return L3_FALLBACK_BYTES, "fallback"


def l3_bytes() -> int:
    """This machine's L3 size in bytes (see l3_info)."""
    return l3_info()[0]


def cache_working_set(l3: int | None = None) -> int:
    """The cache-resident measurement's working set: 48 MiB, or a quarter of a smaller L3 (well inside it,
    well beyond any L2)."""
    return min(CACHE_WS_MAX, (l3 or l3_bytes()) // 4)


def dram_working_set(l3: int | None = None) -> int:
    """The DRAM measurement's working set: DRAM_WS_FACTOR x the L3."""
    return DRAM_WS_FACTOR * (l3 or l3_bytes())


def _machine_l3(machine: dict | None) -> int:
    """The L3 a measurement was taken with (older JSONs lack it: this machine's)."""
    return int((machine or {}).get("l3_bytes") or l3_bytes())


def regime(working_set_bytes: float, l3: int | None = None) -> str:
    """The regime of a working set: cache (fits the L3), dram (>= 2x the L3), or l3/dram (the transition,
    reported against DRAM)."""
    l3 = l3 or l3_bytes()
    if working_set_bytes <= l3:
        return "cache"
    if working_set_bytes >= 2 * l3:
        return "dram"
    return "l3/dram"


def git(*args: str) -> str:
    """Output of a git command in the repository ("" outside a checkout)."""
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
    l3, source = l3_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l3_bytes": l3,
        "l3_source": source,
        "mem_total_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_1m": os.getloadavg()[0],
        **mk,
    }


def time_median(fn: Callable[[], object], reps: int, warmup: int = 2, min_sample_s: float = 0.0) -> dict:
    """Median seconds per call of fn over `reps` samples.

    Args:
        fn: the call to time (no arguments).
        reps: number of samples.
        warmup: untimed calls first (first-call costs: allocator, lazy initialisation, cold caches).
        min_sample_s: a sample repeats fn until it lasts this long, so microsecond calls are not timed one
            perf_counter pair at a time.

    Returns:
        {"median_s", "min_s", "max_s", "reps", "calls_per_sample"}.
    """
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

    read: a.sum() (1 read); copy: b.copy_(a) (1 read, 1 write); triad: torch.add(b, c, alpha=s, out=a)
    (2 reads, 1 write); triad_inplace: a.add_(b, alpha=s) (2 reads, 1 write to a line already read).
    """
    arrays = {"read": 1, "copy": 2, "triad": 3, "triad_inplace": 2}[pattern]
    n = max(1, working_set_bytes // (4 * arrays))
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
    t = time_median(lambda: torch.mm(a, b, out=c), reps, warmup=2, min_sample_s=0.02 if n < 512 else 0.0)
    return {"n": n, "gflops": 2 * n**3 / t["median_s"] / 1e9, **t}


def measure_machine(
    quick: bool = False,
    threads: int | None = None,
    cache_ws: int | None = None,
    dram_ws: int | None = None,
    gemm_n: int = GEMM_N,
) -> dict:
    """Measures the cache-resident and DRAM bandwidth of every STREAM pattern and the fp32 GEMM rate.

    Args:
        quick: fewer repetitions.
        threads: torch threads to set first (None: keep torch's).
        cache_ws, dram_ws: working sets in bytes (defaults: cache_working_set(), dram_working_set(): 48 MiB and
            4x the L3). Smaller ones are for tests only: the figures are then not the machine's bounds.
        gemm_n: the GEMM's size.

    Returns:
        {"info", "convention", "l3_bytes", "cache": {pattern: ...}, "dram": {pattern: ...}, "gemm_fp32"}.
        Takes ~10 s (quick: ~5 s) and 4x the L3 of memory for the DRAM arrays, freed before returning.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    reps = 5 if quick else 11
    info = machine_info()
    out = {
        "info": info,
        "convention": "bytes the kernel must move: reads + writes, RFO not counted",
        "l3_bytes": info["l3_bytes"],
        "cache": {},
        "dram": {},
    }
    cache_ws = cache_ws or cache_working_set()
    dram_ws = dram_ws or dram_working_set()
    for p in PATTERNS:
        out["cache"][p] = measure_bandwidth(p, cache_ws, reps)
    for p in PATTERNS:
        out["dram"][p] = measure_bandwidth(p, dram_ws, 3 if quick else 7)
    out["gemm_fp32"] = measure_gemm(gemm_n, 3 if quick else 7)
    out["info"]["load_average_1m_after"] = os.getloadavg()[0]
    return out


def roofline(machine: dict, working_set_bytes: float, pattern: str) -> tuple[str, float, str]:
    """(bound name, GB/s, regime) for a kernel of the given STREAM pattern at this working set."""
    where = regime(working_set_bytes, _machine_l3(machine))
    level = "cache" if where == "cache" else "dram"
    return f"{level}.{pattern}", machine[level][pattern]["gbps"], where


def best_bandwidth(machine: dict, working_set_bytes: float) -> float:
    """The highest bandwidth any pattern reached at this level (in practice the in-place triad, the one
    with no hidden RFO traffic): the stricter bound, that credits a kernel nothing for its store pattern."""
    level = "cache" if regime(working_set_bytes, _machine_l3(machine)) == "cache" else "dram"
    return max(v["gbps"] for v in machine[level].values())


def bandwidth_fields(machine: dict, read: float, written: float, timing: dict, pattern: str) -> dict:
    """The columns every bandwidth row shares: bytes moved, time, GB/s and the roofline it is measured against.

    Args:
        machine: a measure_machine() result.
        read, written: bytes the kernel must read and write (working set = read + written).
        timing: a time_median() result.
        pattern: the machine pattern that bounds this kernel ("read", "triad", "triad_inplace", ...).

    Returns:
        ws_bytes, bytes_read, bytes_written, t_median_us, t_min_us, gbps, regime, bound, bound_gbps,
        pct_roofline, pct_best_bandwidth.
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


def format_machine(m: dict) -> str:
    """A few lines describing a measure_machine() result: identity, bandwidth table, GEMM rate."""
    info = m["info"]
    l3 = _machine_l3(m)
    cache_ws = m["cache"]["triad"]["working_set_bytes"]
    dram_ws = m["dram"]["triad"]["working_set_bytes"]
    lines = [
        f"{info['cpu_model']} | {info['logical_cpus']} CPUs, torch threads {info['torch_threads']} | "
        f"L3 {fmt_bytes(l3)} ({info.get('l3_source', 'sysfs')}) | torch {info['torch_version']} | metakernels "
        f"{info.get('metakernels_version')} ({info.get('cpu_backend')}) | commit {info['git_commit'][:10]}"
        f"{' (dirty)' if info['git_dirty'] else ''} | "
        f"load {info['load_average_1m']:.2f} -> {info.get('load_average_1m_after', float('nan')):.2f}",
        f"bandwidth, GB/s ({m['convention']}):",
        f"  {'pattern':<14}{'cache ' + fmt_bytes(cache_ws):>16}{'DRAM ' + fmt_bytes(dram_ws):>16}",
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


def load_json(path: str | os.PathLike) -> dict:
    """Reads a JSON file (a saved measurement)."""
    return json.loads(Path(path).read_text())


def save_json(obj: dict, path: str | os.PathLike) -> None:
    """Writes obj as indented JSON, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fmt_n(n: float) -> str:
    """1e4-style element counts for tables."""
    return f"{n:.0e}".replace("e+0", "e") if n >= 1000 else str(int(n))


def fmt_bytes(b: float) -> str:
    """Bytes as MiB or KiB for tables."""
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    if b >= MIB:
        return f"{b / MIB:.0f} MiB"
    return f"{b / 1024:.0f} KiB" if b >= 1024 else f"{b:.0f} B"
