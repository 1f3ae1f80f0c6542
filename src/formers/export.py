"""Export a model to a `torch.export` program (.pt2) or ONNX, and prove the export right.

    from formers.export import export_model
    export_model(model, "m.pt2", format="pt2", img_size=64, dynamic=True)
    formers export poolformer_s12 --format onnx --dynamic --img-size 64 --out m.onnx

The batch dimension is always dynamic; `dynamic=True` makes height and width dynamic too, in
steps of the model's `input_divisor` and from its `min_input_size`. After every export the
exported program is run (pt2: `torch.export.load(...).module()`, ONNX: onnxruntime) against
the eager model at the traced size and another batch size, and, when dynamic, at a second
image size; an output that differs by more than `atol` raises `ExportMismatch`, so an export
that traced the wrong thing (a shape branch specialised, a trace-time-only path) is never
written silently. ONNX needs `onnx`, `onnxscript` and `onnxruntime` (test extras), imported
only when asked for.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

__all__ = ["export_model", "ExportMismatch", "FORMATS", "add_parser"]

FORMATS = ("pt2", "onnx")


class ExportMismatch(RuntimeError):
    """The exported program's outputs differ from the eager model's."""


def _model_size(model: nn.Module, img_size) -> tuple[int, int]:
    if img_size is None:
        img_size = getattr(model, "img_size", None) or 224
    if isinstance(img_size, (tuple, list)):
        return int(img_size[0]), int(img_size[-1])
    return int(img_size), int(img_size)


def _divisor_and_min(model: nn.Module) -> tuple[int, int]:
    div = int(getattr(model, "input_divisor", 1) or 1)
    low = int(getattr(model, "min_input_size", 1) or 1)
    return div, max(low, div)


def _second_size(size: int, div: int, low: int) -> int:
    """Another size the model takes: the next multiple of its divisor above the traced size."""
    return size + max(div, 1)


def _leaves(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _onnx_modules():
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime "
                          "(or export with --format pt2)")
    import onnxruntime
    return onnxruntime


def _dynamic_shapes(model: nn.Module, dynamic: bool, declared: bool = True):
    """The dynamic_shapes of torch.export: the batch always, height and width with `dynamic`.
    declared: named dims from the model's input_divisor / min_input_size; else Dim.DYNAMIC hints,
    whose ranges torch.export infers (for a model whose declared limits are looser than its real ones)."""
    from torch.export import Dim
    if not declared:
        return {"x": {0: Dim.DYNAMIC, **({2: Dim.DYNAMIC, 3: Dim.DYNAMIC} if dynamic else {})}}
    shapes = {0: Dim("batch", min=1, max=4096)}
    if dynamic:
        div, low = _divisor_and_min(model)
        for axis, name in ((2, "height"), (3, "width")):
            if div == 1:
                shapes[axis] = Dim(name, min=max(2, low))
            else:
                shapes[axis] = div * Dim(f"{name}_over_{div}", min=max(1, math.ceil(low / div)))
    return {"x": shapes}


def _first_line(e: BaseException) -> str:
    lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if ln.startswith(("Not all values", "solving"))), "")
    return (lines[0] if lines else type(e).__name__) + (f" ({detail})" if detail else "")


def _torch_export(model, x, dynamic: bool, name: str, exporter):
    """Run `exporter(dynamic_shapes)` with the declared dims, then with inferred ranges; one clear
    ValueError when neither can make the asked-for dimensions dynamic."""
    try:
        return exporter(_dynamic_shapes(model, dynamic, declared=True))
    except Exception as first:   # noqa: BLE001 - constraint violations come as several exception types
        try:
            return exporter(_dynamic_shapes(model, dynamic, declared=False))
        except Exception:        # noqa: BLE001
            what = "batch, height and width" if dynamic else "batch"
            raise ValueError(f"{name} could not be exported with a dynamic {what}, traced at {tuple(x.shape)}: "
                             f"{_first_line(first)}" + ("; try without --dynamic, or another --img-size"
                                                        if dynamic else "")) from None


def _check(name: str, ref, got, atol: float, where: str):
    ref, got = _leaves(ref), [torch.as_tensor(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    got = [t for g in got for t in _leaves(g)]
    if len(ref) != len(got):
        raise ExportMismatch(f"{name}: the exported program returns {len(got)} output(s), the model {len(ref)}, "
                             f"at {where}")
    for i, (r, g) in enumerate(zip(ref, got)):
        if tuple(r.shape) != tuple(g.shape):
            raise ExportMismatch(f"{name}: output {i} has shape {tuple(g.shape)} in the exported program but "
                                 f"{tuple(r.shape)} in the model, at {where}")
        diff = (r.detach().float().cpu() - g.detach().float().cpu()).abs().max().item() if r.numel() else 0.0
        if not diff <= atol:
            raise ExportMismatch(f"{name}: the exported program differs from the model by {diff:.3g} "
                                 f"(> {atol:g}) at {where}; the export is wrong, not written as good")


def export_model(model: nn.Module, path: str, format: str = "pt2", img_size=None, dynamic: bool = False,
                 batch: int = 2, in_chans: int | None = None, atol: float = 1e-4, name: str | None = None) -> dict:
    """Export `model` (in eval mode, on the CPU) to `path` and verify the export; returns what was
    checked: {"path", "format", "dynamic", "checks": [(batch, h, w, max_abs_diff), ...]}.

    `img_size`: the traced size (default the model's own). `batch`: the traced batch (>= 2; the
    batch is always dynamic). `dynamic`: height and width dynamic too. `atol`: the largest absolute
    difference allowed between the exported program and the eager model on any output."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if batch < 2:
        raise ValueError(f"the traced batch must be at least 2 (a batch of 1 is specialised), got {batch}")
    name = name or type(model).__name__
    model = model.eval().cpu()
    h, w = _model_size(model, img_size)
    c = int(in_chans or getattr(model, "in_chans", 3) or 3)
    if hasattr(model, "check_input"):
        model.check_input(torch.empty(1, c, h, w))   # a size it cannot take: its own ValueError
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{os.getpid()}{ext}"    # written under its name only once verified
    try:
        checks = _export_and_verify(model, tmp, format, x, dynamic, name, atol, g)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": path, "format": format, "dynamic": dynamic, "checks": checks}


