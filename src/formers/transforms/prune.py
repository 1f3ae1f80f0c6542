"""NViT: Hessian-aware global structural pruning (catalog 67).

"Global Vision Transformer Pruning with Hessian-Aware Saliency", Yang et al., CVPR 2023,
arXiv 2110.04869; official code NVlabs/NViT. Claim: ranking every structure of every block
(heads, FFN neurons, embedding channels) on one global scale, by a Hessian-aware saliency
approximated with first-order Taylor terms, and removing the least salient under a latency
budget gives smaller, faster ViTs at the same accuracy (NViT-B: 83.29%, 6.8 GFLOPs, 1.86x).

    pruned = formers.transforms.prune(model, calib_batches, target_flops=0.5)

What is computed here:
  saliency   for each unit (a head, a hidden neuron, a residual channel of one stage), per
             calibration batch, S = (sum over the unit's parameters of grad * weight)^2 (the
             official "method 23": the Taylor estimate of the loss change from removing the unit,
             squared, which is the Fisher/Hessian-diagonal form), summed over batches. As the
             official code does for the embedding, a channel's sum is divided by the number of
             blocks the channel runs through before squaring, so that a unit spanning many
             layers is comparable with one inside a block.
  ranking    one global order over every unit of every layer and kind.
  latency    latency_aware=True ranks by saliency per unit of cost instead, where the cost of
             a unit is the multiply-accumulates it accounts for, counted on the model at its
             input size (torch's FLOP counter per module: an attention's MACs / heads, an FFN's
             MACs / neurons, a stream's share of every layer that reads or writes it). The
             official code uses a measured GPU latency table (latency_head.json, interpolated
             over emb/head/qk/v/mlp sizes); counted MACs stand in for it on any device.
  removal    the shortest prefix of that order whose removal brings the counted MACs to
             `target_flops` x the original (bisection on measured counts); units are removed
             physically (smaller tensors) and at least `min_keep` of each set survive.
The official method prunes iteratively with fine-tuning between steps and also prunes the
q/k and v widths inside heads; here one shot over heads, neurons and channels, then fine-tune.
"""
from __future__ import annotations

import copy
import math
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._surgery import Units, all_units, resize_units, unit_reduce
from .base import TransformError, model_name, record_transform, register_transform

PAPER = 67

__all__ = ["prune", "prune_units", "unit_saliency"]


def _grad_times_weight(slot):
    t = slot.tensor
    if not isinstance(t, nn.Parameter) or t.grad is None:
        return None
    return t.detach() * t.grad


def unit_saliency(model: nn.Module, batches, units: list[Units], max_batches: int | None = None,
                  loss_fn=None) -> dict[str, torch.Tensor]:
    """NViT saliency (sum of grad*weight over a unit, squared) per unit, summed over batches."""
    loss_fn = loss_fn or F.cross_entropy
    scores = {u.key: torch.zeros(u.size, dtype=torch.float64) for u in units}
    was = model.training
    model.eval()   # no dropout / drop-path noise in the gradients
    seen = 0
    for x, y in batches:
        if max_batches is not None and seen >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for u in units:
            taylor = unit_reduce(u, _grad_times_weight)
            if u.kind == "channels":
                taylor = taylor / max(len(u.blocks), 1)
            scores[u.key] += taylor.pow(2)
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    if seen == 0:
        raise TransformError(f"{model_name(model)}: prune needs at least one calibration batch")
    return scores


def _input_size(model) -> tuple[int, int, int]:
    size = model.img_size
    h, w = (size, size) if isinstance(size, int) else size
    return (model.in_chans, h, w)


def _macs(model) -> int:
    import formers
    return formers.count_flops(model, _input_size(model))


