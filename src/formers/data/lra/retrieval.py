"""LRA Retrieval: do two byte-level documents belong together? (LRA: AAN citation links, 4,000 bytes
per document, a shared two-tower encoder with no cross-attention.)

AAN cannot be had offline, so this is the reference sheet's SUBSTITUTE (a): the documents of
formers.data.lra.text (stdlib docstrings per module); label 1 = two disjoint windows of one module,
0 = windows of two different modules of the same split. Modules are split between train / val / test
as in text.py, so no module is in two splits; classes are balanced. Tokens: byte b -> b + 1, 0 = pad.
Each example is (2, seq_len): the two documents.
"""
from __future__ import annotations

import numpy as np

from . import pad_rows
from .text import documents, encode, split_sources, windows

VERSION = 1
DEFAULTS = dict(train=2000, val=200, test=500, seq_len=1000, seed=0)


def build(task: str, train: int, val: int, test: int, seq_len: int, seed: int) -> dict:
    docs = documents()
    rng = np.random.default_rng(seed)
    splits = split_sources([d[0] for d in docs], [0] * len(docs), rng)
    wins = {d[0]: windows(d[2], seq_len) for d in docs}
    out = {"info": dict(vocab_size=257, num_classes=2, substitute=True, padded=True,
                        source="substitute: stdlib docstring windows, same module vs different module (bytes)")}
    for split, n in (("train", train), ("val", val), ("test", test)):
        names = [m for m in splits[split] if wins[m]]
        multi = [m for m in names if len(wins[m]) >= 2]
        if not multi or len(names) < 2:
            raise ValueError(f"retrieval: split {split!r} has too few modules for seq_len={seq_len}")
        pairs, ys = [], []
        for i in range(n):
            if i % 2 == 0:              # positive: two different windows of one module
                m = multi[rng.integers(len(multi))]
                a, b = rng.choice(len(wins[m]), 2, replace=False)
                pairs.append((wins[m][a], wins[m][b]))
            else:                        # negative: windows of two different modules
                m1, m2 = rng.choice(len(names), 2, replace=False)
                w1, w2 = wins[names[m1]], wins[names[m2]]
                pairs.append((w1[rng.integers(len(w1))], w2[rng.integers(len(w2))]))
            ys.append(1 - i % 2)
        order = rng.permutation(n)
        x = np.stack([pad_rows([encode(p[0]) for p in pairs], seq_len), pad_rows([encode(p[1]) for p in pairs], seq_len)], 1)
        out[f"x_{split}"] = x[order] if n else np.zeros((0, 2, seq_len), np.int16)
        out[f"y_{split}"] = np.array(ys, dtype=np.int8)[order]
    return out
