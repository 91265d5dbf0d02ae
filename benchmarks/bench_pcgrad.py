"""Benchmark of metakernels.pcgrad against the per-pair loop, LibMTL, TorchJD and a plain-torch Gram version.

Grid: T in {4, 16, 64} tasks x P in {1e5, 1e6, 1e7} parameters, float32 (--quick: P in {1e5, 1e6}).

Inputs: G = A B + 0.5 N, A [T, 4] and B [4, P] and N [T, P] standard normal: every task mixes four shared
directions with its own noise, so pairs conflict at cosines of order 0.1-1 (random Gaussian rows at
P = 1e7 would be orthogonal to ~3e-4, where float32 rounding flips projection decisions between
implementations and a cross-check would compare noise). Preallocated, touched before timing.

Variants (all sum reduction, eps = 0):
  metakernels           metakernels.pcgrad(G, generator=gen): the public call, orders drawn (T randperms),
                        the [P] update allocated.
  metakernels out=      the same into a preallocated buffer (no page faults of a fresh 4P-byte output):
                        what the roofline compares.
  gram / combine        the stage ops alone (pcgrad_gram; pcgrad_combine allocates its output).
  reference loop        metakernels.reference.pcgrad: the classic per-pair loop in float32 (the oracle).
  LibMTL                LibMTL.weighting.PCGrad's projection (its backward() on given gradients: the .grad
                        read/write around it replaced): visits j = i, Python random.shuffle orders.
  TorchJD               torchjd.aggregation.PCGrad()(G): Gramian (float32 mm) + its weighting loop + combine;
                        j != i, torch.randperm rows from the global generator.
  torch Gram            plain torch: K = G G^T (float32 mm), the coefficient recurrence vectorised over the
                        tasks (T steps of batched ops on K), update = c G (mv).

Cross-checks (each peer's own result, from its timed call): LibMTL's random.shuffle orders and TorchJD's
torch.randperm rows are reproduced exactly with our `orders` argument (LibMTL also with include_self=True)
and the updates compared: max |ours - theirs| / max |theirs|. Expected: ~1e-7..1e-6 against the per-pair
loop, TorchJD and the torch Gram; LibMTL's float32 arithmetic is less accurate (its norms and projections
round in float32 over all P): measured at T = 16, P = 1e6 and 3e6, LibMTL vs our float64 result 1.3e-5 and
6.3e-5, our float32 result vs float64 1.9e-7 and 1.8e-7, and LibMTL in float64 vs ours in float64 8e-14 and
1.4e-13 (the same semantics).

Roofline of the fused op (out=): pass 1 costs max(read G at the bandwidth, T (T + 1) P flops — the
upper triangle with the diagonal, what the kernel computes — at the measured fp32 GEMM rate); pass 2 reads G
again and writes the [P] update. Bandwidth: the cache-resident read bandwidth where G fits the L3 (sysfs
size), the DRAM read bandwidth otherwise (benchmarks/_machine.py's measurements, 'read' pattern).

Targets (the issue): >= 1.5x faster than the fastest peer at every point; >= 30x faster than LibMTL for
T >= 16; within 1.25x of the roofline for P >= 1e6.

    python benchmarks/bench_pcgrad.py --quick     # P <= 1e6 (~3 minutes on the 2-core VM)
    python benchmarks/bench_pcgrad.py             # full grid (~10 minutes; LibMTL and the loop dominate)

Writes benchmarks/results/pcgrad[_quick].{json,csv}.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine as M  # noqa: E402

import metakernels  # noqa: E402
from metakernels.reference import pcgrad as reference  # noqa: E402

OPS = torch.ops.metakernels
TARGET_VS_PEER = 1.5
TARGET_VS_LIBMTL = 30.0
TARGET_ROOFLINE = 1.25
SEED = 1234


# --- inputs and peers ------------------------------------------------------------------------------------------


def make_grads(num_tasks: int, num_params: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(num_tasks, num_params, generator=gen).mul_(0.5)
    mix = torch.randn(num_tasks, 4, generator=gen)
    basis = torch.randn(4, num_params, generator=gen)
    return grads.addmm_(mix, basis)


def _peer(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return __import__(name, fromlist=["_"])
        except ImportError as exc:
            print(f"peer {name} unavailable ({exc}); scripts/install_peers.sh installs it")
            return None


def libmtl_runner(grads: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """LibMTL's PCGrad projection on given gradients: its backward() with the autograd parts (computing the
    per-task gradients, writing .grad) replaced by handing it `grads` and capturing the update."""
    module = _peer("LibMTL.weighting.PCGrad")
    if module is None:
        return None
    weighting = module.PCGrad()
    weighting.task_num, weighting.rep_grad, weighting.device = grads.shape[0], False, grads.device
    captured: dict = {}
    weighting._compute_grad_dim = lambda: None
    weighting._compute_grad = lambda losses, mode: grads
    weighting._reset_grad = lambda new_grads: captured.__setitem__("update", new_grads)

    def run() -> torch.Tensor:
        weighting.backward([None] * grads.shape[0])
        return captured["update"]

    return run


def libmtl_orders(num_tasks: int) -> torch.Tensor:
    rows = []
    for _ in range(num_tasks):
        row = list(range(num_tasks))
        random.shuffle(row)
        rows.append(row)
    return torch.tensor(rows)


def torchjd_runner(grads: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    module = _peer("torchjd.aggregation")
    if module is None:
        return None
    aggregator = module.PCGrad()
    return lambda: aggregator(grads)


def torch_gram_pcgrad(grads: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad in plain torch through the Gram matrix: the rows of W are independent, so step s of every row
    runs as one batched update."""
    num_tasks = grads.shape[0]
    gram = (grads @ grads.t()).double()
    diag = gram.diagonal()
    weights = torch.eye(num_tasks, dtype=torch.float64)
    rows = torch.arange(num_tasks)
    for s in range(num_tasks):
        j = orders[:, s]
        d = (weights * gram[:, j].t()).sum(1)
        denominator = diag[j]
        project = (d < 0) & (j != rows) & (denominator > 0)
        weights[rows, j] -= torch.where(project, d / torch.where(denominator > 0, denominator, 1.0), 0.0)
    return weights.sum(0).to(grads.dtype) @ grads


