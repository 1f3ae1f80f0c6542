"""`formers bench`: throughput, memory and FLOP-rate, optionally beside timm (see harness.py)."""
from __future__ import annotations

import argparse
import ast
import os
import sys

import torch

from formers.cli import check_out_file, positive_float, positive_int, nonnegative_int, resolve_device

from .harness import BenchError, benchmark, csv_columns
from .machine import cache_path, machine_limits
from .report import format_table, plot_peer, plot_sweep, write_csv

__all__ = ["add_parser", "run"]

_EXAMPLES = """examples:
  formers bench swin_tiny_patch4_window7_224 --peer timm --batch-size 8 --mode both
  formers bench swin_demo --sweep img-size=32,64,128 --out runs/bench/demo.csv
  formers bench --machine            (measure this machine's fp32/bf16 matmul limits, cached)
"""


def _kwargs(items, model: str, option: str) -> dict:
    """The KEY=VALUE items that apply to `model` (an item `MODEL:KEY=VALUE` applies to MODEL only)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        scope, colon, key = key.rpartition(":")
        if not sep or not key:
            raise BenchError(f"{option} takes [MODEL:]KEY=VALUE, got {item!r}")
        if colon and scope != model:
            continue
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


def _sweep_sizes(spec: str) -> list[int]:
    key, sep, values = spec.partition("=")
    if not sep or key.replace("_", "-") != "img-size":
        raise BenchError(f"--sweep takes img-size=S1,S2,..., got {spec!r}")
    try:
        sizes = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--sweep: image sizes must be integers, got {values!r}") from None
    if not sizes or min(sizes) < 1:
        raise BenchError(f"--sweep: no valid image sizes in {values!r}")
    return sizes


def _print_limits(limits: dict):
    g = limits["gflops"]
    paths = "  ".join(f"{k} {v:.0f}" for k, v in sorted(g.items()))
    lim = limits["limit_gflops"]
    print(f"machine {limits['key']}  (torch {limits['torch']}, {limits['matmul_n']}^2 matmuls, {limits['measured']})")
    print(f"  GFLOP/s by path: {paths}")
    print(f"  limits: fp32 {lim['fp32']:.0f} GFLOP/s, bf16 {lim['bf16']:.0f} GFLOP/s   (cache: {cache_path()})")


def run(args) -> int:
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    # every check that needs no work comes first: a bad device or output path is one line, at once
    dev_name = str(resolve_device(args.device))
    device = args.device or None
    if args.out is not None:
        check_out_file(args.out)
    if args.plot is not None:
        check_out_file(args.plot, "--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.machine:
        limits = machine_limits(dev_name, measure=True)
        _print_limits(limits)
        if not args.models:
            return 0
    else:
        limits = machine_limits(dev_name, measure=None if args.peak else False)
    if not args.models:
        raise BenchError("name at least one model (formers list shows them), or use --machine")
    opts = dict(peer=args.peer, batch_size=args.batch_size, precision=args.precision, mode=args.mode,
                compile=args.compile, optimized=args.optimize, threads=args.threads, min_time=args.min_time,
                repeats=args.repeats, warmup=args.warmup, device=device, limits=limits, log=log)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    if args.sweep and args.img_size:
        raise BenchError("--sweep img-size=... sets the image sizes; drop --img-size")
    sizes = _sweep_sizes(args.sweep) if args.sweep else [args.img_size]
    rows = []
    try:
        for name in args.models:  # one at a time, so a failing model still leaves the others' results
            kw = dict(model_kwargs=_kwargs(args.model_kwargs, name, "--model-kwargs"),
                      ours_kwargs=_kwargs(args.ours_kwargs, name, "--ours-kwargs"),
                      peer_kwargs=_kwargs(args.peer_kwargs, name, "--peer-kwargs"))
            for size in sizes:
                rows += benchmark([name], img_size=size, **kw, **opts)
    finally:
        if rows:
            print(format_table(rows, modes))
            if args.out:
                write_csv(rows, args.out, csv_columns(modes, peak=limits is not None, sweep=bool(args.sweep)))
                print(f"wrote {args.out}")
    if args.sweep:
        plot = args.plot or (os.path.splitext(args.out)[0] + "_sweep.png" if args.out else "bench_sweep.png")
        plot_sweep(rows, plot, mode=modes[0])
        print(f"wrote {plot}")
    elif args.peer and (args.out or args.plot):
        plot = args.plot or os.path.splitext(args.out)[0] + ".png"
        plot_peer(rows, plot, modes)
        print(f"wrote {plot}")
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="images/s, memory, GMACs and GFLOP/s, optionally side by side with timm",
        description=__doc__.splitlines()[0], epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="registered model names")
    p.add_argument("--peer", choices=["timm", "hf"], default=None,
                   help="also time the peer library's model of the same name, with the same weights, interleaved")
    p.add_argument("--batch-size", "-b", type=positive_int, default=8)
    p.add_argument("--img-size", type=positive_int, default=None, help="default: the model's own input size")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: torch.autocast")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="infer")
    p.add_argument("--compile", action="store_true", help="torch.compile ours and the peer's")
    p.add_argument("--optimize", action="store_true", help="time ours through formers.optimize (inference)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (at least 1)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when there is one)")
    p.add_argument("--out", default=None, metavar="FILE.csv", help="write the results as CSV")
    p.add_argument("--min-time", type=positive_float, default=2.0, help="seconds of each timed loop")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed loops per model (the median is reported)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps first")
    p.add_argument("--model-kwargs", nargs="+", default=None, metavar="[MODEL:]KEY=VALUE",
                   help="extra create_model arguments, for ours and the peer's (e.g. window_size=4); "
                        "a MODEL: prefix applies one to that model only")
    p.add_argument("--ours-kwargs", nargs="+", default=None, metavar="[MODEL:]KEY=VALUE",
                   help="the same, for our model only (e.g. poolformer_s12:final_norm=layer, timm's variant)")
    p.add_argument("--peer-kwargs", nargs="+", default=None, metavar="[MODEL:]KEY=VALUE",
                   help="the same, for the peer's model only")
    p.add_argument("--sweep", default=None, metavar="img-size=S1,S2,...",
                   help="benchmark at each image size and plot img/s and memory against tokens")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="where the plot goes (--sweep: img/s and memory against tokens; --peer: ours beside "
                        "the peer's); default: beside --out")
    p.add_argument("--machine", action="store_true",
                   help="measure this machine's fp32/bf16 matmul limits now and cache them")
    p.add_argument("--peak", action="store_true",
                   help="report the fraction of the machine's limit (measured once, then cached)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
    return p
