"""`metakernels profile`: this machine's rooflines, then every fused op timed over a size grid.

    from metakernels.profiler import profile
    result = profile(grid="quick", out="runs/profile")     # table printed; profile.{json,csv,png} written

Modules: machine (bandwidth and GEMM measurements, regimes), cases (the op grids), runner (timing),
report (table, JSON, CSV), plot (PNG), command (the CLI subcommand).
"""

from .cases import CASE_BUILDERS, Case, available_ops, build_cases, ops_without_cases
from .command import profile
from .machine import measure_machine

__all__ = ["CASE_BUILDERS", "Case", "available_ops", "build_cases", "measure_machine", "ops_without_cases", "profile"]
