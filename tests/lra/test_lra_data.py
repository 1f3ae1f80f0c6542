"""The LRA generators, checked by algorithms that share nothing with them: ListOps labels by a
stack machine over the token string, Pathfinder labels by connected components of the drawn pixels."""
import os
import random

import numpy as np
import pytest
import torch

from formers.data import lra
from formers.data.lra import listops, pathfinder

# ---------------------------------------------------------------- ListOps


def stack_eval(tokens: list[str]) -> int:
    """Evaluate a ListOps token string left to right with an explicit stack (no trees, no recursion)."""
    stack = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "X":
            frame = stack.pop()
            op, args = frame[0], sorted(frame[1:])
            if op == "[MIN":
                v = args[0]
            elif op == "[MAX":
                v = args[-1]
            elif op == "[SM":
                v = sum(args) % 10
            else:                                   # median, truncated like int(np.median)
                m = len(args) // 2
                v = args[m] if len(args) % 2 else (args[m - 1] + args[m]) // 2
            if stack:
                stack[-1].append(v)
            else:
                return v
        else:
            if not stack:
                return int(t)
            stack[-1].append(int(t))
    raise AssertionError("unbalanced expression")


def test_listops_labels_match_an_independent_stack_evaluator(cache):
    d = lra.load_task("listops", train=300, val=30, test=100, min_length=20, max_length=300)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        labels = [stack_eval(listops.decode(row)) for row in x]
        assert labels == y.tolist()
    assert len(set(d.y_train.tolist())) == 10                      # all ten answers occur
    n = (d.x_train != 0).sum(1)
    assert (n > 20).all() and (n < 300).all()
    assert d.vocab_size == 16 and d.num_classes == 10 and not d.substitute


def test_listops_full_length_examples_and_official_constants():
    rng = random.Random(3)
    rows = listops.generate(12, rng, 500, 2000, set())
    for toks, value in rows:
        assert 500 < len(toks) < 2000
        assert stack_eval(toks) == value
        assert toks[0] in listops.OPERATORS and toks[-1] == "X"
        # nesting depth never exceeds the generator's max depth of 10 operators
        depth = np.cumsum([1 if t.startswith("[") else -1 if t == "X" else 0 for t in toks])
        assert depth.max() <= listops.MAX_DEPTH - 1 and depth[-1] == 0
    assert len({" ".join(t) for t, _ in rows}) == len(rows)
    assert listops.VALUE_P == 0.25 and listops.MAX_ARGS == 10 and len(listops.VOCAB) == 15


# ---------------------------------------------------------------- Pathfinder


def joined(img: np.ndarray, markers: np.ndarray, link: int) -> bool:
    """Are the two marker pixels in one component of the lit pixels, pixels up to `link` apart
    (Chebyshev) counting as touching? k-d tree pairs + graph components: no flood fill, no drawing."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree
    ys, xs = np.nonzero(img > 0)
    pts = np.stack([ys, xs], 1)
    pairs = cKDTree(pts).query_pairs(r=link + 0.5, p=np.inf, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(pts), len(pts)))
    _, comp = connected_components(g, directed=False)
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(pts)}
    a, b = (index[tuple(np.floor(m).astype(int))] for m in markers)   # a marker's centre pixel is lit
    return comp[a] == comp[b]


@pytest.mark.parametrize("size,n", [(32, 24), (128, 8)])
def test_pathfinder_labels_agree_with_pixel_connectivity(size, n):
    pytest.importorskip("scipy")
    cfg = pathfinder.config(size)
    rng = np.random.default_rng(11)
    link = max(cfg["margins"])        # the widest dash gap of the published settings
    agree = 0
    for i in range(n):
        img, markers, placed = pathfinder.generate_example(rng, cfg, label=i % 2)
        assert img.shape == (size, size) and img.dtype == np.uint8
        agree += joined(img, markers, link) == bool(i % 2)
    assert agree == n, f"pixel connectivity agrees on {agree}/{n}"


def test_pathfinder_has_distractors_and_dashes():
    cfg = pathfinder.config(128)
    img, markers, placed = pathfinder.generate_example(np.random.default_rng(0), cfg, 1)
    assert placed >= cfg["num_distractors"] // 2
    # the contours are dashed: with 8-connectivity alone (link 1) the 128 px markers are not joined
    assert joined(img, markers, max(cfg["margins"]))
    assert not joined(img, markers, 1)
    assert cfg["contour_length"] == 14 and cfg["distractor_length"] == 4 and cfg["num_distractors"] == 8
    assert pathfinder.config(32)["num_distractors"] == 5


def test_pathfinder_task_is_cached_and_deterministic(cache, monkeypatch):
    a = lra.load_task("pathfinder32", train=6, val=2, test=2, seed=5)
    assert os.path.isfile(a.path) and a.path.startswith(str(cache))
    assert a.x_train.shape == (6, 1024) and a.substitute and not a.padded and a.mask(a.x_train) is None
    assert a.y_train.sum() == 3                                     # balanced labels
    # the second call reads the file: building again would fail
    monkeypatch.setattr(pathfinder, "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    b = lra.load_task("pathfinder32", train=6, val=2, test=2, seed=5)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    monkeypatch.undo()
    c = lra.load_task("pathfinder32", cache_dir=str(cache / "other"), train=6, val=2, test=2, seed=5)
    assert torch.equal(a.x_train, c.x_train)                        # a fresh build gives the same bytes
    assert lra.cache_path("pathfinder32", train=6, val=2, test=2, seed=6) != a.path


def test_unknown_task_or_parameter():
    with pytest.raises(ValueError, match="unknown LRA task"):
        lra.load_task("cifar")
    with pytest.raises(ValueError, match="unknown parameter"):
        lra.load_task("listops", colour=3)


# ---------------------------------------------------------------- substitutes


def test_text_and_retrieval_substitutes_split_by_module(cache):
    from formers.data.lra import text
    docs = text.documents()
    assert len({d[1] for d in docs}) == 2 and len(docs) > 30
    splits = text.split_sources([d[0] for d in docs], [d[1] for d in docs], np.random.default_rng(0))
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    t = lra.load_task("text", train=40, val=10, test=10, seq_len=256)
    assert t.substitute and "substitute" in t.source and t.x_train.shape == (40, 256)
    assert t.y_train.sum() == 20 and t.x_train.max() <= 256
    # byte b is token b + 1: the text reads back
    row = t.x_train[0]
    assert bytes((row[row > 0] - 1).tolist()).decode("utf-8", "replace")
    r = lra.load_task("retrieval", train=20, val=4, test=6, seq_len=256)
    assert r.pair and r.x_train.shape == (20, 2, 256) and r.y_train.sum() == 10 and r.substitute


def test_image_substitute_is_padded_fashion_mnist(cache):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("dataset-fashion-mnist is not installed")
    d = lra.load_task("image", train=50, val=10, test=20)
    assert d.x_train.shape == (50, 1024) and d.substitute and d.vocab_size == 256
    img = d.x_train.view(-1, 32, 32)
    assert img[:, :2].max() == 0 and img[:, :, -2:].max() == 0        # the 2-pixel zero border
    assert img.max() > 200
