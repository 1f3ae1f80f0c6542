"""SReT: Sliced Recursive Transformer.

Paper (catalog id 64): "Sliced Recursive Transformer", Shen, Liu and Xing, arXiv 2111.05297.
Official code: szq0214/SReT (SReT.py).

The idea, in three lines:
  recursion: each transformer block is applied twice with the same weights (depth for free), a small
      non-shared MLP ("non-linear projection") between the passes, every residual mixed by learnable scalars;
  sliced group self-attention: tokens attend only within G equal slices (G1 on the first pass, G2 on the
      recursive one), cutting the N^2 cost by G; a 3-stage conv-stem pyramid (strides 8, 16, 32) holds it together.

Slices on the recursive pass. The official code shuffles the tokens with a fresh `torch.randperm` before
slicing them on the recursive pass (where G2 > 1, i.e. stage 1), at training *and* at evaluation, so its eval
logits are random. Here training shuffles the same way (`train_shuffle=True`), but evaluation is
deterministic, with `eval_order`:
  "strided"    (default) slice r takes tokens r, r+G, r+2G, ... - like a random permutation, each slice
               spreads over the whole image; equal to the official model with randperm returning that order;
  "contiguous" slice r takes tokens r*N/G ... (r+1)*N/G-1 - the official model with randperm = identity;
  "random"     a fresh permutation per call, as the official code (not deterministic).
The first pass always uses contiguous slices, as the official code.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from formers.checkpoint import release_state_dict
from formers.layers import DropPath, Mlp, Scale, check_image_input, sdpa, to_2tuple
from formers.layers.pool import pool_map
from formers.models.base import Backbone, stage_intermediates
from formers.registry import ModelCard, register_model

__all__ = ["SReT", "SlicedGroupAttention", "checkpoint_filter_fn"]

_ORDERS = ("strided", "contiguous", "random")


def _half(size: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1."""
    return (size - 1) // 2 + 1


def _check_slices(h: int, w: int, name: str, groups, what: str = ""):
    """Raise the ValueError for an input (or img_size) whose token grid in some stage does not split into
    that stage's slices; `groups` = ((groups1, groups2) per stage)."""
    gh, gw = _half(_half(_half(h))), _half(_half(_half(w)))
    for s, pair in enumerate(groups):
        if s:
            gh, gw = _half(gh), _half(gw)
        for g in sorted(set(pair)):
            if (gh * gw) % g:
                raise ValueError(
                    f"{name}: cannot take {what or f'a {h}x{w} input'}: stage {s + 1} has a {gh}x{gw} token grid, "
                    f"which does not split into {g} equal slices; height and width that are multiples of 32 work")