def _export_and_verify(model, path, format, x, dynamic, name, atol, g) -> list:
    import copy
    batch, c, h, w = x.shape
    sizes = [(batch, h, w), (batch + 1, h, w)]
    if dynamic:
        div, low = _divisor_and_min(model)
        sizes.append((batch + 1, _second_size(h, div, low), _second_size(w, div, low)))
    inputs = [x] + [torch.randn(b, c, hh, ww, generator=g) for b, hh, ww in sizes[1:]]
    # the eager outputs come first, from the model itself; the export traces a copy, so that nothing a
    # trace leaves behind (a size-keyed cache filled with traced tensors) reaches the reference or the caller
    with torch.no_grad():
        refs = [model(inp) for inp in inputs]
    traced = copy.deepcopy(model)
    if format == "pt2":
        def exporter(shapes):
            with torch.no_grad():
                return torch.export.export(traced, (x,), dynamic_shapes=shapes, strict=False)
        program = _torch_export(traced, x, dynamic, name, exporter)
        torch.export.save(program, path)
        runner = torch.export.load(path).module()

        def run(inp):
            with torch.no_grad():
                return runner(inp)
    else:
        ort = _onnx_modules()
        import contextlib
        import io
        import warnings

        def exporter(shapes):
            buf = io.StringIO()    # the dynamo exporter prints its progress; keep the output to our lines
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buf):
                warnings.simplefilter("ignore")
                return torch.onnx.export(traced, (x,), path, dynamo=True, dynamic_shapes=shapes, input_names=["x"],
                                         external_data=False, verbose=False)
        _torch_export(traced, x, dynamic, name, exporter)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(inp):
            return [torch.from_numpy(o) for o in session.run(None, {input_name: inp.numpy()})]
    checks = []
    for (b, hh, ww), inp, ref in zip(sizes, inputs, refs):
        try:
            got = run(inp)
        except Exception as e:   # noqa: BLE001 - a program that cannot run at a size it was exported for
            raise ExportMismatch(f"{name}: the exported program fails at batch {b}, {hh}x{ww}: "
                                 f"{_first_line(e)}") from None
        _check(name, ref, got, atol, f"batch {b}, {hh}x{ww}")
        diff = max(((r.float() - torch.as_tensor(o).float()).abs().max().item()
                    for r, o in zip(_leaves(ref), _leaves(got))), default=0.0)
        checks.append((b, hh, ww, diff))
    return checks


