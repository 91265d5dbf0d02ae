"""The profile's outputs: the terminal table, profile.json and profile.csv (with machine, versions, commit)."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from .machine import save_json

CSV_FIELDS = (
    "op", "case", "via", "params", "t_median_us", "t_min_us", "t_max_us", "reps", "calls_per_sample",
    "bytes_read", "bytes_written", "ws_bytes", "flops", "gbps", "gflops", "rate", "rate_unit", "regime",
    "bound", "bound_value", "pct_of_bound", "pct_best_bandwidth", "reference_us", "speedup_vs_reference",
    "reference_error", "error",
)


def versions() -> dict:
    """Versions of Python and of the packages a profile depends on (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "numpy", "matplotlib", "metakernels"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def fmt_time(us: float) -> str:
    """Microseconds as us / ms / s with 3 significant digits."""
    if us < 1000:
        return f"{us:.3g} us"
    if us < 1e6:
        return f"{us / 1e3:.3g} ms"
    return f"{us / 1e6:.3g} s"


def _fmt_value(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_pct(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def format_table(rows: list[dict]) -> str:
    """The profile as a text table: op, case, median time, rate, bound, % of bound, speedup over reference.

    A bound marked * is the DRAM bound applied to a working set between 1x and 2x the L3 (partly cached:
    its % can exceed 100).
    """
    header = ("op", "case", "median", "rate", "bound", "% bound", "vs ref")
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append((r["op"], r["case"], "ERROR", "-", "-", "-", "-"))
            continue
        star = "*" if r["regime"] == "l3/dram" else ""
        speedup = r.get("speedup_vs_reference")
        lines.append((
            r["op"],
            r["case"],
            fmt_time(r["t_median_us"]),
            f"{_fmt_value(r['rate'])} {r['rate_unit']}",
            f"{r['bound']}{star} {_fmt_value(r['bound_value'])}",
            f"{_fmt_pct(r['pct_of_bound'])}%",
            ("ref error" if r.get("reference_error") else "-") if speedup is None else f"{speedup:.2f}x",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    left = {0, 1, 4}

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                 strict=True)))

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    previous = None
    for r, line in zip(rows, lines, strict=True):
        if previous is not None and r["op"] != previous:
            out.append("")
        out.append(fmt(line))
        previous = r["op"]
    if any(r.get("regime") == "l3/dram" for r in rows):
        out.append("* working set between 1x and 2x the L3: partly cached, measured against the DRAM bound")
    for r in rows:
        if r.get("error"):
            out.append(f"ERROR in {r['op']} [{r['case']}] via {r['via']}: {r['error']}")
        if r.get("reference_error"):
            out.append(f"reference error in {r['op']} [{r['case']}]: {r['reference_error']}")
    out.append("rate: GB/s = bytes the op must move (reads + writes) / time; GFLOP/s for GEMM-bound ops. "
               "vs ref = reference time / op time.")
    return "\n".join(out)


def _header_line(run: dict) -> str:
    dirty = " dirty" if run.get("git_dirty") else ""
    return (
        f"# metakernels profile | {run['cpu_model']} | torch {run['torch_version']} | torch threads "
        f"{run['torch_threads']} | metakernels {run.get('metakernels_version')} ({run.get('cpu_backend')}) | "
        f"commit {run['git_commit']}{dirty} | {run['date']} | load {run['load_average_1m']:.2f}"
    )


def write_json(
    path: str | os.PathLike, machine: dict, run: dict, config: dict, rows: list[dict], ops: dict
) -> Path:
    """profile.json: {"tool", "run", "machine", "versions", "config", "ops", "results"}.

    Args:
        path: the file to write.
        machine: a measure_machine() result (the rooflines, and the identity of the run that measured them).
        run: machine_info() of this run (commit, date, threads, load).
        config: the run's settings (grid, threads, ...).
        rows: the profile rows.
        ops: {"available", "profiled", "without_cases"} op name lists.
    """
    path = Path(path)
    save_json(
        {"tool": "metakernels profile", "run": run, "machine": machine, "versions": versions(), "config": config,
         "ops": ops, "results": rows},
        path,
    )
    return path


def write_csv(path: str | os.PathLike, run: dict, rows: list[dict]) -> Path:
    """profile.csv: one comment line (machine, versions, commit of this run), a header, one row per case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write(_header_line(run) + "\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "params": json.dumps(r["params"], separators=(",", ":"))})
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a profile.csv (values as strings; the comment line skipped)."""
    with Path(path).open(newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))
