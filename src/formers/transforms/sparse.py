"""Sparse then Prune (catalog 69): a sparsity penalty during training, then magnitude pruning.

"Sparse then Prune: Toward Efficient Vision Transformers", Prasetyo, Yudistira, Widodo,
arXiv 2307.11988 (code: yogiprsty/Sparse-ViT). Fine-tuning a ViT with a sparse
regulariser on its attention maps, loss = CE + 0.01 * mean(log(1 + A^2)), then pruning 10%
of the weights by global L1 magnitude, beats pruning alone (+0.57% CIFAR-10, +1.76% CIFAR-100).

    formers train swin_demo --objective sparse --objective-kwargs '{"strength": 0.01}'          # the paper's
    formers train swin_demo --objective sparse --objective-kwargs '{"penalty": "group", "strength": 1e-4}'
    m = formers.transforms.prune_sparse(m, amount=0.1)                          # the paper's prune
    m = formers.transforms.prune_sparse(m, threshold=1e-2, structure="neurons")   # FFN units, physically
    formers transform sparse-prune --model swin_demo --checkpoint best.safetensors --amount 0.1 --out p.safetensors

Penalties (SparseObjective, `strength` x):
- "attention" (the paper): mean over the attention maps of mean(log(1 + A^2)), A the softmax
  probabilities. The zoo attends through F.scaled_dot_product_attention, which never forms A,
  so during the forward a torch function mode recomputes each SDPA call explicitly (softmax of
  the scaled, masked logits, then A @ V: the same output) and collects the term. The official
  code keeps only the last block's term (its loop overwrites it); we average every block's.
- "l1": sum |w| over the prunable weights (below): drives single weights to zero.
- "group": group lasso over FFN hidden units, sum_j ||(fc1 row j, its bias, depthwise channel
  j, fc2 column j)||_2: drives whole units to zero, which "neurons" pruning then removes.

Pruning (prune_sparse):
- structure="weights" (the paper): global unstructured magnitude pruning over the weights of
  every Linear, Conv and normalisation layer (the paper's list: embedding, norms, q/k/v/out,
  fc1, fc2, classifier). The zeros are written into the weights (no mask buffers: the file
  and the architecture stay the plain ones); they are a mask only in effect, and further
  training would move them again.
- structure="neurons": FFN hidden units whose group norm is at most `threshold` (or the
  `amount` fraction with the smallest norms, over all FFNs) are removed with physically
  smaller fc1/fc2 (recorded as "sparse-prune", so the saved file reloads). At least one
  unit stays in each FFN.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from formers.train.objectives import Objective, register_objective

from ._ffn import cut_ffn, find_ffns, set_ffn_widths
from .base import TransformError, model_name, record_transform, register_transform

PAPER = 69

__all__ = ["SparseObjective", "attention_penalty", "prunable_weights", "ffn_unit_norms", "prune_sparse",
           "sparsity"]


# ------------------------------------------------------------------------ the attention penalty

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class _ExplicitAttention(TorchFunctionMode):
    """Runs each F.scaled_dot_product_attention as softmax(QK^T * scale + mask) @ V and keeps
    mean(log(1 + A^2)) of each call in `terms`."""

    def __init__(self):
        super().__init__()
        self.terms: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = dict(zip(_SDPA_ARGS, args))
        a.update(kwargs)
        if a.get("enable_gqa"):
            return func(*args, **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = (q @ k.transpose(-2, -1)) * scale
        mask = a.get("attn_mask")
        if a.get("is_causal"):
            lq, lk = q.shape[-2], k.shape[-2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        attn = logits.softmax(-1)
        self.terms.append(torch.log1p(attn.float().square()).mean())
        p = a.get("dropout_p", 0.0)
        if p:
            attn = F.dropout(attn, p)
        return attn @ v


@contextmanager
def attention_penalty():
    """Inside the block, every SDPA call adds its mean(log(1 + A^2)) to the yielded list."""
    mode = _ExplicitAttention()
    with mode:
        yield mode.terms


# ------------------------------------------------------------------------ what is penalised and pruned

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights of every Linear, Conv and normalisation layer (biases, position tables,
    layer scales and scalar parameters are left alone), as in the paper's prune list."""
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.numel() <= 1:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd) + _NORM_TYPES) or "Norm" in type(m).__name__:
            out.append((f"{name}.weight" if name else "weight", w))
    return out


def ffn_unit_norms(model: nn.Module, eps: float = 1e-30) -> list[torch.Tensor]:
    """Per FFN, the L2 norm of each hidden unit's group: fc1 row (+ bias), depthwise channel
    (+ bias), fc2 column. The group-lasso penalty is their sum. The squared norm is clamped at
    `eps` so that an exactly-zero group has a finite gradient (pruning passes eps=0)."""
    norms = []
    for site in find_ffns(model):
        sq = site.fc1.weight.flatten(1).square().sum(1)
        if site.fc1.bias is not None:
            sq = sq + site.fc1.bias.square()
        for name in site.mids:
            dw = getattr(site.module, name)
            sq = sq + dw.weight.flatten(1).square().sum(1)
            if dw.bias is not None:
                sq = sq + dw.bias.square()
        w2 = site.fc2.weight
        sq = sq + w2.flatten(1).square().sum(0) if w2.dim() == 2 else sq + w2.flatten(2).square().sum((0, 2))
        norms.append(sq.clamp_min(eps).sqrt())
    return norms


