"""Smoke test of benchmarks/bench_maml.py: its cross-check (no timing) on tiny configurations.

Every implementation the benchmark times must compute the same second-order meta-gradient as the plain
per-task loop, in float64, on T = 2 tasks of a sinusoid MLP and of a 3-block conv net with BatchNorm on 8x8
inputs, with two inner steps. The one known exception is asserted as such: torch.func.grad nested in vmap
(functorch's MAML recipe, the benchmark's "vmap") is wrong through training-mode BatchNorm in torch 2.13;
if a later torch fixes it, the test says so, so that the benchmark's documentation can be updated.

Peers that are not installed are skipped (METAKERNELS_REQUIRE_PEERS=1 makes that a failure, as in
test_peers.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_maml  # noqa: E402

REQUIRE_PEERS = os.environ.get("METAKERNELS_REQUIRE_PEERS") == "1"
# (workload, implementation) pairs known to disagree, and why.
KNOWN_WRONG = {("tiny_conv", "vmap"): "torch.func.grad under vmap through training-mode BatchNorm (torch 2.13)"}


@pytest.fixture(scope="module")
def check_rows():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny ops: a second thread only adds contention
    try:
        return bench_maml.cross_check(bench_maml.tiny_workloads(), bench_maml.IMPL_NAMES)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("impl", bench_maml.IMPL_NAMES)
@pytest.mark.parametrize("workload", [w.name for w in bench_maml.tiny_workloads()])
def test_meta_gradients_agree(check_rows, workload, impl):
    (row,) = [r for r in check_rows if r["workload"] == workload and r["impl"] == impl]
    error = row["error"] or ""
    if error.startswith("unavailable"):
        if REQUIRE_PEERS:
            pytest.fail(f"{impl} is required (METAKERNELS_REQUIRE_PEERS=1): {error}", pytrace=False)
        pytest.skip(error)
    assert not error, f"{impl} failed on {workload}: {error}"
    # Not vacuous: the meta-gradient is far from zero and the loss is finite.
    assert row["grad_scale"] > 1e-3 and torch.isfinite(torch.tensor(row["loss"]))
    if (workload, impl) in KNOWN_WRONG:
        assert not row["agrees"], (
            f"{impl} now agrees on {workload} (was: {KNOWN_WRONG[(workload, impl)]}); update bench_maml's docs"
        )
        assert row["grad_rel_dev"] > 1e-4  # a real error, not rounding
        return
    assert row["agrees"], (
        f"{impl} disagrees with the loop on {workload}: meta-gradient relative deviation {row['grad_rel_dev']:.3e}, "
        f"loss relative deviation {row['loss_rel_dev']:.3e} (tolerance {bench_maml.CHECK_RTOL:g})"
    )


def test_tables_render():
    """The markdown tables accept the rows the benchmark writes, including missing and failed implementations."""
    rows = [
        {"section": "check", "workload": "w", "impl": "loop", "error": None, "agrees": True, "grad_rel_dev": 0.0},
        {"section": "check", "workload": "w", "impl": "vmap", "error": None, "agrees": False, "grad_rel_dev": 0.03},
        {"section": "check", "workload": "w", "impl": "higher", "error": "unavailable: x", "agrees": None},
    ]
    for impl, ms in (("loop", 4.0), ("vmap", 2.0), ("metakernels", 1.0)):
        rows.append({"section": "timing", "workload": "w", "label": "W", "threads": 1, "impl": impl, "error": None,
                     "median_ms": ms, "agrees_float64": impl != "vmap"})
    rows.append({"section": "timing", "workload": "w", "label": "W", "threads": 1, "impl": "torchopt",
                 "error": "RuntimeError: boom"})
    bench_maml._add_speedups([r for r in rows if r["section"] == "timing"])
    impls = ["loop", "vmap", "higher", "torchopt", "metakernels"]
    table = bench_maml.timing_table(rows, impls)
    assert "4 ms (4.00x)" in table and "(disagrees)" in table and "| error |" in table and "| n/a |" in table
    assert "4.00x vs loop" in table  # the disagreeing vmap is not "the fastest other"
    assert "DISAGREES" in bench_maml.check_table(rows, impls)
    summary = bench_maml.summarise(rows)
    assert summary["check_disagreeing"] == ["vmap"]
