"""Semantic segmentation: every model whose card says `task="segment"` (SegFormer, DAFormer, ...).

    formers train segformer_b0 --dataset mosaic --epochs 8 --batch-size 16
    formers eval segformer_b0 --checkpoint runs/segformer_b0-mosaic/best.safetensors --mode slide --crop 48

The model maps (B, C, H, W) images to (B, K, h, w) class scores at any stride (SegFormer's are at
1/4); the objective and the metrics upsample them bilinearly to the label size, as mmseg and HF do.

- data: `mosaic` (the default: generated Fashion-MNIST items on textured stuff, exact labels; a
  substitute for a real benchmark), `mosaic-target` (its second domain), `mosaic-uda` (labelled
  source + unlabelled target images, tested on the target: domain adaptation, `--objective dacs`),
  `mosaic-uda-night` (the same with the milder "night" domain: palette and blur only), `horse`
  (scikit-image's real horse mask composited on its real photographs, unseen ones in the test
  split: a small qualitative check on real images) and `seg-folder` (the user's own images + label PNGs, ADE20K/Cityscapes layout, 255 = ignore);
- batch: images normalised with the training split's channel statistics, and the label maps, under
  one random crop (zero-padded images, ignore-padded labels) and flip;
- objective: pixel-wise cross-entropy that skips the ignore index (`--objective ce`);
- metrics: mIoU (the headline), mAcc and aAcc from one confusion matrix over the split
  (`segment_metrics.SegMetrics`, summed across DDP ranks), per-class IoU;
- inference: whole image, or mmseg's sliding window (crops of `crop` every `stride`, overlapping
  scores averaged), with optional flip and multi-scale test-time augmentation (probabilities
  averaged); `formers eval` prints the per-class table and writes colour-overlay PNGs.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from formers.data.augment import BatchTransform
from formers.train.common import autocast, read_weights_metadata
from formers.train.objectives import Objective

from .base import Task
from .segment_metrics import SegMetrics

__all__ = ["SegmentTask", "SegTransform", "SegmentCrossEntropy", "predict", "evaluate", "run_eval"]

MOSAIC_SPLITS = (2000, 500)    # the default mosaic: train / test images
MOSAIC_SIZE = 64
HORSE_SPLITS = (800, 200)     # the scikit-image horse composites: train / test images


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, K, h, w) scores -> (B, K, H, W), bilinear, align_corners=False (mmseg's `resize`)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegTransform:
    """uint8 images (B, C, H, W) and label maps (B, H, W) -> normalised float images and int64 labels,
    with one random crop of the zero-padded image (the label padded with the ignore index) and one
    left-right flip per image, drawn as `BatchTransform` draws them."""

    def __init__(self, mean, std, out_chans: int, crop_pad: int = 0, hflip: bool = False, ignore_index: int = 255):
        self.image = BatchTransform(mean, std, out_chans, crop_pad=crop_pad, hflip=hflip)
        self.ignore_index = ignore_index

    @property
    def augments(self) -> bool:
        return self.image.augments

    def draw(self, n: int, generator: torch.Generator) -> dict:
        return self.image.draw(n, generator)

    slice_params = staticmethod(BatchTransform.slice_params)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, params: dict | None = None):
        xf = self.image(x, params)
        y = y.long()
        if params is not None:
            p = self.image.crop_pad
            if params.get("shift") is not None and p:
                b, h, w = y.shape
                shift = params["shift"].to(y.device)
                padded = F.pad(y, (p, p, p, p), value=self.ignore_index)
                rows = (shift[:, 0:1] + torch.arange(h, device=y.device)).view(b, h, 1)
                cols = (shift[:, 1:2] + torch.arange(w, device=y.device)).view(b, 1, w)
                y = padded[torch.arange(b, device=y.device).view(b, 1, 1), rows, cols]
            if params.get("flip") is not None:
                y = torch.where(params["flip"].to(y.device).view(-1, 1, 1), y.flip(-1), y)
        return xf, y


class SegmentCrossEntropy(Objective):
    """Pixel-wise cross-entropy on the scores upsampled to the label size; ignore-index pixels skipped.
    Returns the upsampled scores, for the step's pixel accuracy.

    A model that returns several score maps in training (a main head and auxiliary heads, mmseg's
    `auxiliary_head`) gets the weighted sum of their losses, with the weights of its `loss_weights`
    attribute (mmseg's `loss_weight`, e.g. (1.0, 0.4)); without one, their mean. The first map is the
    prediction."""
    name = "ce"

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = 255):
        super().__init__(label_smoothing)
        self.ignore_index = ignore_index

    def loss(self, logits, y, weights=None):
        if isinstance(logits, (tuple, list)):
            if weights is None:
                weights = (1.0 / len(logits),) * len(logits)
            if len(weights) != len(logits):
                raise ValueError(f"the model returned {len(logits)} score maps but has {len(weights)} loss_weights")
            return sum(w * self.loss(one, y) for w, one in zip(weights, logits))
        logits = upsample(logits, y.shape[-2:]).float()
        if not (y != self.ignore_index).any():          # nothing labelled: no signal, not a NaN
            return logits.sum() * 0.0
        return F.cross_entropy(logits, y, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def __call__(self, model, x, y, step: int):
        out = model(x)
        first = out[0] if isinstance(out, (tuple, list)) else out
        weights = getattr(getattr(model, "module", model), "loss_weights", None)  # DDP wraps the model
        return self.loss(out, y, weights), upsample(first, y.shape[-2:])


# ---------------------------------------------------------------- inference

def _slide(model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], num_classes: int):
    """mmseg's sliding window: crops of `crop` every `stride` (the last one flush with the border), the
    scores of overlapping crops averaged. Returns scores at x's size."""
    b, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total = x.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            part = upsample(model(x[:, :, y1:y2, x1:x2]).float(), (y2 - y1, x2 - x1))
            total[:, :, y1:y2, x1:x2] += part
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def predict(model, x: torch.Tensor, num_classes: int, mode: str = "whole", crop=None, stride=None,
            flip: bool = False, scales=(1.0,)) -> torch.Tensor:
    """(B, K, H, W) scores of a normalised image batch at its own size.

    mode "whole": the model sees the whole image; "slide": windows of `crop` (int or (h, w)) every
    `stride` (default 2/3 of the crop). With `flip` or several `scales` (test-time augmentation) the
    softmax probabilities of every view are averaged and their log is returned (so argmax and the
    cross-entropy stay meaningful); otherwise the raw scores."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode must be whole or slide, got {mode!r}")
    h, w = x.shape[-2:]
    if mode == "slide":
        if crop is None:
            raise ValueError("sliding-window inference needs a crop size (--crop)")
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        stride = stride or (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)

    def once(img):
        if mode == "slide":
            return _slide(model, img, crop, stride, num_classes)
        return upsample(model(img).float(), img.shape[-2:])

    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    if views == [(1.0, False)]:
        return once(x)
    probs = 0.0
    div = getattr(model, "input_divisor", 1) or 1
    for s, f in views:
        img = x
        if s != 1.0:
            size = (max(div, round(h * s / div) * div), max(div, round(w * s / div) * div))
            img = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if f:
            img = img.flip(-1)
        out = once(img)
        if f:
            out = out.flip(-1)
        probs = probs + upsample(out, (h, w)).softmax(1)
    return (probs / len(views)).clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, tf: SegTransform, num_classes: int, batch_size: int = 32,
             device: torch.device = torch.device("cpu"), precision: str = "fp32", ctx=None, ignore_index: int = 255,
             keep_predictions: int = 0, **inference) -> dict:
    """Loss (mean over labelled pixels) and the metrics of segment_metrics over (x, y); under torchrun each
    process takes a contiguous part and the counts are summed. `inference`: predict()'s mode/crop/stride/
    flip/scales. `keep_predictions`: also return the first N predicted label maps (for overlays)."""
    was_training = model.training
    model.eval()
    idx = torch.arange(len(y))
    if ctx is not None and ctx.distributed:
        idx = idx.tensor_split(ctx.world_size)[ctx.rank]
    metrics = SegMetrics(num_classes, ignore_index, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    kept = []
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        xb, yb = tf(x[b].to(device, non_blocking=True), y[b].to(device, non_blocking=True))
        if yb.numel() and int(yb.max()) >= num_classes and (yb[yb != ignore_index] >= num_classes).any():
            bad = torch.unique(yb[(yb != ignore_index) & (yb >= num_classes)]).tolist()
            raise ValueError(f"label ids {bad[:10]} are outside the model's {num_classes} classes "
                             f"(0..{num_classes - 1}, {ignore_index} = ignore)")
        with autocast(device, precision):
            scores = predict(model, xb, num_classes, **inference)
        scores = scores.float()
        loss_sum += F.cross_entropy(scores, yb, ignore_index=ignore_index, reduction="sum").double()
        pred = scores.argmax(1)
        metrics.update(pred, yb)
        if len(kept) * batch_size < keep_predictions:
            kept.append(pred.cpu())
    if ctx is not None:
        packed = ctx.all_reduce_sum(torch.cat([loss_sum.view(1), metrics.state().double()]))
        loss_sum = packed[0]
        metrics.load_state_(packed[1:])
    model.train(was_training)
    res = metrics.compute()
    pixels = int(metrics.matrix().sum())
    res.update(loss=float(loss_sum) / max(pixels, 1), pixels=pixels, n=len(y),
               confusion=metrics.matrix().cpu(), table=metrics.table)
    if keep_predictions:
        res["predictions"] = torch.cat(kept)[:keep_predictions] if kept else torch.empty(0)
    return res


def mosaic_uda(splits, size: int, path: str | None = None, target: str = "target"):
    """Domain adaptation on the mosaic: labelled source train images, unlabelled `target`-domain train
    images (`x_target`), and that domain's test split to measure on (`mosaic-uda`: the "target" domain,
    new palette, textures and blur; `mosaic-uda-night`: the "night" domain, palette and blur only). Any
    objective trains on it; `ce` is the source-only baseline, `dacs` DAFormer's self-training."""
    import dataclasses

    from formers.data import load_mosaic
    src = load_mosaic(splits, size=size, domain="source", path=path)
    tgt = load_mosaic(splits, size=size, domain=target, path=path)
    return dataclasses.replace(
        src, name="mosaic-uda" if target == "target" else f"mosaic-uda-{target}", x_test=tgt.x_test,
        y_test=tgt.y_test, instance_test=tgt.instance_test, x_target=tgt.x_train, y_target=tgt.y_train,
        description=f"generated substitute: Fashion-MNIST mosaic, source domain -> {target} domain",
        notes=src.notes + tgt.notes + ["test split: the target domain's"])


