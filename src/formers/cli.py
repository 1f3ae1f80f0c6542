"""The `formers` command: list | info | papers, and the subcommands of the train/bench/lra/export modules.

Each subsystem package that has a command line exposes `add_parser(subparsers)` (which sets
`func` on its parser); a bad argument ends with one line on stderr and exit status 2, any other
failure (out of memory included) with one line and exit status 1. The helpers below (devices,
output paths, number types) are shared by every command so that each refuses the same things
the same way.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import types

# packages that add subcommands (module, attribute); each is optional so a missing extra
# (e.g. matplotlib for training plots) only disables its own command
_SUBCOMMANDS = ["formers.train.cli", "formers.bench.cli", "formers.transforms.cli", "formers.lra.cli",
                "formers.export", "formers.predict"]


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class OutOfMemory(RuntimeError):
    """A run that does not fit in this machine's memory: printed as one line, exit status 1."""


# ---------------------------------------------------------------- helpers every command shares

def one_line_error(self, message):
    """argparse's `error`, as one line on stderr (no usage block) and exit status 2."""
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line_everywhere(parser: argparse.ArgumentParser):
    parser.error = types.MethodType(one_line_error, parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _one_line_everywhere(child)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def finite_float(text: str) -> float:
    """argparse type: a finite number (range checks belong to the option)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def resolve_device(name: str | None, option: str = "--device"):
    """The torch.device that `name` names (None: cuda when there is one, else cpu); a name torch
    does not know, or a device this machine lacks, is a ValueError that says what there is."""
    import torch
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {name!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name} was asked for but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{option} {name}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "meta":
        raise ValueError(f"{option} meta holds no data; use cpu or cuda")
    try:
        torch.empty(1, device=dev)
    except Exception:   # noqa: BLE001 - any backend's failure means the same thing here
        raise ValueError(f"{option} {name}: this machine's torch cannot use that device; use cpu"
                         + (" or cuda" if torch.cuda.is_available() else "")) from None
    return dev


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_dir(path, option: str = "--out") -> str:
    """Refuse, before any work, an output directory that cannot be made or written: an empty name,
    a path under (or at) a regular file, a folder without write permission."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{option} is empty; name the directory the outputs go to (--out . for the current one)")
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a file, not a directory; choose a directory path")
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        raise ValueError(f"{option} {path!r} is under {base!r}, which is a file, not a directory; "
                         "choose a directory path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path!r}: {base!r} is not writable; choose a directory you can write to")
    return path


def check_out_file(path, option: str = "--out") -> str:
    """The same checks for an output file: its folder must be makeable and writable, and the path
    itself must not be a directory."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{option} is empty; name the file the output goes to")
    path = str(path)
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; name a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path!r} exists and is not writable")
    check_out_dir(os.path.dirname(os.path.abspath(path)), option=f"{option} {path!r}: its folder")
    return path


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocator's failure (CPU or GPU)."""
    import torch
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)


def requested_bytes(e: BaseException) -> int | None:
    """The allocation size an allocator's message names, if it names one."""
    import re
    m = re.search(r"allocate (?:memory: you tried to allocate )?(\d+) bytes", str(e), re.I)
    if m:
        return int(m.group(1))
    m = re.search(r"tried to allocate ([\d.]+) (KiB|MiB|GiB|TiB)", str(e), re.I)
    if m:
        return int(float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2)[0])))
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def available_memory() -> int | None:
    """Bytes of host memory available now (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    if args.img_size is not None and args.img_size < 1:
        raise UsageError(f"--img-size must be a positive integer, got {args.img_size}")
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
    p.add_argument("--img-size", type=positive_int, default=None, help="default: the card's size")
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
    _one_line_everywhere(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:   # noqa: BLE001 - every path ends in one line; FORMERS_DEBUG=1 shows the traceback
        if os.environ.get("FORMERS_DEBUG"):
            raise
        return _report(args.command, e)


def _report(command: str, e: Exception) -> int:
    """One line on stderr for an error that ended a command; the exit status it deserves."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OutOfMemory):
        print(f"formers {command}: out of memory: {msg}", file=sys.stderr)
        return 1
    if is_out_of_memory(e):
        need = requested_bytes(e)
        print(f"formers {command}: out of memory" + (f" (an allocation of {fmt_bytes(need)} failed)" if need else "")
              + "; lower --batch-size or --img-size", file=sys.stderr)
        return 1
    if isinstance(e, (UsageError, ValueError, FileNotFoundError)):
        print(f"formers {command}: error: {msg}", file=sys.stderr)
        return 2
    if isinstance(e, ImportError):
        print(f"formers {command}: error: {msg}", file=sys.stderr)
        return 1
    if isinstance(e, OSError):
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        print(f"formers {command}: error: {e.strerror or msg}{where}", file=sys.stderr)
        return 2
    print(f"formers {command}: error: {type(e).__name__}: {msg} (FORMERS_DEBUG=1 shows the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    # through the package's module, so the error classes the subcommands raise are the ones caught here
    from formers.cli import main as _main
    sys.exit(_main())
