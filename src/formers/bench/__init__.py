"""Throughput, memory and FLOP-rate of our models, side by side with a peer library (timm).

`benchmark` measures images/s, ms per batch, peak memory, params, GMACs and GFLOP/s for
inference and/or a training step; with `peer="timm"` it loads the same weights into timm's
model, checks that the outputs agree, then times the two interleaved in one process.
`machine_limits` measures this machine's matmul limits; `optimize` is an opt-in fast
inference path. The command line is `formers bench`.
"""
from .harness import BenchError, benchmark, csv_columns, sweep
from .machine import machine_limits
from .optimize import optimize
from .report import format_table, plot_sweep, write_csv

__all__ = ["benchmark", "sweep", "write_csv", "csv_columns", "machine_limits", "optimize", "BenchError",
           "format_table", "plot_sweep"]