def _resize_pos_map(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (1, C, h0, w0) position map at the stem's (h, w): bicubic, or as it is at its own size (under
    torch.compile / torch.export it always resamples, exact at the same size, so no test pins the size)."""
    if not torch.compiler.is_compiling() and (h, w) == (pos.shape[-2], pos.shape[-1]):
        return pos
    return F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)


# sizes from the input: each is one eager node of a torch.fx graph
torch.fx.wrap("_check_slices")
torch.fx.wrap("_resize_pos_map")


class SlicedGroupAttention(nn.Module):
    """Multi-head self-attention inside G equal slices of the N tokens (G must divide N).

    forward(x, recursive): G = groups1 on the first pass, groups2 on the recursive one, where the
    slices are taken in the order described in the module docstring.
    """

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, eval_order: str = "strided",
                 train_shuffle: bool = True):
        super().__init__()
        if eval_order not in _ORDERS:
            raise ValueError(f"eval_order must be one of {_ORDERS}, got {eval_order!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.groups1, self.groups2 = groups1, groups2
        self.eval_order = eval_order
        self.train_shuffle = train_shuffle
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _order(self, recursive: bool) -> str:
        if not recursive:
            return "contiguous"
        if self.training and self.train_shuffle:
            return "random"
        return self.eval_order

    def forward(self, x, recursive: bool = False):
        # sizes by flatten/unflatten: no -1 on the batch (a batch of 0 works), no unpacking of x.shape (torch.fx)
        g = self.groups2 if recursive else self.groups1
        order = self._order(recursive) if g > 1 else "contiguous"
        perm = None
        if order == "random":
            perm = torch.randperm(x.shape[1], device=x.device)
            x = x[:, perm]
        if order == "strided":  # slice r = tokens r, r+g, r+2g, ...
            x = x.unflatten(1, (-1, g)).transpose(1, 2)
        else:
            x = x.unflatten(1, (g, -1))
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*G, heads, N/G, head_dim): 4-D for the flash kernel and ONNX
        x = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0).unflatten(0, (x.shape[0], g))
        x = x.transpose(2, 3).flatten(3)  # (B, G, N/G, C)
        if order == "strided":
            x = x.transpose(1, 2)
        x = x.flatten(1, 2)
        if perm is not None:
            x = x[:, torch.argsort(perm)]
        return self.proj_drop(self.proj(x))


def _coefficient() -> Scale:
    """A learnable scalar gain, initialised at 1 (the paper's learnable residual coefficients)."""
    return Scale(1)


class Block(nn.Module):
    """The weight-shared block: x = a1*x + a2*Attn(LN(x)); x = a3*x + a4*MLP(LN(x)), with scalar a1..a4."""

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int, mlp_ratio: float,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, **attn_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SlicedGroupAttention(dim, num_heads, groups1, groups2, True, attn_drop, drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1, self.coefficient2 = _coefficient(), _coefficient()
        self.coefficient3, self.coefficient4 = _coefficient(), _coefficient()

    def forward(self, x, recursive: bool = False):
        x = self.coefficient1(x) + self.coefficient2(self.drop_path(self.attn(self.norm1(x), recursive)))
        return self.coefficient3(x) + self.coefficient4(self.drop_path(self.mlp(self.norm2(x))))


class NonProj(nn.Module):
    """The non-shared "non-linear projection" after every pass: x = a1*x + a2*MLP(LN(x))."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1, self.coefficient2 = _coefficient(), _coefficient()

    def forward(self, x):
        return self.coefficient1(x) + self.coefficient2(self.mlp(self.norm1(x)))


class SReTStage(nn.Module):
    """[downsample] then, for each of `recursive_num` shared blocks, `depth/recursive_num` passes
    through it, each pass followed by its own NonProj. Pass k of the stage (counting from 0 over
    all blocks) is a recursive one when k is odd, the official marking ((i+2) % 4 == 0 over its
    [B0, NP0, B0, NP1, B1, NP2, ...] list). NCHW map in, NCHW map out.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, recursive_num: int, num_heads: int, groups1: int,
                 groups2: int, mlp_ratio: float, np_mlp_ratio: float, downsample: bool, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path=(), **attn_kwargs):
        super().__init__()
        if depth % recursive_num:
            raise ValueError(f"depth {depth} must be a multiple of recursive_num {recursive_num}")
        self.loops = depth // recursive_num
        # the official pooling: a depthwise-grouped 3x3 stride-2 conv widening in_dim -> dim
        self.downsample = nn.Conv2d(in_dim, dim, 3, 2, 1, groups=in_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, groups1, groups2, mlp_ratio, drop, attn_drop, drop_path[r], **attn_kwargs)
            for r in range(recursive_num)])
        self.non_projs = nn.ModuleList([NonProj(dim, np_mlp_ratio, drop) for _ in range(depth)])
        self.grad_checkpointing = False

    def _pass(self, k: int, x):
        x = self.blocks[k // self.loops](x, recursive=k % 2 == 1)
        return self.non_projs[k](x)

    def forward(self, x):
        x = self.downsample(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for k in range(len(self.non_projs)):
            if self.grad_checkpointing and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(self._pass, k, x, use_reentrant=False)
            else:
                x = self._pass(k, x)
        return x.transpose(1, 2).unflatten(2, hw)


class ConvStem(nn.Module):
    """Three 3x3 stride-2 convs (bias, then BatchNorm and ReLU): C_in -> dim/2 -> dim -> dim, stride 8."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2)
        self.conv2, self.bn2 = nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim)
        self.conv3, self.bn3 = nn.Conv2d(dim, dim, 3, 2, 1), nn.BatchNorm2d(dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


class SReT(Backbone):
    """Conv stem (stride 8) + learned position map, three SReTStages (strides 8, 16, 32), then
    global average pooling, LayerNorm and a linear head.

    Inputs: any size whose token grid in every stage (ceil(H/8) x ceil(W/8), halved, rounding up,
    per stage) splits into that stage's slices; H and W multiples of 32 always work with the paper's
    slices. The (1, C, H/8, W/8) position map is resized bicubically for other sizes.
    forward_features returns the last stage's NCHW map; `eval_order` / `train_shuffle`: see the module docstring.
    """

    head_norm = True  # `norm` acts on the pooled features, before the classifier
    script_unsupported = ("its recursive passes pick a shared block by a loop counter, and TorchScript indexes "
                          "a ModuleList by constants only")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, base_dims=(32, 32, 32),
                 depth=(4, 10, 6), recursive_num=(2, 5, 3), heads=(2, 4, 8), groups1=(8, 4, 1), groups2=(2, 1, 1),
                 mlp_ratio: float = 3.6, np_mlp_ratio: float = 1.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, eval_order: str = "strided",
                 train_shuffle: bool = True, global_pool: str = "avg"):
        super().__init__()
        num_stages = len(depth)
        if not all(len(v) == num_stages for v in (base_dims, recursive_num, heads, groups1, groups2)):
            raise ValueError("base_dims, depth, recursive_num, heads, groups1 and groups2 need one entry per stage")
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        h, w = to_2tuple(img_size)
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = dims[-1]
        self.groups = [(g1, g2) for g1, g2 in zip(groups1, groups2)]
        self.input_divisor = self.min_input_size = self._size_divisor()

        self.patch_embed = ConvStem(in_chans, dims[0])
        self.pos_grid = self.stage_grids((h, w))[0]
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *self.pos_grid))
        self.pos_drop = nn.Dropout(drop_rate)
        total, start = sum(depth), 0
        self.stages = nn.ModuleList()
        self.feature_info = []
        for s in range(num_stages):
            # the official rates: rate * i / total over the stage's depth, of which the first
            # recursive_num go to its shared blocks (NonProj layers have no drop path)
            dpr = [drop_path_rate * i / total for i in range(start, start + depth[s])]
            start += depth[s]
            self.stages.append(SReTStage(
                dims[s - 1] if s else dims[0], dims[s], depth[s], recursive_num[s], heads[s], groups1[s], groups2[s],
                mlp_ratio, np_mlp_ratio, downsample=s > 0, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr,
                eval_order=eval_order, train_shuffle=train_shuffle))
            self.feature_info.append(dict(num_chs=dims[s], reduction=8 * 2 ** s, module=f"stages.{s}"))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        self.check_size((h, w), f"img_size {h}x{w}")
        if h % self.input_divisor or w % self.input_divisor:
            raise ValueError(f"SReT: img_size {h}x{w} must be a multiple of {self.input_divisor}")

    def init_weights(self):
        # as the official code: position map trunc-normal(0.02); Linear/Conv at torch defaults; unit LayerNorms
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def stage_grids(self, hw) -> list[tuple[int, int]]:
        h, w = _half(_half(_half(hw[0]))), _half(_half(_half(hw[1])))
        grids = [(h, w)]
        for _ in range(1, len(self.groups)):
            h, w = _half(h), _half(w)
            grids.append((h, w))
        return grids

    def check_size(self, hw, what: str):
        _check_slices(hw[0], hw[1], getattr(self, "model_name", type(self).__name__), tuple(self.groups), what)

    def _size_divisor(self) -> int:
        """The declared input rule: H and W multiples of the smallest m (the total stride times a power
        of two) at which every stage's grid splits into its slices. Multiples of m then always split
        (each stage's grid is a multiple of m's); the slices alone would admit a few scattered other
        sizes (e.g. 249-255 px for the paper's), which the model refuses so that what it declares
        (input_divisor, min_input_size) is exactly what it takes."""
        m = 8 * 2 ** (len(self.groups) - 1)
        while True:
            grids = self.stage_grids((m, m))
            if all((gh * gw) % g == 0 for (gh, gw), groups in zip(grids, self.groups) for g in groups):
                return m
            m *= 2

    def check_input(self, x):
        hw = check_image_input(self, x)  # the tensor's rank, channels, dtype and device
        # one node under torch.fx (hw are then Proxies): the slice test runs on the real size
        _check_slices(hw[0], hw[1], getattr(self, "model_name", type(self).__name__), tuple(self.groups), "")
        return super().check_input(x)  # and the declared divisor

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def stem(self, x):
        x = self.patch_embed(x)
        return self.pos_drop(x + _resize_pos_map(self.pos_embed, x.shape[-2], x.shape[-1]))

    def forward_features(self, x):
        """(B, C, H, W) -> the last stage's map (B, num_features, H/32, W/32)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        if not self.global_pool:
            return x
        x = self.norm(pool_map(x, self.global_pool))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """One NCHW map per requested stage. The final LayerNorm acts on pooled features, so `norm`
        changes nothing here."""
        if output_fmt != "NCHW":
            name = getattr(self, "model_name", type(self).__name__)
            raise ValueError(f"{name}: output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        self.check_input(x)
        return stage_intermediates(self.stages, self.stem(x), indices, stop_early, intermediates_only)


_BLOCK = re.compile(r"^transformers\.(\d+)\.blocks\.(\d+)\.(.*)$")
_POOL = re.compile(r"^pools\.(\d+)\.conv\.(.*)$")


def checkpoint_filter_fn(state_dict: dict, model: SReT) -> dict:
    """Map an official SReT release (or our own state dict) to our key names.

    The official stage `transformers.{s}` lists its modules as [B0, NP0, B0, NP1, B1, NP2, B1, NP3, ...]
    (each shared block twice, so its tensors appear under two indices; one copy is kept):
      transformers.{s}.blocks.{k}.* -> stages.{s}.blocks.{k // (2 * loops)}.*  (k even),
                                       stages.{s}.non_projs.{k // 2}.*        (k odd);
      .coefficient{n}.bias -> .coefficient{n}.scale; pools.{s}.conv.* -> stages.{s+1}.downsample.*;
    pos_embed, patch_embed.*, norm.*, head.* keep their names. A position map made for another grid
    is resized bicubically. timm has no SReT.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        block, pool = _BLOCK.match(k), _POOL.match(k)
        if block:
            s, i, rest = int(block.group(1)), int(block.group(2)), block.group(3)
            rest = re.sub(r"^(coefficient\d)\.bias$", r"\1.scale", rest)
            if i % 2 == 0:
                k = f"stages.{s}.blocks.{i // (2 * model.stages[s].loops)}.{rest}"
            else:
                k = f"stages.{s}.non_projs.{i // 2}.{rest}"
        elif pool:
            k = f"stages.{int(pool.group(1)) + 1}.downsample.{pool.group(2)}"
        out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and tuple(pos.shape[-2:]) != model.pos_grid:
        if pos.dim() != 4 or pos.shape[:2] != model.pos_embed.shape[:2]:
            from formers.checkpoint import does_not_fit
            raise does_not_fit(model, f"pos_embed has shape {tuple(pos.shape)}; the model's is "
                                      f"{tuple(model.pos_embed.shape)} (1, channels, height, width)")
        out["pos_embed"] = F.interpolate(pos.float(), size=model.pos_grid, mode="bicubic",
                                         align_corners=False).to(pos.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Numbers from the official README (ImageNet-1K, 224x224, trained without distillation).

_COMMON = dict(depth=(4, 10, 6), recursive_num=(2, 5, 3), groups1=(8, 4, 1), groups2=(2, 1, 1))
_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="patch_embed.conv1", classifier="head")
_NOTES = ("recursive-pass slices deterministic at eval (strided order; the official code shuffles them "
          "randomly even at eval); ")


def _card(name: str, params: str, macs: float, top1: float, notes: str) -> ModelCard:
    return ModelCard(paper=64, arxiv="2111.05297", repo="szq0214/SReT", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1, notes=_NOTES + notes)


@register_model(_card("SReT_T", "4.8", 1.1, 76.0,
                      "distilled (SReT_T_distill, same architecture): 77.6; no-slice SReT_T: 1.4G, 76.1"), **_CFG)
def sret_tiny(**kwargs):
    return SReT(**{**_COMMON, "base_dims": (32, 32, 32), "heads": (2, 4, 8), "mlp_ratio": 3.6,
                   "np_mlp_ratio": 1, **kwargs})


@register_model(_card("SReT_LT", "5.0", 1.2, 76.7,
                      "distilled (SReT_LT_distill, same architecture): 77.7; slices [16,14,1]/[1,1,1]: 76.6"),
                **_CFG)
def sret_light_tiny(**kwargs):
    return SReT(**{**_COMMON, "base_dims": (32, 32, 32), "heads": (2, 4, 8), "mlp_ratio": 4.0,
                   "np_mlp_ratio": 1, **kwargs})


@register_model(_card("SReT_S", "20.9", 4.2, 81.9, "no-slice SReT_S: 4.7G, 82.0"), **_CFG)
def sret_small(**kwargs):
    return SReT(**{**_COMMON, "base_dims": (42, 42, 42), "heads": (3, 6, 12), "mlp_ratio": 3.0,
                   "np_mlp_ratio": 2, **kwargs})


@register_model(ModelCard(paper=64, arxiv="2111.05297", repo="szq0214/SReT", img_size=32, status="reduced",
                          notes="demo: widths 24/48/96, depth 2/4/2 with 1/2/1 shared blocks, slices 4/2/1 then 2/1/1"),
                **_CFG)
def sret_demo(**kwargs):
    return SReT(**{"img_size": 32, "base_dims": (24, 24, 24), "heads": (1, 2, 4), "depth": (2, 4, 2),
                   "recursive_num": (1, 2, 1), "groups1": (4, 2, 1), "groups2": (2, 1, 1), "mlp_ratio": 3.0,
                   "np_mlp_ratio": 1, **kwargs})
