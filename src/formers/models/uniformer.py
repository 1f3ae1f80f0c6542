"""UniFormer: local convolution in the shallow stages, global self-attention in the deep ones.

Paper (catalog id 49): "UniFormer: Unifying Convolution and Self-attention for Visual Recognition",
Li et al., arXiv 2201.09450. Official code: Sense-X/UniFormer (image_classification/models/uniformer.py,
and image_classification/models/uniformer_light.py for the light XXS/XS models).

The idea, in three lines:
  every block has one shape: dynamic position encoding (x += depthwise 3x3 conv of x), then
      x += relation-aggregator(norm(x)), then x += FFN(norm(x));
  stages 1-2 aggregate locally with a learned 5x5 depthwise "affinity" between 1x1 convs (CBlock, BatchNorm),
      stages 3-4 globally with multi-head self-attention (SABlock, LayerNorm); final BatchNorm, average pool;
  the light models keep a cls token in stages 3-4 and let only the half of the tokens it attends to most
      through attention, the rest merged into one token whose update they all share (Evo-ViT style).

Input sizes: any height and width that are multiples of 32 (the total stride); there are no position
tables (the position encoding is a convolution), so nothing is resized. The light models take the same
sizes: at a 32-pixel side the last stage has a single token, which they then merge whole.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import release_state_dict
from formers.layers.attention import Attention, sdpa
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.helpers import feature_take_indices
from formers.layers.mlp import ConvMlp, Mlp
from formers.layers.patch_embed import PatchEmbed
from formers.layers.scale import Scale
from formers.layers.pool import pool_map
from formers.layers.windows import compiling
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["UniFormer", "UniFormerLight", "CBlock", "SABlock", "EvoSABlock", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------------
# Patch embeddings (all return NCHW maps)

class PatchEmbedNCHW(PatchEmbed):
    """Conv k=s=patch, then LayerNorm over channels (eps 1e-5, torch's default, as the official code)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm)

    def forward(self, x):
        return super().forward(x).permute(0, 3, 1, 2).contiguous()


class ConvStem(nn.Module):
    """The overlapping stem of S-dagger and the light models: conv3x3 s2 -> BN -> GELU -> conv3x3 s2 -> BN."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(embed_dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class ConvDownsample(nn.Module):
    """The overlapping downsampling of S-dagger between stages: conv3x3 s2 -> BN."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, embed_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        return self.norm(self.conv(x))


# ---------------------------------------------------------------------------------------------
# Blocks

class CBlock(nn.Module):
    """Local MHRA on an NCHW map: x += DWConv3x3(x); x += conv2(DWConv5x5(conv1(BN(x)))); x += ConvMlp(BN(x)).

    The 5x5 depthwise conv is the learned local affinity (named `attn`, as in the official code).
    `layer_scale_init_value` (None: off) multiplies both branches by learned per-channel scales; the
    official image models never use it in CBlocks (only token-labeling UniFormer-L does).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float | None = None):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.ls1 = nn.Identity() if layer_scale_init_value is None else Scale(dim, layer_scale_init_value, False)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = nn.Identity() if layer_scale_init_value is None else Scale(dim, layer_scale_init_value, False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.ls1(self.conv2(self.attn(self.conv1(self.norm1(x))))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class SABlock(nn.Module):
    """Global MHRA on a (B, C, *spatial) map: x += DWConv3x3(x), then on the flattened tokens a pre-norm
    transformer block (LayerNorm eps 1e-6, multi-head self-attention, MLP), optionally layer-scaled.

    `mix` is the token part, on (B, N, C); `forward` wraps it with the position conv and the
    flatten / unflatten, so a subclass with another `pos_embed` (a 3-D conv for video) reuses it.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float | None = None, norm_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = nn.Identity() if layer_scale_init_value is None else Scale(dim, layer_scale_init_value)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = nn.Identity() if layer_scale_init_value is None else Scale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mix(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x):
        x = x + self.pos_embed(x)
        shape = x.shape
        x = self.mix(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(shape)


class EvoSABlock(SABlock):
    """SABlock of the light models, with a cls token and Evo-ViT token pruning.

    It carries `score` (B, N): per patch token, the cls token's attention to it (mean over heads),
    kept as a running mix `(1 - trade_off) * score + trade_off * new`. With prune_ratio 1 every
    token goes through attention (the first stage-3 block, which starts the score). Otherwise:
      the `int(N * prune_ratio)` tokens with the highest score go through the block with the cls token
          and one "representative" token, the score-weighted mean of the others;
      the other tokens skip the block and get the representative token's attention + MLP outputs
          added (the "fast update"); only the kept tokens' scores are refreshed.
    Pruning happens in eval mode too (the official inference sorts in place; the maths is the same).
    The result goes back to raster order, so the map is a normal (B, C, H, W) map between blocks.
    No layer scale here: the released light models do not use it.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 prune_ratio: float = 1.0, trade_off: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, None, norm_eps)
        if not 0 < prune_ratio <= 1:
            raise ValueError(f"prune_ratio must be in (0, 1], got {prune_ratio}")
        self.prune_ratio = prune_ratio
        self.trade_off = trade_off

    def _attention(self, x):
        """Self-attention on (B, N, C) tokens whose first is the cls token. Also returns the cls token's
        attention probabilities over the other N - 1 tokens, averaged over heads (before dropout)."""
        attn = self.attn
        b, n = x.shape[0], x.shape[1]  # indexed, and no -1 below: torch.fx traces it, a batch of 0 works
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = sdpa(q, k, v, dropout=attn.attn_drop if self.training else 0.0)
        cls_probs = ((q[:, :, :1] @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(-1)
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)))
        return out, cls_probs[:, :, 0, 1:].mean(1)

    def _mix(self, x):
        """The transformer block on [cls, tokens...]; returns the tokens, the last token's two branch
        outputs summed (the fast update, undropped) and the new cls attention scores."""
        y, cls_attn = self._attention(self.norm1(x))
        x = x + self.drop_path(y)
        z = self.mlp(self.norm2(x))
        x = x + self.drop_path(z)
        return x, y[:, -1:] + z[:, -1:], cls_attn

    def _update(self, old, new):
        return (1 - self.trade_off) * old + self.trade_off * new

    def forward(self, x, cls_token, score):
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), raster order
        if self.prune_ratio == 1:
            out, _, cls_attn = self._mix(torch.cat([cls_token, tokens], dim=1))
            score = cls_attn if score is None else self._update(score, cls_attn)
            cls_token, tokens = out[:, :1], out[:, 1:]
        else:
            if score is None:
                raise ValueError("EvoSABlock: a pruning block needs the score of an earlier unpruned block")
            keep = _kept_tokens(tokens, self.prune_ratio)
            order = torch.argsort(score, dim=1, descending=True)  # most attended first
            index = order.unsqueeze(-1).expand(b, h * w, c)
            tokens, score = tokens.gather(1, index), score.gather(1, order)
            kept, dropped = tokens[:, :keep], tokens[:, keep:]
            weights = score[:, keep:] / score[:, keep:].sum(dim=1, keepdim=True)
            merged = (weights.unsqueeze(-1) * dropped).sum(dim=1, keepdim=True)
            out, fast, cls_attn = self._mix(torch.cat([cls_token, kept, merged], dim=1))
            score = self._refresh(score, cls_attn, keep)
            cls_token = out[:, :1]
            tokens = torch.cat([out[:, 1:-1], dropped + fast], dim=1)
            tokens = torch.empty_like(tokens).scatter(1, index, tokens)  # back to raster order
            score = torch.empty_like(score).scatter(1, order, score)
        return tokens.transpose(1, 2).reshape(b, c, h, w), cls_token, score

    def _refresh(self, score, cls_attn, keep: int):
        """The sorted score with the kept tokens' entries updated by `cls_attn` (the cls token's attention
        to [kept..., merged]). The official code tells the cases apart by shape: when a single token is
        dropped (keep + 1 == N) it refreshes that token's score too, with the attention to the merged one.
        Written with a mask, not a Python test on the sizes, so torch.export keeps it for every size."""
        n = score.shape[1]
        pos = torch.arange(n, device=score.device)
        refresh = (pos < keep) | ((pos == keep) & (pos == n - 1))
        new = F.pad(cls_attn, (0, n - keep - 1))  # lined up with the sorted tokens; the tail is not used
        return torch.where(refresh, self._update(score, new), score)


def _kept_tokens(tokens: torch.Tensor, ratio: float) -> int:
    """How many of the (B, N, C) tokens a pruning block keeps: int(N * ratio), as the official code. Under
    torch.compile / torch.export (N symbolic) the same number in integer arithmetic, N * p // q with
    p / q = ratio exactly (equal to int(N * ratio) for the released ratio, 0.5). One torch.fx node."""
    n = tokens.shape[1]
    if compiling():
        p, q = ratio.as_integer_ratio()
        return n * p // q
    return int(n * ratio)


torch.fx.wrap("_kept_tokens")


def pool_score(score, hw: tuple[int, int]):
    """The light models' stage-3 -> stage-4 score: 2x2 average pooled, rescaled to keep its sum."""
    b = score.shape[0]
    pooled = F.avg_pool2d(score.reshape(b, 1, hw[0], hw[1]), 2).flatten(1)
    return pooled * (score.sum(dim=1, keepdim=True) / pooled.sum(dim=1, keepdim=True))


class UniFormerStage(nn.Module):
    """A patch embedding (stride 4 for the first stage, 2 after), then `depth` blocks, on NCHW maps."""

    def __init__(self, patch_embed: nn.Module, blocks, drop: float = 0.0):
        super().__init__()
        self.patch_embed = patch_embed
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def _run(self, block, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x):
        x = self.pos_drop(self.patch_embed(x))
        for block in self.blocks:
            x = self._run(block, x)
        return x


# ---------------------------------------------------------------------------------------------
# Models

class UniFormer(Backbone):
    """Four stages (CBlock, CBlock, SABlock, SABlock) at strides 4, 8, 16, 32 -> BatchNorm -> mean -> linear.

    `conv_stem=False`: non-overlapping patch embeddings (conv k=s=4, then k=s=2, each + LayerNorm);
    `conv_stem=True` (S-dagger): the two-conv stem, then conv3x3 s2 + BN downsamplings.
    Heads per attention stage: dim // head_dim. `layer_scale_init_value` switches layer scale on in
    the SABlocks (UniFormer-B+LS; the official code does it with a module-global flag);
    `layer_scale_conv` adds it to the CBlocks too.
    """

    input_divisor = 32
    script_unsupported = ("the stages run through a Python generator (shared with forward_intermediates) and call "
                          "their blocks through *args, neither of which TorchScript compiles")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, depths=(3, 4, 8, 3),
                 embed_dims=(64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 conv_stem: bool = False, layer_scale_init_value: float | None = None,
                 layer_scale_conv: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if len(depths) != 4 or len(embed_dims) != 4:
            raise ValueError(f"{type(self).__name__}: depths and embed_dims need four entries (one per stage)")
        if any(d % head_dim for d in embed_dims[2:]):
            raise ValueError(f"{type(self).__name__}: attention stage widths {embed_dims[2:]} must be multiples "
                             f"of head_dim {head_dim}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.global_pool = self.check_pool(global_pool)
        self.num_features = embed_dims[-1]
        self.conv_stem = conv_stem
        self.grad_checkpointing = False

        mlp_ratios = mlp_ratio if isinstance(mlp_ratio, (tuple, list)) else (mlp_ratio,) * 4
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        prev = in_chans
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            blocks = [self._make_block(i, j, dim, dim // head_dim, mlp_ratios[i], qkv_bias, drop_rate,
                                       attn_drop_rate, dpr[i][j], layer_scale_init_value, layer_scale_conv)
                      for j in range(depth)]
            self.stages.append(UniFormerStage(self._make_patch_embed(i, prev, dim), blocks,
                                              drop_rate if i == 0 else 0.0))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = dim
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)  # as the official code; convs keep torch's init

    def _make_patch_embed(self, i: int, in_chans: int, dim: int) -> nn.Module:
        if self.conv_stem:
            return ConvStem(in_chans, dim) if i == 0 else ConvDownsample(in_chans, dim)
        return PatchEmbedNCHW(4 if i == 0 else 2, in_chans, dim)

    def _make_block(self, i, j, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                    layer_scale_init_value, layer_scale_conv) -> nn.Module:
        if i < 2:
            return CBlock(dim, mlp_ratio, drop, drop_path, layer_scale_init_value if layer_scale_conv else None)
        return SABlock(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, layer_scale_init_value)


    def no_weight_decay(self) -> set[str]:
        # The official recipe (DeiT's) decays every weight tensor of 2+ dims, the position convs included,
        # and skips only 1-D tensors (biases, norms, layer scales) and the light models' cls_token.
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n == "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _stages(self, x, last: int):
        """Run stages 0..last; yield each stage's output map (and the cls token: None here)."""
        for stage in self.stages[:last + 1]:
            x = stage(x)
            yield x, None

    def forward_features(self, x):
        """(B, C, H, W) -> the BatchNorm'ed last-stage map (B, C4, H/32, W/32)."""
        self.check_input(x)
        for x, _ in self._stages(x, len(self.stages) - 1):
            pass
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = pool_map(x, self.global_pool)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """One NCHW map per requested stage (`norm`: the last stage's through the final BatchNorm) and,
        unless `intermediates_only`, the forward_features output (with `stop_early`, the last map run)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        self.check_input(x)
        last = len(self.stages) - 1
        take, max_index = feature_take_indices(len(self.stages), indices)
        stop = max_index if stop_early or intermediates_only else last
        intermediates = []
        for i, (x, _) in enumerate(self._stages(x, stop)):
            if i == last:
                x_norm = self.norm(x)
                if i in take:
                    intermediates.append(x_norm if norm else x)
                x = x_norm
            elif i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates


class UniFormerLight(UniFormer):
    """UniFormer-XXS/XS: a conv stem, patch-embedding downsamplings, MLP ratio 3 and, in stages 3-4,
    EvoSABlocks with a cls token (zeros at init, widened by `cls_upsample` between the stages).

    `prune_ratios` / `trade_offs`: one value per block of stages 3 and 4 (the first of stage 3 must be 1).
    Classification is the linear head on the averaged BatchNorm'ed map: this is the official inference.
    The official training adds a second loss on the cls token (`head_cls(norm_cls(cls))`, each loss
    weighted 0.5), so, as the official model does, forward in train mode returns both logits as
    (head, cls_head) (with a classifier): the cls head and its norm are trained, every parameter gets a
    gradient (DDP, timm's backward test). `set_cls_head_training(False)` makes train mode return the
    head's logits only (then norm_cls and head_cls go untrained).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, depths=(2, 5, 8, 2),
                 embed_dims=(56, 112, 224, 448), head_dim: int = 28, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, conv_stem: bool = True, prune_ratios=None, trade_offs=None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg"):
        n3, n4 = depths[2], depths[3]
        default = ((1.0,) + (0.5,) * (n3 - 1), (0.5,) * n4)
        self._prune = tuple(tuple(r) for r in (prune_ratios or default))
        self._trade = tuple(tuple(t) for t in (trade_offs or default))
        if [len(r) for r in self._prune] != [n3, n4] or [len(t) for t in self._trade] != [n3, n4]:
            raise ValueError(f"UniFormerLight: prune_ratios and trade_offs need ({n3}, {n4}) values "
                             "(one per block of stages 3 and 4)")
        if n3 < 1 or self._prune[0][0] != 1:
            raise ValueError("UniFormerLight: the first stage-3 block must keep every token (prune_ratio 1); "
                             "it starts the attention score that later blocks prune by")
        super().__init__(num_classes, in_chans, img_size, depths, embed_dims, head_dim, mlp_ratio, qkv_bias,
                         conv_stem, None, False, drop_rate, attn_drop_rate, drop_path_rate, global_pool)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[2]))
        self.cls_upsample = nn.Linear(embed_dims[2], embed_dims[3])
        self.norm_cls = nn.LayerNorm(embed_dims[3])
        self.head_cls = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        for m in (self.cls_upsample, self.norm_cls, self.head_cls):
            m.apply(init_trunc_normal)
        self.cls_head_training = True  # the official training forward: (head, cls_head) logits

    def _make_patch_embed(self, i: int, in_chans: int, dim: int) -> nn.Module:
        if i == 0 and self.conv_stem:
            return ConvStem(in_chans, dim)
        return PatchEmbedNCHW(4 if i == 0 else 2, in_chans, dim)

    def _make_block(self, i, j, dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                    layer_scale_init_value, layer_scale_conv) -> nn.Module:
        if i < 2:
            return CBlock(dim, mlp_ratio, drop, drop_path)
        return EvoSABlock(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path,
                          prune_ratio=self._prune[i - 2][j], trade_off=self._trade[i - 2][j])

    def set_cls_head_training(self, enable: bool = True):
        self.cls_head_training = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        super().reset_classifier(num_classes, global_pool)
        self.head_cls = self._new_module(lambda: self.make_classifier(num_classes))

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        n = len(self.stages)
        if n < 3:
            self.cls_token = None  # the cls token starts in stage 3
        if n < 4:
            self.cls_upsample = nn.Identity()  # it widens the cls token for stage 4
        if prune_head or n < 4:
            self.norm_cls = nn.Identity()
        return take

    def _stages(self, x, last: int):
        """As UniFormer._stages; the cls token and the attention score run along through stages 3-4."""
        cls_token = score = None
        for i, stage in enumerate(self.stages[:last + 1]):
            if i < 2:
                x = stage(x)
            else:
                x = stage.pos_drop(stage.patch_embed(x))
                if i == 2:
                    # a copy, not an expand() view: under no_grad such a view of a parameter is taken
                    # for a tensor that needs grad but has no grad_fn (torch's FLOP counter trips on it)
                    cls_token = self.cls_token.repeat(x.shape[0], 1, 1)
                else:
                    cls_token, score = self.cls_upsample(cls_token), pool_score(score, hw)
                for block in stage.blocks:
                    x, cls_token, score = stage._run(block, x, cls_token, score)
                hw = x.shape[-2:]
            yield x, cls_token

    def forward(self, x):
        if not (self.training and self.cls_head_training and self.num_classes > 0):
            return super().forward(x)
        self.check_input(x)
        for feats, cls_token in self._stages(x, len(self.stages) - 1):
            pass
        return self.forward_head(self.norm(feats)), self.head_cls(self.norm_cls(cls_token[:, 0]))


# ---------------------------------------------------------------------------------------------
# Checkpoints

_STEM = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}   # official head_embedding.proj indices
_DOWN = {"0": "conv", "1": "norm"}                                 # official middle_embedding.proj indices


