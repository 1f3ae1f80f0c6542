"""Low-rank factorisation of linear layers (catalog 47): "Greenformers: Improving Computation
and Memory Efficiency in Transformer Models via Low-Rank Approximation", Winata et al.,
arXiv 2108.10808; code SamuelCahyawijaya/greenformer.

The official auto_fact factors as (U S, V^T) from a randomised SVD, with the rank given or as a
fraction of the break-even rank; here the SVD is exact, the factors balanced (sqrt(S) on each
side), and ranks may also follow retained energy or a global parameter budget.

Claim: a trained Linear W (out x in) is replaced by two, x -> B(Ax), with A = sqrt(S_r) V_r^T
(r x in) and B = U_r sqrt(S_r) (out x r) from its truncated SVD: exact at full rank, and at
rank r < in*out / (in + out) fewer parameters and multiply-adds, at the cost of the
discarded singular values; a short fine-tune recovers most of the accuracy.

    low_rank(model, rank=16)              # every Linear at rank <= 16 (where that saves)
    low_rank(model, rank=0.5)             # half of each layer's break-even rank in*out/(in+out) (official)
    low_rank(model, energy=0.9)           # per layer, the fewest singular values keeping 90% of sum(s^2)
    low_rank(model, param_budget=0.6)     # globally: the ranks that keep the most energy within 60% of the
                                          # parameters (an int: an absolute count)

A layer is factorised only where that saves parameters (unless only_if_smaller=False), so
`energy=1.0` leaves a model as it was. Which layers: `include` / `exclude` are fnmatch
patterns on module names ("*.mlp.*", "head"). The ranks chosen are recorded, so the file
that `formers transform lowrank` writes reloads with `formers.transforms.load`; training on
goes through `formers train --objective lowrank` (see LowRankObjective).
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn

from formers.layers import Linear
from formers.train.objectives import Objective, register_objective

from .base import TransformError, model_name, record_transform, register_transform

PAPER = 47

__all__ = ["LowRankLinear", "low_rank", "singular_values", "LowRankObjective"]


class LowRankLinear(nn.Module):
    """x -> up(down(x)): down = Linear(in, rank, no bias), up = Linear(rank, out, bias as the original)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) product, for code that reads a Linear's weight (its dtype, device or value)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self):
        return self.up.bias

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        w = linear.weight
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        new = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype)
        new.down.weight.copy_(root[:, None] * vh[:rank])
        new.up.weight.copy_(u[:, :rank] * root)
        if linear.bias is not None:
            new.up.bias.copy_(linear.bias)
        return new.train(linear.training)


def _selected(model: nn.Module, include, exclude) -> dict[str, nn.Linear]:
    inc = [include] if isinstance(include, str) else list(include or ["*"])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Linear)
            and any(fnmatch.fnmatchcase(n, p) for p in inc) and not any(fnmatch.fnmatchcase(n, p) for p in exc)}


def _saves(linear: nn.Linear, rank: int) -> bool:
    return rank * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features


def _cost(linear: nn.Linear, rank: int | None) -> int:
    """Weight parameters of the layer at `rank` (None: dense); the bias is the same either way."""
    i, o = linear.in_features, linear.out_features
    return i * o if rank is None else rank * (i + o)


