"""MatFormer: nested FFNs for elastic inference (catalog 5).

"MatFormer: Nested Transformer for Elastic Inference", Devvrit, Kudugunta, Kusupati et al.,
arXiv 2310.07707. Every FFN's hidden layer is nested: granularity i uses only its first m_i
units (the paper: m in {h/8, h/4, h/2, h}), all granularities are trained jointly (the
official MatViT step sums the losses of the g uniform granularities), and Mix'n'Match then
picks one granularity per layer to extract hundreds of smaller models that were never
trained alone, each a plain model of the same architecture with narrower FFNs.

    m = formers.transforms.to_matformer(model)            # same parameters, nested forward
    formers.transforms.set_granularity(m, 0.25)           # every FFN at h/4 (or a list, one per FFN)
    sub = formers.transforms.extract_submodel(m, [0.25, 0.25, 0.5, 1, ...])   # physically smaller
    formers train swin_demo --matformer                   # = --objective matformer
    formers transform matformer --model swin_demo --checkpoint best.safetensors --granularity 0.5 --out s.safetensors

Which modules are FFNs: see `_ffn.py` (Mlp, ConvMlp, RMT's ConvFFN, anything with fc1/fc2 of
the same kind around elementwise ops and depthwise convs). The nested layers are the same
nn.Linear / nn.Conv2d objects with a forward that slices their weights, so the state dict of
a nested model is the plain model's: a `formers train --matformer` file loads into the plain
architecture, and Mix'n'Match extraction runs on it.
"""
from __future__ import annotations

import copy
import random
from fractions import Fraction
from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from formers.layers import Linear
from formers.train.objectives import Objective, register_objective

from ._ffn import cut_ffn, find_ffns, set_ffn_widths
from .base import TransformError, model_name, record_transform, register_transform

PAPER = 5

__all__ = ["to_matformer", "set_granularity", "extract_submodel", "granularity_widths", "MatFormerObjective",
           "DEFAULT_GRANULARITIES"]

DEFAULT_GRANULARITIES = (0.125, 0.25, 0.5, 1.0)   # h/8, h/4, h/2, h as in the paper


class NestedLinear(nn.Linear):
    """nn.Linear whose forward may use only its first `nest_out` outputs / `nest_in` inputs."""
    nest_out: int | None = None
    nest_in: int | None = None

    def forward(self, x):
        if self.nest_out is None and self.nest_in is None:
            return super().forward(x)
        w, b = self.weight, self.bias
        if self.nest_out is not None:
            w = w[:self.nest_out]
            b = b[:self.nest_out] if b is not None else None
        if self.nest_in is not None:
            w = w[:, :self.nest_in]
        return F.linear(x, w, b)


class NestedConv2d(nn.Conv2d):
    """nn.Conv2d (1x1, or depthwise over the hidden channels) with the same nesting."""
    nest_out: int | None = None
    nest_in: int | None = None

    def forward(self, x):
        if self.nest_out is None and self.nest_in is None:
            return super().forward(x)
        w, b, groups = self.weight, self.bias, self.groups
        if self.nest_out is not None:
            w = w[:self.nest_out]
            b = b[:self.nest_out] if b is not None else None
        if groups == 1 and self.nest_in is not None:
            w = w[:, :self.nest_in]
        if groups > 1:   # depthwise: one group per kept channel
            groups = w.shape[0]
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)


_NESTED = {nn.Linear: NestedLinear, Linear: NestedLinear, nn.Conv2d: NestedConv2d}


def _sites(model: nn.Module):
    sites = find_ffns(model)
    if not sites:
        raise TransformError(f"{model_name(model)}: MatFormer nests FFN hidden layers, and this model has no FFN "
                             f"(a module with fc1/fc2 Linear or 1x1 Conv2d layers around elementwise ops)")
    return sites


def _fraction(g, who: str) -> float:
    try:
        g = float(Fraction(g)) if isinstance(g, str) else float(g)
    except (TypeError, ValueError):
        raise TransformError(f"{who}: granularity {g!r} is not a number") from None
    if not 0.0 < g <= 1.0:
        raise TransformError(f"{who}: granularity {g} must be a fraction of the hidden width in (0, 1]")
    return g


def granularity_widths(model: nn.Module, granularity=None) -> list[int]:
    """The hidden width of every FFN for `granularity`: None (full), one fraction for all FFNs,
    or one fraction per FFN (in module order). Width = round(fraction * hidden), at least 1."""
    sites, who = _sites(model), model_name(model)
    if granularity is None:
        return [s.hidden for s in sites]
    if isinstance(granularity, (int, float, str, Fraction)):
        granularity = [granularity] * len(sites)
    granularity = list(granularity)
    if len(granularity) != len(sites):
        raise TransformError(f"{who}: {len(granularity)} granularities given, the model has {len(sites)} FFNs "
                             f"(give one fraction, or one per FFN)")
    return [max(1, int(_fraction(g, who) * s.hidden + 0.5)) for g, s in zip(granularity, sites)]