def checkpoint_filter_fn(state_dict: dict, model: UniFormer) -> dict:
    """Map an official UniFormer / UniFormer-light release (or our own state dict) to our key names.

    Official -> ours: patch_embed{i}.{proj,norm}.* -> stages.{i-1}.patch_embed.{proj,norm}.*;
    conv stem patch_embed1.proj.{0,1,3,4} -> stages.0.patch_embed.{conv1,norm1,conv2,norm2};
    conv downsampling patch_embed{i}.proj.{0,1} -> stages.{i-1}.patch_embed.{conv,norm};
    blocks{i}.{j}.* -> stages.{i-1}.blocks.{j}.* with gamma_1/gamma_2 -> ls1.scale/ls2.scale (flattened);
    norm, head and the light models' cls_token, cls_upsample, norm_cls, head_cls keep their names.
    Token-labeling releases carry `aux_head.*` (a per-token classifier whose max the official eval adds,
    x0.5, to the logits); it is dropped with a warning, so their logits here are the average-pool head's
    only. Those releases also use head_dim 32 for S/S-dagger/B (`*_dim64` ones use 64): the checkpoint
    cannot tell, so build the model with the matching `head_dim`.
    """
    state_dict = release_state_dict(state_dict)
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    out, aux = {}, []
    for k, v in state_dict.items():
        if k.startswith("aux_head."):
            aux.append(k)
            continue
        m = re.match(r"^patch_embed(\d)\.(.*)$", k)
        if m:
            i, rest = int(m[1]) - 1, m[2]
            sub = re.match(r"^proj\.(\d)\.(.*)$", rest)
            if sub:
                rest = f"{(_STEM if i == 0 else _DOWN)[sub[1]]}.{sub[2]}"
            k = f"stages.{i}.patch_embed.{rest}"
        m = re.match(r"^blocks(\d)\.(\d+)\.(.*)$", k)
        if m:
            rest = m[3]
            if rest in ("gamma_1", "gamma_2"):
                rest, v = f"ls{rest[-1]}.scale", v.flatten()
            k = f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{rest}"
        out[k] = v
    if aux:
        warnings.warn(f"{getattr(model, 'model_name', type(model).__name__)}: dropped the token-labeling "
                      f"auxiliary head ({', '.join(aux)}); it is a training aid, and the logits here are the "
                      "average-pool head's only (the official token-labeling eval adds 0.5 x its max over tokens)")
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Numbers from the official README (ImageNet-1K, 224x224; "FLOPs" there are fvcore MACs).

