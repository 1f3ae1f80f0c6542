"""Image classification data held in memory: uint8 tensors (N, C, H, W) and int64 labels.

Four sources, each giving a train and a test split:

  digits         scikit-learn's bundled 8x8 digits (1,797 images; nothing to install)
  fashion-mnist  the 60,000 / 10,000 IDX files (Debian's `dataset-fashion-mnist` package)
  folder         ROOT/<class>/*.png|jpg (with ROOT/train and ROOT/test|val if present)
  npz            arrays x (N, H, W[, C]) uint8 or float and y (N,), optionally x_test/y_test

Where a source has no test split of its own, a fixed 20% of each class is held out
(the same split on every run, so `formers eval` sees the images training did not).
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

__all__ = ["ImageData", "DATASETS", "load_dataset", "resize_images", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_SEED = 0          # the held-out split never depends on the run's seed
_TEST_FRACTION = 0.2


@dataclass
class ImageData:
    """Both splits of one data set, in memory, as uint8 images of one size."""
    name: str
    x_train: torch.Tensor            # uint8 (N, C, H, W)
    y_train: torch.Tensor            # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    hflip: bool = True               # whether a horizontal flip keeps an image's meaning
    source: str = ""
    notes: list[str] = field(default_factory=list)
    held_out: bool = False           # the test split is a fixed 20% of one pool (the source has none of its own)

    @property
    def from_file(self) -> bool:
        """Whether the images are the user's own file or folder (not a packaged data set)."""
        return self.name in ("npz", "folder")

    def all_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of both splits (x, y)."""
        return torch.cat([self.x_train, self.x_test]), torch.cat([self.y_train, self.y_test])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[-2:])

    def resized(self, size: int | tuple[int, int]) -> "ImageData":
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size == self.size:
            return self
        _check_fits(self, size)
        return replace(self, x_train=resize_images(self.x_train, size), x_test=resize_images(self.x_test, size))

    def limited(self, train: int | None = None, test: int | None = None) -> "ImageData":
        """A fixed subset (the same on every run) of each split."""
        out = self
        if train is not None and train < len(self.y_train):
            keep = _fixed_subset(len(self.y_train), train, 1)
            out = replace(out, x_train=self.x_train[keep], y_train=self.y_train[keep])
        if test is not None and test < len(self.y_test):
            keep = _fixed_subset(len(self.y_test), test, 2)
            out = replace(out, x_test=self.x_test[keep], y_test=self.y_test[keep])
        return out

    def describe(self) -> str:
        h, w = self.size
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test images, "
                f"{self.num_classes} classes, {self.channels}x{h}x{w}")


def _check_fits(data: "ImageData", size: tuple[int, int]):
    """Refuse, before allocating, a size at which the images cannot be held in this machine's memory."""
    from formers.cli import OutOfMemory, available_memory, fmt_bytes
    n = len(data.y_train) + len(data.y_test)
    need = n * data.channels * size[0] * size[1]       # uint8, plus one float chunk while resizing
    need += min(n, 4096) * data.channels * size[0] * size[1] * 4
    free = available_memory()
    if free is not None and need > free:
        raise OutOfMemory(f"{data.name} at {size[0]}x{size[1]} px: its {n} images need {fmt_bytes(need)} in memory "
                          f"and {fmt_bytes(free)} is available; lower --img-size")


def _fixed_subset(n: int, k: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + salt)
    return torch.randperm(n, generator=g)[:k].sort().values


