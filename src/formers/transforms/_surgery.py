"""Structural surgery shared by the pruning (prune.py) and OT fusion (otfusion.py) transforms.

A model's prunable / permutable structure is described as `Units`: a set of interchangeable
units (the heads of one attention, the hidden neurons of one FFN, the channels of one residual
stream) and every tensor axis (`Slot`) that is indexed by them. One operation, `select(units,
index)`, keeps the units in `index`, in that order, on every slot at once: a subset removes
units physically (smaller tensors, not masks), a permutation reorders them. Module attributes
that record widths (Linear.in_features, LayerNorm.normalized_shape, attention num_heads, the
model's num_features / feature_info) follow.

    heads     an attention module with num_heads, head_dim, a fused `qkv` (rows q|k|v, each
              heads x head_dim) or `q` + `kv`, and `proj` (columns heads x head_dim); per-head
              tables (Swin's relative position bias) go with their head.
    neurons   an Mlp / ConvMlp: fc1 rows (and bias), fc2 columns.
    channels  the residual stream of one stage: the layer that writes it (patch embedding or
              downsampling), position tables and tokens, every norm, input column and output
              row of the blocks on it, and the layer that reads it after the stage (next
              downsampling, or the final norm and classifier). Described per family: Swin and
              PVT (SwinTransformer, PyramidVisionTransformer); other families raise TransformError.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .base import TransformError, model_name

__all__ = ["Slot", "Units", "select", "head_units", "neuron_units", "channel_units", "all_units",
           "unit_sizes", "resize_units", "unit_reduce", "unit_features", "check_permutation_invariance"]


@dataclasses.dataclass
class Slot:
    """Axis `axis` of `module.<name>`, laid out as [repeat][unit][block] (size repeat*units*block).

    `anchor` marks a slot whose other axes do not depend on any unit set of the same stage
    (a patch embedding's rows, a position table): OT fusion aligns a stream on these first.
    """
    module: nn.Module
    name: str
    axis: int
    repeat: int = 1
    block: int = 1
    anchor: bool = False

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def positions(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """Positions along `axis` of the units in `index`, in the slot's layout."""
        r = torch.arange(self.repeat)[:, None, None] * size * self.block
        b = torch.arange(self.block)[None, None, :]
        return (r + index[None, :, None] * self.block + b).reshape(-1)


@dataclasses.dataclass
class Units:
    kind: str                 # "heads" | "neurons" | "channels"
    name: str                 # module path (heads, neurons) or "stages.i" (channels)
    size: int
    slots: list[Slot]
    owner: nn.Module | None = None     # attention (num_heads) or None
    blocks: list[nn.Module] = dataclasses.field(default_factory=list)  # channels: blocks on the stream

    @property
    def key(self) -> str:
        return f"{self.name}:{self.kind}"


# ----------------------------------------------------------------------------- selecting


def _sync(module: nn.Module):
    """Make width attributes agree with the (resized) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        if module.groups == module.in_channels == module.out_channels and module.weight.shape[1] == 1:
            module.groups = module.in_channels = module.out_channels = module.weight.shape[0]   # depthwise
        elif module.groups == 1:
            module.out_channels, module.in_channels = module.weight.shape[:2]
        else:
            raise TransformError(f"grouped convolution {module} cannot be resized here")
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


@torch.no_grad()
def select(units: Units, index) -> Units:
    """Keep units `index` (a subset removes, a permutation reorders) on every slot; in place."""
    index = torch.as_tensor(index, dtype=torch.long).cpu()
    if index.numel() == 0:
        raise TransformError(f"{units.key}: cannot remove every unit")
    touched = []
    for slot in units.slots:
        old = slot.tensor
        pos = slot.positions(index, units.size).to(old.device)
        new = old.index_select(slot.axis, pos)
        if isinstance(old, nn.Parameter):
            setattr(slot.module, slot.name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            slot.module.register_buffer(slot.name, new)
        if slot.module not in touched:
            touched.append(slot.module)
    for m in touched:
        _sync(m)
    units.size = index.numel()
    if units.kind == "heads":
        units.owner.num_heads = units.size
    return units


# ----------------------------------------------------------------------------- finding units


def _attention_kinds():
    from formers.layers.attention import Attention
    from formers.models.pvt import SpatialReductionAttention
    from formers.models.swin import WindowAttention
    return (Attention, WindowAttention, SpatialReductionAttention)


def _linear_slots(linear: nn.Linear, axis: int, **kw) -> list[Slot]:
    slots = [Slot(linear, "weight", axis, **kw)]
    if axis == 0 and linear.bias is not None:
        slots.append(Slot(linear, "bias", 0, **kw))
    return slots


def _attention_heads(path: str, attn: nn.Module, model: nn.Module) -> Units:
    h, d = attn.num_heads, attn.head_dim
    if getattr(attn, "qkv", None) is not None:
        if attn.qkv.out_features != 3 * h * d:
            raise TransformError(f"{model_name(model)}: {path}.qkv has {attn.qkv.out_features} outputs, "
                                 f"not 3 x {h} heads x {d}")
        slots = _linear_slots(attn.qkv, 0, repeat=3, block=d)
    elif getattr(attn, "q", None) is not None and getattr(attn, "kv", None) is not None:
        slots = _linear_slots(attn.q, 0, block=d) + _linear_slots(attn.kv, 0, repeat=2, block=d)
    else:
        raise TransformError(f"{model_name(model)}: {path} has neither qkv nor q/kv projections")
    slots.append(Slot(attn.proj, "weight", 1, block=d))
    for name, p in attn.named_parameters(recurse=False):
        if "bias_table" in name and p.shape[-1] == h:   # one column per head (Swin)
            slots.append(Slot(attn, name, p.dim() - 1))
    return Units("heads", path, h, slots, owner=attn)


def head_units(model: nn.Module) -> list[Units]:
    """Every attention module's heads, in module order; an attention we cannot cut raises."""
    kinds = _attention_kinds()
    out = []
    for path, m in model.named_modules():
        if isinstance(m, kinds):
            out.append(_attention_heads(path, m, model))
        elif hasattr(m, "qkv") and hasattr(m, "proj") and hasattr(m, "num_heads"):
            raise TransformError(f"{model_name(model)}: attention {path} ({type(m).__name__}) has a layout "
                                 f"these transforms do not cut (supported: {', '.join(k.__name__ for k in kinds)})")
    return out


def neuron_units(model: nn.Module) -> list[Units]:
    """Every FFN's hidden layer (found by structure in _ffn.py: Mlp, ConvMlp, RMT's ConvFFN), in
    module order: fc1 rows (+bias), the depthwise convs between (channels), fc2 columns."""
    from ._ffn import find_ffns
    out = []
    for site in find_ffns(model):
        slots = [Slot(site.fc1, "weight", 0)] + ([Slot(site.fc1, "bias", 0)] if site.fc1.bias is not None else [])
        for name in site.mids:
            conv = getattr(site.module, name)
            slots += [Slot(conv, "weight", 0)] + ([Slot(conv, "bias", 0)] if conv.bias is not None else [])
        slots.append(Slot(site.fc2, "weight", 1))
        out.append(Units("neurons", site.name, site.hidden, slots))
    return out


def _norm_slots(norm: nn.Module, **kw) -> list[Slot]:
    if not isinstance(norm, nn.LayerNorm):
        raise TransformError(f"norm {type(norm).__name__} is not a LayerNorm")
    return [Slot(norm, n, 0, **kw) for n in ("weight", "bias") if getattr(norm, n) is not None]


def _block_slots(block: nn.Module) -> list[Slot]:
    """The residual-stream axes of a pre-norm block x + attn(norm1(x)); x + mlp(norm2(x))."""
    attn, mlp = block.attn, block.mlp
    slots = _norm_slots(block.norm1) + _norm_slots(block.norm2)
    reduced = getattr(attn, "sr", None) is not None    # PVT: keys/values read a reduced copy of the stream
    for name in ("qkv", "q") + (() if reduced else ("kv",)):
        if getattr(attn, name, None) is not None:
            slots.append(Slot(getattr(attn, name), "weight", 1))
    if reduced:
        slots.append(Slot(attn.sr, "weight", 1))
    slots += _linear_slots(attn.proj, 0)
    slots.append(Slot(mlp.fc1, "weight", 1))
    slots += _linear_slots(mlp.fc2, 0)
    return slots


def _embed_slots(embed: nn.Module) -> list[Slot]:
    """A PatchEmbed (conv + LayerNorm) writing the stream: conv rows, bias, norm."""
    slots = [Slot(embed.proj, "weight", 0, anchor=True)]
    if embed.proj.bias is not None:
        slots.append(Slot(embed.proj, "bias", 0, anchor=True))
    if embed.norm is not None:
        slots += _norm_slots(embed.norm, anchor=True)
    return slots


def _tail_slots(model: nn.Module) -> list[Slot]:
    slots = _norm_slots(model.norm)
    if isinstance(model.head, nn.Linear):
        slots.append(Slot(model.head, "weight", 1))
    return slots


def _swin_streams(model) -> list[Units]:
    out, stages = [], model.layers
    for i, stage in enumerate(stages):
        if i == 0:
            slots = _embed_slots(model.patch_embed)
        else:
            slots = [Slot(stage.downsample.reduction, "weight", 0, anchor=True)]
        for blk in stage.blocks:
            slots += _block_slots(blk)
        if i + 1 < len(stages):   # patch merging reads 4 neighbours, each a copy of the stream
            nxt = stages[i + 1].downsample
            slots += _norm_slots(nxt.norm, repeat=4) + [Slot(nxt.reduction, "weight", 1, repeat=4)]
        else:
            slots += _tail_slots(model)
        out.append(Units("channels", f"layers.{i}", stage.blocks[0].norm1.weight.numel() if len(stage.blocks)
                         else slots[0].tensor.shape[0], slots, blocks=list(stage.blocks)))
    return out


def _pvt_streams(model) -> list[Units]:
    out, stages = [], model.stages
    for i, stage in enumerate(stages):
        slots = _embed_slots(stage.patch_embed) + [Slot(stage, "pos_embed", 2, anchor=True)]
        if stage.cls_token is not None:
            slots.append(Slot(stage, "cls_token", 2, anchor=True))
        for blk in stage.blocks:
            slots += _block_slots(blk)
        if i + 1 < len(stages):
            slots.append(Slot(stages[i + 1].patch_embed.proj, "weight", 1))
        else:
            slots += _tail_slots(model)
        out.append(Units("channels", f"stages.{i}", stage.pos_embed.shape[2], slots, blocks=list(stage.blocks)))
    return out


def channel_units(model: nn.Module) -> list[Units]:
    """One Units per residual stream (stage), for the families whose layout is described here."""
    from formers.models.pvt import PyramidVisionTransformer
    from formers.models.swin import SwinTransformer
    if isinstance(model, SwinTransformer):
        return _swin_streams(model)
    if isinstance(model, PyramidVisionTransformer):
        return _pvt_streams(model)
    raise TransformError(f"{model_name(model)}: its residual-stream (embedding channel) layout is not described "
                         f"for pruning/fusion (supported: SwinTransformer, PyramidVisionTransformer)")


def all_units(model: nn.Module, channels: bool = True) -> list[Units]:
    """Channel units (per stage) first, then heads and neurons in module order."""
    units = channel_units(model) if channels else []
    units += head_units(model) + neuron_units(model)
    if not any(u.kind in ("heads", "neurons") for u in units):
        raise TransformError(f"{model_name(model)}: no attention heads or FFN neurons found to work on")
    return units


def _fix_model_widths(model: nn.Module, units: list[Units]):
    """num_features and feature_info follow the streams' widths."""
    streams = [u for u in units if u.kind == "channels"]
    if not streams:
        return
    for info, u in zip(getattr(model, "feature_info", []), streams):
        info["num_chs"] = u.size
    model.num_features = streams[-1].size


def unit_sizes(units: list[Units]) -> dict[str, int]:
    return {u.key: u.size for u in units}


def resize_units(model: nn.Module, sizes: dict[str, int], keep: dict[str, list[int]] | None = None) -> nn.Module:
    """Cut the model to `sizes` (unit key -> count), keeping `keep[key]` (default the first ones)."""
    units = all_units(model, channels=any(k.endswith(":channels") for k in sizes))
    known = {u.key: u for u in units}
    for key, n in sizes.items():
        if key not in known:
            raise TransformError(f"{model_name(model)}: no unit set {key!r} in this model")
        u = known[key]
        if n != u.size or (keep and key in keep):
            select(u, (keep or {}).get(key, list(range(n))))
    _fix_model_widths(model, units)
    return model


# ----------------------------------------------------------------------------- per-unit quantities


def unit_reduce(units: Units, fn) -> torch.Tensor:
    """Sum over every slot of fn(slot) (a tensor shaped like the slot's tensor) within each unit: (size,)."""
    total = torch.zeros(units.size, dtype=torch.float64)
    for slot in units.slots:
        t = fn(slot)
        if t is None:
            continue
        t = t.detach().double().movedim(slot.axis, 0)
        t = t.reshape(slot.repeat, units.size, slot.block, -1).sum(dim=(0, 2, 3))
        total += t.cpu()
    return total


def unit_features(units: Units, anchors_only: bool = False) -> torch.Tensor:
    """(size, F): every value of every slot that belongs to each unit, concatenated (OT ground metric)."""
    parts = []
    for slot in units.slots:
        if anchors_only and not (slot.anchor or slot.tensor.dim() == 1):
            continue
        t = slot.tensor.detach().float().movedim(slot.axis, 0)
        t = t.reshape(slot.repeat, units.size, slot.block, -1).transpose(0, 1).reshape(units.size, -1)
        parts.append(t.cpu())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def check_permutation_invariance(model: nn.Module, x: torch.Tensor, channels: bool = True,
                                 seed: int = 0, atol: float = 1e-4) -> float:
    """Permute every unit set of a copy at random and return the largest output difference.

    A unit set whose slots miss a tensor breaks the function; this is how a description that is
    incomplete for some model shows itself (fuse() runs it before aligning).
    """
    import copy
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model).eval()
    for u in all_units(other, channels=channels):
        select(u, torch.randperm(u.size, generator=g))
    was = model.training
    model.eval()
    diff = (model(x) - other(x)).abs().max().item()
    model.train(was)
    return diff
