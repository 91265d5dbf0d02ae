"""Smoke test of benchmarks/bench_imaml.py: its float64 cross-check on tiny workloads, and its memory harness.

Cross-check: every implementation the benchmark times (the per-task autograd loop, TorchOpt's custom_root,
torch.func vmap with jvp(grad) or grad(grad) HVPs, metakernels.iMAML) must compute the loop's iMAML meta-gradient
in float64 on T = 2 tasks of a sinusoid MLP and of a 3-block conv net with BatchNorm; the harness must flag an
implementation that is subtly wrong (one CG iteration short) and main() must then exit with status 1. The one
known failure is asserted as such: torch.func.jvp of torch.func.grad raises "ZeroTensors are immutable" for
F.mse_loss in torch 2.13 (if a later torch fixes it, the test says so, so that the docs can be updated).

Memory harness: fresh processes at a small but not trivial size; second-order MAML's peak must grow with the
number of inner steps (its graph keeps every step) and the iMAML loop's must not; the extrapolation cap must skip
a run it predicts too large.

Peers that are not installed are skipped (METAKERNELS_REQUIRE_PEERS=1 makes that a failure, as in test_peers.py);
metakernels.iMAML is skipped, saying so, while metakernels/learners/imaml.py does not exist.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _imaml_peers  # noqa: E402
import bench_imaml  # noqa: E402

REQUIRE_PEERS = os.environ.get("METAKERNELS_REQUIRE_PEERS") == "1"
# TorchOpt 0.7.3's custom_root calls the deprecated functorch.vjp on every backward.
pytestmark = pytest.mark.filterwarnings("ignore:.*functorch.vjp. is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def check_rows():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny ops: a second thread only adds contention
    try:
        return bench_imaml.cross_check(bench_imaml.tiny_workloads(), bench_imaml.IMPL_NAMES)
    finally:
        torch.set_num_threads(previous)


def _skip_unavailable(impl: str, error: str) -> None:
    if not error.startswith("unavailable"):
        return
    if REQUIRE_PEERS and impl in _imaml_peers.PEER_OF:
        pytest.fail(f"{impl} is required (METAKERNELS_REQUIRE_PEERS=1): {error}", pytrace=False)
    pytest.skip(error)


@pytest.mark.parametrize("impl", bench_imaml.IMPL_NAMES)
@pytest.mark.parametrize("workload", [w.name for w in bench_imaml.tiny_workloads()])
def test_meta_gradients_agree(check_rows, workload, impl):
    (row,) = [r for r in check_rows if r["workload"] == workload and r["impl"] == impl]
    error = row["error"] or ""
    _skip_unavailable(impl, error)
    known = bench_imaml.KNOWN_ERRORS.get((row["net"], impl))
    if known is not None:
        assert known in error, f"{impl} on {workload} no longer raises {known!r}; update the docs ({error or 'ok'})"
        return
    assert not error, f"{impl} failed on {workload}: {error}"
    # Not vacuous: a meta-gradient far from zero, a finite loss.
    assert row["grad_scale"] > 1e-3 and torch.isfinite(torch.tensor(row["loss"]))
    assert row["agrees"], (
        f"{impl} disagrees with {row['reference']} on {workload}: meta-gradient relative deviation "
        f"{row['ref_grad_rel_dev']:.3e} (vs the plain loop {row['grad_rel_dev']:.3e}), loss {row['loss_rel_dev']:.3e} "
        f"(tolerance {bench_imaml.CHECK_RTOL:g})"
    )


def test_stop_rule_reference(check_rows):
    """The two references coincide exactly where CG met no non-positive curvature, and differ where it did."""
    for row in (r for r in check_rows if r["impl"] == "loop"):
        if row["tasks_nonpositive_curvature"]:
            assert row["min_cg_curvature"] <= 0 and row["stop_rule_rel_dev"] > 1e-6
        else:
            assert row["min_cg_curvature"] > 0 and row["stop_rule_rel_dev"] == 0.0


def _one_cg_step_short(model, w, batch):
    return _imaml_peers.build_loop(model, dataclasses.replace(w, cg_steps=w.cg_steps - 1), batch)


def test_cross_check_flags_a_wrong_implementation():
    builders = {**bench_imaml.BUILDERS, "short_cg": _one_cg_step_short}
    rows = bench_imaml.cross_check(bench_imaml.tiny_workloads()[:1], ["loop", "short_cg"], builders=builders)
    (row,) = [r for r in rows if r["impl"] == "short_cg"]
    assert row["agrees"] is False and row["grad_rel_dev"] > 1e-6
    assert any("short_cg" in f for f in bench_imaml.check_failures(rows))


def test_main_fails_loudly(monkeypatch, tmp_path, capsys):
    """main() exits with status 1 when an implementation disagrees in float64 (and writes its results)."""
    monkeypatch.setitem(bench_imaml.BUILDERS, "vmap_rr", _one_cg_step_short)
    written = []
    monkeypatch.setattr(bench_imaml.M, "write_results", lambda *a: written.append(a) or (tmp_path, tmp_path))
    args = ["--quick", "--no-timing", "--tasks-filter", "tiny_sinusoid", "--impls", "loop,vmap_rr", "--name", "x"]
    assert bench_imaml.main(args) == 1
    assert written and "CROSS-CHECK FAILED" in capsys.readouterr().out


def test_memory_harness():
    """Fresh processes: MAML's peak grows with k, the iMAML loop's does not; the cap skips a predicted giant."""
    (w,) = bench_imaml.memory_test_workloads()
    cap = 120 * 2**20  # MAML at k = 64 is predicted ~300 MiB above its setup RSS (~4.7 MiB per step, measured)
    rows = bench_imaml.run_memory([w], ["maml"], (2, 16, 64), steps=1, cap_bytes=cap)
    rows += bench_imaml.run_memory([w], ["imaml_loop"], (2, 64), steps=1, cap_bytes=cap)
    by = {(r["algo"], r["k"]): r for r in rows}
    for r in rows:
        if r["algo"] != "imaml" and not str(r["error"]).startswith("capped"):
            assert r["error"] is None, r
            # Linux batches RSS accounting per thread (up to 64 pages = 256 KiB each before the mm counters, and so
            # VmHWM, catch up), so VmRSS read just after the reset can exceed the VmHWM read later by that much:
            # seen 0.15 MiB. 1 MiB allows four threads.
            assert r["hwm_reset"] and 0 < r["rss_setup_mib"] <= r["peak_mib"] + 1.0
            assert r["peak_mib"] <= r["peak_process_mib"]
    assert by[("maml", 16)]["growth_increment_vs_k2"] > 2.0
    assert by[("maml", 64)]["error"].startswith("capped") and by[("maml", 64)]["predicted_increment_mib"] > 120
    assert by[("imaml_loop", 64)]["growth_increment_vs_k2"] <= 1.1
    # The allocator setting reaches the worker.
    (fixed,) = bench_imaml.run_memory([w], ["imaml_loop"], (2,), steps=1, cap_bytes=cap, allocators=("mmap128k",))
    assert fixed["error"] is None and fixed["malloc_env"] == bench_imaml.ALLOCATORS["mmap128k"]
    assert by[("imaml_loop", 2)]["malloc_env"] == {}
    # metakernels.iMAML's live memory must not grow with k. Under glibc's default (dynamic) mmap threshold the
    # RSS also carries heap fragmentation that varies from run to run (measured 1.15x and 1.21x at this size
    # while the live tensors stay the same); with a fixed 128 KiB threshold the RSS follows the live memory.
    imaml_rows = bench_imaml.run_memory([w], ["imaml"], (2, 64), steps=1, cap_bytes=cap, allocators=("mmap128k",))
    imaml = {r["k"]: r for r in imaml_rows}[64]
    if str(imaml["error"]).startswith("unavailable"):
        pytest.skip(f"metakernels.iMAML: {imaml['error']}")
    assert imaml["error"] is None, imaml
    assert imaml["growth_increment_vs_k2"] <= 1.1


def test_tables_render():
    """The markdown tables accept missing, failed, disagreeing and capped entries."""
    rows = [
        {"section": "check", "workload": "w", "impl": "loop", "reference": "loop", "error": None, "agrees": True,
         "grad_rel_dev": 0.0, "min_cg_curvature": 0.5, "tasks_nonpositive_curvature": [], "stop_rule_rel_dev": 0.0},
        {"section": "check", "workload": "w", "impl": "vmap_rr", "reference": "loop", "error": None, "agrees": False,
         "grad_rel_dev": 0.03, "ref_grad_rel_dev": 0.03},
        {"section": "check", "workload": "w", "impl": "torchopt", "error": "unavailable: x", "agrees": None},
    ]  # fmt: skip
    timing = [
        {"section": "timing", "workload": "w", "label": "W", "threads": 1, "impl": i, "error": None, "median_ms": ms,
         "agrees_float64": i != "vmap_rr"}
        for i, ms in (("loop", 4.0), ("vmap_rr", 1.0), ("metakernels", 2.0))
    ]  # fmt: skip
    rounds = [{"loop": 4.0, "vmap_rr": 1.0, "metakernels": 1.0}, {"loop": 6.0, "vmap_rr": 1.0, "metakernels": 2.0}]
    bench_imaml.add_ratios(timing, rounds)
    (mk,) = [r for r in timing if r["impl"] == "metakernels"]
    assert mk["round_ratio_vs_fastest_peer"] == 3.5  # median of 4/1 and 6/2; vmap_rr disagrees, so not a baseline
    impls = ["loop", "torchopt", "vmap_rr", "metakernels"]
    table = bench_imaml.timing_table(rows + timing, impls)
    assert "2.00x vs loop" in table and "(disagrees)" in table and "| n/a |" in table
    assert "DISAGREES" in bench_imaml.check_table(rows, impls)
    mem = [
        {"section": "memory", "workload": "w", "algo": "maml", "k": 5, "peak_mib": 300.0, "increment_mib": 10.0},
        {"section": "memory", "workload": "w", "algo": "maml", "k": 100, "error": "capped: 9 GiB"},
        {"section": "memory", "workload": "w", "algo": "imaml", "k": 5, "peak_mib": 300.0, "increment_mib": 10.0},
        {"section": "memory", "workload": "w", "algo": "imaml", "k": 100, "peak_mib": 303.0, "increment_mib": 10.5},
    ]
    bench_imaml.add_growth(mem)
    table = bench_imaml.memory_table(mem)
    assert "capped" in table and "1.01x, 1.05x" in table


def test_memory_repeats_report_the_median_and_keep_every_run():
    (w,) = bench_imaml.memory_test_workloads()
    (row,) = bench_imaml.run_memory([w], ["imaml_loop"], (2,), steps=1, cap_bytes=2**40, repeats=3)
    assert row["error"] is None and row["repeats"] == 3
    assert len(row["peak_mib_runs"]) == 3 and len(row["increment_mib_runs"]) == 3
    assert row["peak_mib"] == sorted(row["peak_mib_runs"])[1]
    assert row["increment_mib"] == sorted(row["increment_mib_runs"])[1]
    # the field-wise median of runs, whatever their order
    runs = [{"a": 3.0, "b": True, "c": "x"}, {"a": 1.0, "b": False, "c": "y"}, {"a": 2.0, "b": False, "c": "z"}]
    assert bench_imaml._median_run(runs) == {"a": 2.0, "b": True, "c": "x"}


def test_maml_hvp_memory_is_refused_on_an_mlp_with_a_reason():
    (w,) = bench_imaml.memory_test_workloads()
    (row,) = bench_imaml.run_memory([w], ["maml_hvp"], (2,), steps=1, cap_bytes=2**40)
    assert "conv" in row["error"]