def to_matformer(model: nn.Module, granularities: Sequence[float] = DEFAULT_GRANULARITIES) -> nn.Module:
    """Make every FFN nested, in place (same parameter objects; the state dict keeps its keys and
    shapes); the model runs at full width until `set_granularity`. `granularities` (fractions of
    each FFN's hidden width) are what MatFormerObjective trains; they are kept on the model."""
    who = model_name(model)
    grans = tuple(sorted({_fraction(g, who) for g in granularities}))
    if not grans:
        raise TransformError(f"{who}: give at least one granularity")
    for site in _sites(model):
        for layer in [site.fc1, site.fc2] + [getattr(site.module, n) for n in site.mids]:
            if type(layer) in _NESTED:
                layer.__class__ = _NESTED[type(layer)]
    model.matformer_granularities = grans
    return set_granularity(model, None)


def _nested(model: nn.Module):
    sites = _sites(model)
    if not all(isinstance(s.fc1, (NestedLinear, NestedConv2d)) for s in sites):
        raise TransformError(f"{model_name(model)}: not a MatFormer model; call to_matformer(model) first")
    return sites


def set_granularity(model: nn.Module, granularity=None) -> nn.Module:
    """Run every FFN at `granularity` (None or 1: full; a fraction; or one fraction per FFN)."""
    sites = _nested(model)
    for site, w in zip(sites, granularity_widths(model, granularity)):
        n = None if w == site.hidden else w
        site.fc1.nest_out = n
        site.fc2.nest_in = n
        for name in site.mids:
            getattr(site.module, name).nest_out = n
    return model


def extract_submodel(model: nn.Module, granularity) -> nn.Module:
    """Mix'n'Match: a plain copy of `model` (same class) whose FFN i keeps only its first
    round(granularity[i] * hidden) units, with physically smaller weights. Recorded as
    "matformer" so `formers.transforms.load` rebuilds it. `model` itself is unchanged."""
    widths = granularity_widths(model, granularity)
    sub = copy.deepcopy(model)
    for site, w in zip(find_ffns(sub), widths):
        cut_ffn(site, w)     # also at full width: plain layers in place of nested ones
    sub.__dict__.pop("matformer_granularities", None)
    return record_transform(sub, "matformer", hidden=widths)


def _rebuild(model: nn.Module, hidden: list[int]) -> nn.Module:
    return set_ffn_widths(model, hidden, model_name(model))


# ------------------------------------------------------------------------ training objective

@register_objective
class MatFormerObjective(Objective):
    """Joint training of the nested granularities (`formers train M --matformer`).

    Each step runs the model at every granularity and adds the losses (reduce="sum", as the
    official MatViT step; "mean" divides by their number), or, with reduce="sample", at one
    granularity drawn per step (deterministic in the step: a resumed run draws the same).
    `weights` optionally scales each granularity's loss. The logits returned (for the running
    train accuracy) are the full model's when it is among the granularities; the model is left
    at full width, so evaluation measures the full model."""
    name = "matformer"

    def __init__(self, label_smoothing: float = 0.0, granularities: Sequence[float] = DEFAULT_GRANULARITIES,
                 reduce: str = "sum", weights: Sequence[float] | None = None, seed: int = 0):
        super().__init__(label_smoothing)
        grans = tuple(sorted({_fraction(g, "matformer objective") for g in granularities}))
        if reduce not in ("sum", "mean", "sample"):
            raise TypeError(f"reduce must be sum, mean or sample, got {reduce!r}")
        if weights is not None and len(weights) != len(grans):
            raise TypeError(f"{len(weights)} weights for {len(grans)} granularities")
        self.granularities, self.reduce, self.seed = grans, reduce, seed
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(grans)

    def prepare(self, model: nn.Module) -> nn.Module:
        return to_matformer(model, self.granularities)

    def __call__(self, model, x, y, step: int):
        if self.reduce == "sample":
            i = random.Random(self.seed * 1_000_003 + step).randrange(len(self.granularities))
            todo = [(self.granularities[i], 1.0)]
        else:
            todo = list(zip(self.granularities, self.weights))
        total, logits = 0.0, None
        try:
            for g, w in todo:
                set_granularity(model, g)
                out = model(x)
                total = total + w * self.loss(out, y)
                if logits is None or g == 1.0:
                    logits = out
        finally:
            set_granularity(model, None)
        if self.reduce == "mean":
            total = total / len(todo)
        return total, logits


# ------------------------------------------------------------------------ CLI

def _add_arguments(p):
    p.add_argument("--granularity", required=True, metavar="G[,G...]",
                   help="fraction of each FFN's hidden width to keep: one value for every FFN (0.5, 1/4) or one "
                        "per FFN in module order (Mix'n'Match), comma-separated")


def _run(model, args):
    parts = [s.strip() for s in str(args.granularity).split(",") if s.strip()]
    return extract_submodel(model, parts[0] if len(parts) == 1 else parts)


register_transform("matformer", "MatFormer Mix'n'Match: extract a submodel with the first fraction of each FFN's "
                   "hidden units (per layer)", _add_arguments, _run, _rebuild)