# ---------------------------------------------------------------- the task

class SegmentTask(Task):
    name = "segment"
    headline = "mIoU"
    headline_label = "mIoU"
    headline_field = "miou"
    default_dataset = "mosaic"
    datasets = ("mosaic", "mosaic-target", "mosaic-uda", "mosaic-uda-night", "horse", "seg-folder")

    def load_data(self, cfg, img_size=None):
        from formers.data import load_horse, load_mosaic, load_seg_folder
        size = img_size if img_size is not None else cfg.img_size
        if cfg.dataset == "horse":
            return load_horse((cfg.limit_train or HORSE_SPLITS[0], cfg.limit_test or HORSE_SPLITS[1]),
                              size=size or MOSAIC_SIZE)
        if cfg.dataset.startswith("mosaic"):
            splits = (cfg.limit_train or MOSAIC_SPLITS[0], cfg.limit_test or MOSAIC_SPLITS[1])
            if cfg.dataset.startswith("mosaic-uda"):
                target = "night" if cfg.dataset == "mosaic-uda-night" else "target"
                return mosaic_uda(splits, size or MOSAIC_SIZE, cfg.data, target)
            return load_mosaic(splits, size=size or MOSAIC_SIZE,
                               domain="source" if cfg.dataset == "mosaic" else "target", path=cfg.data)
        if not cfg.data:
            raise ValueError("--dataset seg-folder needs --data ROOT (ROOT/images/..., ROOT/annotations/...)")
        return load_seg_folder(cfg.data, img_size=size).limited(cfg.limit_train, cfg.limit_test)

    def transforms(self, data, in_chans: int, size: int, augment: str, cfg=None):
        from formers.data import channel_stats
        mean, std = channel_stats(data.x_train)
        pad = max(1, size // 8) if augment in ("crop", "crop-flip") else 0
        ignore = data.ignore_index
        return (SegTransform(mean, std, in_chans, crop_pad=pad, hflip=augment == "crop-flip", ignore_index=ignore),
                SegTransform(mean, std, in_chans, ignore_index=ignore), (mean, std))

    def make_batch(self, tf, x, y, params):
        return tf(x, y, params)

    def build_objective(self, name: str, kwargs: dict, label_smoothing: float):
        if name == "ce":
            try:
                return SegmentCrossEntropy(label_smoothing=label_smoothing, **(kwargs or {}))
            except TypeError as e:
                raise ValueError(f"--objective ce: bad --objective-kwargs {kwargs!r} ({e})") from None
        from formers.train.objectives import build_objective
        return build_objective(name, kwargs, label_smoothing)

    def output_problem(self, out, num_classes: int):
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[:2]) != (1, num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"{shape} for one image; a segmentation model should return (1, {num_classes}, h, w) scores"
        return None

    def step_stats(self, logits, y, ignore_index: int = 255):
        """(correct, counted) labelled pixels of one micro-batch (the scores upsampled by the objective)."""
        valid = y != ignore_index
        return ((logits.detach().argmax(1) == y) & valid).sum(), int(valid.sum())

    def evaluate(self, model, data, tf, batch_size: int, device, precision: str, ctx=None) -> dict:
        return evaluate(model, data.x_test, data.y_test, tf, data.num_classes, batch_size, device, precision, ctx,
                        ignore_index=data.ignore_index)

    def epoch_fields(self, res: dict, prefix: str) -> dict:
        if prefix == "test":
            return {"test_loss": res["loss"], "test_miou": res["mIoU"], "test_macc": res["mAcc"],
                    "test_aacc": res["aAcc"]}
        return {f"{prefix}_miou": res["mIoU"], f"{prefix}_loss": res["loss"]}

    def run_eval(self, *args, **kwargs) -> dict:
        return run_eval(*args, **kwargs)


# ---------------------------------------------------------------- formers eval

def palette(k: int) -> torch.Tensor:
    """(k, 3) uint8 colours, distinct and fixed (a golden-angle walk around the hue circle)."""
    import colorsys
    return torch.tensor([[round(255 * v) for v in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)]
                         for i in range(k)], dtype=torch.uint8)