def resize_images(x: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) batch (bilinear, antialiased when shrinking), in chunks."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].float()
        part = F.interpolate(part, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _held_out_split(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices): a fixed 20% of every class is held out."""
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    perm = torch.randperm(len(y), generator=g)
    test = []
    for c in torch.unique(y):
        members = perm[y[perm] == c]
        k = int(round(len(members) * _TEST_FRACTION)) if len(members) > 1 else 0
        test.append(members[:k])
    test = torch.cat(test).sort().values if test else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().flatten(), test


# ---------------------------------------------------------------- sources

def load_digits(path=None) -> ImageData:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ValueError("the 'digits' data set needs scikit-learn: pip install 'formers[train]'") from None
    import numpy as np
    d = sk_load_digits()
    # pixel values are counts 0..16 of an 4x4-downsampled 32x32 bitmap
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = _held_out_split(y)
    return ImageData("digits", x[train], y[train], x[test], y[test], [str(i) for i in range(10)],
                     hflip=False, source="sklearn.datasets.load_digits", held_out=True)


def _read_idx(path: str, expect_magic: int) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path!r}: {e}") from None
    if len(raw) < 8:
        raise ValueError(f"{path!r} is not an IDX file (only {len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expect_magic:
        raise ValueError(f"{path!r} is not an IDX file of the expected kind (magic {magic:#x}, want {expect_magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    count = 1
    for d in dims:
        count *= d
    if len(body) != count:
        raise ValueError(f"{path!r} is truncated or corrupt: {len(body)} bytes of data for shape {dims}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find(root: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {root!r}; install Debian's 'dataset-fashion-mnist' "
        f"package (it puts the files in {FASHION_MNIST_DIR}) or pass --data-dir DIR holding the four IDX files")


def load_fashion_mnist(path=None) -> ImageData:
    root = path or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Fashion-MNIST directory {root!r} does not exist; install Debian's 'dataset-fashion-mnist' "
            "package (apt-get install dataset-fashion-mnist) or pass --data-dir DIR")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), 0x803)
        y = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 0x801)
        if len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split} split in {root!r}: {len(x)} images but {len(y)} labels")
        parts[split] = (x.unsqueeze(1), y.long())
    return ImageData("fashion-mnist", *parts["train"], *parts["test"], list(FASHION_MNIST_CLASSES),
                     hflip=True, source=root)


def _class_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _list_images(root: str, classes: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(i)
    return files, labels


def _read_images(files: list[str], size: tuple[int, int] | None, mode: str | None):
    from PIL import Image, UnidentifiedImageError
    if size is None or mode is None:
        modes = set()
        for p in files:
            try:
                with Image.open(p) as im:
                    modes.add(im.mode)
                    size = size or (im.height, im.width)
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {p!r}: {e}") from None
        mode = mode or ("L" if modes <= {"1", "L", "LA", "I", "I;16", "F"} else "RGB")
    h, w = size
    out = torch.empty((len(files), 1 if mode == "L" else 3, h, w), dtype=torch.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if (im.height, im.width) != (h, w):
                    im = im.resize((w, h), Image.BILINEAR, reducing_gap=None)
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {p!r}: {e}") from None
        out[i] = t.reshape(h, w, -1).permute(2, 0, 1)
    return out, size, mode


def load_folder(path=None, size=None) -> ImageData:
    if not path:
        raise ValueError("--dataset folder needs --data ROOT (ROOT/<class>/*.png|jpg)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    size = (size, size) if isinstance(size, int) else size
    top = _class_dirs(path)
    held_out = False
    test_name = next((s for s in ("test", "val", "valid", "validation") if s in top), None)
    if "train" in top and test_name:
        classes = _class_dirs(os.path.join(path, "train"))
        f_tr, y_tr = _list_images(os.path.join(path, "train"), classes)
        f_te, y_te = _list_images(os.path.join(path, test_name), classes)
        if not f_tr or not f_te:
            raise ValueError(f"image folder {path!r}: no images under train/<class>/ or {test_name}/<class>/")
        x_tr, size, mode = _read_images(f_tr, size, None)
        x_te, _, _ = _read_images(f_te, size, mode)
        y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)
    else:
        held_out = True
        classes = top
        files, labels = _list_images(path, classes)
        if not classes or not files:
            raise ValueError(f"image folder {path!r} holds no images in class subfolders "
                             f"(expected {path}/<class_name>/*.png|jpg)")
        x, size, mode = _read_images(files, size, None)
        y = torch.tensor(labels)
        train, test = _held_out_split(y)
        x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    if len(classes) < 2:
        raise ValueError(f"image folder {path!r} has {len(classes)} class folder(s); a classifier needs at least 2")
    return ImageData("folder", x_tr, y_tr.long(), x_te, y_te.long(), classes, hflip=True, source=path,
                     held_out=held_out)


def _npz_images(a, key: str, path: str) -> torch.Tensor:
    import numpy as np
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"{path!r}: {key} must have shape (N, H, W) or (N, H, W, C), got {a.shape}")
    if a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):
        a = a.transpose(0, 2, 3, 1)          # (N, C, H, W) given: accept it
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"{path!r}: {key} has {a.shape[-1]} channels; expected 1 or 3 (shape {a.shape})")
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{path!r}: {key} holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1.0:
            a = a * 255.0
        elif lo < 0 or hi > 255:
            warnings.warn(f"{path!r}: {key} values span [{lo:g}, {hi:g}]; rescaled to 0..255", stacklevel=2)
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        a = np.rint(a).clip(0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{path!r}: {key} has dtype {a.dtype}; expected uint8 or float")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _npz_labels(a, key: str, path: str, n: int) -> torch.Tensor:
    import numpy as np
    a = np.asarray(a).reshape(-1)
    if len(a) != n:
        raise ValueError(f"{path!r}: {key} has {len(a)} labels for {n} images")
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(a == np.rint(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{path!r}: {key} must hold integer class ids, got dtype {a.dtype}")
    if len(a) and a.min() < 0:
        raise ValueError(f"{path!r}: {key} holds negative class ids")
    return torch.from_numpy(a.astype(np.int64))


def load_npz(path=None) -> ImageData:
    if not path:
        raise ValueError("--dataset npz needs --data FILE.npz (arrays x (N,H,W[,C]) and y (N,))")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file {path!r} does not exist")
    import zipfile

    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {path!r} as an .npz file of arrays: {e}") from None
    for k in ("x", "y"):
        if k not in arrays:
            raise ValueError(f"{path!r} has no array {k!r} (it has {sorted(arrays)}); "
                             "expected x (N,H,W[,C]) and y (N,)")
    x = _npz_images(arrays["x"], "x", path)
    y = _npz_labels(arrays["y"], "y", path, len(x))
    pairs = (("x_test", "y_test"), ("x_val", "y_val"))
    test_keys = next(((a, b) for a, b in pairs if a in arrays and b in arrays), None)
    if test_keys:
        x_te = _npz_images(arrays[test_keys[0]], test_keys[0], path)
        y_te = _npz_labels(arrays[test_keys[1]], test_keys[1], path, len(x_te))
        if x_te.shape[1:] != x.shape[1:]:
            raise ValueError(f"{path!r}: {test_keys[0]} images {tuple(x_te.shape[1:])} differ from "
                             f"x {tuple(x.shape[1:])}")
        x_tr, y_tr = x, y
    else:
        train, test = _held_out_split(y)
        x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    k = int(max(y_tr.max(), y_te.max() if len(y_te) else 0)) + 1
    if "classes" in arrays and len(arrays["classes"]) == k:
        classes = [str(c) for c in arrays["classes"]]
    else:
        classes = [str(i) for i in range(k)]
    if k < 2:
        raise ValueError(f"{path!r}: y holds a single class; a classifier needs at least 2")
    return ImageData("npz", x_tr, y_tr, x_te, y_te, classes, hflip=False, source=path, held_out=not test_keys)


DATASETS = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "folder": load_folder,
    "npz": load_npz,
}


def load_dataset(name: str, path: str | None = None, img_size: int | None = None,
                 limit_train: int | None = None, limit_test: int | None = None) -> ImageData:
    """Load a data set by name; with `img_size`, resized to img_size x img_size."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "folder":
        data = load_folder(path, size=img_size)
    else:
        data = DATASETS[name](path)
    data = data.limited(limit_train, limit_test)
    if img_size is not None:
        data = data.resized(img_size)
    if len(data.y_test) == 0 and not (data.held_out and data.from_file):
        raise ValueError(f"{data.name} data from {data.source!r} has no test images")
    return data
