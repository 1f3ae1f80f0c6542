"""Long Range Arena data (Tay et al., ICLR 2021, arXiv 2011.04006): one module per task.

    from formers.data.lra import load_task, TASKS
    data = load_task("listops", train=2000, test=500)     # SeqData, cached on disk after the first build
    data.x_train   # (N, L) int64 tokens, 0 = padding;  data.x_train[:, 0] is the first token
    data.mask(data.x_train)                                # (N, L) bool, True = real token

Every generator is seeded and deterministic; the built arrays are cached as
`<cache_dir>/<task>-<hash of the build parameters>.npz` (default ~/.cache/formers/lra, or
$FORMERS_LRA_CACHE). Tasks whose real data cannot be had offline (IMDb, AAN, CIFAR-10) use the
substitutes of the reference sheet; `data.substitute` is True for them and every report says so.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["SeqData", "TASKS", "load_task", "task_module", "default_cache_dir", "cache_path"]

# task name -> module in this package; each module has build(seed, **params) -> dict of arrays + info,
# DEFAULTS (the small CPU sizes) and VERSION (bumped when its output changes, so old caches are ignored)
TASKS = {
    "listops": "listops",
    "text": "text",
    "retrieval": "retrieval",
    "image": "image",
    "pathfinder32": "pathfinder",
    "pathfinder128": "pathfinder",
}


@dataclass
class SeqData:
    """Token sequences of one LRA task. x_* are (N, L) int64, or (N, 2, L) for the two-document
    retrieval task; 0 is the padding token everywhere (real tokens are >= 1 or, for fixed-length
    pixel tasks without padding, any value in [0, vocab_size))."""
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab_size: int
    num_classes: int
    substitute: bool
    source: str                     # what the data is, in words ("LRA ListOps generator", "substitute: ...")
    padded: bool = True             # False: every position is a real token (pixel tasks)
    params: dict = field(default_factory=dict)
    path: str | None = None         # the cache file it came from

    @property
    def seq_len(self) -> int:
        return self.x_train.shape[-1]

    @property
    def pair(self) -> bool:
        return self.x_train.ndim == 3

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        return (x != 0) if self.padded else None

    def describe(self) -> str:
        tag = "SUBSTITUTE " if self.substitute else ""
        return (f"{tag}{self.task}: {self.source}; {len(self.y_train)}/{len(self.y_val)}/{len(self.y_test)} "
                f"train/val/test, length {self.seq_len}, vocab {self.vocab_size}, {self.num_classes} classes")


def default_cache_dir() -> str:
    return os.environ.get("FORMERS_LRA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "formers", "lra")


def task_module(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown LRA task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{TASKS[task]}")


def _resolved(task: str, params: dict) -> dict:
    mod = task_module(task)
    defaults = mod.defaults(task) if hasattr(mod, "defaults") else dict(mod.DEFAULTS)
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"LRA task {task!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    out.update({k: v for k, v in params.items() if v is not None})
    return out


def cache_path(task: str, cache_dir: str | None = None, **params) -> str:
    mod = task_module(task)
    full = _resolved(task, params)
    key = json.dumps({"task": task, "version": mod.VERSION, **full}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"{task}-{digest}.npz")


def _save_atomic(path: str, arrays: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_task(task: str, cache_dir: str | None = None, rebuild: bool = False, **params) -> SeqData:
    """Build (first call) or read (later calls) one task's arrays. params override the module's
    DEFAULTS (sizes, lengths, seed ...); a parameter the task does not know is a ValueError."""
    mod = task_module(task)
    full = _resolved(task, params)
    path = cache_path(task, cache_dir, **full)
    if rebuild or not os.path.isfile(path):
        out = mod.build(task, **full)
        info = out.pop("info")
        arrays = {k: np.asarray(v) for k, v in out.items()}
        arrays["info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
        _save_atomic(path, arrays)
    with np.load(path) as z:
        info = json.loads(bytes(z["info"]).decode())
        t = {k: torch.from_numpy(z[k].astype(np.int64)) for k in
             ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    return SeqData(task=task, vocab_size=info["vocab_size"], num_classes=info["num_classes"],
                   substitute=info["substitute"], source=info["source"], padded=info.get("padded", True),
                   params=full, path=path, **t)


def pad_rows(rows: list, length: int, dtype=np.int16) -> np.ndarray:
    """Right-pad (with 0) or truncate a list of 1-D token arrays to one (N, length) array."""
    out = np.zeros((len(rows), length), dtype=dtype)
    for i, r in enumerate(rows):
        r = np.asarray(r)[:length]
        out[i, :len(r)] = r
    return out
