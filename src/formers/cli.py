"""The `formers` command: list | info | papers, and the subcommands of the train/bench packages.

Each subsystem package that has a command line exposes `add_parser(subparsers)` (which sets
`func` on its parser); a bad argument ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# packages that add subcommands (module, attribute); each is optional so a missing extra
# (e.g. matplotlib for training plots) only disables its own command
_SUBCOMMANDS = ["formers.train.cli", "formers.bench.cli", "formers.transforms.cli", "formers.lra.cli"]


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _cmd_list(args):
    import formers
    names = formers.list_models(args.pattern)
    for n in names:
        card = formers.model_info(n)
        params = f"{card['params_m']}M" if card["params_m"] else "-"
        print(f"{n:<40} {params:>10}  {card['img_size']:>4}px  [{card['paper']}] {card['title'][:60]}")
    print(f"{len(names)} model(s)")


def _fmt(v, unit=""):
    return "-" if v is None else f"{v}{unit}"


def _cmd_info(args):
    import torch

    import formers
    info = formers.model_info(args.name)
    print(f"{info['name']}  ({info['module']})")
    print(f"  paper   [{info['paper']}] {info['title']}")
    print(f"  arXiv   {info['arxiv']}    code: github.com/{info['repo']}    official name: {info['official_name']}")
    print(f"  status  {info['status']}" + (f"    notes: {info['notes']}" if info["notes"] else ""))
    size = args.img_size or info["img_size"]
    with torch.device("meta"):
        model = formers.create_model(args.name, img_size=args.img_size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = formers.count_flops(model, (model.in_chans, size, size)) / 1e9
    print(f"  {'':<14}{'paper':>10}{'measured':>12}")
    print(f"  {'params (M)':<14}{_fmt(info['params_m']):>10}{params:>12.2f}")
    paper_macs = info["macs_g"] if size == info["img_size"] else None
    print(f"  {'GMACs @' + str(size):<14}{_fmt(paper_macs):>10}{macs:>12.2f}")
    print(f"  {'top-1 (%)':<14}{_fmt(info['top1']):>10}{'-':>12}")
    cfg = info["pretrained_cfg"]
    print(f"  input {cfg['input_size']}  mean {cfg['mean']}  std {cfg['std']}  crop_pct {cfg['crop_pct']}")


def _cmd_papers(args):
    import formers
    papers = formers.list_papers()
    done = 0
    for p in papers:
        models = p["models"]
        done += bool(models)
        shown = ", ".join(models[:4]) + (f" (+{len(models) - 4})" if len(models) > 4 else "") if models else "not yet"
        print(f"{p['id']:>3}  {p['title'][:70]:<70}  {shown}")
    print(f"{done} of {len(papers)} papers implemented")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="formers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered models")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'swin*'")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="a model's card, with measured params and FLOPs beside the paper's")
    p.add_argument("name")
    p.add_argument("--img-size", type=int, default=None)
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("papers", help="the catalog's papers and the models implementing each")
    p.set_defaults(func=_cmd_papers)
    for module in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name and e.name.startswith("formers"):
                continue  # subsystem not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, ValueError, FileNotFoundError) as e:
        if os.environ.get("FORMERS_DEBUG"):
            raise
        print(f"formers {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
