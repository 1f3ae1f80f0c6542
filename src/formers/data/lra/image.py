"""LRA Image: an image as a sequence of 8-bit grey levels (vocab 256), flattened row-major, 10 classes.

LRA uses grey CIFAR-10 (1,024 tokens; 45k/5k/10k train/val/test). CIFAR-10 cannot be had offline
here, so this is the reference sheet's SUBSTITUTE: Fashion-MNIST (Debian's dataset-fashion-mnist),
zero-padded by 2 px to 32x32 so the sequence keeps LRA's length of 1,024 (variant B), split like
LRA: train[:90%] / train[90%:] / test. Sizes are the first n of each split after a seeded shuffle.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

VERSION = 1
DEFAULTS = dict(train=10000, val=1000, test=2000, pad=2, seed=0)


def build(task: str, train: int, val: int, test: int, pad: int, seed: int) -> dict:
    from formers.data.datasets import load_fashion_mnist
    data = load_fashion_mnist()
    x = F.pad(data.x_train[:, 0], (pad,) * 4).flatten(1).numpy()
    y = data.y_train.numpy()
    n_fit = int(0.9 * len(y))
    xt = F.pad(data.x_test[:, 0], (pad,) * 4).flatten(1).numpy()
    rng = np.random.default_rng(seed)
    pick = {"train": rng.permutation(n_fit)[:train], "val": n_fit + rng.permutation(len(y) - n_fit)[:val],
            "test": rng.permutation(len(xt))[:test]}
    side = 28 + 2 * pad
    out = {"info": dict(vocab_size=256, num_classes=10, substitute=True, padded=False,
                        source=f"substitute: Fashion-MNIST padded to {side}x{side} for grey CIFAR-10")}
    for split, idx in pick.items():
        src_x, src_y = (xt, data.y_test.numpy()) if split == "test" else (x, y)
        out[f"x_{split}"] = src_x[idx].astype(np.uint8)
        out[f"y_{split}"] = src_y[idx].astype(np.int8)
    return out


def as_tensor_image(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) pixel tokens back to (N, side, side) images, for looking at them."""
    side = int(round(tokens.shape[-1] ** 0.5))
    return tokens.reshape(-1, side, side)