@torch.no_grad()
def unit_costs(model: nn.Module, units: list[Units]) -> dict[str, float]:
    """MACs one unit of each set accounts for, counted per module at the model's input size."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, *_input_size(model))
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    per_module = {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}
    prefix = type(model).__name__
    names = {m: n for n, m in model.named_modules()}

    def macs(module):
        n = names[module]
        return per_module.get(f"{prefix}.{n}" if n else prefix, 0)

    costs = {}
    for u in units:
        if u.kind == "heads":
            attn = u.owner
            fixed = sum(macs(m) for n, m in attn.named_children() if n not in ("qkv", "q", "kv", "proj"))
            costs[u.key] = (macs(attn) - fixed) / u.size
        else:
            mods = {id(s.module): s.module for s in u.slots
                    if s.name == "weight" and isinstance(s.module, (nn.Linear, nn.Conv2d))}
            costs[u.key] = sum(macs(m) for m in mods.values()) / u.size
    return costs


def prune_units(model: nn.Module, remove: dict[str, list[int]]) -> nn.Module:
    """Remove the given units (unit key -> indices, e.g. {'layers.0.blocks.0.attn:heads': [0]})
    physically, in place; recorded so the saved model reloads. Keys come from `unit_saliency`."""
    channels = any(k.endswith(":channels") for k in remove)
    units = {u.key: u for u in all_units(model, channels=channels)}
    keep = {}
    for key, idx in remove.items():
        if key not in units:
            raise TransformError(f"{model_name(model)}: no unit set {key!r}")
        drop = set(int(i) for i in idx)
        keep[key] = [i for i in range(units[key].size) if i not in drop]
    sizes = {k: len(v) for k, v in keep.items()}
    resize_units(model, sizes, keep)
    record_transform(model, "prune", sizes=sizes)
    return model


def _removal_order(scores, costs, units, latency_aware: bool, min_keep: float):
    """(key, index) pairs, least salient first, never emptying a set below its floor."""
    entries = []
    for u in units:
        s = scores[u.key]
        if latency_aware:
            s = s / max(costs[u.key], 1e-12)
        entries += [(float(v), u.key, i) for i, v in enumerate(s.tolist())]
    entries.sort()
    left = {u.key: u.size for u in units}
    floor = {u.key: max(1, math.ceil(min_keep * u.size)) for u in units}
    order = []
    for _, key, i in entries:
        if left[key] > floor[key]:
            left[key] -= 1
            order.append((key, i))
    return order


def _keep_lists(order, units, k):
    drop = {}
    for key, i in order[:k]:
        drop.setdefault(key, set()).add(i)
    return {u.key: [i for i in range(u.size) if i not in drop.get(u.key, ())] for u in units}


def prune(model: nn.Module, calib, target_flops: float = 0.5, latency_aware: bool = True,
          calib_batches: int | None = 8, channels: bool = True, min_keep: float = 0.05,
          loss_fn=None, scores: dict | None = None) -> nn.Module:
    """Prune heads, FFN neurons and (with `channels`) residual channels to `target_flops` x MACs.

    calib: an iterable of (images, labels) batches (a DataLoader, a list); the first
    `calib_batches` are used for the saliency (or pass precomputed `scores`). Returns the same
    model, pruned in place (same class, smaller tensors), with the structure recorded so
    `formers.transforms.save/load` round-trips it.
    """
    if not 0.0 < target_flops <= 1.0:
        raise TransformError(f"{model_name(model)}: target_flops must be in (0, 1], got {target_flops}")
    units = all_units(model, channels=channels)
    if scores is None:
        scores = unit_saliency(model, calib, units, calib_batches, loss_fn)
    costs = unit_costs(model, units)
    order = _removal_order(scores, costs, units, latency_aware, min_keep)
    full = _macs(model)
    goal = target_flops * full

    def macs_after(k):
        keep = _keep_lists(order, units, k)
        return _macs(resize_units(copy.deepcopy(model), {key: len(v) for key, v in keep.items()}, keep))

    lo, hi = 0, len(order)     # macs_after(lo) > goal (or lo = 0), macs_after(hi) <= goal if reachable
    if target_flops >= 1.0 or full <= goal:
        k = 0
    elif macs_after(hi) > goal:
        raise TransformError(f"{model_name(model)}: cannot reach {target_flops:.2f} x MACs while keeping "
                             f"{min_keep:.0%} of every layer; lower min_keep")
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if macs_after(mid) <= goal:
                hi = mid
            else:
                lo = mid
        k = hi
    keep = _keep_lists(order, units, k)
    sizes = {key: len(v) for key, v in keep.items()}
    resize_units(model, sizes, keep)
    record_transform(model, "prune", sizes=sizes)
    return model


def _rebuild(model, sizes):
    return resize_units(model, sizes)


# ----------------------------------------------------------------------------- CLI


def _add_arguments(p):
    p.add_argument("--target-flops", type=float, default=0.5, help="keep this fraction of the MACs (default 0.5)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for the saliency (default 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dataset", default="fashion-mnist", help="calibration data: digits | fashion-mnist | folder | npz")
    p.add_argument("--data-dir", default=None, metavar="PATH")
    p.add_argument("--no-latency-aware", dest="latency_aware", action="store_false",
                   help="rank by saliency alone, not saliency per MAC")
    p.add_argument("--no-channels", dest="channels", action="store_false",
                   help="prune heads and FFN neurons only, keep the embedding width")
    p.add_argument("--min-keep", type=float, default=0.05, help="fraction of every unit set kept (default 0.05)")
    p.add_argument("--seed", type=int, default=0)


def calibration_batches(model, dataset: str, data_dir=None, batch_size: int = 64, n_batches: int = 8,
                        seed: int = 0, checkpoint: str | None = None):
    """(x, y) batches of a data set's training split at the model's size, normalised as the
    checkpoint's training was (its recorded mean/std) or by the data's own statistics."""
    from formers.data import BatchTransform, channel_stats, load_dataset
    from formers.train.common import read_weights_metadata
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    data = load_dataset(dataset, data_dir, img_size=size)
    meta = read_weights_metadata(checkpoint) if checkpoint else {}
    mean, std = (meta["mean"], meta["std"]) if "mean" in meta else channel_stats(data.x_train)
    tf = BatchTransform(mean, std, model.in_chans)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=g)[:batch_size * n_batches]
    return [(tf(data.x_train[b]), data.y_train[b]) for b in idx.split(batch_size)]


def _run(model, args):
    batches = calibration_batches(model, args.dataset, args.data_dir, args.batch_size, args.calib_batches,
                                  args.seed, args.checkpoint)
    return prune(model, batches, target_flops=args.target_flops, latency_aware=args.latency_aware,
                 calib_batches=args.calib_batches, channels=args.channels, min_keep=args.min_keep)


register_transform("prune", "NViT global structural pruning (heads, FFN neurons, embedding channels) to a MAC target",
                   _add_arguments, _run, _rebuild)


class _CallableModule(types.ModuleType):
    """`formers.transforms.prune` is this module once imported (Python sets the package attribute
    to the submodule), so calling it calls `prune`: both spellings work."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
