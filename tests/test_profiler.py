"""`metakernels profile`: a tiny-grid run end to end (JSON, CSV, table, PNG, chrome trace), the ops' names in
torch.profiler traces, the command line, and the L3 / regime logic the bounds rest on."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import metakernels
from metakernels.cli import build_parser, main
from metakernels.ops import OP_NAMES
from metakernels.profiler import cases as C
from metakernels.profiler import machine as M
from metakernels.profiler.plot import plot_profile
from metakernels.profiler.report import format_table, read_csv

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `metakernels profile --tiny` run (toy sizes, toy machine measurement: a few seconds), shared."""
    out = tmp_path_factory.mktemp("profile")
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            rc = main(["profile", "--tiny", "--threads", "1", "--out", str(out), "--trace", str(out / "trace.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out, json.loads((out / "profile.json").read_text()), stdout.getvalue()


def _profiled_ops() -> list[str]:
    return [op for op in C.available_ops() if op in C.CASE_BUILDERS]


def test_every_available_op_has_profiler_cases():
    missing = C.ops_without_cases()
    assert not missing, (
        f"ops in metakernels.ops.OP_NAMES without profiler cases: {missing}; add a grid for each to "
        "CASE_BUILDERS in metakernels/profiler/cases.py"
    )


def test_json_has_every_op_and_sane_rows(tiny_run):
    _, data, _ = tiny_run
    assert set(data) >= {"tool", "run", "machine", "versions", "config", "ops", "results"}
    assert data["ops"]["available"] == C.available_ops()
    assert data["ops"]["profiled"] == _profiled_ops()
    assert set(_profiled_ops()) >= {"inner_step", "inner_step_backward", "inner_step_out", "reptile_update"}
    rows = data["results"]
    assert {r["op"] for r in rows} == set(_profiled_ops())
    machine = data["machine"]
    for r in rows:
        where = f"{r['op']} [{r['case']}]"
        assert r["error"] is None, (where, r["error"])
        for key in ("t_median_us", "t_min_us", "rate", "bound_value", "pct_of_bound", "gbps"):
            assert math.isfinite(r[key]) and r[key] > 0, (where, key, r[key])
        assert r["t_min_us"] <= r["t_median_us"] <= r["t_max_us"], where
        assert r["ws_bytes"] == r["bytes_read"] + r["bytes_written"] > 0, where
        if r["regime"] == "gemm":
            assert r["bound"] == "gemm_fp32" and r["rate_unit"] == "GFLOP/s" and r["flops"] > 0, where
            assert r["bound_value"] == machine["gemm_fp32"]["gflops"], where
        else:
            # Toy sizes fit any L3: every bandwidth case is compared with the cache-resident bound.
            assert r["regime"] == "cache" and r["rate_unit"] == "GB/s", where
            level, pattern = r["bound"].split(".")
            assert level == "cache" and pattern in C.BANDWIDTH_BOUNDS, where
            assert r["bound_value"] == machine["cache"][pattern]["gbps"], where
        assert r["pct_of_bound"] == pytest.approx(100 * r["rate"] / r["bound_value"]), where
        # The reference of each op exists in metakernels.reference: the speedup column is filled.
        if C._reference(r["op"]) is not None:
            assert r["reference_error"] is None, (where, r["reference_error"])
            assert r["speedup_vs_reference"] > 0 and r["reference_us"] > 0, where
    run = data["run"]
    assert run["git_commit"] and run["torch_version"] == torch.__version__ and run["torch_threads"] == 1
    assert machine["info"]["l3_bytes"] == machine["l3_bytes"] > 0
    for level in ("cache", "dram"):
        assert all(machine[level][p]["gbps"] > 0 for p in M.PATTERNS)
    assert data["versions"]["torch"] and data["config"]["grid"] == "tiny" and data["config"]["threads"] == 1


def test_csv_matches_json(tiny_run):
    out, data, _ = tiny_run
    text = (out / "profile.csv").read_text()
    assert text.startswith("# metakernels profile |") and data["run"]["git_commit"] in text.splitlines()[0]
    rows = read_csv(out / "profile.csv")
    assert [(r["op"], r["case"]) for r in rows] == [(r["op"], r["case"]) for r in data["results"]]
    for r, j in zip(rows, data["results"], strict=True):
        assert float(r["t_median_us"]) == pytest.approx(j["t_median_us"])
        assert r["bound"] == j["bound"] and json.loads(r["params"]) == j["params"]


def test_table_printed(tiny_run):
    _, data, stdout = tiny_run
    assert "fp32 GEMM" in stdout and "bandwidth, GB/s" in stdout  # the machine summary
    header = next(line for line in stdout.splitlines() if line.startswith("op "))
    for column in ("case", "median", "rate", "bound", "% bound", "vs ref"):
        assert column in header
    for r in data["results"]:
        assert any(line.startswith(r["op"]) and r["case"] in line for line in stdout.splitlines()), r["case"]
    assert format_table(data["results"]).splitlines()[0] == header


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed: the PNG is skipped by design")
def test_png_written(tiny_run):
    out, _, _ = tiny_run
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    row = {"op": "x", "case": "y", "regime": "cache", "pct_of_bound": 50.0, "speedup_vs_reference": 2.0}
    assert plot_profile([row], tmp_path / "p.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_chrome_trace_names_every_op(tiny_run):
    out, data, _ = tiny_run
    names = {e.get("name") for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
    for op in data["ops"]["profiled"]:
        assert f"metakernels::{op}" in names, op


def _event_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_every_case_appears_under_its_op_name_in_torch_profiler():
    for case in C.build_cases("tiny"):
        built = case.make()
        assert f"metakernels::{case.op}" in _event_names(built.call), f"{case.op} [{case.label}] via {case.via}"


def test_inner_step_trace_names_through_every_entry():
    theta = torch.rand(3, 5, requires_grad=True)
    grad, lr = torch.rand(3, 5), torch.tensor(0.1)

    def public_api():  # metakernels.inner_step: the extension's unboxed entry when it is loaded
        metakernels.inner_step(theta, grad, lr, weight_decay=0.1).sum().backward()

    names = _event_names(public_api)
    assert {"metakernels::inner_step", "metakernels::inner_step_backward"} <= names
    assert "metakernels::inner_step" in _event_names(lambda: torch.ops.metakernels.inner_step(theta, grad, lr))
    out = torch.empty(3, 5)
    with torch.no_grad():
        names = _event_names(lambda: metakernels.inner_step(theta, grad, lr, out=out))
    assert "metakernels::inner_step_out" in names


def test_cli_parses():
    args = build_parser().parse_args(
        [
            "profile",
            "--quick",
            "--ops",
            "inner_step,reptile_update",
            "--threads",
            "2",
            "--out",
            "d",
            "--no-plot",
            "--trace",
            "t.json",
        ]
    )
    assert (args.command, args.quick, args.ops, args.threads, args.out, args.no_plot, args.trace) == (
        "profile",
        True,
        "inner_step,reptile_update",
        2,
        "d",
        True,
        "t.json",
    )
    defaults = build_parser().parse_args(["profile"])
    assert (defaults.out, defaults.quick, defaults.ops, defaults.threads, defaults.tiny) == (
        "runs/profile",
        False,
        None,
        None,
        False,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["profile", "--threads", "0"])


def test_cli_rejects_unknown_op(tmp_path, capsys):
    # The op list is checked before the machine is measured: this fails fast.
    with pytest.raises(SystemExit) as info:
        main(["profile", "--tiny", "--ops", "inner_step,no_such_op", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "no_such_op" in capsys.readouterr().err
    assert not (tmp_path / "profile.json").exists()


def test_build_cases_validates():
    with pytest.raises(ValueError, match="grid"):
        C.build_cases("huge")
    with pytest.raises(ValueError, match="not available"):
        C.build_cases("tiny", ["no_such_op"])
    assert {c.op for c in C.build_cases("tiny", ["reptile_update"])} == {"reptile_update"}
    assert set(C.available_ops()) <= set(OP_NAMES) | set(C.COMPOSITE_OPS)


def test_quick_grid_reaches_beyond_the_l3():
    # Every bandwidth-bound op has a quick-grid case in the DRAM regime (working set >= 2x the L3). Sizes
    # only: the cases' inputs are not built.
    l3 = 300 * M.MIB
    # Bytes per [T, P] element: theta, grad, out; grad_out, theta, grad, d_grad; fast + theta/T + out/T; G + out/T.
    bytes_per = {
        "inner_step_out": lambda T: 12,
        "inner_step_backward": lambda T: 16,
        "reptile_update": lambda T: 4 * (T + 2) / T,
        "pcgrad_out": lambda T: 4 * (T + 1) / T,
    }
    for op, per in bytes_per.items():
        cases = C.CASE_BUILDERS[op]("quick", l3)
        assert max(c.params["T"] * c.params["P"] * per(c.params["T"]) for c in cases) >= 2 * l3, op


def test_l3_from_sysfs_or_override(monkeypatch):
    M.l3_info.cache_clear()
    try:
        size, source = M.l3_info()
        assert size > 0 and source in ("sysfs", "lscpu", "fallback", "METAKERNELS_L3_BYTES")
        monkeypatch.setenv("METAKERNELS_L3_BYTES", "504M")
        M.l3_info.cache_clear()
        assert M.l3_info() == (504 * M.MIB, "METAKERNELS_L3_BYTES")
        assert M.dram_working_set() == 4 * 504 * M.MIB and M.cache_working_set() == 48 * M.MIB
    finally:
        monkeypatch.delenv("METAKERNELS_L3_BYTES", raising=False)
        M.l3_info.cache_clear()
    assert M._parse_size("307200K") == 300 * M.MIB and M._parse_size("314572800") == 300 * M.MIB


def test_regimes():
    l3 = 300 * M.MIB
    assert M.regime(l3, l3) == "cache"
    assert M.regime(l3 + 1, l3) == "l3/dram"
    assert M.regime(2 * l3, l3) == "dram"
    machine = {"l3_bytes": l3, "cache": {"triad": {"gbps": 40.0}}, "dram": {"triad": {"gbps": 20.0}}}
    assert M.roofline(machine, 10 * M.MIB, "triad") == ("cache.triad", 40.0, "cache")
    assert M.roofline(machine, 700 * M.MIB, "triad") == ("dram.triad", 20.0, "dram")


def test_reuses_a_machine_measurement(tiny_run, tmp_path, capsys):
    out, data, _ = tiny_run
    threads = torch.get_num_threads()
    try:
        rc = main(
            [
                "profile",
                "--tiny",
                "--ops",
                "reptile_update",
                "--threads",
                "1",
                "--no-plot",
                "--machine-json",
                str(out / "profile.json"),
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and "measuring the machine" not in capsys.readouterr().out
    again = json.loads((tmp_path / "profile.json").read_text())
    assert again["machine"] == data["machine"]
    assert {r["op"] for r in again["results"]} == {"reptile_update"}


# --- hvp: the composite entry (metakernels.hvp_operator's product, not a torch.ops op) --------------------------


def _hvp_rows(data: dict) -> dict[str, dict]:
    rows = [r for r in data["results"] if r["op"] == "hvp"]
    return {r["params"]["model"]: r for r in rows}


def test_hvp_is_a_composite_entry_with_tiny_cases_for_both_models():
    assert "hvp" not in OP_NAMES and "hvp" in C.COMPOSITE_OPS
    assert "hvp" in C.available_ops() and "hvp" in C.CASE_BUILDERS and "hvp" not in C.ops_without_cases()
    cases = C.build_cases("tiny", ["hvp"])
    assert sorted(c.params["model"] for c in cases) == ["conv", "mlp"]
    for c in cases:
        assert c.op == "hvp" and c.bound == "gemm" and "metakernels.hvp_operator" in c.via, c
    for grid in ("quick", "full"):  # the shapes
        mlp, conv, *more = C.build_cases(grid, ["hvp"])  # the MLP first, then the conv net at T = 8 (then T = 32)
        assert mlp.params["widths"] == [1, 40, 40, 1] and (mlp.params["T"], mlp.params["N"]) == (25, 10)
        shape = (conv.params[k] for k in ("model", "T", "N", "channels", "blocks", "H", "ways"))
        assert tuple(shape) == ("conv", 8, 5, 64, 4, 28, 5)
        assert [c.params["T"] for c in more] == ([32] if grid == "full" else [])


def test_hvp_rows_in_the_tiny_run(tiny_run):
    out, data, stdout = tiny_run
    rows = _hvp_rows(data)
    assert set(rows) == {"mlp", "conv"} and "hvp" in data["ops"]["profiled"]
    for model, r in rows.items():
        assert r["error"] is None and r["reference_error"] is None, (model, r)
        for key in ("t_median_us", "flops", "gflops", "pct_of_bound", "reference_us", "speedup_vs_reference"):
            assert math.isfinite(r[key]) and r[key] > 0, (model, key, r[key])
        assert r["regime"] == "gemm" and r["bound"] == "gemm_fp32"
        assert r["gflops"] == pytest.approx(r["flops"] / (r["t_median_us"] * 1e3))
        assert r["pct_of_bound"] == pytest.approx(100 * r["gflops"] / data["machine"]["gemm_fp32"]["gflops"])
        assert any(line.startswith("hvp") and r["case"] in line for line in stdout.splitlines()), r["case"]
    csv_ops = [r["op"] for r in read_csv(out / "profile.csv")]
    assert csv_ops.count("hvp") == 2


def test_hvp_products_are_the_hessian_vector_products():
    # The timed call and the reference are H v of the same point and direction (float32: both accumulate over at
    # most a few hundred terms of O(1) size, so agreement to 1e-4 relative to the largest entry).
    for case in C.build_cases("tiny", ["hvp"]):
        built = case.make()
        fused, generic = built.call(), built.reference()
        assert fused.shape == (case.params["T"], case.params["P"]) and fused.abs().max() > 0
        torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-4 * generic.abs().max().item())


def test_hvp_flop_counts_by_hand():
    # Tiny conv net: T = 2 tasks, N = 3 images 8x8, 2 blocks of 4 channels, 3 ways. Block 1 (1 -> 4 channels at
    # 8x8): 2 convolution-sized products; block 2 (4 -> 4 at 4x4): 6; Linear(4 * 2 * 2 = 16 -> 3): 6 products.
    conv_block1 = 2 * 3 * 8 * 8 * 4 * 1 * 9
    conv_block2 = 2 * 3 * 4 * 4 * 4 * 4 * 9
    linear = 2 * 3 * 16 * 3
    expected_conv = 2 * (2 * conv_block1 + 6 * conv_block2 + 6 * linear)
    # Tiny MLP [1, 8, 8, 1], T = 3, N = 4: per sample, 16 FLOPs per multiply-add of layers 2-3 (8 * 8, 8 * 1), 6
    # for the first (1 * 8).
    expected_mlp = 3 * 4 * (16 * (64 + 8) + 6 * 8)
    flops = {c.params["model"]: c.make().flops for c in C.build_cases("tiny", ["hvp"])}
    assert flops == {"conv": expected_conv, "mlp": expected_mlp} == {"conv": 224640, "mlp": 14400}


class _ProductCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """FLOPs of the convolutions and batched matrix products a call executes, from the aten calls' shapes
    (torch.utils.flop_counter counts a grouped convolution's weight gradient `groups` times over and skips
    baddbmm_, so it is not the oracle here)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    @staticmethod
    def _conv(grad_or_out: torch.Tensor, weight: torch.Tensor) -> int:
        # 2 * N * Ho * Wo * Cout(all groups) * Cin(per group) * k * k
        n, _, ho, wo = grad_or_out.shape
        return 2 * n * ho * wo * weight.numel()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.flops += self._conv(out, args[1])
        elif name == "convolution_backward":
            self.flops += sum(args[10][:2]) * self._conv(args[0], args[2])  # d_input and d_weight as masked
        elif name in ("bmm", "baddbmm", "baddbmm_"):
            a, b = args[:2] if name == "bmm" else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return out


@pytest.mark.parametrize("grid", ["tiny", "quick"])
def test_hvp_conv_flop_count_matches_the_products_executed(grid):
    # The documented count (conv_net_hvp_flops) against the convolutions and bmms the R-operator's product runs.
    (case,) = [c for c in C.build_cases(grid, ["hvp"]) if c.params["model"] == "conv"]
    built = case.make()
    counter = _ProductCounter()
    with counter:
        built.call()
    assert counter.flops > 0 and built.flops == counter.flops


def test_hvp_mlp_flop_count_matches_the_reference_r_operator():
    # The fused kernel's products are those of metakernels.reference.mlp_loss_grad (see _mlp_rop_flops).
    from metakernels.reference.mlp_loss_grad import mlp_loss_grad_backward

    for case in C.build_cases("quick", ["hvp"]) + C.build_cases("tiny", ["hvp"]):
        if case.params["model"] != "mlp":
            continue
        T, N, widths, P = (case.params[k] for k in ("T", "N", "widths", "P"))
        counter = _ProductCounter()
        with counter:
            mlp_loss_grad_backward(
                None,
                torch.randn(T, P),
                torch.randn(T, P),
                torch.randn(T, N, widths[0]),
                torch.randn(T, N, widths[-1]),
                widths,
                "relu",
                "mse",
            )
        assert case.make().flops == counter.flops > 0, case.label


def test_cli_selects_hvp_only(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["profile", "--tiny", "--ops", "hvp", "--threads", "1", "--no-plot", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "profile.json").read_text())
    assert {r["op"] for r in data["results"]} == {"hvp"} and set(_hvp_rows(data)) == {"mlp", "conv"}
    assert "hvp" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'hvpp' is not available"):
        C.build_cases("tiny", ["hvp", "hvpp"])
