"""LRA Text: byte-level binary classification of long documents (LRA: IMDb reviews, 256 bytes + pad).

IMDb cannot be had offline, so this is the reference sheet's SUBSTITUTE T1: for each module of the
Python standard library (read from its source with `ast`, never imported), its module, class and
function docstrings form one document; label = module family, 0 = networking / internet modules,
1 = text / data-processing modules (the lists below are fixed). A document is cut into windows of
`seq_len` bytes; modules (not windows) are split between train / val / test by a seeded shuffle, so no
module is in two splits; classes are balanced per split by dropping windows of the larger class.
Tokens: byte b -> b + 1, 0 = padding (vocab 257). The built data depends on the Python version.
"""
from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig

import numpy as np

from . import pad_rows

VERSION = 1
DEFAULTS = dict(train=2000, val=200, test=500, seq_len=1000, seed=0)

NETWORK = ("socket", "ssl", "selectors", "socketserver", "http", "urllib", "email", "smtplib", "imaplib",
           "poplib", "ftplib", "xmlrpc", "asyncio", "ipaddress", "mailbox", "wsgiref", "webbrowser",
           "mimetypes", "http.cookiejar", "ssl", "nntplib", "telnetlib", "uuid", "concurrent")
TEXT = ("string", "re", "textwrap", "difflib", "unicodedata", "csv", "json", "pickle", "struct", "codecs",
        "configparser", "tomllib", "tokenize", "shlex", "gettext", "locale", "pprint", "reprlib", "statistics",
        "decimal", "_pydecimal", "fractions", "calendar", "collections", "heapq", "bisect", "textwrap", "html",
        "xml", "plistlib", "base64", "binascii", "quopri", "zipfile", "tarfile", "gzip", "lzma", "bz2",
        "sqlite3", "pickletools", "copyreg", "shelve", "dbm", "netrc", "stringprep", "encodings")
FAMILIES = (NETWORK, TEXT)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_files(name: str) -> list[str]:
    """The .py files of a stdlib module or package (without its tests)."""
    root = stdlib_root()
    path = os.path.join(root, *name.split("."))
    if os.path.isdir(path):
        out = []
        for d, subdirs, files in os.walk(path):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("test"))
            out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
        return out
    return [path + ".py"] if os.path.isfile(path + ".py") else []


def docstrings(path: str) -> str:
    with open(path, "rb") as f:
        tree = ast.parse(f.read())
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, int, bytes], ...]:
    """(module, label, document bytes) for every listed module that exists and has docstrings."""
    seen, out = set(), []
    for label, family in enumerate(FAMILIES):
        for name in family:
            if name in seen:
                continue
            seen.add(name)
            text = "\n\n".join(docstrings(p) for p in module_files(name))
            if text.strip():
                out.append((name, label, text.encode("utf-8")))
    return tuple(out)


def split_sources(names: list, labels: list, rng: np.random.Generator, fractions=(0.7, 0.1)) -> dict:
    """Assign whole sources to train/val/test per label (a seeded shuffle), each split getting >= 1."""
    out = {"train": [], "val": [], "test": []}
    for lab in sorted(set(labels)):
        group = [n for n, l in zip(names, labels) if l == lab]
        group = [group[i] for i in rng.permutation(len(group))]
        n_tr = max(1, int(round(fractions[0] * len(group))))
        n_va = max(1, int(round(fractions[1] * len(group))))
        out["train"] += group[:n_tr]
        out["val"] += group[n_tr:n_tr + n_va]
        out["test"] += group[n_tr + n_va:]
    return out


def windows(doc: bytes, length: int, min_bytes: int = 64) -> list[bytes]:
    return [doc[i:i + length] for i in range(0, len(doc), length) if len(doc[i:i + length]) >= min_bytes]


def encode(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).astype(np.int16) + 1


def build(task: str, train: int, val: int, test: int, seq_len: int, seed: int) -> dict:
    docs = documents()
    rng = np.random.default_rng(seed)
    splits = split_sources([d[0] for d in docs], [d[1] for d in docs], rng)
    by_name = {d[0]: d for d in docs}
    out = {"info": dict(vocab_size=257, num_classes=2, substitute=True, padded=True, python=sys.version.split()[0],
                        source="substitute: stdlib docstrings, networking vs text-processing modules (bytes)")}
    for split, n in (("train", train), ("val", val), ("test", test)):
        per_class = [[w for name in splits[split] if by_name[name][1] == lab for w in windows(by_name[name][2], seq_len)]
                     for lab in (0, 1)]
        k = min(min(len(c) for c in per_class), n // 2)
        rows, ys = [], []
        for lab, c in enumerate(per_class):
            for i in rng.permutation(len(c))[:k]:
                rows.append(encode(c[i]))
                ys.append(lab)
        order = rng.permutation(len(rows))
        out[f"x_{split}"] = pad_rows([rows[i] for i in order], seq_len)
        out[f"y_{split}"] = np.array([ys[i] for i in order], dtype=np.int8)
    return out
