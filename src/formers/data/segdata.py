"""Semantic-segmentation data held in memory: uint8 images (N, C, H, W) and per-pixel class ids.

Two sources:

  mosaic   the generated substitute (`formers.data.mosaic.load_mosaic`): Fashion-MNIST items
           pasted on procedural textures, a "source" and a "target" domain
  folder   the user's own data in the ADE20K / Cityscapes layout (`load_seg_folder`):

             ROOT/images/training/*.jpg|png        ROOT/annotations/training/*.png
             ROOT/images/validation/*.jpg|png      ROOT/annotations/validation/*.png

           (`train`/`val` are accepted for `training`/`validation`; a flat ROOT/images/ +
           ROOT/annotations/ gets a fixed, seeded 20% hold-out as its validation split). A label
           PNG is single-channel class ids (mode L, P or I;16), 255 = ignore, the same size as its
           image, with the image's relative path and stem (`seg_map_suffix` changes the ending, as
           in mmseg: Cityscapes is img_suffix="_leftImg8bit.png",
           seg_map_suffix="_gtFine_labelTrainIds.png"). Subfolders (Cityscapes' cities) are walked.

Labels are uint8 when every id fits (0..254 plus 255), int64 otherwise; cast with `.long()`
before a loss.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .datasets import IMAGE_EXTENSIONS

__all__ = ["SegData", "load_seg_folder"]

_SPLIT_SEED = 0          # the flat layout's hold-out never depends on the run's seed
_TEST_FRACTION = 0.2
_TRAIN_DIRS = ("training", "train")
_TEST_DIRS = ("validation", "val", "valid", "test")


@dataclass
class SegData:
    """Both splits of one segmentation data set, in memory, as uint8 images of one size."""
    name: str
    x_train: torch.Tensor                  # uint8 (N, C, H, W)
    y_train: torch.Tensor                  # uint8 or int64 (N, H, W): class ids, ignore_index = no label
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    ignore_index: int = 255
    source: str = ""
    thing_ids: list[int] = field(default_factory=list)   # class ids that are countable objects
    instance_train: torch.Tensor | None = None            # int16 (N, H, W): 0 = none, 1..k per image
    instance_test: torch.Tensor | None = None
    substitute: bool = False               # generated data standing in for a real benchmark
    description: str = ""                  # what the data is, for reports (e.g. "generated substitute: ...")
    held_out: bool = False                 # the test split is a fixed 20% of one pool
    notes: list[str] = field(default_factory=list)
    hflip: bool = True                     # a left-right flip keeps the labels right (street scenes, mosaics)
    # domain adaptation: unlabelled images of the target domain to adapt to (the test split is then that
    # domain's); their labels are kept only for diagnostics and are never trained on
    x_target: torch.Tensor | None = None
    y_target: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[-2:])

    @property
    def stuff_ids(self) -> list[int]:
        things = set(self.thing_ids)
        return [c for c in range(self.num_classes) if c not in things]

    def class_pixel_counts(self, split: str = "train") -> torch.Tensor:
        """Labelled pixels per class (int64, K), ignore pixels left out: f_c of rare-class sampling."""
        y = self.y_train if split == "train" else self.y_test
        y = y.reshape(-1).long()
        y = y[y != self.ignore_index]
        return torch.bincount(y, minlength=self.num_classes)[:self.num_classes]

    def resized(self, size: int | tuple[int, int]) -> "SegData":
        """Both splits at `size`: images bilinear (antialiased when shrinking), labels and instances nearest."""
        from .datasets import resize_images
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size == self.size:
            return self

        def nearest(y):
            if y is None:
                return None
            return torch.nn.functional.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].to(y.dtype)
        return replace(self, x_train=resize_images(self.x_train, size), x_test=resize_images(self.x_test, size),
                       y_train=nearest(self.y_train), y_test=nearest(self.y_test),
                       instance_train=nearest(self.instance_train), instance_test=nearest(self.instance_test),
                       x_target=None if self.x_target is None else resize_images(self.x_target, size),
                       y_target=nearest(self.y_target))

    def limited(self, train: int | None = None, test: int | None = None) -> "SegData":
        """The first `train` / `test` images of each split (the mosaic's images are independent draws)."""
        out = self
        if train is not None and train < len(self.x_train):
            out = replace(out, x_train=out.x_train[:train], y_train=out.y_train[:train],
                          instance_train=None if out.instance_train is None else out.instance_train[:train])
            if out.x_target is not None:
                out = replace(out, x_target=out.x_target[:train],
                              y_target=None if out.y_target is None else out.y_target[:train])
        if test is not None and test < len(self.x_test):
            out = replace(out, x_test=out.x_test[:test], y_test=out.y_test[:test],
                          instance_test=None if out.instance_test is None else out.instance_test[:test])
        return out

    def describe(self) -> str:
        h, w = self.size
        what = f" ({self.description})" if self.description else ""
        px = f"{h}px" if h == w else f"{h}x{w}px"
        target = f" + {len(self.x_target)} unlabelled target" if self.x_target is not None else ""
        return (f"{self.name}{what}, {len(self.x_train)} train{target} / {len(self.x_test)} test, {px}, "
                f"{self.num_classes} classes")


# ---------------------------------------------------------------- the folder layout

def _pick_dir(base: str, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if os.path.isdir(os.path.join(base, n))), None)


