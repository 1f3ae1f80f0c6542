"""TNT: Transformer in Transformer.

Paper (catalog id 10): "Transformer in Transformer", Han, Xiao, Wu, Guo, Xu and Wang,
arXiv 2103.00112. Official code: huawei-noah/Efficient-AI-Backbones (tnt_pytorch/tnt.py).

The idea, in three lines:
  an image is cut into 16x16 patches ("sentences") and each patch into 4x4 sub-patches ("words"),
      embedded by a 7x7 stride-4 conv run on every patch on its own;
  every block runs an inner transformer among the 16 words of each patch, adds the flattened words
      (LN -> Linear -> LN) to their patch token, then runs an outer ViT block over the patch tokens;
  the classifier reads the CLS token of the outer sequence, as in ViT.
"""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.layers import TransformerBlock, drop_path_rates, feature_take_indices, resample_pos_embed, to_2tuple
from formers.layers.pool import TOKEN_POOLS, pool_tokens
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

torch.fx.wrap("resample_pos_embed")  # the table is resized to the input's grid: one eager node under fx

__all__ = ["TNT", "PixelEmbed", "TNTBlock", "checkpoint_filter_fn"]


class PixelEmbed(nn.Module):
    """Image -> words: each patch on its own (zero-padded at the patch's border) through
    Conv(7x7, stride `inner_stride`, padding 3), giving ceil(patch / stride)^2 words per patch.

    (B, C, H, W) -> (B * N, words, inner_dim), patches in row-major order.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, inner_dim: int = 24, inner_stride: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.num_words = math.ceil(patch_size / inner_stride) ** 2
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, stride=inner_stride, padding=3)

    def forward(self, x):
        p = self.patch_size
        # (B, C, h * p, w * p) -> (B * h * w, C, p, p), plain torch ops (torch.fx and TorchScript take them)
        x = x.unflatten(3, (-1, p)).unflatten(2, (-1, p)).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        return self.proj(x).flatten(2).transpose(1, 2)


class TNTBlock(nn.Module):
    """Inner ViT block over each patch's words; words -> patch token (LN, Linear without bias, LN),
    added to every patch token but the CLS; outer ViT block over the patch tokens."""

    def __init__(self, outer_dim: int, inner_dim: int, num_words: int, outer_heads: int, inner_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.inner = TransformerBlock(inner_dim, inner_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_eps)
        self.proj_norm1 = nn.LayerNorm(num_words * inner_dim, eps=norm_eps)
        self.proj = nn.Linear(num_words * inner_dim, outer_dim, bias=False)
        self.proj_norm2 = nn.LayerNorm(outer_dim, eps=norm_eps)
        self.outer = TransformerBlock(outer_dim, outer_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_eps)

    def forward(self, words, tokens):
        """words (B * N, words, c), tokens (B, 1 + N, C) -> both updated."""
        words = self.inner(words)
        # (B * N, words, c) -> (B, N, words * c); sizes named, not -1, so that a batch of 0 works
        sentence = words.flatten(1).unflatten(0, (tokens.shape[0], tokens.shape[1] - 1))
        sentence = self.proj_norm2(self.proj(self.proj_norm1(sentence)))
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + sentence], dim=1)
        return words, self.outer(tokens)


class TNT(Backbone):
    """TNT for classification: word embedding (+ word position table shared by all patches), patch
    tokens from the flattened words (LN, Linear, LN), a CLS token and a patch position table, the
    TNT blocks, a final LayerNorm and a linear head on the CLS token.

    Takes any input whose height and width are multiples of the patch size; the patch position
    table is resized (bicubic) to the grid. `feature_info` has one entry per block (as timm's TNT),
    and forward_intermediates returns the patch tokens of those blocks as NCHW maps.
    """

    output_fmt = "NLC"  # forward_features returns the tokens (B, 1 + N, C)
    pool_types = TOKEN_POOLS
    final_norm_per_stage = False  # every block has the model's width

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, patch_size: int = 16,
                 inner_stride: int = 4, outer_dim: int = 384, inner_dim: int = 24, depth: int = 12,
                 outer_heads: int = 6, inner_heads: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-5, global_pool: str = "token"):
        super().__init__()
        h, w = to_2tuple(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"TNT: img_size {h}x{w} must be a multiple of the patch size {patch_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = outer_dim
        self.input_divisor = self.min_input_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.grad_checkpointing = False

        self.pixel_embed = PixelEmbed(patch_size, in_chans, inner_dim, inner_stride)
        num_words = self.pixel_embed.num_words
        self.pixel_pos_embed = nn.Parameter(torch.zeros(1, num_words, inner_dim))
        self.proj_norm1 = nn.LayerNorm(num_words * inner_dim, eps=norm_eps)
        self.proj = nn.Linear(num_words * inner_dim, outer_dim)
        self.proj_norm2 = nn.LayerNorm(outer_dim, eps=norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, outer_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], outer_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_rates(drop_path_rate, [depth])[0]
        self.blocks = nn.ModuleList([
            TNTBlock(outer_dim, inner_dim, num_words, outer_heads, inner_heads, mlp_ratio, qkv_bias, drop_rate,
                     attn_drop_rate, dpr[i], norm_eps) for i in range(depth)])
        self.feature_info = [dict(num_chs=outer_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.norm = nn.LayerNorm(outer_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(outer_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        for p in (self.cls_token, self.pos_embed, self.pixel_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_trunc_normal)

    def _embed(self, x):
        """(B, C, H, W) -> words (B * N, words, c), tokens (B, 1 + N, C), grid (H / p, W / p)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        b = x.shape[0]
        grid = (x.shape[-2] // self.pixel_embed.patch_size, x.shape[-1] // self.pixel_embed.patch_size)
        words = self.pixel_embed(x) + self.pixel_pos_embed
        tokens = self.proj_norm2(self.proj(self.proj_norm1(words.flatten(1).unflatten(0, (b, grid[0] * grid[1])))))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + resample_pos_embed(self.pos_embed, grid, self.grid, 1, mode="bicubic")
        return words, self.pos_drop(tokens), grid

    def _run(self, blk, words, tokens):
        if self.grad_checkpointing and tokens.requires_grad:
            return checkpoint(blk, words, tokens, use_reentrant=False)
        return blk(words, tokens)

    def forward_features(self, x):
        """(B, C, H, W) -> normalised tokens (B, 1 + H/p * W/p, C), the CLS token first."""
        words, tokens, _ = self._embed(x)
        for blk in self.blocks:
            if torch.jit.is_scripting():  # TorchScript cannot pass a module to _run
                words, tokens = blk(words, tokens)
            else:
                words, tokens = self._run(blk, words, tokens)
        return self.norm(tokens)

    def forward_head(self, x, pre_logits: bool = False):
        x = pool_tokens(x, self.global_pool)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The patch tokens (CLS dropped) after each requested block, as NCHW maps (or NLC);
        `norm` applies the final LayerNorm to them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        words, tokens, grid = self._embed(x)
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        feats = []
        for i, blk in enumerate(blocks):
            words, tokens = self._run(blk, words, tokens)
            if i in take:
                y = (self.norm(tokens) if norm else tokens)[:, 1:]
                feats.append(y.transpose(1, 2).unflatten(2, grid) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        return (self.norm(tokens) if len(blocks) == len(self.blocks) else tokens), feats


# Module names of the official release and of timm -> ours, inside a block and at the top level.
_BLOCK_NAMES = {
    "inner_norm1": "inner.norm1", "inner_attn": "inner.attn", "inner_norm2": "inner.norm2", "inner_mlp": "inner.mlp",
    "outer_norm1": "outer.norm1", "outer_attn": "outer.attn", "outer_norm2": "outer.norm2", "outer_mlp": "outer.mlp",
    "norm_in": "inner.norm1", "attn_in": "inner.attn", "norm_mlp_in": "inner.norm2", "mlp_in": "inner.mlp",
    "norm_out": "outer.norm1", "attn_out": "outer.attn", "norm_mlp": "outer.norm2", "mlp": "outer.mlp",
    "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2",
}
_TOP_NAMES = {
    "patch_embed": "pixel_embed", "outer_pos": "pos_embed", "patch_pos": "pos_embed",
    "inner_pos": "pixel_pos_embed", "pixel_pos": "pixel_pos_embed",
    "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2",
}


def checkpoint_filter_fn(state_dict: dict, model: TNT) -> dict:
    """Map an official TNT release, a timm TNT state dict, or our own, to our key names.

    Official -> ours: inner_{norm1,attn,norm2,mlp} -> inner.{norm1,attn,norm2,mlp}, outer_* -> outer.*,
    outer_pos -> pos_embed, inner_pos -> pixel_pos_embed, patch_embed -> pixel_embed; the unused
    `outer_tokens` parameter is dropped. timm -> ours: norm_in/attn_in/norm_mlp_in/mlp_in -> inner.*,
    norm_out/attn_out/norm_mlp/mlp -> outer.*, norm{1,2}_proj -> proj_norm{1,2}, patch_pos -> pos_embed,
    pixel_pos (1, c, 4, 4) -> pixel_pos_embed (1, 16, c). Both keep queries+keys (`qk`) and values
    (`v`) in two Linears, concatenated here into our one `qkv`. The patch position table is resized
    (bicubic, CLS entry kept) when the model's grid differs. Wrappers ({'state_dict': ...}) and a
    `module.` prefix are removed before, by formers.checkpoint.read_state_dict.
    """
    out = {}
    for k, v in state_dict.items():
        if k == "outer_tokens":
            continue
        parts = k.split(".")
        if parts[0] == "blocks" and len(parts) > 2:
            parts[2] = _BLOCK_NAMES.get(parts[2], parts[2])
        else:
            parts[0] = _TOP_NAMES.get(parts[0], parts[0])
        k = ".".join(parts)
        if k == "pixel_pos_embed" and v.dim() == 4:
            v = v.flatten(2).transpose(1, 2)
        out[k] = v
    from formers.checkpoint import does_not_fit
    for k in [k for k in out if ".attn.qk." in k]:
        v_key = k.replace(".attn.qk.", ".attn.v.")
        if v_key not in out or out[k].dim() != out[v_key].dim() or out[k].shape[1:] != out[v_key].shape[1:]:
            raise does_not_fit(model, f"{k} needs its {v_key} partner of the same width (TNT keeps qk and v apart)")
        out[k.replace(".attn.qk.", ".attn.qkv.")] = torch.cat([out.pop(k), out.pop(v_key)], dim=0)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        if pos.dim() != 3 or pos.shape[2] != model.pos_embed.shape[2] or pos.shape[1] < 2:
            raise does_not_fit(model, f"pos_embed has shape {tuple(pos.shape)}; the model's is "
                                      f"{tuple(model.pos_embed.shape)} (1, 1 + grid entries, channels)")
        n = pos.shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise does_not_fit(model, f"pos_embed: cannot resize a table of {n} grid entries (not square) to {model.grid}")
        out["pos_embed"] = resample_pos_embed(pos, model.grid, (side, side), 1, mode="bicubic")
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the paper's Table 1 (TNT-S, TNT-B; ImageNet-1K at 224). FLOPs are MACs.

_CFG = dict(reduction=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, first_conv="pixel_embed.proj",
            classifier="head")


def _card(official: str, params: str, macs: float, top1: float) -> ModelCard:
    return ModelCard(paper=10, arxiv="2103.00112", repo="huawei-noah/Efficient-AI-Backbones", official_name=official,
                     params_m=params, macs_g=macs, img_size=224, top1=top1)


@register_model(_card("tnt_s_patch16_224", "23.8", 5.2, 81.5), **_CFG)
def tnt_s_patch16_224(**kwargs):
    return TNT(**{**dict(outer_dim=384, inner_dim=24, depth=12, outer_heads=6, inner_heads=4), **kwargs})


@register_model(_card("tnt_b_patch16_224", "65.6", 14.1, 82.9), **_CFG)
def tnt_b_patch16_224(**kwargs):
    return TNT(**{**dict(outer_dim=640, inner_dim=40, depth=12, outer_heads=10, inner_heads=4), **kwargs})


@register_model(ModelCard(paper=10, arxiv="2103.00112", repo="huawei-noah/Efficient-AI-Backbones", img_size=32,
                          status="reduced", notes="demo: 32 px, 8 px patches of 4x4 words (inner stride 2)"), **_CFG)
def tnt_demo(**kwargs):
    return TNT(**{**dict(img_size=32, patch_size=8, inner_stride=2, outer_dim=96, inner_dim=16, depth=4,
                         outer_heads=4, inner_heads=2), **kwargs})
