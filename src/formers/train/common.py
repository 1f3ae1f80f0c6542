"""Pieces that training and evaluation share: building and checking a model for a data set,
mixed precision, and the metadata written into trained weights."""
from __future__ import annotations

import contextlib
import json
import math

import torch

import formers

__all__ = ["check_model", "default_img_size", "autocast", "read_weights_metadata",
           "weights_metadata", "load_trained", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _build(name: str, **kwargs):
    """The model on the meta device, for structural checks: weights files are not read there (the real
    build loads them)."""
    kwargs.pop("checkpoint", None)
    try:
        return formers.create_model(name, **kwargs)
    except ValueError:
        raise
    except Exception as e:  # a constructor's assert / shape error: say what was asked for
        shown = {k: v for k, v in kwargs.items() if v is not None}
        raise ValueError(f"{name} cannot be built with {shown}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def default_img_size(name: str, native: tuple[int, int], in_chans: int, num_classes: int,
                     model_kwargs: dict) -> int:
    """The size to train at when none is given: the data's own size, but at least 32 px (or the
    model's own default size where that is smaller) since hierarchical backbones downsample 32x,
    rounded up to the model's divisor; a model that takes one size only gets that size."""
    with torch.device("meta"):
        model = _build(name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None:
        return int(fixed[0]) if isinstance(fixed, (tuple, list)) else int(fixed)
    own = getattr(model, "img_size", None)
    own = min(own) if isinstance(own, (tuple, list)) else (own or 32)
    size = max(max(native), min(int(own), 32))
    div = int(getattr(model, "input_divisor", 1) or 1)
    return int(math.ceil(size / div) * div)


class _CountOutputs:
    """Counts the bytes of every tensor the ops of a forward pass create (on the meta device: no
    memory is used): about what training keeps for the backward pass, per image."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            total = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # views and in-place results alias an input: only fresh tensors take new memory
                fresh = [r.alias_info is None for r in func._schema.returns]
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for t, new in zip(outs, fresh + [True] * (len(outs) - len(fresh))):
                    if new and isinstance(t, torch.Tensor):
                        Mode.total += t.numel() * t.element_size()
                return out
        self.mode = Mode()

    @property
    def total(self) -> int:
        return type(self.mode).total


def check_model(name: str, num_classes: int, in_chans: int, img_size: int, model_kwargs: dict) -> int:
    """Build the model on the meta device and run one image through it: a size, channel count
    or keyword the model cannot take is a ValueError here, before any training. Returns the bytes
    the ops of that one-image forward pass create (an estimate of training's activation memory)."""
    if img_size < 1:
        raise ValueError(f"--img-size must be positive, got {img_size}")
    with torch.device("meta"):
        model = _build(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **model_kwargs)
    x = torch.empty(1, in_chans, img_size, img_size, device="meta")
    if hasattr(model, "check_input"):
        model.check_input(x)
    model.eval()
    counter = _CountOutputs()
    try:
        with torch.no_grad(), counter.mode:
            out = model(x)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{name} cannot take {in_chans}x{img_size}x{img_size} images: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    from formers.tasks import task_of
    problem = task_of(name).output_problem(out, num_classes)
    if problem:
        raise ValueError(f"{name} returned {problem}")
    return counter.total


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")


def weights_metadata(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def read_weights_metadata(path: str) -> dict:
    """The training metadata of a safetensors weights file written by `formers train` ({} otherwise)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}   # load_checkpoint reports the damage with its own clear message
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    if isinstance(meta.get("model_kwargs"), dict) and "checkpoint" in meta["model_kwargs"]:
        # the run's initial weights (e.g. a pretrained encoder): this file's own weights replace them
        meta["init_checkpoint"] = meta["model_kwargs"].pop("checkpoint")
    return meta


def load_trained(path: str, name: str | None = None, **overrides):
    """Rebuild a model trained by `formers train` from its weights file alone (the file records
    the architecture, classes, input size, channels and model keyword arguments)."""
    meta = read_weights_metadata(path)
    name = name or meta.get("architecture")
    if not name:
        raise ValueError(f"{path!r} does not record its architecture; pass the model name")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(num_classes=meta.get("num_classes"), img_size=meta.get("img_size"),
                  in_chans=meta.get("in_chans"))
    kwargs.update(overrides)
    return formers.create_model(name, checkpoint=path, **kwargs)