def _walk(root: str, accept) -> dict[str, str]:
    """relative key -> path of every file under root that `accept(name)` maps to a key (or None)."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for n in sorted(names):
            stem = accept(n)
            if stem is not None and not n.startswith("."):
                out[os.path.normpath(os.path.join(rel, stem))] = os.path.join(dirpath, n)
    return out


def _image_stem(img_suffix):
    def accept(n):
        if img_suffix:
            return n[:-len(img_suffix)] if n.endswith(img_suffix) else None
        return os.path.splitext(n)[0] if n.lower().endswith(IMAGE_EXTENSIONS) else None
    return accept


def _label_stem(seg_map_suffix):
    return lambda n: n[:-len(seg_map_suffix)] if n.endswith(seg_map_suffix) else None


def _pairs(img_dir: str, ann_dir: str, img_suffix, seg_map_suffix) -> list[tuple[str, str]]:
    images = _walk(img_dir, _image_stem(img_suffix))
    labels = _walk(ann_dir, _label_stem(seg_map_suffix))
    if not images:
        raise ValueError(f"segmentation folder: no images in {img_dir!r}"
                         + (f" ending in {img_suffix!r}" if img_suffix else f" ({'/'.join(IMAGE_EXTENSIONS)})"))
    pairs = []
    for key, p in images.items():
        if key not in labels:
            want = os.path.join(ann_dir, key + seg_map_suffix)
            raise ValueError(f"segmentation folder: image {p!r} has no label (expected {want!r})")
        pairs.append((p, labels[key]))
    return pairs


def _read_label(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(f"label {path!r} is a {im.mode} image; a label PNG must be single-channel "
                                 "class ids (mode L, P or I;16), 255 = ignore")
            a = np.array(im)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read label {path!r}: {e}") from None
    if a.ndim != 2:
        raise ValueError(f"label {path!r} has shape {a.shape}; expected one channel of class ids")
    if a.min(initial=0) < 0:
        raise ValueError(f"label {path!r} holds negative class ids")
    return a.astype(np.int64)


def _nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D label map (pixel centres, as PIL's NEAREST)."""
    h, w = a.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return a
    rows = ((2 * np.arange(oh) + 1) * h) // (2 * oh)
    cols = ((2 * np.arange(ow) + 1) * w) // (2 * ow)
    return a[rows[:, None], cols[None, :]]


def _read_split(pairs, size, mode, resize, reduce_zero_label, ignore_index):
    """(images uint8 (N, C, H, W), labels int32 (N, H, W), size, mode); resize=False: one size or an error."""
    from PIL import Image, UnidentifiedImageError
    xs, ys = [], []
    for img_path, lab_path in pairs:
        try:
            with Image.open(img_path) as im:
                if mode is None:
                    mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                im = im.convert(mode)
                wh = (im.width, im.height)
                if size is None:
                    size = (im.height, im.width)
                elif (im.height, im.width) != tuple(size) and not resize:
                    raise ValueError(f"image {img_path!r} is {im.width}x{im.height} and the others "
                                     f"{size[1]}x{size[0]}; pass img_size to resize them all to one size")
                if (im.height, im.width) != tuple(size):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                x = np.asarray(im, dtype=np.uint8).reshape(size[0], size[1], -1)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {img_path!r}: {e}") from None
        y = _read_label(lab_path)
        if (y.shape[1], y.shape[0]) != wh:
            raise ValueError(f"label {lab_path!r} is {y.shape[1]}x{y.shape[0]} but its image {img_path!r} "
                             f"is {wh[0]}x{wh[1]}")
        if reduce_zero_label:            # mmseg's ADE20K convention: 0 (other) -> ignore, the rest shift down
            y = np.where(y == 0, ignore_index, np.where(y == ignore_index, ignore_index, y - 1))
        xs.append(x.transpose(2, 0, 1))
        ys.append(_nearest(y, tuple(size)).astype(np.int32))
    return np.stack(xs), np.stack(ys), size, mode



