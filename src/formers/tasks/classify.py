"""Image classification: the task of every image backbone (`ModelCard.task == "classify"`).

Its data sets are formers.data's (digits, Fashion-MNIST, a folder of class folders, an .npz file);
its batch is a uint8 image batch augmented by `BatchTransform` and its labels; its objective is
cross-entropy (`--objective ce`, or multires / matformer / sparse / lowrank); its metrics are
top-1 / top-5 accuracy, loss and the confusion matrix of the whole split; `formers eval` evaluates a
weights file and draws the matrix.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from formers.train.common import autocast, read_weights_metadata

from .base import Task

__all__ = ["ClassifyTask", "evaluate", "run_eval"]


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, transform, num_classes: int, batch_size: int = 256,
             device: torch.device = torch.device("cpu"), precision: str = "fp32", ctx=None) -> dict:
    """Metrics over (x, y); under torchrun each process takes a contiguous part and the sums are reduced."""
    was_training = model.training
    model.eval()
    idx = torch.arange(len(y))
    if ctx is not None and ctx.distributed:
        idx = idx.tensor_split(ctx.world_size)[ctx.rank]
    k = num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    confusion = torch.zeros(k * k, dtype=torch.long, device=device)
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        xb = transform(x[b].to(device, non_blocking=True))
        yb = y[b].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(xb)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        top = logits.topk(min(5, k), dim=1).indices
        top5 += (top == yb[:, None]).any(1).sum()
        confusion += torch.bincount(yb * k + top[:, 0], minlength=k * k)
    if ctx is not None:
        packed = ctx.all_reduce_sum(torch.cat([loss_sum.view(1), top5.double().view(1), confusion.double()]))
        loss_sum, top5, confusion = packed[0], packed[1].long(), packed[2:].long()
    model.train(was_training)
    confusion = confusion.view(k, k).cpu()
    n = int(confusion.sum())
    return {
        "n": n,
        "loss": float(loss_sum) / max(n, 1),
        "top1": 100.0 * float(confusion.trace()) / max(n, 1),
        "top5": 100.0 * float(top5) / max(n, 1),
        "confusion": confusion,
    }


def run_eval(model_name: str, checkpoint: str, dataset: str | None = None, data: str | None = None,
             img_size: int | None = None, batch_size: int = 256, limit_test: int | None = None,
             precision: str = "fp32", model_kwargs: dict | None = None, out: str | None = None,
             device: str | None = None, split: str | None = None) -> dict:
    """Evaluate a weights file on a data set; print and write the results.

    `split`: "test", "train" or "all". None: every image of a --data file or folder that has no test
    split of its own (evaluating a file means all of it), else the test split. The printed line says
    which images were used."""
    import formers
    from formers.data import BatchTransform, channel_stats, load_dataset

    from formers.train.common import check_model, default_img_size
    if not os.path.exists(checkpoint):   # a directory: load_checkpoint says what it is
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if not os.access(checkpoint, os.R_OK):
        raise ValueError(f"checkpoint {checkpoint!r} is not readable")
    if split not in (None, "test", "train", "all"):
        raise ValueError(f"--split must be test, train or all, got {split!r}")
    from formers.cli import check_out_dir, resolve_device
    if out is not None:
        check_out_dir(out)
    dev = resolve_device(device)
    meta = read_weights_metadata(checkpoint)
    dataset = dataset or meta.get("dataset") or "digits"   # default: the data the weights were trained on
    formers.registry.model_entry(model_name)        # an unknown name fails before any data is read
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(model_kwargs or {})
    size = img_size or meta.get("img_size")
    data_set = load_dataset(dataset, data, img_size=size)
    if split is None:
        split = "all" if data_set.from_file and data_set.held_out else "test"
    num_classes = meta.get("num_classes", data_set.num_classes)
    if num_classes != data_set.num_classes:
        raise ValueError(f"{checkpoint!r} has a {num_classes}-class head but {dataset} has "
                         f"{data_set.num_classes} classes")
    in_chans = meta.get("in_chans", data_set.channels)
    if size is None:
        size = default_img_size(model_name, data_set.size, in_chans, num_classes, kwargs)
        data_set = data_set.resized(size)
    check_model(model_name, num_classes, in_chans, size, kwargs)
    mean, std = (meta["mean"], meta["std"]) if "mean" in meta else channel_stats(data_set.x_train)
    if meta.get("transforms"):   # written by `formers transform`: rebuild the changed structure first
        from formers.transforms import load
        model = load(checkpoint, model_name, num_classes=num_classes, in_chans=in_chans, img_size=size,
                     **kwargs).to(dev)
    else:
        model = formers.create_model(model_name, num_classes=num_classes, in_chans=in_chans, img_size=size,
                                     checkpoint=checkpoint, **kwargs).to(dev)
    print("weights verified (sha256)" if getattr(model, "checkpoint_verified", False)
          else "weights not verifiable (no digest: an official release or foreign file)")
    tf = BatchTransform(mean, std, in_chans)
    x, y = {"test": (data_set.x_test, data_set.y_test), "train": (data_set.x_train, data_set.y_train),
            "all": None}.get(split) or data_set.all_images()
    total = len(data_set.y_train) + len(data_set.y_test)
    if limit_test is not None and limit_test < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(1002))[:limit_test].sort().values
        x, y = x[keep], y[keep]
    if len(y) == 0:
        raise ValueError(f"{dataset} data from {data_set.source!r} has no {split} images; use --split all")
    src = os.path.basename(data_set.source) if data_set.from_file else dataset
    if split == "all":
        which = f"all {len(y)} images of {src}" if len(y) == total else f"{len(y)} of all {total} images of {src}"
    else:
        which = f"the {split} split ({len(y)} of {total} images of {src})"
    out = out or os.path.dirname(os.path.abspath(checkpoint))
    check_out_dir(out)
    res = evaluate(model, x, y, tf, num_classes, batch_size, dev, precision)
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    png = os.path.join(out, f"confusion_{stem}_{dataset}_{split}.png")
    from formers.train.report import plot_confusion
    plot_confusion(res["confusion"].numpy(), data_set.classes, png,
                   title=f"{model_name} on {dataset} {split}: top-1 {res['top1']:.2f}%")
    summary = {k: v for k, v in res.items() if k != "confusion"}
    summary.update(model=model_name, checkpoint=checkpoint, dataset=dataset, split=split, img_size=size,
                   images=which,
                   confusion=res["confusion"].tolist(), classes=data_set.classes, confusion_png=png)
    with open(os.path.join(out, f"eval_{stem}_{dataset}_{split}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{model_name} on {which}, {size}px: top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
    print(f"confusion matrix: {png}")
    return summary


class ClassifyTask(Task):
    name = "classify"
    headline = "top1"
    headline_label = "acc"
    default_dataset = "digits"

    @property
    def datasets(self) -> tuple:
        from formers.data import DATASETS
        return tuple(DATASETS)

    def load_data(self, cfg):
        from formers.data import load_dataset
        return load_dataset(cfg.dataset, cfg.data, img_size=cfg.img_size,
                            limit_train=cfg.limit_train, limit_test=cfg.limit_test)

    def transforms(self, data, in_chans: int, size: int, augment: str, cfg=None):
        """(train, test) transforms and the (mean, std) they normalise with, the training split's. With a
        TrainConfig `cfg`, its strong augmentation: RandomResizedCrop (--augment rrc, rrc-flip), RandAugment
        (--aa), random erasing (--reprob) and mixup / cutmix (--mixup, --cutmix)."""
        from formers.data import BatchTransform, channel_stats
        from formers.data.augment import Mixup
        from formers.data.randaugment import RandAugment
        mean, std = channel_stats(data.x_train)
        pad = max(1, size // 8) if augment in ("crop", "crop-flip") else 0
        strong = {}
        if cfg is not None:
            if augment in ("rrc", "rrc-flip"):
                strong["rrc"] = (tuple(cfg.scale), tuple(cfg.ratio))
            if cfg.aa:
                strong["rand_augment"] = RandAugment.from_string(cfg.aa, img_mean=[min(255, round(255 * m))
                                                                                   for m in mean])
            strong["reprob"] = cfg.reprob
            if cfg.mixup > 0 or cfg.cutmix > 0:
                strong["mixup"] = Mixup(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, data.num_classes)
        train = BatchTransform(mean, std, in_chans, crop_pad=pad, hflip=augment in ("crop-flip", "rrc-flip"), **strong)
        return train, BatchTransform(mean, std, in_chans), (mean, std)

    def make_batch(self, tf, x, y, params):
        x = tf(x, params)
        if getattr(tf, "mixup", None) is not None and params is not None:
            return tf.mixup(x, y, params)        # soft targets (B, K)
        return x, y

    def build_objective(self, name: str, kwargs: dict, label_smoothing: float):
        from formers.train.objectives import build_objective
        return build_objective(name, kwargs, label_smoothing)

    def output_problem(self, out, num_classes: int):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"{shape} for one image; a classifier should return (1, {num_classes})"
        return None

    def step_stats(self, logits, y):
        """(correct, counted) of one micro-batch: top-1 hits over its images (against the larger part of
        a mixed soft target)."""
        if y.dim() == 2:
            y = y.argmax(1)
        return (logits.detach().argmax(1) == y).sum(), y.numel()

    def evaluate(self, model, data, tf, batch_size: int, device, precision: str, ctx=None) -> dict:
        return evaluate(model, data.x_test, data.y_test, tf, data.num_classes, batch_size, device, precision, ctx)

    def epoch_fields(self, res: dict, prefix: str) -> dict:
        if prefix == "test":
            return {"test_loss": res["loss"], "test_acc": res["top1"], "test_top5": res["top5"]}
        return {f"{prefix}_acc": res["top1"], f"{prefix}_loss": res["loss"]}

    headline_field = "acc"   # the epoch row's key is f"{prefix}_{headline_field}"

    def run_eval(self, *args, **kwargs) -> dict:
        return run_eval(*args, **kwargs)
