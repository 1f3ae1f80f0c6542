"""`formers transform NAME --model M [--checkpoint C] --out FILE [options of NAME]`.

Builds the model (from a `formers train` weights file, which records classes, size and
channels, or a registered name plus any checkpoint create_model reads), applies the
transform, prints params and GMACs before and after, and writes a safetensors file that
`formers.transforms.load(FILE)` (or `formers eval`-style code through it) rebuilds.
Each transform adds its own options: `formers transform NAME --help`.
"""
from __future__ import annotations

import argparse
import json
import types

from formers.cli import check_out_file, positive_int
from formers.cli import one_line_error as _one_line_error

__all__ = ["add_parser"]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_parser(subparsers):
    from formers.transforms.base import _TRANSFORMS, list_transforms
    p = subparsers.add_parser("transform", help="apply a whole-model transform and save a loadable checkpoint",
                              description=__doc__.splitlines()[0])
    p.error = types.MethodType(_one_line_error, p)
    sub = p.add_subparsers(dest="transform", required=True, metavar="NAME")
    for name in list_transforms():
        entry = _TRANSFORMS[name]
        t = sub.add_parser(name, help=entry.help, description=entry.help)
        t.error = types.MethodType(_one_line_error, t)
        t.add_argument("--model", required=True, help="registered model name")
        t.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weights: a `formers train` file (records classes/size/channels) or any loadable file")
        t.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON")
        t.add_argument("--out", required=True, metavar="FILE.safetensors")
        t.add_argument("--threads", type=positive_int, default=None)
        entry.add_arguments(t)
        t.set_defaults(func=_cmd_transform)


def _build(args):
    import formers
    from formers.train.common import read_weights_metadata
    from formers.transforms.base import load
    if args.checkpoint and read_weights_metadata(args.checkpoint).get("architecture"):
        return load(args.checkpoint, args.model, **args.model_kwargs)
    return formers.create_model(args.model, checkpoint=args.checkpoint, **args.model_kwargs)


def _cost(model):
    import torch

    import formers
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    was = model.training
    model.eval()
    with torch.no_grad():
        macs = formers.count_flops(model, (model.in_chans, size, size)) / 1e9
    model.train(was)
    return params, macs


def _cmd_transform(args):
    import torch

    from formers.transforms.base import get_transform, save
    check_out_file(args.out)               # before any work: an unwritable --out is one line
    if args.threads:
        torch.set_num_threads(args.threads)
    entry = get_transform(args.transform)
    model = _build(args)
    before = _cost(model)
    model = entry.run(model, args)
    after = _cost(model)
    meta = {"model_kwargs": args.model_kwargs, "img_size": model.img_size, "in_chans": model.in_chans,
            "transform_args": {k: v for k, v in vars(args).items() if k != "func" and _jsonable(v)}}
    save(model, args.out, metadata=meta)
    print(f"{args.transform} on {args.model}: params {before[0]:.3f}M -> {after[0]:.3f}M, "
          f"GMACs {before[1]:.3f} -> {after[1]:.3f}; wrote {args.out}")
    return 0


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
