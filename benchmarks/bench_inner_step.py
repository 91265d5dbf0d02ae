"""Benchmark of metakernels.inner_step: per-call latency with autograd, and forward/backward bandwidth.

Three sections:

latency    T*P <= 1e4 (where the learners live): microseconds per call of the forward with autograd
           recording, the raw backward op, and a k-step chain of forwards plus one backward (per step),
           beside the pieces of a call (allocation, dispatch + validation + kernel, the Python wrapper) and
           the pure-torch reference / plain eager expression. Target: <= 15 us per call.
forward    T*P from 1e3 to >= 1e8 (1.2 GB: theta + grad + out, well beyond the L3): GB/s of the forward
           into a preallocated out= buffer (no page faults), in place (out=theta), allocating, and the
           reference's; % of the applicable roofline (cache below 64 MiB, DRAM from 2x the L3). Target:
           >= 80% of the measured DRAM bandwidth.
backward   the fused backward op's GB/s for the typical masks (as called: it allocates its outputs, so
           their page faults are in the figure; the column fault_ms says how much of it they are).

Bytes are counted as in benchmarks/_machine.py: reads + writes the kernel must move, RFO not counted.

    python benchmarks/bench_inner_step.py --quick        # ~1 minute
    python benchmarks/bench_inner_step.py                # full grid, all lr/theta0 modes (~5 minutes)

Writes benchmarks/results/inner_step[_quick].{json,csv}.
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

OPS = torch.ops.metakernels
TARGET_US = 15.0
TARGET_DRAM_FRACTION = 0.80
NUM_TASKS = 4  # T of every configuration; P = N / T
NUM_SEGMENTS = 16  # segmented (MAML++ per-layer) rates: 16 equal segments


# --- inputs ----------------------------------------------------------------------------------------------


def make_case(n: int, mode: str, requires_grad: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Inputs of one configuration. mode: scalar | per_coordinate | segmented | prox (scalar lr, shared
    theta0, prox and weight decay non-zero)."""
    T, P = NUM_TASKS, max(1, n // NUM_TASKS)
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(T, P, generator=g, dtype=dtype)
    grad = torch.rand(T, P, generator=g, dtype=dtype) - 0.5
    offsets, theta0, prox, wd = None, None, 0.0, 0.0
    if mode == "per_coordinate":
        lr = torch.full((P,), 1e-3, dtype=dtype)
    elif mode == "segmented":
        S = min(NUM_SEGMENTS, P)
        offsets = torch.linspace(0, P, S + 1).round().to(torch.int64)
        lr = torch.full((S,), 1e-3, dtype=dtype)
    else:
        lr = torch.tensor(1e-3, dtype=dtype)
    if mode == "prox":
        theta0, prox, wd = torch.rand(P, generator=g, dtype=dtype), 0.1, 1e-4
    if requires_grad:
        for t in (theta, grad, lr):
            t.requires_grad_(True)
    return dict(
        T=T, P=P, theta=theta, grad=grad, lr=lr, segment_offsets=offsets, theta0=theta0, prox=prox, weight_decay=wd
    )


def kwargs(c: dict) -> dict:
    return dict(
        segment_offsets=c["segment_offsets"], theta0=c["theta0"], prox=c["prox"], weight_decay=c["weight_decay"]
    )


def op_args(c: dict) -> tuple:
    return (
        c["theta"],
        c["grad"],
        c["lr"],
        c["segment_offsets"],
        c["theta0"],
        float(c["prox"]),
        float(c["weight_decay"]),
    )


def eager(theta, grad, lr, segment_offsets=None, theta0=None, prox=0.0, weight_decay=0.0):
    """The expression a user writes in plain torch (no validation): the peer baseline."""
    if segment_offsets is not None:
        lr = torch.repeat_interleave(lr, segment_offsets.diff(), output_size=theta.shape[1])
    u = grad + weight_decay * theta if weight_decay else grad
    if theta0 is not None:
        u = u + prox * (theta - theta0)
    return theta - lr * u


def forward_bytes(c: dict) -> tuple[int, int]:
    """(bytes read, bytes written) of one forward: theta, grad, the rate, theta0; out."""
    T, P, es = c["T"], c["P"], c["theta"].element_size()
    read = 2 * T * P + c["lr"].numel() + (0 if c["theta0"] is None else c["theta0"].numel())
    return read * es, T * P * es


# --- section 1: latency ----------------------------------------------------------------------------------


def bench_latency(sizes: list[int], modes: list[str], reps: int, chain_steps: int) -> list[dict]:
    return [row for mode in modes for n in sizes for row in _latency_rows(n, mode, reps, chain_steps)]


def _latency_rows(n: int, mode: str, reps: int, chain_steps: int) -> list[dict]:
    rows = []
    c = make_case(n, mode, requires_grad=True)
    d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    out = torch.empty_like(d["theta"])
    go = torch.rand_like(d["theta"])
    prox, wd = float(c["prox"]), float(c["weight_decay"])
    # The mask the C++ autograd asks for when theta, grad and lr all need gradients.
    mask = [prox + wd != 0.0, True, True, False]
    bwd_args = (go, d["theta"], d["grad"], d["lr"], d["segment_offsets"], d["theta0"], prox, wd, mask)
    leaves = (c["theta"], c["grad"], c["lr"])

    def below_autograd_bwd():
        with torch._C._AutoDispatchBelowAutograd():
            OPS.inner_step_backward(*bwd_args)

    def chain(step):
        def run():
            x = c["theta"]
            for _ in range(chain_steps):
                x = step(x, c["grad"], c["lr"], **kwargs(c))
            torch.autograd.grad(x, leaves, go)

        return run

    items = {
        # the pieces of a call
        "torch.empty [T,P] (allocation)": lambda: torch.empty(d["T"], d["P"]),
        "torch.add out= (dispatch floor)": lambda: torch.add(d["theta"], d["grad"], out=out),
        "op inner_step_out (dispatch+checks+kernel)": lambda: OPS.inner_step_out(*op_args(d), out),
        "inner_step(out=) (+ Python wrapper)": lambda: metakernels.inner_step(
            d["theta"], d["grad"], d["lr"], **kwargs(d), out=out
        ),
        "inner_step no grad (+ allocation)": lambda: metakernels.inner_step(
            d["theta"], d["grad"], d["lr"], **kwargs(d)
        ),
        # the targets
        "inner_step fwd, autograd recording": lambda: metakernels.inner_step(
            c["theta"], c["grad"], c["lr"], **kwargs(c)
        ),
        "op inner_step_backward (via Python autograd key)": lambda: OPS.inner_step_backward(*bwd_args),
        "op inner_step_backward below autograd": below_autograd_bwd,
        f"fwd+bwd per step (chain of {chain_steps})": chain(metakernels.inner_step),
        # the baselines
        "reference fwd, autograd recording": lambda: R.inner_step(*op_args(c)),
        "eager torch fwd, autograd recording": lambda: eager(c["theta"], c["grad"], c["lr"], **kwargs(c)),
        "reference inner_step_backward": lambda: R.inner_step_backward(*bwd_args),
        f"reference fwd+bwd per step (chain of {chain_steps})": chain(R.inner_step),
        f"eager torch fwd+bwd per step (chain of {chain_steps})": chain(eager),
    }
    for name, fn in items.items():
        t = M.time_median(fn, reps, warmup=20, min_sample_s=0.02)
        per = chain_steps if "per step" in name else 1
        us = t["median_s"] / per * 1e6
        target = name in (
            "inner_step fwd, autograd recording",
            "op inner_step_backward (via Python autograd key)",
        ) or name.startswith("fwd+bwd per step")
        rows.append(
            {
                "section": "latency",
                "mode": mode,
                "T": d["T"],
                "P": d["P"],
                "N": d["T"] * d["P"],
                "variant": name,
                "t_median_us": us,
                "t_min_us": t["min_s"] / per * 1e6,
                "target_us": TARGET_US if target else None,
                "meets_target": (us <= TARGET_US) if target else None,
            }
        )
    return rows


# --- section 2: forward bandwidth ------------------------------------------------------------------------


def _reps_for(ws_bytes: int, quick: bool) -> int:
    if ws_bytes >= 512 * M.MIB:
        return 3 if quick else 7
    return 5 if quick else 11


def bench_forward(machine: dict, sizes: list[int], modes: list[str], quick: bool) -> list[dict]:
    rows = []
    for mode in modes:
        for n in sizes:
            rows += _forward_rows(machine, n, mode, quick)
            gc.collect()
    return rows


def _forward_rows(machine: dict, n: int, mode: str, quick: bool) -> list[dict]:
    rows = []
    c = make_case(n, mode)
    out = torch.empty_like(c["theta"]).fill_(0.0)  # touched: no page faults in the timed calls
    read, written = forward_bytes(c)
    ws = read + written
    reps = _reps_for(ws, quick)
    big = ws >= 256 * M.MIB

    def inplace():  # theta drifts by 5e-4 per call: bounded for any repetition count used here
        metakernels.inner_step(c["theta"], c["grad"], c["lr"], **kwargs(c), out=c["theta"])

    variants = {
        "out=buf": (lambda: metakernels.inner_step(c["theta"], c["grad"], c["lr"], **kwargs(c), out=out), "triad"),
        "out=theta (in place)": (inplace, "triad_inplace"),
        "allocating": (lambda: metakernels.inner_step(c["theta"], c["grad"], c["lr"], **kwargs(c)), "triad"),
        "reference": (lambda: R.inner_step(*op_args(c)), "triad"),
        "eager torch": (lambda: eager(c["theta"], c["grad"], c["lr"], **kwargs(c)), "triad"),
    }
    times = {}
    for name, (fn, pattern) in variants.items():
        if big and quick and name == "eager torch":
            continue  # the reference is the same ops plus checks; skip its twin at 1 GB in quick mode
        t = M.time_median(
            fn,
            reps if not (big and name in ("reference", "eager torch")) else 3,
            warmup=1 if big else 3,
            min_sample_s=0.0 if big else 0.02,
        )
        times[name] = t["median_s"]
        rows.append(
            {
                "section": "forward",
                "mode": mode,
                "T": c["T"],
                "P": c["P"],
                "N": c["T"] * c["P"],
                "variant": name,
                **M.bandwidth_fields(machine, read, written, t, pattern),
            }
        )
        gc.collect()
    for r in rows[-len(times) :]:
        r["speedup_vs_reference"] = times["reference"] / times[r["variant"]]
        if "eager torch" in times:
            r["speedup_vs_eager"] = times["eager torch"] / times[r["variant"]]
    return rows


# --- section 3: backward bandwidth -----------------------------------------------------------------------

# (name, mode, mask): what the C++ autograd requests. Second-order MAML with a learned rate and no decay:
# d_theta is grad_out itself (not computed), d_grad and d_lr are; with weight decay d_theta is computed too.
BACKWARD_CASES = [
    ("d_grad,d_lr (wd=0)", "scalar", [False, True, True, False]),
    ("d_theta,d_grad,d_lr (wd>0)", "prox", [True, True, True, False]),
]


def bench_backward(machine: dict, sizes: list[int], quick: bool) -> list[dict]:
    rows = []
    for name, mode, mask in BACKWARD_CASES:
        for n in sizes:
            rows.append(_backward_row(machine, name, mode, mask, n, quick))
            gc.collect()
    return rows


def _backward_row(machine: dict, name: str, mode: str, mask: list[bool], n: int, quick: bool) -> dict:
    c = make_case(n, mode)
    go = torch.rand_like(c["theta"])
    T, P, es = c["T"], c["P"], c["theta"].element_size()
    args = (go, *op_args(c)[:-2], float(c["prox"]), float(c["weight_decay"]), mask)
    read = (3 * T * P + c["lr"].numel() + (0 if c["theta0"] is None else c["theta0"].numel())) * es
    written = (T * P * (mask[0] + mask[1]) + c["lr"].numel() * mask[2]) * es
    ws = read + written
    reps = _reps_for(ws, quick)
    big = ws >= 256 * M.MIB

    def op():
        with torch._C._AutoDispatchBelowAutograd():
            return OPS.inner_step_backward(*args)

    t = M.time_median(op, reps, warmup=1 if big else 3, min_sample_s=0.0 if big else 0.02)
    t_ref = M.time_median(
        lambda: R.inner_step_backward(*args),
        3 if big else reps,
        warmup=1 if big else 3,
        min_sample_s=0.0 if big else 0.02,
    )
    # What the fresh outputs' page faults cost: fill a fresh [T, P] minus fill a reused one, per output.
    reused = torch.empty(T, P).fill_(0.0)
    t_fresh = M.time_median(lambda: torch.empty(T, P).fill_(0.0), 3, warmup=1, min_sample_s=0.0 if big else 0.02)
    t_reused = M.time_median(lambda: reused.fill_(0.0), 3, warmup=1, min_sample_s=0.0 if big else 0.02)
    fault_s = max(0.0, t_fresh["median_s"] - t_reused["median_s"]) * (mask[0] + mask[1])
    return {
        "section": "backward",
        "mode": mode,
        "T": T,
        "P": P,
        "N": T * P,
        "variant": name,
        **M.bandwidth_fields(machine, read, written, t, "triad"),
        "fault_ms": fault_s * 1e3,
        "gbps_excl_faults": (read + written) / max(t["median_s"] - fault_s, 1e-9) / 1e9,
        "reference_us": t_ref["median_s"] * 1e6,
        "speedup_vs_reference": t_ref["median_s"] / t["median_s"],
    }


# --- output ----------------------------------------------------------------------------------------------


def print_tables(rows: list[dict]) -> None:
    lat = [r for r in rows if r["section"] == "latency"]
    if lat:
        print("\n== latency: us per call (median; T = 4), target <= 15 us ==")
        keys = sorted({(r["mode"], r["N"]) for r in lat}, key=lambda k: (k[0], k[1]))
        names = list(dict.fromkeys(r["variant"] for r in lat))
        print(f"{'':52}" + "".join(f"{m[:5] + ' ' + M.fmt_n(n):>13}" for m, n in keys))
        for name in names:
            cells = []
            for k in keys:
                r = next(r for r in lat if r["variant"] == name and (r["mode"], r["N"]) == k)
                mark = "" if r["meets_target"] is None else (" ok" if r["meets_target"] else " X")
                cells.append(f"{r['t_median_us']:.1f}{mark}".rjust(13))
            print(f"{name:52}" + "".join(cells))
    fwd = [r for r in rows if r["section"] == "forward"]
    if fwd:
        print(
            "\n== forward bandwidth (T = 4): GB/s; % of the pattern's roofline and of the best bandwidth measured at "
            "that level; speedup = reference time / this time =="
        )
        print(
            f"{'mode':15}{'N':>6}{'WS':>10}{'regime':>9} {'variant':21}{'time us':>11}{'GB/s':>7}"
            f"{'bound GB/s':>26}{'%roof':>7}{'%best':>7}{'vs ref':>8}"
        )
        for r in fwd:
            bound = f"{r['bound']} {r['bound_gbps']:.1f}"
            print(
                f"{r['mode']:15}{M.fmt_n(r['N']):>6}{M.fmt_bytes(r['ws_bytes']):>10}{r['regime']:>9} "
                f"{r['variant']:21}{r['t_median_us']:>11.1f}{r['gbps']:>7.1f}{bound:>26}"
                f"{r['pct_roofline']:>6.0f}%{r['pct_best_bandwidth']:>6.0f}%{r['speedup_vs_reference']:>7.1f}x"
            )
    bwd = [r for r in rows if r["section"] == "backward"]
    if bwd:
        print("\n== backward op bandwidth (T = 4; allocates its outputs: fault_ms is their page faults) ==")
        print(
            f"{'mask':28}{'N':>6}{'WS':>10}{'regime':>9}{'time us':>11}{'GB/s':>7}{'bound':>18}{'%roof':>7}"
            f"{'fault ms':>9}{'GB/s ex.f':>10}{'vs ref':>8}"
        )
        for r in bwd:
            print(
                f"{r['variant']:28}{M.fmt_n(r['N']):>6}{M.fmt_bytes(r['ws_bytes']):>10}{r['regime']:>9}"
                f"{r['t_median_us']:>11.1f}{r['gbps']:>7.1f}{r['bound'] + ' ' + format(r['bound_gbps'], '.1f'):>18}"
                f"{r['pct_roofline']:>6.0f}%{r['fault_ms']:>9.2f}{r['gbps_excl_faults']:>10.1f}"
                f"{r['speedup_vs_reference']:>7.1f}x"
            )


def summarise(rows: list[dict]) -> dict:
    """The issue's targets, met or not."""
    lat = [r for r in rows if r["section"] == "latency" and r["meets_target"] is not None and r["N"] <= 10_000]
    dram = [r for r in rows if r["section"] == "forward" and r["regime"] == "dram" and r["variant"] == "out=buf"]
    dram_inplace = [
        r
        for r in rows
        if r["section"] == "forward" and r["regime"] == "dram" and r["variant"] == "out=theta (in place)"
    ]
    out = {
        "latency_target_us": TARGET_US,
        "latency": {f"{r['variant']} [{r['mode']}, N={r['N']}]": round(r["t_median_us"], 2) for r in lat},
        "latency_met": all(r["meets_target"] for r in lat) if lat else None,
        "dram_target_fraction": TARGET_DRAM_FRACTION,
    }
    for key, sel in (("dram_out_buf", dram), ("dram_in_place", dram_inplace)):
        out[key] = {
            f"{r['mode']}, N={r['N']}": {
                "pct_roofline": round(r["pct_roofline"], 1),
                "pct_best_bandwidth": round(r["pct_best_bandwidth"], 1),
            }
            for r in sel
        }
        out[key + "_met"] = all(r["pct_roofline"] >= 100 * TARGET_DRAM_FRACTION for r in sel) if sel else None
        out[key + "_met_vs_best"] = (
            all(r["pct_best_bandwidth"] >= 100 * TARGET_DRAM_FRACTION for r in sel) if sel else None
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    M.add_common_arguments(p)
    p.add_argument("--sections", default="latency,forward,backward")
    args = p.parse_args(argv)
    quick, sections = args.quick, args.sections.split(",")
    machine = M.machine_from_arguments(args)
    print(M.format_machine(machine))
    if quick:
        lat_sizes, lat_modes = [8, 1_000, 10_000], ["scalar"]
        fwd_sizes = [1_000, 10_000, 100_000, 1_000_000, 4_000_000, 10_000_000, 100_000_000]
        fwd_modes = {"scalar": fwd_sizes, "per_coordinate": [1_000_000], "segmented": [10_000], "prox": [1_000_000]}
        bwd_sizes = [10_000, 1_000_000, 100_000_000]
    else:
        lat_sizes, lat_modes = [8, 100, 1_000, 10_000], ["scalar", "segmented", "prox"]
        fwd_sizes = [
            1_000,
            10_000,
            100_000,
            300_000,
            1_000_000,
            3_000_000,
            4_000_000,
            10_000_000,
            30_000_000,
            100_000_000,
            200_000_000,
        ]
        fwd_modes = {m: fwd_sizes for m in ("scalar", "per_coordinate", "segmented", "prox")}
        bwd_sizes = [10_000, 100_000, 1_000_000, 4_000_000, 10_000_000, 100_000_000, 200_000_000]
    rows: list[dict] = []
    if "latency" in sections:
        rows += bench_latency(lat_sizes, lat_modes, reps=7 if quick else 15, chain_steps=5)
    if "forward" in sections:
        for mode, sizes in fwd_modes.items():
            rows += bench_forward(machine, sizes, [mode], quick)
    if "backward" in sections:
        rows += bench_backward(machine, bwd_sizes, quick)
    machine["info"]["load_average_1m_end"] = M.os.getloadavg()[0]
    print_tables(rows)
    summary = summarise(rows)
    print("\ntargets:", M.json.dumps({k: v for k, v in summary.items() if k.endswith("_met")}))
    paths = M.write_results(
        "inner_step_quick" if quick else "inner_step",
        machine,
        {
            "quick": quick,
            "sections": sections,
            "threads": torch.get_num_threads(),
            "num_tasks": NUM_TASKS,
            "dtype": "float32",
        },
        rows,
        summary,
    )
    print("wrote", *paths)


if __name__ == "__main__":
    main()