_PAPER = dict(paper=49, arxiv="2201.09450", repo="Sense-X/UniFormer")
_CFG = dict(crop_pct=0.875, interpolation="bicubic", classifier="head")
_PATCH = dict(first_conv="stages.0.patch_embed.proj", **_CFG)
_STEMCFG = dict(first_conv="stages.0.patch_embed.conv1", **_CFG)
_SB = dict(embed_dims=(64, 128, 320, 512), mlp_ratio=4.0, qkv_bias=True)


@register_model(ModelCard(**_PAPER, official_name="UniFormer-S (uniformer_small)", params_m="22", macs_g=3.6,
                          top1=82.9), **_PATCH)
def uniformer_small(**kwargs):
    return UniFormer(**{**_SB, "depths": (3, 4, 8, 3), "head_dim": 64, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-S\u2020 (uniformer_small_plus)", params_m="24",
                          macs_g=4.2, top1=83.4, notes="conv stem, head_dim 32"), **_STEMCFG)
def uniformer_small_plus(**kwargs):
    return UniFormer(**{**_SB, "depths": (3, 5, 9, 3), "head_dim": 32, "conv_stem": True, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-S\u2020 head_dim 64 (uniformer_small_plus_dim64)",
                          params_m="24", macs_g=4.2, top1=83.4,
                          notes="the README's re-trained S-dagger with head_dim 64 (less memory downstream)"),
                **_STEMCFG)
