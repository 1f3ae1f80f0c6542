"""Datasets held in memory as tensors, batched torch augmentation, a resumable sampler.

    data = load_dataset("digits", img_size=32)          # ImageData: uint8 tensors
    tf = BatchTransform(*channel_stats(data.x_train), out_chans=3, crop_pad=4)
    x = tf(data.x_train[:64], tf.draw(64, generator))   # normalised float batch
"""
from .augment import AUGMENTS, BatchTransform, channel_stats
from .datasets import DATASETS, FASHION_MNIST_DIR, ImageData, load_dataset, resize_images
from .sampler import EpochSampler, shard_slice, step_generator

_LAZY = {"SegData": ".segdata", "load_seg_folder": ".segdata", "load_mosaic": ".mosaic", "load_horse": ".horse"}   # they need numpy


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "ImageData", "load_dataset", "resize_images",
           "AUGMENTS", "BatchTransform", "channel_stats", "EpochSampler", "shard_slice", "step_generator",
           "SegData", "load_seg_folder", "load_mosaic", "load_horse"]
