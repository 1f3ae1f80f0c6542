"""Loggers beside metrics.jsonl, chosen with `formers train --log tensorboard,csv`.

Each logger gets every row the trainer writes to metrics.jsonl (the same dicts, on rank 0 only)
and is closed when the run ends, however it ends. To add one (W&B, MLflow, ...), call
`register_logger("wandb", factory, requires="wandb")` before `train()`: `factory(out, history,
resumed_step)` returns an object with `log(row)` and `close()`; `history` holds the rows a resumed run
kept (resumed_step is the step it continues from, None for a new run).
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import os

__all__ = ["register_logger", "check_loggers", "open_loggers", "CsvLogger", "TensorBoardLogger"]

LOGGERS: dict[str, tuple] = {}      # name -> (factory, the package it needs or None)


def register_logger(name: str, factory, requires: str | None = None):
    """Make `--log NAME` (TrainConfig.loggers) call `factory(out, history, resumed_step)`."""
    LOGGERS[name] = (factory, requires)


def check_loggers(names):
    """A ValueError, before any training, for a name no logger has or a package that is missing."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--log takes a list of names like ['tensorboard', 'csv'], got {names!r}")
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown --log {name!r}; choose among {', '.join(LOGGERS)} "
                             f"(comma-separated, e.g. --log tensorboard,csv)")
        package = LOGGERS[name][1]
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"--log {name} needs the {package} package: pip install {package} "
                             f"(or drop {name} from --log)")


def open_loggers(names, out: str, history: list[dict], resumed_step: int | None) -> list:
    return [LOGGERS[name][0](out, history, resumed_step) for name in names]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v) -> str:
    if isinstance(v, float):
        return repr(v)                  # full precision: float(cell) == v
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return "" if v is None else str(v)


class CsvLogger:
    """OUT/metrics_steps.csv and OUT/metrics_epochs.csv: one file per row kind, the columns are the
    keys seen so far. A row with a new key rewrites its file under the wider header (earlier rows get
    empty cells there); every other row is one appended line, so nothing logged waits in a buffer."""

    def __init__(self, out: str, history: list[dict], resumed_step: int | None):
        self.out = out
        self.columns: dict[str, list[str]] = {}
        by_kind: dict[str, list[dict]] = {}
        for row in history:
            by_kind.setdefault(row["kind"], []).append(row)
        for kind in {"step", "epoch", *by_kind}:   # a new run starts them empty; a resumed one rewrites
            if os.path.exists(self.path(kind)):    # them from its (truncated) metrics.jsonl rows
                os.remove(self.path(kind))
        for kind, rows in by_kind.items():
            self._rewrite(kind, [{k: _cell(v) for k, v in r.items() if k != "kind"} for r in rows])

    def path(self, kind: str) -> str:
        return os.path.join(self.out, f"metrics_{kind}s.csv")

    def _rewrite(self, kind: str, cells: list[dict]):
        from .state import atomic_write
        columns = list(dict.fromkeys(k for r in cells for k in r))
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, columns, restval="")
        w.writeheader()
        w.writerows(cells)
        atomic_write(self.path(kind), buf.getvalue().encode("utf-8"))
        self.columns[kind] = columns

    def log(self, row: dict):
        kind = row["kind"]
        cells = {k: _cell(v) for k, v in row.items() if k != "kind"}
        columns = self.columns.get(kind)
        if columns is None or not cells.keys() <= set(columns):
            old = []
            if columns is not None:
                with open(self.path(kind), newline="", encoding="utf-8") as f:
                    old = list(csv.DictReader(f))
            self._rewrite(kind, old + [cells])
            return
        with open(self.path(kind), "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, columns, restval="").writerow(cells)

    def close(self):
        pass                            # every row is already on disk


class TensorBoardLogger:
    """OUT/tb/: step rows as train/<key> scalars, epoch rows as epoch/<key>, at global step row["step"].
    A resumed run passes purge_step so that TensorBoard hides the events logged after its checkpoint."""

    def __init__(self, out: str, history: list[dict], resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        log_dir = os.path.join(out, "tb")
        if resumed_step is None:        # a new run: an earlier run's curves would be drawn over it
            for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
                os.remove(path)
        self.writer = SummaryWriter(log_dir, purge_step=None if resumed_step is None else resumed_step + 1)

    def log(self, row: dict):
        prefix = "train" if row["kind"] == "step" else row["kind"]
        skip = {"kind", "step"} | ({"epoch"} if prefix == "train" else set())
        for k, v in row.items():
            if k not in skip and _number(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, global_step=row["step"])
        if row["kind"] == "epoch":
            self.writer.flush()

    def close(self):
        self.writer.close()


register_logger("csv", CsvLogger)
register_logger("tensorboard", TensorBoardLogger, requires="tensorboard")