# ---------------------------------------------------------------- `formers export`

def add_parser(subparsers):
    from formers.cli import positive_float, positive_int
    p = subparsers.add_parser(
        "export", help="export a model to torch.export (.pt2) or ONNX, verified against the eager model",
        description="Export a registered model (or a trained weights file) and check the exported program's "
                    "outputs against the eager model's at the traced size, another batch size and, with "
                    "--dynamic, another image size. Any difference above --atol is an error (exit 1).")
    p.add_argument("model", help="a registered model name (see `formers list`)")
    p.add_argument("--format", choices=FORMATS, default="pt2")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic height and width (in steps of the model's input divisor); the batch is always dynamic")
    p.add_argument("--img-size", type=positive_int, default=None, help="traced size (default: the model's own)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="weights: a `formers train`/`formers transform` file, or any file create_model reads")
    p.add_argument("--num-classes", type=positive_int, default=None, help="head size (default: the checkpoint's)")
    p.add_argument("--batch", type=positive_int, default=2, help="traced batch, at least 2 (default 2)")
    p.add_argument("--atol", type=positive_float, default=1e-4, help="largest output difference allowed (default 1e-4)")
    p.add_argument("--out", default=None, metavar="FILE", help="default MODEL.pt2 / MODEL.onnx here")
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=_cmd_export)
    return p


def _load(args) -> nn.Module:
    import formers
    from formers.train.common import read_weights_metadata
    kwargs = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
        meta = read_weights_metadata(args.checkpoint)
        if meta.get("transforms"):
            from formers.transforms import load
            return load(args.checkpoint, args.model, **kwargs)
        if meta.get("architecture"):
            from formers.train.common import load_trained
            return load_trained(args.checkpoint, args.model, **kwargs)
        return formers.create_model(args.model, checkpoint=args.checkpoint, **kwargs)
    return formers.create_model(args.model, **kwargs)


def _cmd_export(args):
    import sys

    from formers.cli import check_out_file
    out = args.out if args.out is not None else f"{args.model}.{args.format}"
    check_out_file(out)
    if args.batch < 2:
        raise ValueError(f"--batch must be at least 2 (a batch of 1 is specialised by torch.export), got {args.batch}")
    if args.format == "onnx":
        _onnx_modules()                      # missing packages: one line before the model is built
    if args.threads:
        torch.set_num_threads(args.threads)
    import formers
    formers.registry.model_entry(args.model)  # an unknown name: a clear error with suggestions
    model = _load(args)
    try:
        res = export_model(model, out, format=args.format, img_size=args.img_size, dynamic=args.dynamic,
                           batch=args.batch, atol=args.atol, name=args.model)
    except ExportMismatch as e:
        print(f"formers export: error: {e}", file=sys.stderr)
        return 1
    checked = "; ".join(f"batch {b} {h}x{w}: {d:.1e}" for b, h, w, d in res["checks"])
    print(f"{args.model} -> {out} ({args.format}, batch dynamic" + (", height/width dynamic" if args.dynamic else "")
          + f"); verified against the eager model (max abs diff {checked})")
    return 0
