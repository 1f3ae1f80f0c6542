"""FuseGPT: remove the least important transformer blocks and fuse them into their neighbours.

Catalog 37: "FuseGPT: Learnable Layers Fusion of Generative Pre-trained Transformers"
(Pei et al., arXiv:2411.14507; code github.com/Muuuush/FuseGPT). Claim: instead of dropping
redundant blocks for good, recycle their weights: (1) rank the blocks by Macro Influence, the
loss of information in the final hidden states when one block is skipped (1 - cosine similarity
with the full model's); (2) remove the least influential block and inject each of its linear
weights into the matching linear of the other blocks of its group (the blocks around it), frozen
and scaled element-wise by a learnable rank-r matrix:

    W' = W + B A + (C1 C2) * W_removed,        b' = b + c * b_removed

with C1 = 0 and c = 0 at the start (so the fused model starts as plain removal) and B A a LoRA on
W (B = 0); (3) fine-tune the group for a few epochs on calibration data so that its output matches
the original group's output; repeat (importance is recomputed after every removal). At the end
the low-rank terms are merged: the result is a plain model with fewer blocks.

`fusegpt(model, batches, remove=K)` works on any model whose blocks sit in a ModuleList /
Sequential of at least two structurally equal blocks (same class, same parameter names and
shapes): the stages of Swin / PVT / CSWin, the flat stacks of T2T-ViT / TNT / CrossViT, the
causal stack of `formers.sequence.gpt.GPT`. A block is removed by deleting it from its list,
which the saved record replays (`formers.transforms.load`).

What follows the official code (fuse_utils.py, run_fusion.py), and where this differs:
  - importance: cosine similarity over the channel axis of the final hidden states, averaged
    over tokens and samples; the most similar block goes (official `full_importance_eval`,
    `--iterative`). The hidden states here are the model's `forward_features` (after the final
    norm), not the raw last-block output.
  - group: `group_size` blocks including the removed one, placed around it as the official
    code does, clipped to the block's list (blocks of other stages are never touched).
  - coefficients: `C1` (out x r) zeros, `C2` (r x in) Kaiming-uniform, bias coefficient zeros,
    the LoRA on W with A Kaiming-uniform, B zeros (official FuseLinear with --coef-matrix
    --coef-lora; its weight-LoRA rank is fixed at 128, here `lora_rank`, clipped to the layer).
  - fine-tune: Adam(betas 0.9, 0.95), cosine schedule, coefficient lr 1e-3, every other group
    parameter (norms, biases, LoRA, ...) lr 9.65e-6, linear weights frozen, 20 epochs (official
    `Fuser.update`). The loss is the MSE between the group's output and the original group's
    (`loss="mse"`); the official code trains a KL divergence with softmax over the batch axis
    (`loss="kl"` here takes the softmax over the channel axis instead). The model stays in eval
    mode (no dropout / drop-path) while fine-tuning.
  - the low-rank terms are merged into plain Linear layers after each removal (the official
    code keeps them trainable through later removals and merges at save time).
Only nn.Linear layers are fused; other parameters of the removed block (convolutions, norms,
position tables) are dropped with it.
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import TransformError, model_name, record_transform, register_transform

PAPER = 37

__all__ = ["fusegpt", "removable_blocks", "block_importance", "fuse_group", "merge_fused", "FuseLinear"]


# ----------------------------------------------------------------------------- finding blocks


def _signature(module: nn.Module):
    return type(module), tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def _is_block(module: nn.Module) -> bool:
    """A composite module (not a bare layer) that holds at least one Linear."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm,
                           nn.modules.batchnorm._BatchNorm, nn.Embedding)):
        return False
    return any(isinstance(m, nn.Linear) for m in module.modules())


def removable_blocks(model: nn.Module, min_keep: int = 1) -> dict[str, nn.Module]:
    """{path: list} for every ModuleList / Sequential of structurally equal blocks that holds more
    than `min_keep` of them (one block of the list may go)."""
    found = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2 or len(mod) <= min_keep:
            continue
        kids = list(mod)
        if not all(_is_block(k) for k in kids):
            continue
        sig = _signature(kids[0])
        if all(_signature(k) == sig for k in kids[1:]):
            found[path] = mod
    return found


def _require_blocks(model, min_keep=1):
    lists = removable_blocks(model, min_keep)
    if not lists:
        raise TransformError(f"fusegpt: {model_name(model)} has no removable blocks (no ModuleList/Sequential of "
                             f"more than {min_keep} structurally equal transformer blocks)")
    return lists


def _bypass_output(args, out):
    """What a skipped block returns: its input, in the form of its output."""
    if isinstance(out, tuple) and len(out) == len(args):
        return tuple(args)
    return args[0]