@torch.no_grad()
def singular_values(linear: nn.Linear) -> torch.Tensor:
    return torch.linalg.svdvals(linear.weight.double())


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares keep `energy` of the total."""
    e = (s ** 2).cumsum(0)
    if e[-1] <= 0:
        return 1
    return min(int((e / e[-1] < energy - 1e-12).sum()) + 1, len(s))


def _budget_ranks(layers: dict[str, nn.Linear], spectra: dict[str, torch.Tensor], budget: int, fixed: int,
                  only_if_smaller: bool) -> dict[str, int | None]:
    """Ranks (None: dense) keeping the most relative energy with at most `budget` parameters in all.

    Every layer starts at rank 1; rank units are then taken in order of relative energy gained per
    parameter, each layer's in order, skipping any that no longer fits. A layer whose next rank would
    cost as much as the dense matrix goes dense (which is cheaper and exact)."""
    ranks = {n: 1 for n in layers}
    used = fixed + sum(_cost(m, 1) for m in layers.values())
    if used > budget:
        raise TransformError(f"a budget of {budget} parameters is below the {used} that every chosen layer at rank 1 "
                             "(and the rest of the model) needs")
    items = []
    for n, m in layers.items():
        e = spectra[n] ** 2
        rel = (e / e.sum().clamp_min(1e-300)).tolist()
        items += [(rel[k] / (m.in_features + m.out_features), n, k) for k in range(1, len(rel))]
    items.sort(key=lambda t: -t[0])
    for _, n, k in items:
        m, r = layers[n], ranks[n]
        if r is None or r != k:
            continue        # already dense, or an earlier rank of this layer did not fit
        dense_next = not _saves(m, k + 1) and only_if_smaller
        step = (_cost(m, None) if dense_next else _cost(m, k + 1)) - _cost(m, k)
        if used + step <= budget:
            used += step
            ranks[n] = None if dense_next else k + 1
    return ranks


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _replace(model: nn.Module, ranks: dict[str, int | None]) -> nn.Module:
    modules = dict(model.named_modules())
    for name, r in ranks.items():
        if r is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, LowRankLinear.from_linear(modules[name], r))
    return model


def low_rank(model: nn.Module, rank: int | None = None, energy: float | None = None,
             param_budget: float | int | None = None, include=("*",), exclude=(), only_if_smaller: bool = True,
             ranks: dict[str, int] | None = None) -> nn.Module:
    """Replace chosen nn.Linear layers by LowRankLinear (truncated SVD), in place; returns the model.

    Give one of: `rank` (the same maximum rank everywhere; a fraction < 1: that share of each layer's
    break-even rank in*out/(in+out), as the official auto_fact), `energy` (0 < e <= 1, per layer),
    `param_budget` (the whole model's parameter count after: an int, or a float <= 1 as a fraction of
    the count before), `ranks` (name -> rank, as recorded). Layers where the factors would not be
    smaller are kept dense unless `only_if_smaller=False` (then `rank` gives exact full-rank factors).
    """
    name = model_name(model)
    if sum(v is not None for v in (rank, energy, param_budget, ranks)) != 1:
        raise TransformError(f"{name}: give exactly one of rank, energy, param_budget, ranks")
    layers = _selected(model, include, exclude)
    if ranks is not None:
        missing = sorted(set(ranks) - set(layers))
        if missing:
            raise TransformError(f"{name}: no nn.Linear named {missing[:3]} to factorise")
        layers = {n: layers[n] for n in ranks}
    if not layers:
        raise TransformError(f"{name}: no nn.Linear layer matches include={include!r} exclude={exclude!r}")
    meta = any(m.weight.is_meta for m in layers.values())
    if meta and (energy is not None or param_budget is not None):
        raise TransformError(f"{name}: energy and param_budget need the weights' singular values (not on meta)")

    if ranks is not None:
        chosen = {n: int(r) for n, r in ranks.items()}
    elif rank is not None and 0 < rank < 1:    # as the official auto_fact: a fraction of the break-even rank
        chosen = {n: max(1, int(rank * m.in_features * m.out_features / (m.in_features + m.out_features)))
                  for n, m in layers.items()}
    elif rank is not None:
        if int(rank) < 1:
            raise TransformError(f"{name}: rank must be >= 1 or a fraction in (0, 1), got {rank}")
        chosen = {n: min(int(rank), m.in_features, m.out_features) for n, m in layers.items()}
    elif energy is not None:
        if not 0 < energy <= 1:
            raise TransformError(f"{name}: energy must be in (0, 1], got {energy}")
        chosen = {n: _energy_rank(singular_values(m), energy) for n, m in layers.items()}
    else:
        total = _params(model)
        budget = int(math.floor(param_budget * total)) if isinstance(param_budget, float) else int(param_budget)
        if isinstance(param_budget, float) and not 0 < param_budget <= 1:
            raise TransformError(f"{name}: a fractional param_budget must be in (0, 1], got {param_budget}")
        fixed = total - sum(m.weight.numel() for m in layers.values())
        chosen = _budget_ranks(layers, {n: singular_values(m) for n, m in layers.items()}, budget, fixed,
                               only_if_smaller)
    if ranks is None and only_if_smaller:
        chosen = {n: (r if r is not None and _saves(layers[n], r) else None) for n, r in chosen.items()}
    kept = {n: r for n, r in chosen.items() if r is not None}
    _replace(model, kept)
    return record_transform(model, "lowrank", ranks=kept) if kept else model


def _rebuild(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    _replace(model, {n: int(r) for n, r in ranks.items()})   # shapes only: the weights are loaded after
    return model


# ----------------------------------------------------------------------------- CLI and training


def _add_arguments(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=float,
                   help="the same maximum rank for every chosen layer, or a fraction < 1 of each one's break-even rank")
    g.add_argument("--energy", type=float, help="per layer: keep this fraction of sum(s^2), e.g. 0.9")
    g.add_argument("--param-budget", type=float, metavar="B",
                   help="the model's parameter count after: a fraction <= 1 of the count before, or a count")
    p.add_argument("--include", default="*", metavar="GLOB[,GLOB]", help="module names to factorise (fnmatch)")
    p.add_argument("--exclude", default="", metavar="GLOB[,GLOB]", help="module names to keep dense")


def _globs(text: str) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _budget(value):
    if value is None:
        return None
    return value if value <= 1 else int(value)


def _run(model, args):
    rank = args.rank if args.rank is None or args.rank < 1 else int(args.rank)
    return low_rank(model, rank=rank, energy=args.energy, param_budget=_budget(args.param_budget),
                    include=_globs(args.include), exclude=_globs(args.exclude))


register_transform("lowrank", "Greenformers low-rank factorisation of nn.Linear layers by truncated SVD",
                   _add_arguments, _run, _rebuild)


@register_objective
class LowRankObjective(Objective):
    """`formers train M --objective lowrank --objective-kwargs '{"checkpoint": "trained.safetensors",
    "energy": 0.9}'`: fine-tune the low-rank factorisation of a trained model. prepare() loads the
    checkpoint into the freshly built model and factorises it (deterministic: a resumed run rebuilds
    the same ranks from the same weights); the loss is plain cross-entropy. The trainer's weights file
    does not record the ranks; `low_rank(create_model(...), ranks=...)` with the ranks printed at
    start (or those of `formers transform lowrank`) rebuilds its structure."""
    name = "lowrank"

    def __init__(self, label_smoothing: float = 0.0, checkpoint: str | None = None, rank: int | None = None,
                 energy: float | None = None, param_budget: float | None = None, ranks: dict | None = None,
                 include=("*",), exclude=()):
        super().__init__(label_smoothing)
        self.checkpoint = checkpoint
        self.options = dict(rank=rank, energy=energy, param_budget=_budget(param_budget), ranks=ranks,
                            include=include, exclude=exclude)

    def prepare(self, model):
        if self.checkpoint:
            from formers.checkpoint import load_checkpoint
            load_checkpoint(model, self.checkpoint)
        model = low_rank(model, **self.options)
        recs = [r for r in getattr(model, "_formers_transforms", []) if r["name"] == "lowrank"]
        if recs:
            print(f"lowrank: ranks {recs[-1]['spec']['ranks']}", flush=True)
        return model
