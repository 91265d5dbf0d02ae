"""Benchmark of metakernels.reptile_update: theta + eps * (mean_t fast[t] - theta) in one pass.

Bytes counted (benchmarks/_machine.py's convention): reads T*P + P (fast, theta), writes P (the new theta).
With T = 16 the writes are 1/18 of the bytes, so the applicable bound is the read bandwidth (a.sum()):
cache-resident below 64 MiB, DRAM from 2x the L3 (the largest size here, T*P = 3e8: 1.35 GB). The op
allocates its [P] output (no out= variant); at the largest size that is 75 MB of fresh pages per call,
~5% of the bytes read, and it is in the figures.

    python benchmarks/bench_reptile_update.py --quick    # ~1 minute
    python benchmarks/bench_reptile_update.py            # full grid

Writes benchmarks/results/reptile_update[_quick].{json,csv}.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine as M  # noqa: E402

import metakernels  # noqa: E402
from metakernels import reference as R  # noqa: E402

TARGET_DRAM_FRACTION = 0.80


def eager(theta: torch.Tensor, fast: torch.Tensor, epsilon: float) -> torch.Tensor:
    """What a user writes in plain torch (float32 mean): the peer baseline."""
    return theta + epsilon * (fast.mean(0) - theta)


def bench(machine: dict, num_tasks: int, sizes: list[int], quick: bool) -> list[dict]:
    rows = []
    for n in sizes:
        rows += _rows(machine, num_tasks, n, quick)
        gc.collect()
    return rows


def _rows(machine: dict, T: int, n: int, quick: bool) -> list[dict]:
    rows = []
    P = max(1, n // T)
    g = torch.Generator().manual_seed(0)
    fast = torch.rand(T, P, generator=g)
    theta = torch.rand(P, generator=g)
    es = fast.element_size()
    read, written = (T * P + P) * es, P * es
    ws = read + written
    big = ws >= 256 * M.MIB
    reps = (3 if quick else 7) if big else (5 if quick else 11)
    variants = {
        "metakernels": lambda: metakernels.reptile_update(theta, fast, 0.5),
        "reference": lambda: R.reptile_update(theta, fast, 0.5),  # float64 mean, as the kernel
        "eager torch": lambda: eager(theta, fast, 0.5),  # float32 mean
    }
    times = {}
    for name, fn in variants.items():
        t = M.time_median(
            fn, 3 if big and name != "metakernels" else reps, warmup=1 if big else 3, min_sample_s=0.0 if big else 0.02
        )
        times[name] = t["median_s"]
        fields = M.bandwidth_fields(machine, read, written, t, "read")
        rows.append(
            {
                "section": "reptile_update",
                "mode": "eps=0.5",
                "T": T,
                "P": P,
                "N": T * P,
                "variant": name,
                **fields,
                "pct_dram_triad": 100 * fields["gbps"] / machine["dram"]["triad"]["gbps"],
            }
        )
        gc.collect()
    for r in rows[-len(times) :]:
        r["speedup_vs_reference"] = times["reference"] / times[r["variant"]]
        r["speedup_vs_eager"] = times["eager torch"] / times[r["variant"]]
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n== reptile_update: GB/s, % of roofline (read bandwidth), speedup = other's time / this time ==")
    print(
        f"{'T':>4}{'N':>7}{'WS':>10}{'regime':>9} {'variant':13}{'time us':>11}{'GB/s':>7}{'bound':>18}"
        f"{'%roof':>7}{'vs ref':>8}{'vs eager':>9}"
    )
    for r in rows:
        print(
            f"{r['T']:>4}{M.fmt_n(r['N']):>7}{M.fmt_bytes(r['ws_bytes']):>10}{r['regime']:>9} {r['variant']:13}"
            f"{r['t_median_us']:>11.1f}{r['gbps']:>7.1f}{r['bound'] + ' ' + format(r['bound_gbps'], '.1f'):>18}"
            f"{r['pct_roofline']:>6.0f}%{r['speedup_vs_reference']:>7.1f}x{r['speedup_vs_eager']:>8.1f}x"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    M.add_common_arguments(p)
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="T values (default: 16; full adds 4)")
    args = p.parse_args(argv)
    machine = M.machine_from_arguments(args)
    print(M.format_machine(machine))
    if args.quick:
        tasks = args.tasks or [16]
        sizes = [1_000, 10_000, 100_000, 1_000_000, 10_000_000, 300_000_000]
    else:
        tasks = args.tasks or [16, 4]
        sizes = [1_000, 10_000, 100_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000, 300_000_000]
    rows = []
    for T in tasks:
        rows += bench(machine, T, sizes, args.quick)
    machine["info"]["load_average_1m_end"] = M.os.getloadavg()[0]
    print_table(rows)
    dram = [r for r in rows if r["regime"] == "dram" and r["variant"] == "metakernels"]
    met = all(r["pct_roofline"] >= 100 * TARGET_DRAM_FRACTION for r in dram) if dram else None
    print(
        f"\ntarget >= {TARGET_DRAM_FRACTION:.0%} of DRAM read bandwidth at T*P >= 1e8:",
        {f"T={r['T']}": round(r["pct_roofline"], 1) for r in dram},
        "met" if met else "NOT met",
    )
    summary = {
        "dram_target_fraction": TARGET_DRAM_FRACTION,
        "dram_read": {f"T={r['T']}, N={r['N']}": round(r["pct_roofline"], 1) for r in dram},
        "dram_met": met,
    }
    paths = M.write_results(
        "reptile_update_quick" if args.quick else "reptile_update",
        machine,
        {"quick": args.quick, "tasks": tasks, "threads": torch.get_num_threads(), "dtype": "float32"},
        rows,
        summary,
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