def _next_args(args, out):
    """The arguments of the next block of a stack, from this block's arguments and output."""
    if isinstance(out, tuple) and len(out) == len(args):
        return tuple(out)
    return (out, *args[1:])


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# ----------------------------------------------------------------------------- Macro Influence


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _channel_dim(model, t: torch.Tensor) -> int:
    if t.ndim == 4 and t.shape[1] == getattr(model, "num_features", -1) and t.shape[-1] != t.shape[1]:
        return 1       # NCHW maps
    return -1          # tokens (B, N, C) or channels-last maps


def _similarity(model, full, part) -> torch.Tensor:
    """Mean cosine similarity over the channel axis of (a list of) final hidden states."""
    sims = [F.cosine_similarity(a.float(), b.float(), dim=_channel_dim(model, a)).mean()
            for a, b in zip(_tensors(full), _tensors(part))]
    return torch.stack(sims).mean()


@torch.no_grad()
def block_importance(model: nn.Module, batches, min_keep: int = 1) -> dict[tuple[str, int], float]:
    """Macro Influence of every removable block: 1 - cos(final hidden states, the same with the
    block skipped), averaged over the batches. Keys are (list path, index in the list); a block
    whose output shape differs from its input's (not a residual block) is left out."""
    lists = _require_blocks(model, min_keep)
    was = model.training
    model.eval()
    xs = [_inputs(b) for b in batches]
    full = [model.forward_features(x) for x in xs]
    scores = {}
    for path, mod in lists.items():
        for i, blk in enumerate(mod):
            shape_kept = []

            def bypass(m, args, out):
                skip = _bypass_output(args, out)
                same = [a.shape for a in _tensors(skip)] == [b.shape for b in _tensors(out)]
                shape_kept.append(same)
                return skip if same else out

            handle = blk.register_forward_hook(bypass)
            try:
                sim = torch.stack([_similarity(model, f, model.forward_features(x)) for f, x in zip(full, xs)]).mean()
            finally:
                handle.remove()
            if shape_kept and all(shape_kept):     # a block that changes shapes is no residual block
                scores[(path, i)] = float(1.0 - sim)
    model.train(was)
    if not scores:
        raise TransformError(f"fusegpt: {model_name(model)} has no removable blocks (the uniform block lists "
                             f"{', '.join(lists)} change the shape of their input)")
    return scores


# ----------------------------------------------------------------------------- learnable fusion


class FuseLinear(nn.Module):
    """A Linear with the matching Linear of a removed block injected (frozen) and weighted by a
    learnable rank-r matrix, plus a LoRA on its own frozen weight:
    W + B A + (C1 C2) * W_removed, bias b + c * b_removed. At creation it equals the Linear."""

    def __init__(self, target: nn.Linear, removed: nn.Linear, rank: int = 128, lora_rank: int = 128):
        super().__init__()
        if target.weight.shape != removed.weight.shape or (target.bias is None) != (removed.bias is None):
            raise ValueError(f"FuseLinear: shapes differ {tuple(target.weight.shape)} vs {tuple(removed.weight.shape)}")
        out_f, in_f = target.weight.shape
        w = target.weight.detach()
        self.in_features, self.out_features = in_f, out_f
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = None if target.bias is None else nn.Parameter(target.bias.detach().clone())
        self.register_buffer("fused_weight", removed.weight.detach().clone())
        self.register_buffer("fused_bias", None if removed.bias is None else removed.bias.detach().clone())
        lr_ = min(lora_rank, out_f, in_f)
        self.lora_A = nn.Parameter(w.new_empty(lr_, in_f))
        self.lora_B = nn.Parameter(w.new_zeros(out_f, lr_))
        self.coef_A = nn.Parameter(w.new_zeros(out_f, rank))     # C1: zeros, the fused term starts at 0
        self.coef_B = nn.Parameter(w.new_empty(rank, in_f))      # C2
        self.coef_bias = None if self.bias is None else nn.Parameter(w.new_zeros(out_f))
        for p in (self.lora_A, self.coef_B):
            if p.numel():
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.lora_B @ self.lora_A + (self.coef_A @ self.coef_B) * self.fused_weight

    def merged_bias(self):
        if self.bias is None:
            return None
        return self.bias + self.coef_bias * self.fused_bias

    def forward(self, x):
        return F.linear(x, self.merged_weight(), self.merged_bias())

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.bias is not None:
            lin.bias.copy_(self.merged_bias())
        return lin