def load_seg_folder(root: str, img_size: int | tuple[int, int] | None = None, reduce_zero_label: bool = False,
                    num_classes: int | None = None, classes: list[str] | None = None,
                    img_suffix: str | None = None, seg_map_suffix: str = ".png",
                    ignore_index: int = 255) -> SegData:
    """Images and label PNGs in the ADE20K / Cityscapes layout (see the module docstring).

    img_size          resize every image (bilinear) and label (nearest) to img_size x img_size (or (h, w))
    reduce_zero_label mmseg's ADE20K convention: label 0 becomes ignore, every other id drops by one
    num_classes       how many classes (default: len(classes), else the largest id found + 1); an id
                      >= num_classes other than ignore_index is an error naming the file
    """
    if not root:
        raise ValueError("a segmentation folder needs a ROOT holding images/ and annotations/")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"segmentation folder {root!r} does not exist")
    img_root, ann_root = os.path.join(root, "images"), os.path.join(root, "annotations")
    for d in (img_root, ann_root):
        if not os.path.isdir(d):
            raise ValueError(f"segmentation folder {root!r} has no {os.path.basename(d)}/ folder (expected "
                             "ROOT/images/{training,validation}/ and ROOT/annotations/{training,validation}/)")
    size = (img_size, img_size) if isinstance(img_size, int) else (tuple(img_size) if img_size else None)
    tr, te = _pick_dir(img_root, _TRAIN_DIRS), _pick_dir(img_root, _TEST_DIRS)
    held_out = False
    resize = size is not None
    if tr or te:
        if not (tr and te):
            raise ValueError(f"segmentation folder {root!r}: images/ has {tr or te}/ but no "
                             f"{'validation' if tr else 'training'}/ split beside it")
        ann_tr, ann_te = _pick_dir(ann_root, _TRAIN_DIRS), _pick_dir(ann_root, _TEST_DIRS)
        if not (ann_tr and ann_te):
            raise ValueError(f"segmentation folder {root!r}: annotations/ needs training/ and validation/ "
                             f"(or train/ and val/) beside images/{tr}/ and images/{te}/")
        p_tr = _pairs(os.path.join(img_root, tr), os.path.join(ann_root, ann_tr), img_suffix, seg_map_suffix)
        p_te = _pairs(os.path.join(img_root, te), os.path.join(ann_root, ann_te), img_suffix, seg_map_suffix)
        x_tr, y_tr, size, mode = _read_split(p_tr, size, None, resize, reduce_zero_label, ignore_index)
        x_te, y_te, _, _ = _read_split(p_te, size, mode, resize, reduce_zero_label, ignore_index)
        files_tr, files_te = [p for _, p in p_tr], [p for _, p in p_te]
    else:
        held_out = True
        pairs = _pairs(img_root, ann_root, img_suffix, seg_map_suffix)
        if len(pairs) < 2:
            raise ValueError(f"segmentation folder {root!r} holds {len(pairs)} image; a flat layout needs at "
                             "least 2 to hold some out for validation")
        x, y, size, mode = _read_split(pairs, size, None, resize, reduce_zero_label, ignore_index)
        g = torch.Generator().manual_seed(_SPLIT_SEED)
        perm = torch.randperm(len(pairs), generator=g).numpy()
        k = max(1, int(round(len(pairs) * _TEST_FRACTION)))
        test, train = np.sort(perm[:k]), np.sort(perm[k:])
        x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
        files_tr, files_te = [pairs[i][1] for i in train], [pairs[i][1] for i in test]
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {len(classes)} class names were given")
        num_classes = len(classes)
    if num_classes is None:
        found = np.concatenate([y_tr[y_tr != ignore_index], y_te[y_te != ignore_index]])
        num_classes = int(found.max()) + 1 if found.size else 0
        if num_classes == 0:
            raise ValueError(f"segmentation folder {root!r}: every label pixel is ignore ({ignore_index})")
    for ys, files in ((y_tr, files_tr), (y_te, files_te)):
        bad = (ys >= num_classes) & (ys != ignore_index)
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(len(ys), -1).any(1))[0])
            ids = np.unique(ys[i][bad[i]]).tolist()
            raise ValueError(f"label {files[i]!r} holds class id(s) {ids[:10]} >= num_classes={num_classes} "
                             f"(ids must be 0..{num_classes - 1}, or {ignore_index} = ignore"
                             + ("; ADE20K's 1..150 needs reduce_zero_label=True" if not reduce_zero_label else "")
                             + ")")
    dtype = np.uint8 if num_classes <= 255 and ignore_index == 255 else np.int64
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    return SegData("seg-folder", torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr.astype(dtype)),
                   torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te.astype(dtype)), classes,
                   ignore_index=ignore_index, source=root, held_out=held_out)
