"""Transformer fusion with optimal transport (catalog 75).

"Transformer Fusion with Optimal Transport", Imfeld, Graldi, Giordano, Hofmann, Anagnostidis and
Singh, ICLR 2024, arXiv 2310.05719; official code graldij/transformer-fusion. Claim: two
transformers trained from different seeds can be merged into one by first aligning the second
to the first with optimal transport, layer by layer, through residual connections, multi-head
attention, norms and embeddings, then averaging; the fused model beats plain weight averaging
and, after a short fine-tune, its parents.

    fused = formers.transforms.fuse(model_a, model_b, alpha=0.5)

How it is done here (on the units of _surgery.py):
  residual streams  one transport map per stage, found first, stage by stage: the ground metric
                    is the weights that write the stream from outside (patch embedding or
                    downsampling rows, whose inputs are pixels or the already aligned previous
                    stage; position table, cls token) and every per-channel vector (norms, output
                    biases). The map is then applied everywhere the stream is read or written:
                    all norms, every block's input columns and output rows, the next stage's
                    downsampling and the final norm and classifier. (The official code averages
                    the maps of the layers feeding a residual; with one hard map per stream the
                    residual stays an exact permutation.)
  heads             per attention, a map between whole heads (q, k and v rows of a head and its
                    projection columns move together, as do per-head bias tables), on the
                    weights with the stream already aligned.
  FFN neurons       per FFN, a map between hidden neurons on fc1 rows (+bias) and fc2 columns.
  `metric="activations"` uses the activations of each unit over given batches as the ground
  metric instead (block outputs for streams, per-head attention outputs, FFN hidden values).
Maps are exact OT between uniform measures of equal size, i.e. an optimal permutation
(scipy's linear_sum_assignment, which the official code reaches with POT's EMD); then
fused = (1 - alpha) * A + alpha * aligned B. Soft (Sinkhorn) maps and fusing models of
different widths are not implemented.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ._surgery import Units, all_units, check_permutation_invariance, select, unit_features
from .base import TransformError, model_name, register_transform

PAPER = 75

__all__ = ["fuse", "ot_align", "average"]


def _assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation p minimising sum_i cost[i, p[i]] (exact OT for uniform, equal-size measures)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:   # pragma: no cover - scipy comes with scikit-learn in the extras
        raise ImportError("otfusion needs scipy (pip install scipy, or formers[train])") from e
    rows, cols = linear_sum_assignment(cost.double().numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _cost(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    return torch.cdist(fa.double(), fb.double()).pow(2)


def _check_pair(a: nn.Module, b: nn.Module):
    if type(a) is not type(b):
        raise TransformError(f"cannot fuse {model_name(a)} with {model_name(b)}: different architectures")
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        bad = next((k for k in sa if k not in sb or sa[k].shape != sb[k].shape), None)
        raise TransformError(f"cannot fuse {model_name(a)} with {model_name(b)}: widths differ "
                             f"(first at {bad!r}); fusion of different widths is not implemented")


def _probe(model) -> torch.Tensor:
    size = model.img_size
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(2, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _activations(model: nn.Module, units: list[Units], batches, max_positions: int = 4096) -> dict[str, torch.Tensor]:
    """(units, positions) activation features of every unit set over `batches`."""
    feats: dict[str, list] = {u.key: [] for u in units}
    hooks = []

    def rows(t: torch.Tensor, channel_axis: int = -1) -> torch.Tensor:
        t = t.detach().float().movedim(channel_axis, -1)
        t = t.reshape(-1, t.shape[-1])
        return t[:max_positions].T    # (channels, positions)

    for u in units:
        if u.kind == "channels":
            for blk in u.blocks:
                hooks.append(blk.register_forward_hook(
                    lambda m, i, o, k=u.key: feats[k].append(rows(o[0] if isinstance(o, tuple) else o))))
        elif u.kind == "heads":
            attn = u.owner

            def head_hook(m, i, k=u.key, attn=attn):
                x = i[0].detach().float()
                x = x.reshape(-1, attn.num_heads, attn.head_dim)[:max_positions]   # (positions, H, d)
                feats[k].append(x.permute(1, 0, 2).reshape(attn.num_heads, -1))
            hooks.append(attn.proj.register_forward_pre_hook(head_hook))
        else:
            fc2 = next(s.module for s in u.slots if s.axis == 1)
            axis = 1 if isinstance(fc2, nn.Conv2d) else -1
            hooks.append(fc2.register_forward_pre_hook(lambda m, i, k=u.key, a=axis: feats[k].append(rows(i[0], a))))
    was = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for u in units:
        if not feats[u.key]:
            raise TransformError(f"{u.key}: no activations recorded (is the unit used in forward?)")
        out[u.key] = torch.cat(feats[u.key], dim=1)
    return out


def ot_align(model_a: nn.Module, model_b: nn.Module, metric: str = "weights", batches=None,
          check: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of model_b with its streams, heads and neurons permuted to match model_a, computing
    the same function as model_b; and the permutations (unit key -> index into model_b's units)."""
    _check_pair(model_a, model_b)
    if metric not in ("weights", "activations"):
        raise TransformError(f"{model_name(model_a)}: metric must be 'weights' or 'activations', got {metric!r}")
    if metric == "activations" and batches is None:
        raise TransformError(f"{model_name(model_a)}: metric='activations' needs batches of inputs")
    if check:
        diff = check_permutation_invariance(model_a, _probe(model_a))
        if diff > 1e-3:
            raise TransformError(f"{model_name(model_a)}: permuting its units changes its outputs (by {diff:.2g}); "
                                 "some tensor of this architecture is not described for alignment")
    b = copy.deepcopy(model_b)
    units_a, units_b = all_units(model_a), all_units(b)
    perms = {}
    if metric == "activations":
        batches = list(batches)
        fa, fb = _activations(model_a, units_a, batches), _activations(b, units_b, batches)
        for ua, ub in zip(units_a, units_b):
            perms[ua.key] = _assignment(_cost(fa[ua.key], fb[ub.key]))
            select(ub, perms[ua.key])
        return b, perms
    # weights: streams first (stage order), each on its anchors, applied at once so later stages
    # and the heads/neurons compare weights whose other axes are already aligned
    for anchors_only in (True, False):
        for ua, ub in zip(units_a, units_b):
            if (ua.kind == "channels") != anchors_only:
                continue
            cost = _cost(unit_features(ua, anchors_only), unit_features(ub, anchors_only))
            perms[ua.key] = _assignment(cost)
            select(ub, perms[ua.key])
    return b, perms


