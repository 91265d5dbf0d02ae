"""profile.png: every case's % of its roofline and its speedup over the reference, grouped by op."""

from __future__ import annotations

import os
from pathlib import Path


def plot_profile(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path | None:
    """Saves a two-panel horizontal bar chart (one bar per case): left, % of the applicable bound (colour:
    cache-resident bandwidth, DRAM bandwidth, GEMM rate); right, speedup over the reference (log scale).

    matplotlib is imported here, with the Agg backend, so the profiler runs without it.

    Args:
        rows: the profile rows.
        path: the PNG to write.
        title: the figure title (e.g. the machine and commit).

    Returns:
        The path written, or None (with a message) when matplotlib is not installed or there are no rows.
    """
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        print("metakernels profile: no timed cases, no plot")
        return None
    try:
        import matplotlib
    except ImportError:
        print("metakernels profile: matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cache": "tab:green", "l3/dram": "tab:olive", "dram": "tab:blue", "gemm": "tab:purple"}
    names = {"cache": "cache-resident bandwidth", "l3/dram": "DRAM bandwidth (WS 1-2x L3)",
             "dram": "DRAM bandwidth", "gemm": "fp32 GEMM rate"}
    labels = [f"{r['op']}: {r['case']}" for r in rows]
    y = list(range(len(rows)))[::-1]  # first row at the top
    height = max(3.0, 0.28 * len(rows) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, height), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    pct = [r["pct_of_bound"] for r in rows]
    left.barh(y, pct, color=[colours[r["regime"]] for r in rows])
    left.axvline(100, color="k", linewidth=0.8, linestyle="--")
    left.set_yticks(y, labels, fontsize=7)
    left.set_xlabel("% of the applicable roofline (median time)")
    from matplotlib.patches import Patch

    used = [k for k in colours if any(r["regime"] == k for r in rows)]
    left.legend(handles=[Patch(color=colours[k], label=names[k]) for k in used], loc="lower right", fontsize=7)
    speedups = [r.get("speedup_vs_reference") or 0.0 for r in rows]
    right.barh(y, speedups, color=["tab:orange" if s >= 1 else "tab:red" for s in speedups])
    right.axvline(1, color="k", linewidth=0.8, linestyle="--")
    if any(s > 0 for s in speedups):
        right.set_xscale("log")
    right.set_xlabel("speedup over the reference (reference time / op time)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    # Separators between ops.
    for i in range(1, len(rows)):
        if rows[i]["op"] != rows[i - 1]["op"]:
            for ax in (left, right):
                ax.axhline(y[i] + 0.5, color="gray", linewidth=0.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long case labels widen the canvas instead of being cut
    plt.close(fig)
    return path
