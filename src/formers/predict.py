"""`formers predict`: the top-k classes, or the segmentation mask, of image files (timm's inference.py).

    formers predict MODEL INPUT [INPUT ...] --checkpoint FILE [--topk 5] [--out DIR] [--format csv|json]
                    [--batch-size N] [--threads N] [--device D] [--img-size S]
    formers predict tiny_vit_5m photos/ cat.jpg --checkpoint runs/tiny_vit_5m-folder/best.safetensors --topk 3
    formers predict segformer_b0 street.png --checkpoint seg.safetensors --out seg_out

INPUT: image files and folders (searched recursively for image files, taken in sorted order).

The preprocessing follows the weights file:
- weights written by `formers train` (their metadata records img_size, in_chans, mean, std and the
  classes): exactly what `formers eval` does to a folder's images for them: the image read grey or RGB
  as it is, resized bilinearly to img_size x img_size, normalised with the training split's mean and
  std, and mapped to the model's channels (`_read_images` and `BatchTransform`, the same functions);
- any other checkpoint (an official release, timm's file, a plain state dict): the model's
  pretrained_cfg, used as timm's resolve_data_config + create_transform(is_training=False) use it:
  the shorter side resized to floor(img_size / crop_pct) with the cfg's interpolation, a centre crop
  of img_size, the cfg's mean and std. A segmentation model sees the whole image instead, resized to
  img_size x img_size with the cfg's mean and std (a mask has to cover all of the image).
  The class count is the rows of the file's classifier weight; the classes are named by index.

The outputs go to --out (default: a `predict/` folder beside the checkpoint):
- classification: predictions.csv (path, class_1, prob_1, ..., class_k, prob_k) or, with
  --format json, predictions.json ([{path, topk: [{class, index, prob}]}]); a short table on stdout;
- segmentation: masks/<stem>.png (the class ids, a palette PNG at the image's own size: the scores
  are upsampled bilinearly to it before the argmax), overlays/<stem>.png (the classes' colours of
  `formers eval`'s overlays blended over the image), and predictions.json
  ([{path, mask, overlay, size, pixels: {class: count}}]).

A file that is not a readable image is skipped with one line on stderr and counted in the summary.
A missing input, a folder without images, no readable image at all, --topk above the number of
classes or a missing checkpoint ends the command with one line and exit status 2.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys

import torch

__all__ = ["add_parser", "find_images", "trained_transform", "pretrained_cfg_transform", "classifier_rows",
           "load_for_predict", "predict"]


def find_images(inputs) -> list[str]:
    """The image files that the inputs name: each file as given, each folder's image files (found
    recursively) in sorted order; a path named twice is taken once."""
    from formers.data.datasets import IMAGE_EXTENSIONS
    files = []
    for given in inputs:
        if os.path.isdir(given):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(given) for n in names
                           if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"folder {given!r} holds no images (none named *{', *'.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.exists(given):
            files.append(given)
        else:
            raise ValueError(f"input {given!r} does not exist")
    return list(dict.fromkeys(files))


def trained_transform(mean, std, in_chans: int, size: int):
    """path -> (in_chans, size, size) float tensor: `formers eval`'s preprocessing of a folder's images
    for weights from `formers train` (read grey or RGB as the image is, bilinear resize, the training
    split's normalisation, the model's channels)."""
    from formers.data import BatchTransform
    from formers.data.datasets import _read_images
    tf = BatchTransform(mean, std, in_chans)

    def preprocess(path: str) -> torch.Tensor:
        x, _, _ = _read_images([path], (size, size), None)
        return tf(x)[0]
    return preprocess


def pretrained_cfg_transform(cfg: dict, size: int, in_chans: int = 3):
    """path -> (in_chans, size, size) float tensor, as timm's create_transform(is_training=False) with
    resolve_data_config(model=...) prepares an image: converted to RGB (L for a 1-channel model), the
    shorter side resized to floor(size / crop_pct) with the cfg's interpolation (torchvision's
    Resize(int): the longer side in proportion, truncated), a centre crop of size x size, then
    (x / 255 - mean) / std."""
    from PIL import Image
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
    resample = resample[cfg.get("interpolation") or "bicubic"]
    scale = math.floor(size / (cfg.get("crop_pct") or 0.875))
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)

    def preprocess(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im = im.convert("RGB" if in_chans == 3 else "L")
        w, h = im.size
        short, long = min(w, h), max(w, h)
        if short != scale:
            new_long = int(scale * long / short)
            im = im.resize((scale, new_long) if w <= h else (new_long, scale), resample)
        w, h = im.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, -1).permute(2, 0, 1)
        return (x.float() / 255.0 - mean) / std
    return preprocess


def classifier_rows(model_name: str, checkpoint: str) -> int | None:
    """The class count of a checkpoint without training metadata: the rows of its classifier weight,
    under the key names the model file maps it to (None: the file has no classifier)."""
    import formers
    from formers.checkpoint import read_state_dict
    state = read_state_dict(checkpoint)
    with torch.device("meta"):
        model = formers.create_model(model_name)
    mapping = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if mapping is not None:
        state = mapping(state, model)
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def load_for_predict(model_name: str, checkpoint: str, img_size: int | None = None):
    """(model in eval mode, preprocess: path -> input tensor, class names) for a weights file."""
    import formers
    from formers.tasks import task_of
    from formers.train.common import check_model, read_weights_metadata
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    segment = task_of(model_name).name == "segment"
    meta = read_weights_metadata(checkpoint)
    kwargs = dict(meta.get("model_kwargs") or {})
    if "mean" in meta:   # written by `formers train`: build and preprocess as `formers eval` does
        num_classes, in_chans = meta["num_classes"], meta.get("in_chans", len(meta["mean"]))
        size = img_size or meta["img_size"]
        check_model(model_name, num_classes, in_chans, size, kwargs)
        if meta.get("transforms"):   # written by `formers transform`: rebuild the changed structure first
            from formers.transforms import load
            model = load(checkpoint, model_name, num_classes=num_classes, in_chans=in_chans, img_size=size, **kwargs)
        else:
            model = formers.create_model(model_name, num_classes=num_classes, in_chans=in_chans, img_size=size,
                                         checkpoint=checkpoint, **kwargs)
        preprocess = trained_transform(meta["mean"], meta["std"], in_chans, size)
    else:                # a foreign file: the model's pretrained_cfg
        num_classes = meta.get("num_classes") or classifier_rows(model_name, checkpoint)
        model = formers.create_model(model_name, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint,
                                     **kwargs)
        cfg = model.pretrained_cfg
        in_chans, h, w = cfg["input_size"]
        if h != w:
            raise ValueError(f"{model_name} takes {h}x{w} images; pass --img-size S for S x S")
        preprocess = (trained_transform(cfg["mean"], cfg["std"], in_chans, h) if segment
                      else pretrained_cfg_transform(cfg, h, in_chans))
    classes = [str(c) for c in meta.get("classes") or range(model.num_classes)]
    return model.eval(), preprocess, classes


def _batches(files, preprocess, batch_size: int, skipped: list):
    """(paths, inputs) of the readable files, batch_size at a time; an unreadable file is reported
    on stderr and appended to `skipped`."""
    from PIL import Image
    paths, xs = [], []
    for path in files:
        try:
            xs.append(preprocess(path))
        except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"formers predict: skipped: {why}" if repr(path) in why else
                  f"formers predict: skipped {path!r}: {why}", file=sys.stderr)
            skipped.append(path)
            continue
        paths.append(path)
        if len(paths) == batch_size:
            yield paths, torch.stack(xs)
            paths, xs = [], []
    if paths:
        yield paths, torch.stack(xs)


def _classify(model, batches, classes, k: int, device) -> list[dict]:
    rows = []
    for paths, x in batches:
        probs, idx = model(x.to(device)).float().softmax(1).topk(k, dim=1)
        for path, p, i in zip(paths, probs.tolist(), idx.tolist()):
            rows.append({"path": path, "topk": [{"class": classes[j], "index": j, "prob": q} for j, q in zip(i, p)]})
    return rows


def _segment(model, batches, classes, out: str, device) -> list[dict]:
    import numpy as np
    from PIL import Image

    from formers.tasks.segment import blend, palette, upsample
    colours = palette(len(classes))
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    os.makedirs(os.path.join(out, "overlays"), exist_ok=True)
    rows, used = [], set()
    for paths, x in batches:
        scores = model(x.to(device)).float()
        for path, s in zip(paths, scores):
            with Image.open(path) as im:
                image = im.convert("RGB")
            w, h = image.size
            pred = upsample(s[None], (h, w))[0].argmax(0).cpu()
            stem = name = os.path.splitext(os.path.basename(path))[0]
            n = 1
            while name in used:          # two inputs of one stem (in other folders): stem_2, stem_3, ...
                n += 1
                name = f"{stem}_{n}"
            used.add(name)
            mask_path = os.path.join(out, "masks", f"{name}.png")
            if len(classes) <= 256:      # the class ids as palette indices, shown in the overlay colours
                mask = Image.fromarray(pred.to(torch.uint8).numpy())
                mask.putpalette(colours.flatten().tolist())
            else:
                mask = Image.fromarray(pred.to(torch.int32).numpy())
            mask.save(mask_path)
            base = torch.from_numpy(np.array(image)).float()
            shown = blend(base, colours[pred].float()).clamp(0, 255).byte()
            overlay_path = os.path.join(out, "overlays", f"{name}.png")
            Image.fromarray(shown.numpy()).save(overlay_path)
            counts = torch.bincount(pred.flatten(), minlength=len(classes)).tolist()
            rows.append({"path": path, "mask": mask_path, "overlay": overlay_path, "size": [w, h],
                         "pixels": {classes[c]: n for c, n in enumerate(counts) if n}})
    return rows


@torch.no_grad()
def predict(model_name: str, inputs, checkpoint: str, topk: int | None = None, out: str | None = None,
            fmt: str | None = None, batch_size: int = 32, device: str | None = None,
            img_size: int | None = None) -> dict:
    """Predict every image the inputs name; write the outputs to `out` and return
    {"predictions": rows, "skipped": paths, "file": the predictions file}."""
    from formers.cli import check_out_dir, resolve_device
    from formers.tasks import task_of
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    segment = task_of(model_name).name == "segment"
    if segment and topk is not None:
        raise ValueError(f"--topk is for classification models; {model_name} is a segmentation model")
    if segment and fmt == "csv":
        raise ValueError(f"{model_name} is a segmentation model: its predictions are masks and a JSON file, "
                         "not --format csv")
    files = find_images(inputs)
    out = check_out_dir(out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "predict"))
    dev = resolve_device(device)
    model, preprocess, classes = load_for_predict(model_name, checkpoint, img_size)
    k = topk or min(5, len(classes))
    if k > len(classes):
        raise ValueError(f"--topk {k} is more than the {len(classes)} classes of {checkpoint!r}")
    model.to(dev)
    os.makedirs(out, exist_ok=True)
    skipped = []
    batches = _batches(files, preprocess, batch_size, skipped)
    if segment:
        rows = _segment(model, batches, classes, out, dev)
    else:
        rows = _classify(model, batches, classes, k, dev)
    if not rows:
        raise ValueError(f"none of the {len(files)} input file(s) is a readable image")
    fmt = "json" if segment else fmt or "csv"
    path = os.path.join(out, f"predictions.{fmt}")
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")])
            for r in rows:
                writer.writerow([r["path"]] + [v for t in r["topk"] for v in (t["class"], t["prob"])])
    _print_table(rows, segment)
    print(f"{model_name}: {len(rows)} image(s) predicted"
          + (f", {len(skipped)} unreadable file(s) skipped" if skipped else "") + f"; {path}")
    return {"predictions": rows, "skipped": skipped, "file": path}


def _print_table(rows, segment: bool, limit: int = 20):
    width = min(48, max(len(r["path"]) for r in rows))
    print(f"{'path':<{width}}  " + ("largest classes (share of pixels) -> mask" if segment else
                                    f"top-{len(rows[0]['topk'])} (class probability)"))
    for r in rows[:limit]:
        shown = r["path"] if len(r["path"]) <= width else "..." + r["path"][-width + 3:]
        if segment:
            total = r["size"][0] * r["size"][1]
            top = sorted(r["pixels"].items(), key=lambda kv: -kv[1])[:3]
            what = "  ".join(f"{c} {100 * n / total:.1f}%" for c, n in top) + f"  -> {r['mask']}"
        else:
            what = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["topk"])
        print(f"{shown:<{width}}  {what}")
    if len(rows) > limit:
        print(f"... and {len(rows) - limit} more")


def _cmd_predict(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    predict(args.model, args.inputs, args.checkpoint, topk=args.topk, out=args.out, fmt=args.format,
            batch_size=args.batch_size, device=args.device, img_size=args.img_size)
    return 0


def add_parser(subparsers):
    from formers.cli import positive_int
    p = subparsers.add_parser(
        "predict", help="top-k classes or segmentation masks of image files, from a weights file",
        description="Predict image files and folders with a weights file: the top-k classes of a classifier "
                    "(CSV or JSON), or the mask, overlay and class pixel counts of a segmentation model. Weights "
                    "from `formers train` are preprocessed as `formers eval` does; any other checkpoint with the "
                    "model's pretrained_cfg, as timm's eval transform.")
    p.add_argument("model", help="a registered model name (see `formers list`)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="weights file (.safetensors, .pth)")
    p.add_argument("--topk", type=positive_int, default=None, metavar="K",
                   help="classes per image (default 5, or every class when there are fewer)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the outputs go (default: predict/ beside the checkpoint)")
    p.add_argument("--format", choices=["csv", "json"], default=None,
                   help="classification output: predictions.csv (default) or predictions.json; "
                        "a segmentation model always writes JSON")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default 32")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--device", default=None, metavar="D", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--img-size", type=positive_int, default=None, metavar="S",
                   help="input size (default: the size the weights were trained at, else the model's)")
    p.set_defaults(func=_cmd_predict)
    return p
