"""`formers.optimize(model)`: an opt-in inference path that keeps the model's outputs.

What it does, in order:
- eval mode (dropout and drop-path off);
- channels-last memory format for the weights and the input when convolutions carry most
  of the multiply-accumulates (decided by counting them on one example image);
- for precision='bf16', a wrapper that runs the forward under `torch.autocast(bfloat16)` and
  returns float32 again (LayerNorm, softmax and reductions stay in float32 under autocast);
- with compile=True, `torch.compile` with inductor's freezing (weights become constants, so
  inductor can fold them and pre-pack linear/conv weights for oneDNN on CPU). Freezing needs
  autograd off, so the returned module always runs under `torch.no_grad()`.

The model is changed in place only in ways that keep its own outputs (eval mode, weight
memory format); the returned module holds it as `.model`. Given `example_input`, the
optimized outputs are checked against the original's before returning (and, when compiling,
the compilation happens there): fp32 within 1e-4 and bf16 within 5e-2, both relative to
the largest logit magnitude (at least 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["optimize", "OptimizedModel", "compare_outputs", "conv_mac_fraction", "TOLERANCE"]

# max |a - b| allowed, as a fraction of max(1, max |reference|)
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def compare_outputs(out, ref, precision: str = "fp32") -> tuple[bool, float, float]:
    """(within tolerance, largest absolute difference, the tolerance) of two outputs (tensor or nest)."""
    a, _ = tree_flatten(out)
    b, _ = tree_flatten(ref)
    a = [t for t in a if isinstance(t, torch.Tensor)]
    b = [t for t in b if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        shapes = [tuple(t.shape) for t in a], [tuple(t.shape) for t in b]
        raise ValueError(f"outputs have different shapes: {shapes[0]} vs {shapes[1]}")
    err = max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(y.float().abs().max()) for y in b if y.numel()), default=0.0)
    tol = TOLERANCE[precision] * max(1.0, scale)
    return err <= tol, err, tol


def _example(model: nn.Module, example_input):
    if example_input is not None:
        return example_input[:1]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        img = getattr(model, "img_size", 224)
        h, w = (img, img) if isinstance(img, int) else img
        size = (getattr(model, "in_chans", 3), h, w)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.randn(1, *size, device=device)


def conv_mac_fraction(model: nn.Module, example_input=None) -> float:
    """The share of a forward's multiply-accumulates spent in convolutions (one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    import formers.flops  # noqa: F401  (registers the CPU attention kernel's formula)

    x = _example(model, example_input)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    per_op = counter.get_flop_counts().get("Global", {})
    total = sum(per_op.values())
    conv = sum(v for op, v in per_op.items() if "convolution" in str(op))
    return conv / total if total else 0.0


def _to_dtype(out, dtype):
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)


class OptimizedModel(nn.Module):
    """The inference wrapper `optimize` returns: memory format, autocast and no_grad around `.model`."""

    def __init__(self, model: nn.Module, precision: str = "fp32", channels_last: bool = False,
                 compiled: bool = False):
        super().__init__()
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = compiled
        self._run = self._forward
        if compiled:
            # freezing: parameters are constants of the compiled graph (inference only)
            self._run = torch.compile(self._forward, options={"freezing": True})

    def _forward(self, x):
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.model(x)
            return _to_dtype(out, x.dtype)
        return self.model(x)

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self._run(x)

    def extra_repr(self) -> str:
        return f"precision={self.precision}, channels_last={self.channels_last}, compiled={self.compiled}"


def optimize(model: nn.Module, precision: str = "bf16", compile: bool = False, example_input=None,
             channels_last: bool | None = None) -> OptimizedModel:
    """An inference-only version of `model` whose outputs equal the original's (see module doc).

    channels_last=None decides by the share of convolution MACs (> 1/2); with `example_input`
    the result is checked against the original and a ValueError is raised if it differs.
    """
    if precision not in TOLERANCE:
        raise ValueError(f"optimize: precision must be one of {sorted(TOLERANCE)}, got {precision!r}")
    model.eval()
    ref = None
    if example_input is not None:
        with torch.no_grad():
            ref = model(example_input)
    if channels_last is None:
        channels_last = conv_mac_fraction(model, example_input) > 0.5
    if channels_last:
        model.to(memory_format=torch.channels_last)
    fast = OptimizedModel(model, precision, channels_last, compiled=compile)
    if ref is not None:
        ok, err, tol = compare_outputs(fast(example_input), ref, precision)
        if not ok:
            name = getattr(model, "model_name", type(model).__name__)
            raise ValueError(f"optimize({name}, precision={precision!r}, compile={compile}): outputs differ from "
                             f"the original by {err:.3g} (tolerance {tol:.3g})")
    return fast