# --- timing --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], torch.Tensor], reps: int, warmup: int, before: Callable[[], None] = lambda: None):
    """(result of the last call, M.time_median-like stats); `before` runs untimed ahead of every call (it
    seeds the peers' random orders, so the last result can be cross-checked)."""
    samples, result = [], None
    for k in range(warmup + reps):
        before()
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        if k >= warmup:
            samples.append(dt)
    return result, {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "reps": reps}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-300))


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# --- one grid point ------------------------------------------------------------------------------------------


def roofline(machine: dict, num_tasks: int, num_params: int) -> dict:
    g_bytes = 4 * num_tasks * num_params
    in_l3 = g_bytes <= _sysfs_l3()
    level = "cache" if in_l3 else "dram"
    bw = machine[level]["read"]["gbps"] * 1e9
    gemm = machine["gemm_fp32"]["gflops"] * 1e9
    flops = num_tasks * (num_tasks + 1) * num_params
    t_read = g_bytes / bw
    t_flops = flops / gemm
    t_pass2 = (g_bytes + 4 * num_params) / bw
    return {
        "g_bytes": g_bytes,
        "bandwidth_level": "L3" if in_l3 else "DRAM",
        "bandwidth_gbps": bw / 1e9,
        "gemm_gflops": gemm / 1e9,
        "flops_pass1": flops,
        "pass1_bound": "flops" if t_flops > t_read else "bandwidth",
        "roofline_ms": (max(t_read, t_flops) + t_pass2) * 1e3,
    }


