"""The "Fashion-MNIST mosaic": a generated substitute for a semantic/panoptic segmentation benchmark.

No small segmentation benchmark loads offline, so the segmentation task's default data is drawn:
Fashion-MNIST items pasted on procedurally textured backgrounds, with exact per-pixel targets.

    data = load_mosaic((2000, 500))                   # SegData, cached on disk after the first build
    data.x_train   # (N, 3, 64, 64) uint8          data.y_train  # (N, 64, 64) uint8, 255 = ignore
    data.instance_train  # (N, 64, 64) int16, 0 = no object, 1..k per image

One image (a fixed draw per seed, split, domain and image index, so any image can be regenerated
alone with `mosaic_image`, which also returns what was pasted where):

- Stuff (classes 0..2): the canvas is cut into 2-5 Voronoi cells around random seed points
  (exact integer distances). Each cell gets one stuff class, and the class fixes the texture, so
  a class is learnable from appearance alone: 0 "stripes", 1 "checker", 2 "noise". A texture mixes
  two random colours of the domain's palette by an integer pattern.
- Things (classes 3..12, the ten Fashion-MNIST classes in their usual order): 1-6 items, each a
  Fashion-MNIST image rescaled to 21-42 px (0.75-1.5x, nearest neighbour), tinted with a random
  colour and pasted at a random position (up to a quarter may hang off the canvas). An item's
  mask is its pixels > 0.2*255; inside the mask it is alpha-blended over what lies beneath by its
  own intensity, outside the mask nothing is drawn, so the labels are exact. Later items occlude
  earlier ones. An item left with fewer than 16 visible pixels is dropped: those pixels become
  ignore (255) in `semantic` and 0 in `instance` (they do show part of an item, so labelling them
  as the stuff beneath would be wrong). Instances are numbered 1..k in pasting order.
- The train split draws items from Fashion-MNIST's 60,000 training images and the test split
  from its 10,000 test images, so test objects are unseen.

Domains, for unsupervised domain adaptation (DAFormer: train on labelled "source", adapt to
unlabelled "target"):

  source  bright, high-contrast palette; stripes along the axes and diagonals (2-4 px wide);
          square checks (3-6 px); per-pixel noise; item classes drawn uniformly (balanced).
  target  dark, blue-shifted palette (channel gains 0.6/0.8/1.0); steeper stripes (directions
          (2,1), (1,2), ...; wider); diamond checks (4-7 px); blotchy 4 px noise; the whole
          image blurred by a 5-tap binomial kernel (1 4 6 4 1)/16 in each direction (a Gaussian of
          sigma 1 in exact integers); item classes long-tailed: frequencies ~ 0.7^rank over
          TARGET_CLASS_ORDER (the commonest class about 25x the rarest), so rare-class sampling and
          thing-class feature distance matter.
  night   the target's palette, blur and long tail on the source's textures: a photometric shift
          only (like day -> night), the milder adaptation problem (`mosaic-uda-night`).

Everything is integer arithmetic on a numpy `default_rng([seed, domain, split, index])` stream,
so the same seed gives byte-identical arrays on any machine (with the same numpy). Built splits
are cached as `$FORMERS_CACHE/mosaic/` (else ~/.cache/formers/mosaic/) `mosaic-...-<hash>.npz`,
the hash covering every generation parameter; a damaged file is rebuilt.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
import zipfile

import numpy as np
import torch

from .datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from .segdata import SegData

__all__ = ["load_mosaic", "mosaic_image", "CLASSES", "STUFF_CLASSES", "THING_IDS", "TARGET_CLASS_ORDER",
           "default_cache_dir", "cache_path", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1                 # bump when the drawn images change, so old caches are ignored
STUFF_CLASSES = ["stripes", "checker", "noise"]
NUM_STUFF = len(STUFF_CLASSES)
CLASSES = STUFF_CLASSES + list(FASHION_MNIST_CLASSES)
THING_IDS = list(range(NUM_STUFF, NUM_STUFF + len(FASHION_MNIST_CLASSES)))
IGNORE = 255
MASK_THRESHOLD = 51                   # item pixel > 0.2 * 255
MIN_AREA = 16                         # fewer visible pixels: the item is dropped (its pixels -> ignore)
ITEM_SIZES = (21, 42)                 # 28 px x 0.75 .. 1.5
MAX_ITEMS = 6
DESCRIPTION = "generated substitute: Fashion-MNIST items on textures"

# Fashion-MNIST class ids from commonest to rarest in the target domain
TARGET_CLASS_ORDER = (7, 1, 8, 3, 0, 9, 4, 2, 5, 6)
_TARGET_WEIGHTS = (1000, 700, 490, 343, 240, 168, 118, 82, 58, 40)   # round(1000 * 0.7^rank)

_DOMAINS = {
    "source": dict(code=0, stripe_dirs=((1, 0), (0, 1), (1, 1), (1, -1)), stripe_w=(2, 4),
                   checker="square", checker_p=(3, 6), noise_cell=1, hi=(140, 256), lo=(0, 110),
                   gain=(10, 10, 10), tint=(64, 256), blur=False, weights=(1,) * 10),
    "target": dict(code=1, stripe_dirs=((2, 1), (1, 2), (2, -1), (1, -2)), stripe_w=(5, 9),
                   checker="diamond", checker_p=(4, 7), noise_cell=4, hi=(60, 160), lo=(0, 60),
                   gain=(6, 8, 10), tint=(110, 256), blur=True,
                   weights=tuple(_TARGET_WEIGHTS[TARGET_CLASS_ORDER.index(c)] for c in range(10))),
}
# "night": the target's palette, blur and long tail on the source's textures (a photometric shift only)
_DOMAINS["night"] = dict(_DOMAINS["source"], code=2, **{k: _DOMAINS["target"][k] for k in
                                                       ("hi", "lo", "gain", "tint", "blur", "weights")})
_SPLITS = {"train": 0, "test": 1}


# ---------------------------------------------------------------- one image

@functools.lru_cache(maxsize=4)
def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size]
    return yy.astype(np.int32), xx.astype(np.int32)


def _texture(rng, stuff: int, d: dict, size: int) -> np.ndarray:
    """The mixing pattern (H, W) int in 0..255 of one cell's texture."""
    yy, xx = _grid(size)
    if stuff == 0:                                           # stripes
        a, b = d["stripe_dirs"][int(rng.integers(len(d["stripe_dirs"])))]
        w = int(rng.integers(d["stripe_w"][0], d["stripe_w"][1] + 1))
        off = int(rng.integers(0, 2 * w))
        return (((a * xx + b * yy + off) // w) % 2) * 255
    if stuff == 1:                                           # checker
        p = int(rng.integers(d["checker_p"][0], d["checker_p"][1] + 1))
        oy, ox = (int(v) for v in rng.integers(0, 2 * p, 2))
        if d["checker"] == "square":
            return ((((yy + oy) // p) + ((xx + ox) // p)) % 2) * 255
        u, v = xx + yy + oy, xx - yy + size + ox               # diamonds: checks along the diagonals
        return (((u // p) + (v // p)) % 2) * 255
    n = d["noise_cell"]                                      # noise (blotches of n x n px)
    coarse = rng.integers(0, 256, (size // n + 2, size // n + 2))
    oy, ox = (int(v) for v in rng.integers(0, n, 2))
    return coarse[(yy + oy) // n, (xx + ox) // n]


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable binomial (1 4 6 4 1)/16 blur of (H, W, 3) ints, edges replicated, rounded, exact."""
    k = (1, 4, 6, 4, 1)
    h, w = img.shape[:2]
    p = np.pad(img, ((2, 2), (0, 0), (0, 0)), mode="edge")
    t = sum(k[i] * p[i:i + h] for i in range(5))
    p = np.pad(t, ((0, 0), (2, 2), (0, 0)), mode="edge")
    t = sum(k[i] * p[:, i:i + w] for i in range(5))
    return (t + 128) // 256


def _render(rng, d: dict, pool_x: np.ndarray, pool_by_class: list, size: int, debug: bool = False):
    yy, xx = _grid(size)
    gain = np.array(d["gain"], np.int32)
    # stuff: Voronoi cells, one stuff class (= one texture) per cell
    n_cells = int(rng.integers(2, 6))
    seeds = rng.integers(0, size, (n_cells, 2))
    cell_cls = rng.integers(0, NUM_STUFF, n_cells)
    d2 = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    cell = d2.argmin(0)
    stuff = cell_cls[cell]
    pats, his, los = [], [], []
    for k in range(n_cells):
        pats.append(_texture(rng, int(cell_cls[k]), d, size))
        his.append(rng.integers(d["hi"][0], d["hi"][1], 3) * gain // 10)
        los.append(rng.integers(d["lo"][0], d["lo"][1], 3) * gain // 10)
    pat = np.take_along_axis(np.stack(pats), cell[None], 0)[0][..., None]
    img = (pat * np.stack(his)[cell] + (255 - pat) * np.stack(los)[cell]) // 255
    # things: Fashion-MNIST items, later ones on top
    n_items = int(rng.integers(1, MAX_ITEMS + 1))
    cum = np.cumsum(d["weights"])
    cls = np.searchsorted(cum, rng.integers(0, int(cum[-1]), n_items), side="right")
    inst = np.zeros((size, size), np.int32)
    items = []
    for j in range(n_items):
        c = int(cls[j])
        pool = pool_by_class[c]
        idx = int(pool[int(rng.integers(len(pool)))])
        s = int(rng.integers(ITEM_SIZES[0], ITEM_SIZES[1] + 1))
        y0 = int(rng.integers(-(s // 4), size - s + s // 4 + 1))
        x0 = int(rng.integers(-(s // 4), size - s + s // 4 + 1))
        tint = rng.integers(d["tint"][0], d["tint"][1], 3) * gain // 10
        r = ((2 * np.arange(s) + 1) * 28) // (2 * s)
        v = pool_x[idx][r[:, None], r[None, :]].astype(np.int32)
        ya, yb, xa, xb = max(y0, 0), min(y0 + s, size), max(x0, 0), min(x0 + s, size)
        vv = v[ya - y0:yb - y0, xa - x0:xb - x0]
        m = vv > MASK_THRESHOLD
        region = img[ya:yb, xa:xb]
        region[m] = ((vv[..., None] * tint + (255 - vv[..., None]) * region) // 255)[m]
        inst[ya:yb, xa:xb][m] = j + 1
        if debug:
            full = np.zeros((size, size), bool)
            full[ya:yb, xa:xb] = m
            items.append(dict(cls=c, pool_index=idx, size=s, y0=y0, x0=x0, tint=tint.tolist(), mask=full))
    # drop items left with < MIN_AREA visible pixels; renumber the rest 1..k
    area = np.bincount(inst.ravel(), minlength=n_items + 1)
    keep = area[1:] >= MIN_AREA
    lut_sem = np.concatenate([[0], np.where(keep, cls + NUM_STUFF, IGNORE)])
    lut_inst = np.concatenate([[0], np.where(keep, np.cumsum(keep), 0)])
    semantic = np.where(inst > 0, lut_sem[inst], stuff)
    instance = lut_inst[inst]
    if d["blur"]:
        img = _blur(img)
    out = (img.transpose(2, 0, 1).astype(np.uint8), semantic.astype(np.uint8), instance.astype(np.int16))
    if not debug:
        return out
    for j, it in enumerate(items):
        it.update(kept=bool(keep[j]), instance=int(lut_inst[j + 1]), visible=int(area[j + 1]))
    return out + (dict(stuff=stuff.astype(np.uint8), cells=cell, items=items),)


# ---------------------------------------------------------------- splits, pools, cache

@functools.lru_cache(maxsize=1)
def _pools(path: str):
    """{split: (images (N, 28, 28) uint8, [indices of each class])} from the Fashion-MNIST IDX files."""
    fm = load_fashion_mnist(path)
    out = {}
    for split, x, y in (("train", fm.x_train, fm.y_train), ("test", fm.x_test, fm.y_test)):
        y = y.numpy()
        out[split] = (x[:, 0].numpy(), [np.flatnonzero(y == c) for c in range(len(FASHION_MNIST_CLASSES))])
    return out


def _check(split: str, domain: str, seed: int, size: int):
    if domain not in _DOMAINS:
        raise ValueError(f"mosaic domain {domain!r}: choose one of {', '.join(_DOMAINS)}")
    if split not in _SPLITS:
        raise ValueError(f"mosaic split {split!r}: choose 'train' or 'test'")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"mosaic seed must be a non-negative int, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"mosaic size must be an int >= 32 (items are 21-42 px), got {size!r}")


def _rng(seed: int, domain: str, split: str, index: int):
    return np.random.default_rng([int(seed), _DOMAINS[domain]["code"], _SPLITS[split], int(index)])


def _generate_split(n: int, split: str, domain: str, seed: int, size: int, path: str):
    """(images (n, 3, H, W) uint8, semantic (n, H, W) uint8, instance (n, H, W) int16)."""
    pool_x, pool_by_class = _pools(path)[split]
    d = _DOMAINS[domain]
    x = np.empty((n, 3, size, size), np.uint8)
    sem = np.empty((n, size, size), np.uint8)
    inst = np.empty((n, size, size), np.int16)
    for i in range(n):
        x[i], sem[i], inst[i] = _render(_rng(seed, domain, split, i), d, pool_x, pool_by_class, size)
    return x, sem, inst


def mosaic_image(index: int, split: str = "train", domain: str = "source", seed: int = 0, size: int = 64,
                 path: str | None = None) -> dict:
    """Image `index` of a split, regenerated alone, with what was drawn: keys image (3, H, W) uint8,
    semantic, instance, stuff (H, W) stuff id of each pixel's Voronoi cell, cells (H, W) cell index,
    items (one dict per pasted item in pasting order: cls (Fashion-MNIST id), pool_index (into that
    split's Fashion-MNIST images), size, y0, x0, tint, mask (H, W) bool before occlusion, visible,
    kept, instance)."""
    _check(split, domain, seed, size)
    pool_x, pool_by_class = _pools(os.path.abspath(path or FASHION_MNIST_DIR))[split]
    img, sem, inst, info = _render(_rng(seed, domain, split, index), _DOMAINS[domain], pool_x, pool_by_class,
                                   size, debug=True)
    return dict(image=img, semantic=sem, instance=inst, **info)


def default_cache_dir() -> str:
    base = os.environ.get("FORMERS_CACHE")
    if base:
        return os.path.join(base, "mosaic")
    return os.path.join(os.path.expanduser("~"), ".cache", "formers", "mosaic")


def _key(train: int, test: int, size: int, domain: str, seed: int, path: str) -> dict:
    return dict(version=GENERATOR_VERSION, train=int(train), test=int(test), size=int(size), domain=domain,
                seed=int(seed), fashion_mnist=path, mask_threshold=MASK_THRESHOLD, min_area=MIN_AREA)


def cache_path(train: int, test: int, size: int = 64, domain: str = "source", seed: int = 0,
               path: str | None = None, cache_dir: str | None = None) -> str:
    key = _key(train, test, size, domain, seed, os.path.abspath(path or FASHION_MNIST_DIR))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(),
                        f"mosaic-{domain}-{size}px-{train}-{test}-s{seed}-{digest}.npz")


_ARRAYS = ("x_train", "y_train", "instance_train", "x_test", "y_test", "instance_test")


def _read_cache(file: str, key: dict):
    try:
        with np.load(file, allow_pickle=False) as f:
            if str(f["key"]) != json.dumps(key, sort_keys=True):
                return None
            arrays = {k: f[k] for k in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = {"train": key["train"], "test": key["test"]}
    for k, a in arrays.items():
        split = k.rsplit("_", 1)[1]
        want = (n[split], 3, key["size"], key["size"]) if k.startswith("x") else (n[split], key["size"], key["size"])
        if a.shape != want:
            return None
    return arrays


def _write_cache(file: str, key: dict, arrays: dict):
    tmp = f"{file}.{os.getpid()}.tmp.npz"
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        np.savez_compressed(tmp, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
        os.replace(tmp, file)
    except OSError as e:
        warnings.warn(f"mosaic: could not cache the generated data at {file!r} ({e}); it is rebuilt next time",
                      stacklevel=3)
        try:
            os.remove(tmp)
        except OSError:
            pass


def load_mosaic(split_sizes: tuple[int, int] = (2000, 500), size: int = 64, domain: str = "source",
                seed: int = 0, path: str | None = None, *, cache_dir: str | None = None,
                rebuild: bool = False) -> SegData:
    """The Fashion-MNIST mosaic (see the module docstring): `split_sizes` = (train, test) images of
    `size` x `size` px in `domain` "source" or "target"; `path` is the Fashion-MNIST IDX folder
    (default /usr/share/datasets/fashion-mnist). Image i of a split depends only on (seed, domain,
    split, i), so a smaller split is a prefix of a larger one."""
    train_n, test_n = (int(v) for v in split_sizes)
    if train_n < 0 or test_n < 0:
        raise ValueError(f"mosaic split_sizes must be non-negative, got {split_sizes!r}")
    _check("train", domain, seed, size)
    fm_dir = os.path.abspath(path or FASHION_MNIST_DIR)
    key = _key(train_n, test_n, size, domain, seed, fm_dir)
    file = cache_path(train_n, test_n, size, domain, seed, fm_dir, cache_dir)
    arrays = None if rebuild or not os.path.exists(file) else _read_cache(file, key)
    if arrays is None:
        arrays = {}
        for split, n in (("train", train_n), ("test", test_n)):
            x, y, inst = _generate_split(n, split, domain, seed, size, fm_dir)
            arrays.update({f"x_{split}": x, f"y_{split}": y, f"instance_{split}": inst})
        _write_cache(file, key, arrays)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return SegData(
        "mosaic" if domain == "source" else f"mosaic-{domain}", t["x_train"], t["y_train"], t["x_test"], t["y_test"],
        list(CLASSES), ignore_index=IGNORE, source=f"generated from Fashion-MNIST in {fm_dir} (seed {seed})",
        thing_ids=list(THING_IDS), instance_train=t["instance_train"], instance_test=t["instance_test"],
        substitute=True, description=f"{DESCRIPTION}, {domain} domain",
        notes=[f"cache: {file}", "train items from Fashion-MNIST train, test items from Fashion-MNIST test"])
