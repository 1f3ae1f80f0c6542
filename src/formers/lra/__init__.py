"""Long Range Arena (catalog 59; Tay et al., "Long Range Arena: A Benchmark for Efficient
Transformers", ICLR 2021, arXiv 2011.04006): one sequence model whose token mixer is any
registered `formers.attention` mechanism, the per-task settings of the official configs, and the
`formers lra` command (train/evaluate one cell of Table 1; speed/memory as Table 2).
"""
PAPER = 59

from .model import TASK_CONFIGS, LRAModel, build_model, task_config

__all__ = ["TASK_CONFIGS", "LRAModel", "build_model", "task_config"]
