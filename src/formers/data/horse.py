"""The scikit-image horse: a real mask on real photographs, for a small qualitative segmentation check.

scikit-image ships one real segmentation mask offline, `skimage.data.horse()` (a 328 x 400 CC0
silhouette), and a dozen real CC0 / public-domain photographs and textures. No photograph comes
with a mask, so each image here is a composite, stated as such wherever it is reported:

- a background: a random square crop (40-100% of the shorter side) of one photograph, resized to
  `size`, maybe mirrored;
- the horse: the silhouette, mirrored at random, scaled so its width is 45-90% of the canvas
  (the mask is resampled bilinearly and cut at 0.5), placed at a random position inside it, and
  filled with a crop of a different photograph drawn the same way;
- the label is that resampled mask exactly: 0 "background", 1 "horse".

The two splits use disjoint photographs, so the test split's textures are unseen: only the shape
tells the horse from what lies around it. Image i of a split is a fixed draw of
`default_rng([seed, split, i])`; it needs scikit-image (`pip install scikit-image`, in the test extra).

    data = load_horse((800, 200), size=64)       # SegData, 2 classes, ignore index unused
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .segdata import SegData

__all__ = ["load_horse", "horse_sample", "TRAIN_PHOTOS", "TEST_PHOTOS"]

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "brick", "grass")
TEST_PHOTOS = ("chelsea", "gravel", "immunohistochemistry", "hubble_deep_field")
CLASSES = ["background", "horse"]
_SPLITS = {"train": 0, "test": 1}


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise ImportError("the horse data set needs scikit-image (pip install scikit-image); "
                          "it reads skimage.data.horse() and its photographs, which ship inside the wheel") from None
    return skimage.data


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> torch.Tensor:
    """A photograph as float (3, H, W) in [0, 255]; grey ones repeated over three channels."""
    a = np.asarray(getattr(_skimage_data(), name)())
    t = torch.from_numpy(a.astype(np.float32))
    t = t[None].expand(3, -1, -1) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
    return t.contiguous()


@functools.lru_cache(maxsize=1)
def _silhouette() -> torch.Tensor:
    return torch.from_numpy(~np.asarray(_skimage_data().horse()))      # True on the horse


def _crop(rng, photo: torch.Tensor, size: int) -> torch.Tensor:
    h, w = photo.shape[-2:]
    side = int(rng.integers(int(0.4 * min(h, w)), min(h, w) + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = F.interpolate(photo[None, :, y0:y0 + side, x0:x0 + side], size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    return out.flip(-1) if rng.random() < 0.5 else out


def _placed_mask(rng, size: int) -> torch.Tensor:
    sil = _silhouette()
    if rng.random() < 0.5:
        sil = sil.flip(-1)
    width = int(rng.integers(int(0.45 * size), int(0.9 * size) + 1))
    height = max(1, round(width * sil.shape[0] / sil.shape[1]))
    small = F.interpolate(sil[None, None].float(), size=(height, width), mode="bilinear",
                          align_corners=False, antialias=True)[0, 0] >= 0.5
    y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y0 + height, x0:x0 + width] = small
    return mask


def horse_sample(index: int, split: str = "train", seed: int = 0, size: int = 64) -> dict:
    """Image `index` of `split`, with its parts: background, fill (float (3, S, S)), mask (bool (S, S)),
    image (uint8 (3, S, S)), label (uint8 (S, S)) and the names of the two photographs used."""
    if split not in _SPLITS:
        raise ValueError(f"horse: split must be 'train' or 'test', got {split!r}")
    if size < 16:
        raise ValueError(f"horse: size must be at least 16 px, got {size}")
    rng = np.random.default_rng([int(seed), _SPLITS[split], int(index)])
    photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
    bg_name, fill_name = (photos[i] for i in rng.choice(len(photos), size=2, replace=False))
    background = _crop(rng, _photo(bg_name), size)
    fill = _crop(rng, _photo(fill_name), size)
    mask = _placed_mask(rng, size)
    image = torch.where(mask, fill, background).round().clamp(0, 255).to(torch.uint8)
    return dict(image=image, label=mask.to(torch.uint8), mask=mask, background=background, fill=fill,
                photos=(bg_name, fill_name))


def load_horse(split_sizes: tuple[int, int] = (800, 200), size: int = 64, seed: int = 0) -> SegData:
    """`split_sizes` = (train, test) composites of `size` px (see the module docstring)."""
    n_train, n_test = (int(v) for v in split_sizes)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"horse: split_sizes must be positive, got {split_sizes!r}")
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        samples = [horse_sample(i, split, seed, size) for i in range(n)]
        arrays[f"x_{split}"] = torch.stack([s["image"] for s in samples])
        arrays[f"y_{split}"] = torch.stack([s["label"] for s in samples])
    return SegData(
        "horse", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], list(CLASSES),
        source=f"scikit-image's horse mask and photographs (seed {seed})", thing_ids=[1],
        substitute=True, description="composite: scikit-image's real horse mask on its real photographs",
        notes=[f"train photographs: {', '.join(TRAIN_PHOTOS)}; test photographs (unseen): {', '.join(TEST_PHOTOS)}"])