def _set_child(root: nn.Module, path: str, new: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def fuse_group(targets, removed: nn.Module, rank: int = 128, lora_rank: int = 128) -> list[FuseLinear]:
    """Replace every Linear of each target block by a FuseLinear that injects the removed block's
    matching Linear (matched by name, in module order). Returns the new layers."""
    src = dict(_linears(removed))
    made = []
    for blk in targets:
        for name, lin in _linears(blk):
            if name not in src:
                raise ValueError(f"fusegpt: the removed block has no Linear {name!r}")
            f = FuseLinear(lin, src[name], rank, lora_rank)
            _set_child(blk, name, f)
            made.append(f)
    return made


def merge_fused(module: nn.Module) -> nn.Module:
    """Replace every FuseLinear under `module` by the plain Linear it computes."""
    for name, m in list(module.named_modules()):
        if isinstance(m, FuseLinear):
            _set_child(module, name, m.merge())
    return module


# ----------------------------------------------------------------------------- removal


def _group(index: int, length: int, size: int) -> list[int]:
    """The blocks fine-tuned with block `index` removed (official placement, clipped to the list)."""
    size = min(size, length)
    half = size / 2 - 1
    if index == 0 or index - 1 - half < 0:
        return list(range(0, size))
    if index + half > length - 1:
        return list(range(length - size, length))
    lo = index - 1 - (size // 2 - 1)
    return list(range(lo, lo + size))


def _delete_block(model: nn.Module, path: str, index: int):
    """Delete block `index` of the list at `path`; renumber feature_info entries naming its blocks."""
    mod = model.get_submodule(path)
    del mod[index]
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        prefix = f"{path}."
        kept = []
        for entry in info:
            name = entry.get("module", "") if isinstance(entry, dict) else ""
            tail = name[len(prefix):] if name.startswith(prefix) else ""
            if tail.isdigit():
                j = int(tail)
                if j == index:
                    continue
                if j > index:
                    entry = {**entry, "module": f"{prefix}{j - 1}"}
            kept.append(entry)
        model.feature_info = kept


@torch.no_grad()
def _capture(model, first: nn.Module, last: nn.Module, xs):
    """Per batch: the (args, kwargs) the first group block receives and the last one's output."""
    got = []
    state = {}

    def pre(m, args, kwargs):
        state["in"] = (args, kwargs)

    def post(m, args, out):
        state["out"] = out

    h1 = first.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = last.register_forward_hook(post)
    try:
        for x in xs:
            model.forward_features(x)
            got.append((state["in"][0], state["in"][1], state["out"]))
    finally:
        h1.remove()
        h2.remove()
    return got


def _run_group(blocks, args, kwargs):
    out = None
    for blk in blocks:
        out = blk(*args, **kwargs)
        args = _next_args(args, out)
    return out


def _loss(out, target, kind: str):
    pairs = list(zip(_tensors(out), _tensors(target)))
    if kind == "mse":
        return sum(F.mse_loss(a, b) for a, b in pairs) / len(pairs)
    if kind == "kl":
        return sum(F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="batchmean")
                   for a, b in pairs) / len(pairs)
    raise ValueError(f"fusegpt: loss must be 'mse' or 'kl', not {kind!r}")


@torch.no_grad()
def _group_loss(blocks, data, loss):
    return sum(_loss(_run_group(blocks, a, k), t, loss).item() for a, k, t in data) / len(data)


def _finetune(blocks, data, params_coef, params_base, epochs, lr, coef_lr, loss):
    groups = [g for g in ({"params": params_base, "lr": lr}, {"params": params_coef, "lr": coef_lr}) if g["params"]]
    steps = epochs * len(data)
    if not groups or steps == 0:
        return []
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = []
    for _ in range(epochs):
        total = 0.0
        for args, kwargs, target in data:
            opt.zero_grad()
            value = _loss(_run_group(blocks, args, kwargs), target, loss)
            value.backward()
            opt.step()
            sched.step()
            total += value.item()
        history.append(total / len(data))
    return history


def fusegpt(model: nn.Module, batches, remove: int = 1, fuse: bool = True, group_size: int = 8,
            rank: int = 128, lora_rank: int = 128, epochs: int = 20, lr: float = 9.65e-6,
            coef_lr: float = 1e-3, loss: str = "mse", min_keep: int = 1, lists=None, log=None) -> nn.Module:
    """Remove `remove` blocks one at a time, least Macro Influence first (recomputed after each
    removal), fusing each into its group and fine-tuning the group on `batches` (inputs or
    (inputs, targets) pairs); returns the model (changed in place) with plain Linear layers.

    fuse=False is plain removal followed by the same fine-tune (LoRA, norms, biases) without
    the injected weights; epochs=0 skips the fine-tune (then fusion equals plain removal).
    `lists` restricts removal to these list paths. `log(dict)` receives each step's figures.
    """
    if remove < 1:
        raise TransformError(f"fusegpt: remove must be >= 1 for {model_name(model)}, got {remove}")
    batches = list(batches)
    if not batches:
        raise TransformError(f"fusegpt: {model_name(model)} needs calibration batches")
    xs = [_inputs(b) for b in batches]
    was = model.training
    model.eval()
    removed = []
    for step in range(remove):
        scores = block_importance(model, batches, min_keep)
        if lists is not None:
            scores = {k: v for k, v in scores.items() if k[0] in lists}
        if not scores:
            raise TransformError(f"fusegpt: {model_name(model)} has no removable block left after removing "
                                 f"{len(removed)} (asked for {remove}, min_keep={min_keep})")
        path, index = min(scores, key=lambda k: (scores[k], k))
        stack = model.get_submodule(path)
        group = _group(index, len(stack), group_size)
        blocks = [stack[i] for i in group]
        data = _capture(model, blocks[0], blocks[-1], xs)
        victim = stack[index]
        kept = [b for i, b in zip(group, blocks) if i != index]
        frozen = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        fuse_group(kept, victim, rank, lora_rank)
        coef, base = [], []
        for blk in kept:
            for name, p in blk.named_parameters():
                if name.endswith(".weight") and isinstance(blk.get_submodule(name.rpartition(".")[0]), FuseLinear):
                    continue    # the frozen linear weight itself
                if name.rpartition(".")[2] in ("coef_A", "coef_B", "coef_bias"):
                    if fuse:        # plain removal: the injected term stays at zero
                        p.requires_grad_(True)
                        coef.append(p)
                    continue
                p.requires_grad_(True)
                base.append(p)
        _delete_block(model, path, index)
        before = _group_loss(kept, data, loss)
        history = _finetune(kept, data, coef, base, epochs, lr, coef_lr, loss)
        after = _group_loss(kept, data, loss)
        for blk in kept:
            merge_fused(blk)
        for p, g in frozen.items():
            p.requires_grad_(g)
        for blk in kept:
            for p in blk.parameters():
                p.requires_grad_(True)
        removed.append([path, index])
        if log is not None:
            log({"step": step, "removed": [path, index], "influence": scores[(path, index)],
                 "group": group, "loss_before": before, "loss_after": after, "loss": history})
    model.train(was)
    record_transform(model, "fusegpt", removed=removed)
    return model


def _rebuild(model, removed):
    for path, index in removed:
        _delete_block(model, path, int(index))
    return model


# ----------------------------------------------------------------------------- CLI


def _add_arguments(p):
    p.add_argument("--remove", type=int, default=1, help="blocks to remove (default 1)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="plain removal (same fine-tune, no fusion)")
    p.add_argument("--group-size", type=int, default=8, help="blocks fine-tuned together, the removed one included")
    p.add_argument("--rank", type=int, default=128, help="rank of the fusion coefficients (default 128)")
    p.add_argument("--lora-rank", type=int, default=128, help="rank of the LoRA on the kept weights (default 128)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tune epochs over the calibration batches")
    p.add_argument("--lr", type=float, default=9.65e-6, help="lr of norms, biases, LoRA")
    p.add_argument("--coef-lr", type=float, default=1e-3, help="lr of the fusion coefficients")
    p.add_argument("--loss", default="mse", choices=("mse", "kl"))
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dataset", default="fashion-mnist", help="calibration data: digits | fashion-mnist | folder | npz")
    p.add_argument("--data-dir", default=None, metavar="PATH")
    p.add_argument("--seed", type=int, default=0)


def _run(model, args):
    from .prune import calibration_batches
    torch.manual_seed(args.seed)
    batches = calibration_batches(model, args.dataset, args.data_dir, args.batch_size, args.calib_batches,
                                  args.seed, args.checkpoint)
    return fusegpt(model, batches, remove=args.remove, fuse=args.fuse, group_size=args.group_size, rank=args.rank,
                   lora_rank=args.lora_rank, epochs=args.epochs, lr=args.lr, coef_lr=args.coef_lr, loss=args.loss,
                   log=lambda d: print(f"fusegpt: removed {d['removed'][0]}[{d['removed'][1]}] "
                                       f"(influence {d['influence']:.4g}), group loss "
                                       f"{d['loss_before']:.4g} -> {d['loss_after']:.4g}"))


register_transform("fusegpt", "FuseGPT: remove the least influential blocks, fusing their weights into the neighbours",
                   _add_arguments, _run, _rebuild)


class _CallableModule(types.ModuleType):
    """`formers.transforms.fusegpt` is this module once imported; calling it calls `fusegpt`."""

    def __call__(self, *args, **kwargs):
        return fusegpt(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
