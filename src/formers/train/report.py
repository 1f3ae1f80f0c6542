"""What a run shows and leaves behind: a progress bar, metrics.jsonl, curves.png, a confusion matrix.

matplotlib and tqdm are imported here, lazily, so `import formers` never needs them.
"""
from __future__ import annotations

import json
import os
import sys

__all__ = ["MetricsLog", "Progress", "plot_curves", "plot_confusion"]


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"kind": "step" | "epoch", "step": ..., ...}). Each row
    written also goes to `loggers` (see loggers.py: --log tensorboard,csv), closed by close()."""

    def __init__(self, path: str, loggers: list | None = None):
        self.path = path
        self.loggers = list(loggers or [])

    def reset(self):
        with open(self.path, "w"):
            pass

    def read(self) -> list[dict]:
        rows = []
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break   # a line cut by a kill: it and anything after are dropped
        return rows

    def truncate_after(self, step: int) -> list[dict]:
        """Keep the lines a checkpoint at `step` had seen (a resumed run rewrites the rest)."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        from .state import atomic_write
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return rows

    def write(self, row: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log(row)

    def close(self):
        """Close (and so flush) the loggers; metrics.jsonl itself is never left open."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


class Progress:
    """A tqdm bar per epoch on a terminal; silent otherwise (the epoch lines still print)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, **postfix):
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(f"{k} {v}" for k, v in postfix.items()), refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], path: str, title: str = "", metric: str = "acc"):
    """Training loss (per step and per epoch) and the test metric against epochs: the epoch rows'
    f"test_{metric}" (accuracy for classification, mIoU for segmentation), with the training accuracy."""
    plt = _pyplot()
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_l.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.35,
                  color="tab:blue", label="train loss (step)")
    if epochs:
        ex = [r["epoch"] for r in epochs]
        ax_l.plot(ex, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train loss (epoch)")
        ax_l.plot(ex, [r["test_loss"] for r in epochs], "s--", color="tab:orange", label="test loss")
        ax_a.plot(ex, [r["train_acc"] for r in epochs], "o-", color="tab:blue", label="train acc")
        ax_a.plot(ex, [r[f"test_{metric}"] for r in epochs], "s-", color="tab:orange", label=f"test {metric}")
        if any(f"ema_test_{metric}" in r for r in epochs):
            ax_a.plot(ex, [r.get(f"ema_test_{metric}") for r in epochs], "^-", color="tab:green",
                      label=f"EMA test {metric}")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_yscale("log")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy (%)" if metric == "acc" else f"{metric} / accuracy (%)")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix, classes: list[str], path: str, title: str = ""):
    """A confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    plt = _pyplot()
    import numpy as np
    m = np.asarray(matrix)
    k = len(classes)
    size = min(14, 3 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), [c[:12] for c in classes], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), [c[:12] for c in classes], fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: str):
    from .state import atomic_replace
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    atomic_replace(tmp, path)