def uniformer_small_plus_dim64(**kwargs):
    return UniFormer(**{**_SB, "depths": (3, 5, 9, 3), "head_dim": 64, "conv_stem": True, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-B (uniformer_base)", params_m="50", macs_g=8.3,
                          top1=83.8), **_PATCH)
def uniformer_base(**kwargs):
    return UniFormer(**{**_SB, "depths": (5, 8, 20, 7), "head_dim": 64, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-B+Layer Scale (uniformer_base_ls)", params_m="50",
                          macs_g=8.3, top1=83.9, notes="layer scale (init 1e-6) in the SABlocks only"), **_PATCH)
def uniformer_base_ls(**kwargs):
    return UniFormer(**{**_SB, "depths": (5, 8, 20, 7), "head_dim": 64, "layer_scale_init_value": 1e-6,
                        **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-L+Layer Scale (uniformer_large_ls)", params_m="100",
                          top1=85.6, notes="token-labeling training only (the README's token-labeling table; 384 px: "
                          "86.3): its release carries the token-labeling aux_head, dropped on loading; layer scale "
                          "(init 1e-6) in the SABlocks only. The README prints 12.6G FLOPs at 224, which our counter "
                          "does not reproduce (19.7 GMACs for this config), so no FLOPs are carded"), **_PATCH)
