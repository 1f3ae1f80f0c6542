"""ListOps (Nangia & Bowman, 2018) as Long Range Arena generates it: nested MIN / MAX / MED / SM
(sum mod 10) expressions over the digits 0-9, target = the value of the expression (10 classes).

The grammar and constants are those of the official generator (lra_benchmarks/data/listops.py, read,
not copied): below depth 10 a node is an operator with probability 0.25 (else a digit), an operator
takes 2..10 arguments; only expressions of 500 < length < 2000 tokens are kept, deduplicated.
MED is int(median) (an even count truncates the mean of the two middle values). The official run
is unseeded; here Python's random.Random(seed) makes every build identical.

Tokenisation as the LRA input pipeline: the parentheses are dropped, "]" becomes "X", split on spaces.
Token ids: 0 = padding, then the 15 symbols of VOCAB.  A (min_length, max_length) other than
(500, 2000) is a reduced *variant* for CPU runs, and its source string says so.
"""
from __future__ import annotations

import random

import numpy as np

from . import pad_rows

VERSION = 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "X"                                       # the pipeline's name for "]"
VOCAB = tuple(str(d) for d in range(10)) + OPERATORS + (CLOSE,)
TOKEN_ID = {s: i + 1 for i, s in enumerate(VOCAB)}   # 0 is padding
VALUE_P, MAX_DEPTH, MAX_ARGS = 0.25, 10, 10

DEFAULTS = dict(train=2000, val=200, test=500, min_length=500, max_length=2000, seed=0)


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS):
    """A digit (int) or (operator, [children]); the draws follow the official recursion."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.randint(0, 9)
    n = rng.randint(2, max_args)
    return (rng.choice(OPERATORS), [generate_tree(rng, depth + 1, max_depth, max_args) for _ in range(n)])


def tree_length(t) -> int:
    return 1 if isinstance(t, int) else 2 + sum(tree_length(c) for c in t[1])


def tree_value(t) -> int:
    if isinstance(t, int):
        return t
    op, args = t[0], [tree_value(c) for c in t[1]]
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    return sum(args) % 10


def tree_tokens(t, out: list | None = None) -> list:
    out = [] if out is None else out
    if isinstance(t, int):
        out.append(str(t))
    else:
        out.append(t[0])
        for c in t[1]:
            tree_tokens(c, out)
        out.append(CLOSE)
    return out


def generate(n: int, rng: random.Random, min_length: int, max_length: int, seen: set) -> list[tuple[list, int]]:
    out = []
    while len(out) < n:
        t = generate_tree(rng)
        if not (min_length < tree_length(t) < max_length):
            continue
        toks = tree_tokens(t)
        key = " ".join(toks)
        if key in seen:
            continue
        seen.add(key)
        out.append((toks, tree_value(t)))
    return out


def encode(tokens: list[str]) -> list[int]:
    return [TOKEN_ID[s] for s in tokens]


def decode(ids) -> list[str]:
    return [VOCAB[int(i) - 1] for i in ids if int(i) != 0]


def build(task: str, train: int, val: int, test: int, min_length: int, max_length: int, seed: int) -> dict:
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"listops: need 0 <= min_length < max_length - 1, got {min_length}, {max_length}")
    rng, seen = random.Random(seed), set()
    official = (min_length, max_length) == (500, 2000)
    out = {"info": dict(vocab_size=len(VOCAB) + 1, num_classes=10, substitute=False, padded=True,
                        source="LRA ListOps generator (seeded port)" if official else
                        f"LRA ListOps generator, reduced variant: {min_length} < length < {max_length}")}
    for split, n in (("train", train), ("val", val), ("test", test)):
        rows = generate(n, rng, min_length, max_length, seen)
        out[f"x_{split}"] = pad_rows([encode(t) for t, _ in rows], max_length, np.int8)
        out[f"y_{split}"] = np.array([v for _, v in rows], dtype=np.int8)
    return out
