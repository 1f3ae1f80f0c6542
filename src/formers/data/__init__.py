"""Datasets held in memory as tensors, batched torch augmentation, a resumable sampler.

    data = load_dataset("digits", img_size=32)          # ImageData: uint8 tensors
    tf = BatchTransform(*channel_stats(data.x_train), out_chans=3, crop_pad=4)
    x = tf(data.x_train[:64], tf.draw(64, generator))   # normalised float batch
"""
from .augment import AUGMENTS, BatchTransform, channel_stats
from .datasets import DATASETS, FASHION_MNIST_DIR, ImageData, load_dataset, resize_images
from .sampler import EpochSampler, shard_slice, step_generator
from .segdata import SegData, load_seg_folder
from .mosaic import load_mosaic

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "ImageData", "load_dataset", "resize_images",
           "AUGMENTS", "BatchTransform", "channel_stats", "EpochSampler", "shard_slice", "step_generator",
           "SegData", "load_seg_folder", "load_mosaic"]