def uniformer_large_ls(**kwargs):
    return UniFormer(**{**_SB, "depths": (5, 10, 24, 7), "embed_dims": (128, 192, 448, 640), "head_dim": 64,
                        "layer_scale_init_value": 1e-6, **kwargs})


_LIGHT_NOTES = ("light model (uniformer_light.py): token pruning in stages 3-4, active at eval too; "
                "the README also lists it at other resolutions: {}")


@register_model(ModelCard(**_PAPER, official_name="UniFormer-XXS (uniformer_xxs)", params_m="10.2", macs_g=1.3,
                          img_size=224, top1=80.6,
                          notes=_LIGHT_NOTES.format("128: 76.8/0.43G, 160: 79.1/0.67G, 192: 79.9/0.96G")),
                **_STEMCFG)
def uniformer_xxs(**kwargs):
    return UniFormerLight(**{"depths": (2, 5, 8, 2), "embed_dims": (56, 112, 224, 448), "head_dim": 28,
                             "mlp_ratio": 3.0, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="UniFormer-XS (uniformer_xs)", params_m="16.5", macs_g=2.0,
                          img_size=224, top1=82.0, notes=_LIGHT_NOTES.format("192: 81.5/1.4G")), **_STEMCFG)
def uniformer_xs(**kwargs):
    return UniFormerLight(**{"depths": (3, 5, 9, 3), "embed_dims": (64, 128, 256, 512), "head_dim": 32,
                             "mlp_ratio": 3.0, **kwargs})


@register_model(ModelCard(**_PAPER, official_name="", status="reduced", img_size=32,
                          notes="a few hundred K parameters for quick training demos (32x32 inputs)"), **_PATCH)
def uniformer_demo(**kwargs):
    return UniFormer(**{"depths": (1, 1, 2, 1), "embed_dims": (16, 32, 64, 128), "head_dim": 32,
                        "mlp_ratio": 4.0, "img_size": 32, **kwargs})