def blend(image: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """A class colour over image pixels as every overlay shows it (float, 0..255, last dim RGB)."""
    return 0.35 * image + 0.65 * colour


def plot_overlays(images, labels, preds, classes, path: str, ignore_index: int = 255, title: str = ""):
    """A grid, one column per image: the image, its labels and the prediction blended over it (ignore
    pixels left uncoloured), with a legend of the classes."""
    from formers.train.report import _pyplot, _save
    plt = _pyplot()
    n = len(images)
    colours = palette(len(classes)).float()
    fig, axes = plt.subplots(3, n, figsize=(1.8 * n + 1.5, 5.8), squeeze=False)
    for j in range(n):
        img = images[j].float()
        img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
        base = img.permute(1, 2, 0)
        for i, (row, lab) in enumerate((("image", None), ("labels", labels[j]), ("prediction", preds[j]))):
            shown = base
            if lab is not None:
                lab = lab.long()
                valid = (lab != ignore_index)[..., None]
                col = colours[lab.clamp(0, len(classes) - 1)]
                shown = torch.where(valid, blend(base, col), base)
            axes[i, j].imshow(shown.clamp(0, 255).byte().numpy())
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(row)
    handles = [plt.Rectangle((0, 0), 1, 1, color=(colours[c] / 255).tolist()) for c in range(len(classes))]
    fig.legend(handles, classes, loc="center right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    _save(fig, path)
    plt.close(fig)


def _no_nan(v):
    """JSON has no NaN: an undefined per-class value is written as null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_no_nan(x) for x in v]
    return v


def run_eval(model_name: str, checkpoint: str, dataset: str | None = None, data: str | None = None,
             img_size: int | None = None, batch_size: int = 32, limit_test: int | None = None,
             precision: str = "fp32", model_kwargs: dict | None = None, out: str | None = None,
             device: str | None = None, split: str | None = None, mode: str = "whole", crop=None, stride=None,
             flip: bool = False, scales=(1.0,), overlays: int = 8) -> dict:
    """Evaluate a weights file on a segmentation data set: mIoU / mAcc / aAcc and the per-class table
    printed, eval JSON and an overlay PNG of the first `overlays` test images written beside the weights
    (or to `out`)."""
    import types

    import formers
    from formers.cli import check_out_dir, resolve_device
    from formers.train.common import check_model
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if split not in (None, "test", "train"):
        raise ValueError(f"--split must be test or train for a segmentation data set, got {split!r}")
    split = split or "test"
    if out is not None:
        check_out_dir(out)
    dev = resolve_device(device)
    meta = read_weights_metadata(checkpoint)
    dataset = dataset or meta.get("dataset") or SegmentTask.default_dataset
    task = SegmentTask()
    task.check_dataset(dataset, model_name)
    size = img_size or meta.get("img_size")
    cfg = types.SimpleNamespace(dataset=dataset, data=data, img_size=size, limit_train=None, limit_test=limit_test)
    data_set = task.load_data(cfg)
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(model_kwargs or {})
    num_classes = meta.get("num_classes", data_set.num_classes)
    if num_classes != data_set.num_classes:
        raise ValueError(f"{checkpoint!r} has a {num_classes}-class head but {dataset} has "
                         f"{data_set.num_classes} classes")
    in_chans = meta.get("in_chans", data_set.channels)
    size = size or data_set.size[0]
    data_set = data_set.resized(size)
    check_model(model_name, num_classes, in_chans, size, kwargs)
    if "mean" in meta:
        mean, std = meta["mean"], meta["std"]
    else:   # foreign weights: the data's own statistics
        from formers.data import channel_stats
        mean, std = channel_stats(data_set.x_train)
    model = formers.create_model(model_name, num_classes=num_classes, in_chans=in_chans, img_size=size,
                                 checkpoint=checkpoint, **kwargs).to(dev)
    print("weights verified (sha256)" if getattr(model, "checkpoint_verified", False)
          else "weights not verifiable (no digest: an official release or foreign file)")
    x, y = (data_set.x_test, data_set.y_test) if split == "test" else (data_set.x_train, data_set.y_train)
    if len(y) == 0:
        raise ValueError(f"{dataset} has no {split} images")
    tf = SegTransform(mean, std, in_chans, ignore_index=data_set.ignore_index)
    inference = dict(mode=mode, crop=crop, stride=stride, flip=flip, scales=tuple(scales))
    res = evaluate(model, x, y, tf, num_classes, batch_size, dev, precision, ignore_index=data_set.ignore_index,
                   keep_predictions=overlays, **inference)
    out = out or os.path.dirname(os.path.abspath(checkpoint))
    check_out_dir(out)
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    how = mode + (f" {crop}/{stride or 'auto'}" if mode == "slide" else "") + (" +flip" if flip else "") + \
        (f" scales {','.join(f'{s:g}' for s in scales)}" if tuple(scales) != (1.0,) else "")
    png = None
    if overlays and len(res["predictions"]):
        png = os.path.join(out, f"overlay_{stem}_{dataset}_{split}.png")
        k = len(res["predictions"])
        plot_overlays(x[:k], y[:k], res["predictions"], data_set.classes, png, data_set.ignore_index,
                      title=f"{model_name} on {dataset} {split} ({how}): mIoU {res['mIoU']:.2f}%")
    summary = {k: v for k, v in res.items() if k not in ("confusion", "table", "predictions")}
    summary.update(model=model_name, checkpoint=checkpoint, dataset=dataset, split=split, img_size=size,
                   inference=how, classes=data_set.classes, overlay_png=png, data=data_set.describe())
    with open(os.path.join(out, f"eval_{stem}_{dataset}_{split}.json"), "w") as f:
        json.dump(_no_nan(summary), f, indent=1)
    print(res["table"](data_set.classes))
    print(f"{model_name} on the {split} split of {data_set.describe()} ({len(y)} images, {how}): "
          f"mIoU {res['mIoU']:.2f}%  mAcc {res['mAcc']:.2f}%  aAcc {res['aAcc']:.2f}%  loss {res['loss']:.4f}")
    if png:
        print(f"overlays: {png}")
    return summary