@register_objective
class SparseObjective(Objective):
    """CE + strength * penalty; penalty "attention" (the paper's, strength 0.01), "l1" or "group"
    (see the module docstring)."""
    name = "sparse"

    def __init__(self, label_smoothing: float = 0.0, strength: float = 0.01, penalty: str = "attention"):
        super().__init__(label_smoothing)
        if penalty not in ("attention", "l1", "group"):
            raise TypeError(f"penalty must be attention, l1 or group, got {penalty!r}")
        if not strength >= 0:
            raise TypeError(f"strength must be >= 0, got {strength!r}")
        self.strength, self.penalty = float(strength), penalty

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.penalty == "group" and not find_ffns(model):
            raise ValueError(f"--objective sparse: {model_name(model)} has no FFN for the group penalty")
        return model

    def regulariser(self, model: nn.Module) -> torch.Tensor:
        if self.penalty == "l1":
            return sum(w.abs().sum() for _, w in prunable_weights(model))
        return sum(n.sum() for n in ffn_unit_norms(model))

    def __call__(self, model, x, y, step: int):
        if self.penalty == "attention":
            with attention_penalty() as terms:
                logits = model(x)
            if not terms:
                raise ValueError(f"--objective sparse: {model_name(getattr(model, 'module', model))} runs no "
                                 f"attention (SDPA) to regularise; use penalty 'l1' or 'group'")
            reg = torch.stack(terms).mean()
        else:
            logits = model(x)
            reg = self.regulariser(model)
        return self.loss(logits, y) + self.strength * reg, logits


# ------------------------------------------------------------------------ pruning

def _check_amount(who, threshold, amount):
    if (threshold is None) == (amount is None):
        raise TransformError(f"{who}: give exactly one of threshold= and amount=")
    if amount is not None and not 0.0 <= amount < 1.0:
        raise TransformError(f"{who}: amount {amount} must be a fraction in [0, 1)")


@torch.no_grad()
def prune_sparse(model: nn.Module, threshold: float | None = None, amount: float | None = None,
                 structure: str = "weights") -> nn.Module:
    """Remove what the sparse penalty drove to zero, in place (see the module docstring).

    structure "weights": zero every prunable weight with |w| <= threshold, or exactly the
    round(amount * N) smallest |w| over all N prunable weights (global, as torch's
    global_unstructured L1 pruning the paper calls). structure "neurons": drop FFN hidden units
    with group norm <= threshold, or the round(amount * units) smallest, physically."""
    who = model_name(model)
    _check_amount(who, threshold, amount)
    if structure == "weights":
        params = [w for _, w in prunable_weights(model)]
        if not params:
            raise TransformError(f"{who}: no Linear, Conv or norm weights to prune")
        if amount is not None:
            flat = torch.cat([w.detach().abs().flatten() for w in params])
            k = round(amount * flat.numel())
            if k:
                drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
                drop[flat.topk(k, largest=False, sorted=False).indices] = True
                start = 0
                for w in params:
                    n = w.numel()
                    w.masked_fill_(drop[start:start + n].view_as(w), 0.0)
                    start += n
        else:
            for w in params:
                w.masked_fill_(w.abs() <= threshold, 0.0)
        return model
    if structure != "neurons":
        raise TransformError(f"{who}: structure must be 'weights' or 'neurons', got {structure!r}")
    sites = find_ffns(model)
    if not sites:
        raise TransformError(f"{who}: no FFN (fc1/fc2 around elementwise ops) whose hidden units could be removed")
    norms = ffn_unit_norms(model, eps=0.0)
    if amount is not None:
        flat = torch.cat(norms)
        k = round(amount * flat.numel())
        cut = flat.kthvalue(k).values if k else flat.new_tensor(-1.0)
        drops = [n <= cut for n in norms]
    else:
        drops = [n <= threshold for n in norms]
    widths = []
    for site, n, drop in zip(sites, norms, drops):
        keep = (~drop).nonzero().flatten()
        if keep.numel() == 0:
            keep = n.argmax().view(1)
        if keep.numel() < site.hidden:
            cut_ffn(site, keep)
        widths.append(int(keep.numel()))
    return record_transform(model, "sparse-prune", hidden=widths)


def sparsity(model: nn.Module) -> dict:
    """Fraction of exactly-zero prunable weights, and FFN hidden units left."""
    params = [w for _, w in prunable_weights(model)]
    total = sum(w.numel() for w in params)
    zeros = sum(int((w == 0).sum()) for w in params)
    return {"weights": total, "zero_fraction": zeros / max(total, 1),
            "ffn_units": sum(s.hidden for s in find_ffns(model))}


def _rebuild(model: nn.Module, hidden: list[int]) -> nn.Module:
    return set_ffn_widths(model, hidden, model_name(model))


def _add_arguments(p):
    p.add_argument("--structure", choices=["weights", "neurons"], default="weights",
                   help="weights: global magnitude pruning, zeros in place (the paper); "
                        "neurons: remove FFN hidden units by group norm, physically")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--amount", type=float, help="fraction to prune (the paper: 0.1 of the weights)")
    g.add_argument("--threshold", type=float, help="prune |w| (or a unit's group norm) at most this")


def _run(model, args):
    return prune_sparse(model, threshold=args.threshold, amount=args.amount, structure=args.structure)


register_transform("sparse-prune", "Sparse then Prune: magnitude-prune weights (zeros in place) or remove FFN "
                   "hidden units a group penalty zeroed", _add_arguments, _run, _rebuild)