@torch.no_grad()
def average(model_a: nn.Module, model_b: nn.Module, alpha: float = 0.5) -> nn.Module:
    """Plain weight averaging, (1 - alpha) * A + alpha * B (the baseline the paper compares with)."""
    _check_pair(model_a, model_b)
    fused = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    for k, v in fused.state_dict().items():
        if v.is_floating_point():
            v.mul_(1 - alpha).add_(sb[k].to(v.dtype), alpha=alpha)
    return fused


def fuse(model_a: nn.Module, model_b: nn.Module, alpha: float = 0.5, metric: str = "weights", batches=None,
         check: bool = True) -> nn.Module:
    """OT fusion: align model_b to model_a (see the module docstring), then average with weight
    `alpha` on model_b. Returns a new model of model_a's class and structure."""
    if not 0.0 <= alpha <= 1.0:
        raise TransformError(f"{model_name(model_a)}: alpha must be in [0, 1], got {alpha}")
    aligned, _ = ot_align(model_a, model_b, metric=metric, batches=batches, check=check)
    return average(model_a, aligned, alpha)


# ----------------------------------------------------------------------------- CLI


def _add_arguments(p):
    p.add_argument("--checkpoint-b", required=True, metavar="FILE", help="weights of the second model (same architecture)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the second model (default 0.5)")
    p.add_argument("--metric", choices=("weights", "activations"), default="weights",
                   help="OT ground metric: the units' weights, or their activations on --dataset")
    p.add_argument("--dataset", default="fashion-mnist", help="activations: data for the ground metric")
    p.add_argument("--data-dir", default=None, metavar="PATH")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)


def _run(model, args):
    import argparse

    from .cli import _build
    from .prune import calibration_batches
    model_b = _build(argparse.Namespace(**{**vars(args), "checkpoint": args.checkpoint_b}))
    batches = None
    if args.metric == "activations":
        batches = calibration_batches(model, args.dataset, args.data_dir, args.batch_size, args.calib_batches,
                                      checkpoint=args.checkpoint)
    return fuse(model, model_b, alpha=args.alpha, metric=args.metric, batches=batches)


register_transform("otfusion", "fuse two models of one architecture: align the second to the first with "
                   "optimal transport (streams, heads, FFN neurons), then average", _add_arguments, _run)
