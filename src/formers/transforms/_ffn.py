"""The feed-forward blocks of a zoo model, found by structure, and how to narrow their hidden layer.

Shared by the transforms that act on FFN hidden units (matformer: nested prefixes of the
hidden layer; sparse: removing the units a group penalty zeroed). An FFN here is a module
with children `fc1` and `fc2` (both `nn.Linear`, or both 1x1 `nn.Conv2d` with one group)
where `fc1`'s outputs are `fc2`'s inputs, and whose other children with parameters are
depthwise `nn.Conv2d` over those hidden channels (RMT's ConvFFN) or hold only scalar
parameters (StarReLU's scale and bias). Everything else between
fc1 and fc2 (activation, dropout) must act on each hidden unit alone: that is what makes
"keep hidden units `idx`" a well-defined smaller FFN. This covers `layers.Mlp`,
`layers.ConvMlp` and RMT's ConvFFN; a classifier head built the same way (MetaFormer's
MlpHead normalises over the hidden layer) is never taken.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from formers.layers import Linear

__all__ = ["FFNSite", "find_ffns", "cut_ffn", "set_ffn_widths"]


@dataclasses.dataclass
class FFNSite:
    name: str                 # module path of the FFN, e.g. "stages.0.blocks.1.mlp"
    module: nn.Module
    mids: tuple[str, ...]     # names of the depthwise convs over the hidden channels

    @property
    def fc1(self) -> nn.Module:
        return self.module.fc1

    @property
    def fc2(self) -> nn.Module:
        return self.module.fc2

    @property
    def hidden(self) -> int:
        return _width(self.module.fc1, out=True)


def _pointwise(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1))


def _width(m: nn.Module, out: bool) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    return m.out_channels if out else m.in_channels


def _depthwise(m: nn.Module, channels: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == channels == m.in_channels == m.out_channels
            and m.padding_mode == "zeros")


def _site(name: str, module: nn.Module) -> FFNSite | None:
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    if not (isinstance(fc1, nn.Module) and isinstance(fc2, nn.Module) and _pointwise(fc1) and _pointwise(fc2)):
        return None
    if isinstance(fc1, nn.Linear) != isinstance(fc2, nn.Linear):
        return None
    hidden = _width(fc1, out=True)
    if _width(fc2, out=False) != hidden:
        return None
    mids = []
    for child_name, child in module.named_children():
        if child_name in ("fc1", "fc2") or all(q.numel() == 1 for q in child.parameters()):
            continue   # parameter-free or scalar-parameter elementwise ops (GELU, dropout, StarReLU)
        if not _depthwise(child, hidden):
            return None
        mids.append(child_name)
    return FFNSite(name, module, tuple(mids))


def find_ffns(model: nn.Module) -> list[FFNSite]:
    """Every FFN of the model in module order (the order of the forward pass in the zoo)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    sites = []
    for name, module in model.named_modules():
        if head is not None and module is head:
            continue
        site = _site(name, module)
        if site is not None:
            sites.append(site)
    return sites


def _take(t: torch.Tensor | None, idx: torch.Tensor, dim: int):
    if t is None:
        return None
    return nn.Parameter(t.detach().index_select(dim, idx.to(t.device)).clone(), requires_grad=t.requires_grad)


def _narrow(layer: nn.Module, idx: torch.Tensor, side: str) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d holding only the hidden units `idx` of `layer`.

    side: "out" (fc1: rows), "in" (fc2: columns), "both" (depthwise conv: channels)."""
    n = int(idx.numel())
    w, b = layer.weight, layer.bias
    kw = dict(device=w.device, dtype=w.dtype)
    if isinstance(layer, nn.Linear):
        new = Linear(n if side == "in" else layer.in_features, n if side == "out" else layer.out_features,
                     bias=b is not None, **kw)
    else:
        cin = n if side in ("in", "both") else layer.in_channels
        cout = n if side in ("out", "both") else layer.out_channels
        new = nn.Conv2d(cin, cout, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        groups=n if side == "both" else 1, bias=b is not None, **kw)
    new.weight = _take(w, idx, 1 if side == "in" else 0)
    if b is not None:
        new.bias = _take(b, idx, 0) if side != "in" else nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
    new.train(layer.training)
    return new


def cut_ffn(site: FFNSite, keep) -> None:
    """Keep the hidden units `keep` (an int n: the first n; or a 1-D index tensor) of one FFN,
    with physically smaller plain layers (copies of the kept weights)."""
    if isinstance(keep, int):
        if not 1 <= keep <= site.hidden:
            raise ValueError(f"{site.name}: hidden width {keep} outside 1..{site.hidden}")
        keep = torch.arange(keep)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    m = site.module
    m.fc1 = _narrow(m.fc1, keep, "out")
    m.fc2 = _narrow(m.fc2, keep, "in")
    for name in site.mids:
        setattr(m, name, _narrow(getattr(m, name), keep, "both"))


def set_ffn_widths(model: nn.Module, widths: list[int], who: str = "") -> nn.Module:
    """Narrow FFN i to its first widths[i] hidden units (the structure a recorded cut rebuilds;
    the weights come from the file afterwards)."""
    sites = find_ffns(model)
    if len(sites) != len(widths):
        raise ValueError(f"{who or type(model).__name__}: the record lists {len(widths)} FFN widths, "
                         f"the model has {len(sites)} FFNs")
    for site, w in zip(sites, widths):
        if int(w) != site.hidden:
            cut_ffn(site, int(w))
    return model
