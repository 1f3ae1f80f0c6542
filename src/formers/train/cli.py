"""`formers train` and `formers eval`.

    formers train swin_demo --dataset digits --epochs 40 --batch-size 32 --lr 2e-3 --img-size 16 --out runs/demo
    formers train swin_demo --out runs/demo --resume        (the other settings come from the checkpoint)
    torchrun --nproc_per_node=2 -m formers.cli train ...      (or: python -m torch.distributed.run ...)
    formers eval swin_demo --checkpoint runs/demo/best.safetensors --dataset digits

A bad argument ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types

from formers.cli import finite_float, nonnegative_int, positive_float, positive_int
from formers.cli import one_line_error as _one_line_error

__all__ = ["add_parser"]

_S = argparse.SUPPRESS


def _lr_mult(text: str) -> tuple:
    pattern, sep, factor = text.rpartition("=")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if not sep or not pattern or value is None or not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected PATTERN=FACTOR like encoder=0.1, got {text!r}")
    return pattern, value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depths\": [1, 1, 2, 1]}}', got {text!r}")
    return value


def _size_list(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 128,160,224, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 128,160,224, got {text!r}")
    return sizes


_positive_int = positive_int


def _name_list(text: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected names like tensorboard,csv, got {text!r}")
    return names


def _scale_list(text: str) -> list[float]:
    try:
        scales = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scales like 0.75,1,1.25, got {text!r}") from None
    if not scales or not all(0 < s < 16 for s in scales):
        raise argparse.ArgumentTypeError(f"expected positive scales like 0.75,1,1.25, got {text!r}")
    return scales


def _data_options(p, suppress: bool):
    d = _S if suppress else None
    p.add_argument("--dataset", default=_S if suppress else None, metavar="NAME",
                   help="classification: digits (default) | fashion-mnist | folder | npz; "
                        "segmentation: mosaic (default) | mosaic-target | seg-folder")
    p.add_argument("--data-dir", "--data", dest="data", default=d, metavar="PATH",
                   help="fashion-mnist: directory of the IDX files (default /usr/share/datasets/fashion-mnist); "
                        "folder: ROOT/<class>/*.png; npz: the .npz file")
    p.add_argument("--img-size", type=_positive_int, default=d, metavar="S",
                   help="train/eval at SxS (default: the data's size rounded up to what the model takes)")
    p.add_argument("--limit-test", type=_positive_int, default=d, metavar="N",
                   help="use a fixed subset of N test images")
    p.add_argument("--model-kwargs", type=_json_object, default=_S if suppress else {}, metavar="JSON",
                   help="extra keyword arguments for the model, e.g. '{\"drop_path_rate\": 0.1}'")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=_S if suppress else "fp32",
                   help="bf16 / fp16: autocast (CPU or GPU), weights stay fp32; fp16 trains with a gradient scaler")
    p.add_argument("--device", default=d, help="cpu | cuda | cuda:N (default: cuda if available)")


def add_parser(subparsers):
    from formers.train.trainer import (DEFAULT_LABEL_SMOOTHING, DEFAULT_WARMUP_EPOCHS, SHORT_RUN_EPOCHS,
                                       WARMUP_CAP, TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    p = subparsers.add_parser(
        "train", help="train a registered model on a data set of its task (also under torchrun)",
        description="Train a registered model; checkpoints, metrics.jsonl, curves.png, best/final weights "
                    "and summary.json go to --out. Run it under `torchrun --nproc_per_node=N` for DDP.")
    p.error = types.MethodType(_one_line_error, p)
    p.add_argument("model", help="a registered model name (see `formers list`)")
    _data_options(p, suppress=True)
    p.add_argument("--out", default=_S, metavar="DIR",
                   help="output directory (default runs/MODEL-DATASET; --out . for the current folder)")
    p.add_argument("--epochs", type=_positive_int, default=_S, help=f"default {defaults['epochs']}")
    p.add_argument("--batch-size", type=_positive_int, default=_S,
                   help=f"global batch, split across processes and --accum steps (default {defaults['batch_size']})")
    p.add_argument("--lr", type=positive_float, default=_S, help=f"peak learning rate (default {defaults['lr']})")
    p.add_argument("--weight-decay", type=finite_float, default=_S, help=f"default {defaults['weight_decay']}")
    p.add_argument("--warmup-epochs", type=finite_float, default=_S,
                   help=f"linear warm-up, then cosine (default {DEFAULT_WARMUP_EPOCHS:g}); always capped at "
                        f"{WARMUP_CAP:.0%}% of the run's steps, with a note when a longer one is asked for")
    p.add_argument("--min-lr-ratio", type=finite_float, default=_S,
                   help=f"final lr / peak lr, in [0, 1] (default {defaults['min_lr_ratio']})")
    o = p.add_argument_group("optimizer and schedule (timm's names)")
    o.add_argument("--opt", default=_S, metavar="NAME",
                   help="adamw (default), adam, sgd (Nesterov), momentum, lamb, rmsprop, or any torch.optim "
                        "class by name (nadam, radam, ...)")
    o.add_argument("--momentum", type=finite_float, default=_S, help="sgd / momentum / rmsprop (default 0.9)")
    o.add_argument("--lr-mult", type=_lr_mult, action="append", default=_S, metavar="PATTERN=FACTOR",
                   help="scale the lr of matching parameters (a dotted prefix or fnmatch pattern), e.g. "
                        "encoder=0.1; repeatable, the first match wins")
    o.add_argument("--sched", default=_S, choices=["cosine", "step", "poly", "constant"],
                   help="the decay after the warm-up (default cosine)")
    o.add_argument("--warmup-hold-epochs", type=finite_float, default=_S, metavar="E",
                   help="epochs at the peak lr before the decay (default 0)")
    o.add_argument("--decay-epochs", type=finite_float, default=_S, metavar="E",
                   help="step: epochs between decays (default 1)")
    o.add_argument("--decay-rate", type=finite_float, default=_S, help="step: factor per decay (default 0.1)")
    o.add_argument("--poly-power", type=finite_float, default=_S, help="poly: the power (default 1; mmseg 0.9)")
    o.add_argument("--patience", type=_positive_int, default=_S, metavar="EPOCHS",
                   help="stop early after EPOCHS epochs without a better test headline metric (default off)")
    p.add_argument("--label-smoothing", type=finite_float, default=_S,
                   help=f"in [0, 1) (default {DEFAULT_LABEL_SMOOTHING:g}, or 0 for a run of fewer than "
                        f"{SHORT_RUN_EPOCHS} epochs)")
    p.add_argument("--clip-grad", type=positive_float, default=_S, metavar="NORM",
                   help="clip the gradient norm (default off)")
    p.add_argument("--accum", type=_positive_int, default=_S, help="gradient accumulation steps (default 1)")
    p.add_argument("--channels-last", action="store_const", const=True, default=_S,
                   help="model and batches in channels-last memory format (often faster for conv models)")
    p.add_argument("--compile", action="store_const", const=True, default=_S,
                   help="torch.compile the training step's model (on a CPU it needs a C++ compiler)")
    p.add_argument("--ema", action="store_const", const=True, default=_S,
                   help="keep an EMA of the weights (evaluated too)")
    p.add_argument("--ema-decay", type=finite_float, default=_S, help=f"in (0, 1) (default {defaults['ema_decay']})")
    p.add_argument("--in-chans", type=_positive_int, default=_S,
                   help="model input channels (default: the data's; grayscale is repeated for 3)")
    p.add_argument("--augment", choices=["auto", "none", "crop", "crop-flip", "rrc", "rrc-flip"], default=_S,
                   help=f"auto (default): none for a run of fewer than {SHORT_RUN_EPOCHS} epochs, else a padded "
                        "random crop, plus flips where the data set allows them; rrc: timm's RandomResizedCrop")
    aug = p.add_argument_group("strong augmentation (classification; timm's flags and meanings)")
    aug.add_argument("--scale", type=finite_float, nargs=2, default=_S, metavar=("MIN", "MAX"),
                     help="RandomResizedCrop's area fraction range (default 0.08 1.0)")
    aug.add_argument("--ratio", type=finite_float, nargs=2, default=_S, metavar=("MIN", "MAX"),
                     help="RandomResizedCrop's aspect-ratio range (default 0.75 1.333)")
    aug.add_argument("--aa", default=_S, metavar="SPEC",
                     help="RandAugment, as timm spells it, e.g. rand-m9-mstd0.5-inc1 (default off)")
    aug.add_argument("--reprob", type=finite_float, default=_S, metavar="P",
                     help="random erasing probability per image, per-pixel noise (default 0)")
    aug.add_argument("--mixup", type=finite_float, default=_S, metavar="ALPHA",
                     help="mixup Beta alpha, e.g. 0.8 (default 0: off)")
    aug.add_argument("--cutmix", type=finite_float, default=_S, metavar="ALPHA",
                     help="cutmix Beta alpha, e.g. 1.0 (default 0: off)")
    aug.add_argument("--mixup-prob", type=finite_float, default=_S, metavar="P",
                     help="probability that a batch is mixed (default 1)")
    aug.add_argument("--mixup-switch-prob", type=finite_float, default=_S, metavar="P",
                     help="probability of cutmix instead of mixup when both are on (default 0.5)")
    p.add_argument("--objective", default=_S, metavar="NAME",
                   help="training objective (default ce; see formers.train.objectives: multires, matformer, ...)")
    p.add_argument("--matformer", dest="objective", action="store_const", const="matformer", default=_S,
                   help="train the nested MatFormer granularities jointly (= --objective matformer)")
    p.add_argument("--objective-kwargs", type=_json_object, default=_S, metavar="JSON",
                   help="keyword arguments of the objective, e.g. '{\"sizes\": [16, 24, 32]}'")
    p.add_argument("--multi-res", type=_size_list, default=_S, metavar="S1,S2,...",
                   help="multi-resolution training (ResFormer): every batch at each size, e.g. 128,160,224; "
                        "short for --objective multires --objective-kwargs '{\"sizes\": [...]}'")
    p.add_argument("--seed", type=int, default=_S, help="default 0")
    p.add_argument("--limit-train", type=_positive_int, default=_S, metavar="N",
                   help="use a fixed subset of N training images")
    p.add_argument("--save-every", type=nonnegative_int, default=_S, metavar="STEPS",
                   help=f"checkpoint every STEPS optimizer steps, and at each epoch's end "
                        f"(default {defaults['save_every']})")
    p.add_argument("--keep", type=_positive_int, default=_S, help="checkpoints kept (default 2)")
    p.add_argument("--eval-batch-size", type=_positive_int, default=_S, help="default 256")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT_JSON",
                   help="continue the run in --out from its newest checkpoint (or from the one given; "
                        "put the model name first: `formers train MODEL --resume`); with no checkpoint "
                        "in --out it refuses (one line, exit 2) rather than start over")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=_S,
                   help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("--log", dest="loggers", type=_name_list, default=_S, metavar="LIST",
                   help="also log every metrics.jsonl row to: tensorboard (OUT/tb/; pip install tensorboard), "
                        "csv (OUT/metrics_steps.csv, OUT/metrics_epochs.csv); comma-separated, e.g. "
                        "tensorboard,csv (default: metrics.jsonl only)")
    p.set_defaults(func=_cmd_train)

    e = subparsers.add_parser(
        "eval", help="top-1/top-5, loss and a confusion matrix of a weights file on a data set",
        description="Evaluate weights (from `formers train`, or any checkpoint create_model reads) on a test split.")
    e.error = types.MethodType(_one_line_error, e)
    e.add_argument("model", help="a registered model name")
    e.add_argument("--checkpoint", required=True, metavar="FILE", help="weights file (.safetensors, .pth)")
    _data_options(e, suppress=False)
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--split", choices=["test", "train", "all"], default=None,
                   help="which images (default: all of them for a --data file or folder without a test split "
                        "of its own, else the test split)")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="where the confusion matrix PNG and eval JSON go (default: beside the checkpoint)")
    e.add_argument("--threads", type=_positive_int, default=None)
    g = e.add_argument_group("segmentation models (task segment)")
    g.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="whole image (default) or sliding window (mmseg's slide_inference)")
    g.add_argument("--crop", type=_positive_int, default=None, metavar="S", help="sliding-window crop (SxS)")
    g.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                   help="sliding-window stride (default 2/3 of the crop)")
    g.add_argument("--flip", action="store_true", default=None, help="test-time left-right flip")
    g.add_argument("--scales", type=_scale_list, default=None, metavar="S1,S2,...",
                   help="test-time scales, e.g. 0.75,1,1.25 (probabilities averaged)")
    g.add_argument("--overlays", type=nonnegative_int, default=None, metavar="N",
                   help="colour overlays of the first N images in a PNG (default 8)")
    e.set_defaults(func=_cmd_eval)


def _cmd_train(args):
    import dataclasses as dc

    import torch

    from formers.cli import check_out_dir, resolve_device
    from formers.train.common import TrainingDiverged
    from formers.train.trainer import TrainConfig, train
    if hasattr(args, "multi_res"):
        kwargs = dict(getattr(args, "objective_kwargs", {}))
        other = getattr(args, "objective", "multires")
        clash = (f"cannot be combined with --objective {other}" if other != "multires"
                 else "and --objective-kwargs both give sizes" if "sizes" in kwargs else None)
        if clash:
            print(f"formers train: error: --multi-res {clash}", file=sys.stderr)
            return 2
        args.objective, args.objective_kwargs = "multires", {**kwargs, "sizes": args.multi_res}
    if args.threads:
        torch.set_num_threads(args.threads)
    if hasattr(args, "lr_mult"):
        args.lr_mult = dict(args.lr_mult)
    names = {f.name for f in dc.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "out" not in given:
        from formers.tasks import task_of
        given["out"] = f"runs/{args.model}-{given.get('dataset') or task_of(args.model).default_dataset}"
    check_out_dir(given["out"])
    resolve_device(given.get("device"))
    cfg = TrainConfig(**given)
    try:
        train(cfg, resume=args.resume, explicit=set(given))
    except TrainingDiverged as e:
        print(f"formers train: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args):
    import torch

    from formers.tasks import task_of
    if args.threads:
        torch.set_num_threads(args.threads)
    task = task_of(args.model)
    seg = {k: getattr(args, k) for k in ("mode", "crop", "stride", "flip", "scales", "overlays")
           if getattr(args, k) is not None}
    if seg and task.name != "segment":
        print(f"formers eval: error: --{next(iter(seg))} is for segmentation models; {args.model} is a "
              f"{task.name} model", file=sys.stderr)
        return 2
    if seg.get("mode") == "slide" and "crop" not in seg:
        print("formers eval: error: --mode slide needs --crop", file=sys.stderr)
        return 2
    task.run_eval(args.model, args.checkpoint, args.dataset, data=args.data, img_size=args.img_size,
                  batch_size=args.batch_size, limit_test=args.limit_test, precision=args.precision,
                  model_kwargs=args.model_kwargs, out=args.out, device=args.device, split=args.split, **seg)
    return 0