def _sysfs_l3() -> int:
    """The L3 size sysfs reports (300 MiB on the dev VM; _machine.l3_bytes() takes the larger of this and
    DESIGN.md's 504 MiB to decide what is surely DRAM, the issue asks for the sysfs size here)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1].isalpha() else int(text)
    except (OSError, ValueError, KeyError):
        return M.L3_BYTES_DESIGN


def bench_point(machine: dict, num_tasks: int, num_params: int, quick: bool) -> dict:
    grads = make_grads(num_tasks, num_params)
    out = torch.zeros(num_params)
    g_bytes = grads.numel() * 4
    big = g_bytes >= 256 * M.MIB
    reps = (3 if big else 5) if quick else (5 if big else 9)
    gen = torch.Generator()
    row: dict = {"T": num_tasks, "P": num_params, **roofline(machine, num_tasks, num_params)}
    notes = []

    def ours_alloc():
        return metakernels.pcgrad(grads, generator=gen)

    def ours_out():
        return metakernels.pcgrad(grads, generator=gen, out=out)

    times = {}
    _, t = timed(ours_alloc, reps, 2, lambda: gen.manual_seed(SEED))
    times["metakernels"] = t
    _, t = timed(ours_out, reps, 2, lambda: gen.manual_seed(SEED))
    times["metakernels out="] = t
    _, t = timed(lambda: OPS.pcgrad_gram(grads, None), reps, 1)
    times["gram"] = t
    weights = torch.ones(num_tasks, dtype=torch.float64)
    _, t = timed(lambda: OPS.pcgrad_combine(grads, weights, None), reps, 1)
    times["combine"] = t

    # Slow peers: one timed call (plus a warm-up where it is cheap) at the large sizes.
    slow_reps = 1 if (big or num_tasks * num_tasks * num_params > 4e8) else (2 if quick else 3)
    slow_warmup = 0 if slow_reps == 1 else 1
    free = available_bytes()
    crosscheck = {}

    gen_fixed = torch.Generator().manual_seed(SEED)
    orders = torch.stack([torch.randperm(num_tasks, generator=gen_fixed) for _ in range(num_tasks)])
    ours_fixed = OPS.pcgrad(grads, orders, None, False, "sum", 0.0)[0]

    # The per-pair loop and LibMTL each clone G: skip them with a note when that would not fit.
    if free > 3 * g_bytes:
        result, t = timed(lambda: reference.pcgrad(grads, orders, None, False, "sum", 0.0)[0], slow_reps, slow_warmup)
        times["reference loop"] = t
        crosscheck["reference loop"] = rel_err(ours_fixed, result)
        del result
        gc.collect()
    else:
        notes.append(f"reference loop skipped: {free / 2**30:.1f} GiB available, needs ~{3 * g_bytes / 2**30:.1f}")

    libmtl = libmtl_runner(grads)
    if libmtl is None:
        notes.append("LibMTL not installed")
    elif free > 3 * g_bytes:
        result, t = timed(libmtl, slow_reps, slow_warmup, lambda: random.seed(SEED))
        times["LibMTL"] = t
        random.seed(SEED)
        lib_orders = libmtl_orders(num_tasks)
        mine = OPS.pcgrad(grads, lib_orders, None, True, "sum", 0.0)[0]
        crosscheck["LibMTL"] = rel_err(mine, result)
        del result
        gc.collect()
    else:
        notes.append(f"LibMTL skipped: {free / 2**30:.1f} GiB available, needs ~{3 * g_bytes / 2**30:.1f}")

    torchjd = torchjd_runner(grads)
    if torchjd is None:
        notes.append("TorchJD not installed")
    else:
        result, t = timed(torchjd, reps if not big else 3, 1, lambda: torch.manual_seed(SEED))
        times["TorchJD"] = t
        torch.manual_seed(SEED)
        mine = metakernels.pcgrad(grads)  # the global generator, row by row: TorchJD's draws
        crosscheck["TorchJD"] = rel_err(mine, result)

    result, t = timed(lambda: torch_gram_pcgrad(grads, orders), reps, 1)
    times["torch Gram"] = t
    crosscheck["torch Gram"] = rel_err(ours_fixed, result)

    for name, t in times.items():
        row[f"{name} ms"] = t["median_s"] * 1e3
        row[f"{name} min ms"] = t["min_s"] * 1e3
        row[f"{name} reps"] = t["reps"]
    for name, err in crosscheck.items():
        row[f"crosscheck {name}"] = err
    ours = times["metakernels"]["median_s"]
    peers = {n: times[n]["median_s"] for n in ("reference loop", "LibMTL", "TorchJD", "torch Gram") if n in times}
    fastest = min(peers, key=peers.get)
    row["fastest peer"] = fastest
    row["speedup vs fastest peer"] = peers[fastest] / ours
    for name, t in peers.items():
        row[f"speedup vs {name}"] = t / ours
    row["pct_roofline"] = 100 * row["roofline_ms"] / (times["metakernels out="]["median_s"] * 1e3)
    row["gram_gflops"] = row["flops_pass1"] / times["gram"]["median_s"] / 1e9
    row["gram_gbps"] = g_bytes / times["gram"]["median_s"] / 1e9
    row["notes"] = "; ".join(notes)
    gc.collect()
    return row


# --- output ----------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    peer_names = ["reference loop", "LibMTL", "TorchJD", "torch Gram"]
    print("\n== pcgrad, float32, sum: median ms (speedup = peer / metakernels allocating); roofline of out= ==")
    head = (
        f"{'T':>3}{'P':>6}{'G':>9}{'bw':>5}{'roof ms':>9}{'mk ms':>9}{'out= ms':>9}{'%roof':>7}{'gram':>8}{'comb':>8}"
    )
    print(head + "".join(f"{n[:12]:>20}" for n in peer_names) + "  fastest-peer x")
    for r in rows:
        cells = ""
        for n in peer_names:
            if f"{n} ms" in r:
                cells += f"{r[n + ' ms']:>11.1f} ({r['speedup vs ' + n]:>5.1f}x)"
            else:
                cells += f"{'-':>20}"
        print(
            f"{r['T']:>3}{M.fmt_n(r['P']):>6}{M.fmt_bytes(r['g_bytes']):>9}{r['bandwidth_level']:>5}"
            f"{r['roofline_ms']:>9.2f}{r['metakernels ms']:>9.2f}{r['metakernels out= ms']:>9.2f}"
            f"{r['pct_roofline']:>6.0f}%{r['gram ms']:>8.2f}{r['combine ms']:>8.2f}{cells}"
            f"  {r['speedup vs fastest peer']:.1f}x ({r['fastest peer']})"
        )
    print("\ncross-checks, max |ours - theirs| / max |theirs| (same orders):")
    for r in rows:
        checks = ", ".join(f"{k[11:]} {v:.1e}" for k, v in r.items() if k.startswith("crosscheck "))
        print(f"  T={r['T']:>2} P={M.fmt_n(r['P']):>4}: {checks}{'  [' + r['notes'] + ']' if r['notes'] else ''}")


def summarise(rows: list[dict]) -> dict:
    vs_peer = {f"T={r['T']}, P={M.fmt_n(r['P'])}": round(r["speedup vs fastest peer"], 2) for r in rows}
    vs_libmtl = {
        f"T={r['T']}, P={M.fmt_n(r['P'])}": round(r["speedup vs LibMTL"], 1)
        for r in rows
        if r["T"] >= 16 and "speedup vs LibMTL" in r
    }
    roof = {f"T={r['T']}, P={M.fmt_n(r['P'])}": round(r["pct_roofline"], 1) for r in rows if r["P"] >= 1_000_000}
    worst_check = max((v for r in rows for k, v in r.items() if k.startswith("crosscheck ")), default=None)
    return {
        "speedup_vs_fastest_peer": vs_peer,
        "vs_fastest_peer_met": all(v >= TARGET_VS_PEER for v in vs_peer.values()),
        "speedup_vs_libmtl_T_ge_16": vs_libmtl,
        "vs_libmtl_met": all(v >= TARGET_VS_LIBMTL for v in vs_libmtl.values()) if vs_libmtl else None,
        "pct_roofline_P_ge_1e6": roof,
        "roofline_met": all(v >= 100 / TARGET_ROOFLINE for v in roof.values()) if roof else None,
        "worst_crosscheck_rel_err": worst_check,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    M.add_common_arguments(p)
    p.add_argument("--tasks", default="4,16,64", help="comma-separated T values")
    p.add_argument("--params", default=None, help="comma-separated P values (default: the grid)")
    p.add_argument("--name", default=None, help="results file name (default: pcgrad, or pcgrad_quick)")
    args = p.parse_args(argv)
    machine = M.machine_from_arguments(args)
    if args.machine_json:
        # The bounds come from an earlier (quieter) measurement; this run's identity and load are today's.
        old = machine["info"]
        machine["bounds_measured"] = {k: old.get(k) for k in ("date", "git_commit", "load_average_1m")}
        machine["info"] = M.machine_info()
        machine["info"]["load_average_1m_after"] = machine["info"]["load_average_1m"]
        print(f"bounds from {args.machine_json} (measured {old.get('date')}, load {old.get('load_average_1m')})")
    print(M.format_machine(machine))
    tasks = [int(x) for x in args.tasks.split(",")]
    if args.params:
        params = [int(float(x)) for x in args.params.split(",")]
    else:
        params = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    rows = []
    for num_tasks in tasks:
        for num_params in params:
            print(f"T={num_tasks} P={M.fmt_n(num_params)} ...", flush=True)
            rows.append(bench_point(machine, num_tasks, num_params, args.quick))
    machine["info"]["load_average_1m_end"] = os.getloadavg()[0]
    print_table(rows)
    summary = summarise(rows)
    print("\ntargets:", M.json.dumps({k: v for k, v in summary.items() if k.endswith("_met")}))
    print(
        f"load average: {machine['info']['load_average_1m']:.2f} at the start, "
        f"{machine['info']['load_average_1m_end']:.2f} at the end"
    )
    paths = M.write_results(
        args.name or ("pcgrad_quick" if args.quick else "pcgrad"),
        machine,
        {
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "tasks": tasks,
            "params": params,
            "dtype": "float32",
            "reduction": "sum",
            "inputs": "G = A B + 0.5 N (4 shared directions)",
            "seed": SEED,
        },
        rows,
        summary,
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
