"""A byte-level text corpus from files already on the machine: the Python standard library's
.py sources of the running interpreter, split by file into train and validation parts."""
from __future__ import annotations

import dataclasses
import os
import random
import sysconfig

import torch

__all__ = ["ByteCorpus", "stdlib_corpus", "random_windows"]


@dataclasses.dataclass
class ByteCorpus:
    train: torch.Tensor       # uint8, one long stream
    val: torch.Tensor
    files: tuple[int, int]    # files in train, val


def _sources(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def stdlib_corpus(max_bytes: int = 2_000_000, val_fraction: float = 0.1, seed: int = 0,
                  root: str | None = None) -> ByteCorpus:
    """The stdlib's .py files in a seeded order; whole files go to validation until it holds
    `val_fraction` of `max_bytes`, the rest fill training up to `max_bytes` in all."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = _sources(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root!r}")
    random.Random(seed).shuffle(files)
    val_cap = int(max_bytes * val_fraction)
    parts = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    count = {"train": 0, "val": 0}
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        split = "val" if size["val"] < val_cap else "train"
        cap = val_cap if split == "val" else max_bytes - val_cap
        if size[split] >= cap:
            break
        data = data[:cap - size[split]]
        parts[split].append(data)
        size[split] += len(data)
        count[split] += 1
    to = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return ByteCorpus(to(parts["train"]), to(parts["val"]), (count["train"], count["val"]))


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator | None = None):
    """(inputs, next-byte targets), each (batch, length) int64, from random offsets of `stream`."""
    start = torch.randint(0, len(stream) - length - 1, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(length + 1)
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
