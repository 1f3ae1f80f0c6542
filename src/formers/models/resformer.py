"""ResFormer: a ViT that keeps working across input resolutions.

Paper (catalog id 3): "ResFormer: Scaling ViTs with Multi-Resolution Training", Tian et al.,
arXiv 2212.00776 (CVPR 2023). Official code: ruitian12/resformer (image_classification/models.py).

The idea, in three lines:
  train one DeiT-style ViT on replicated images at several resolutions at once, with a scale-consistency
      loss that pulls the low-resolution cls features towards the next higher resolution's (formers.train.multires);
  a global positional embedding computed for whatever grid arrives: 2-D sin-cos normalised to (0, 2*pi]
      then a learned 3x3 depth-wise conv, so no table is ever resampled;
  a local positional embedding inside every attention: a 3x3 depth-wise conv on V (one conv shared by all heads,
      zero-initialised), added to softmax(QK^T)V.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import release_state_dict
from formers.layers import Attention, DropPath, Mlp, PatchEmbed, drop_path_rates, sdpa
from formers.models.base import TokenBackbone, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["ResFormer", "GlobalPosEmbed", "LocalPEAttention", "sincos_2d", "checkpoint_filter_fn"]


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """The DETR-style (1, dim, h, w) sin-cos map ResFormer uses, computed in float32.

    Row and column positions 1..n are normalised to (0, 2*pi] (divided by n + 1e-6, times 2*pi); each axis
    takes dim/2 channels with frequencies temperature ** (2*floor(j/2) / (dim/2)), sin on even channels and cos
    on odd ones; the row half comes first.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position map needs a width divisible by 4, got {dim}")
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32, device=device)
    freq = torch.pow(temperature, 2 * torch.div(j, 2, rounding_mode="floor") / half)
    rows = _sincos_axis(h, j, freq)[:, None, :].expand(h, w, half)
    cols = _sincos_axis(w, j, freq)[None, :, :].expand(h, w, half)
    return torch.cat([rows, cols], dim=-1).permute(2, 0, 1).unsqueeze(0)


def _sincos_axis(n: int, j: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """(n, half) sin (even channels) / cos (odd) of positions 1..n normalised to (0, 2*pi]."""
    pos = torch.arange(1, n + 1, dtype=torch.float32, device=j.device) / (n + 1e-6) * (2 * math.pi)
    ang = pos[:, None] / freq
    return torch.where(j % 2 == 0, ang.sin(), ang.cos())


# the map follows the input's grid: under torch.fx it is one eager node
torch.fx.wrap("sincos_2d")


class GlobalPosEmbed(nn.Module):
    """GLPE's global part: the sin-cos map of the current grid through a learned 3x3 depth-wise conv."""

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        self.temperature = temperature
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, C) position embedding for an h x w patch grid (the cls token gets none)."""
        table = sincos_2d(h, w, self.proj.in_channels, self.temperature, self.proj.weight.device)
        return self.proj(table.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class LocalPEAttention(Attention):
    """Multi-head self-attention plus GLPE's local part: a 3x3 depth-wise conv over each head's V map.

    The conv has head_dim channels and is shared by all heads (heads are folded into the batch); it is
    zero-initialised, so a fresh block starts as plain attention. The cls token's V gets no local term.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_prefix_tokens: int = 1):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.num_prefix_tokens = num_prefix_tokens
        self.local_pe = nn.Conv2d(self.head_dim, self.head_dim, 3, padding=1, groups=self.head_dim)
        nn.init.zeros_(self.local_pe.weight)
        nn.init.zeros_(self.local_pe.bias)

    def forward(self, x, hw: tuple[int, int]):
        # sizes by flatten/unflatten: no -1 (a batch of 0 works), no unpacking of x.shape (torch.fx traces it)
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        p = self.num_prefix_tokens
        grid = v[:, :, p:].transpose(-1, -2).flatten(0, 1).unflatten(-1, hw)  # (B * heads, head_dim, h, w)
        local = self.local_pe(grid).flatten(2).unflatten(0, (x.shape[0], self.num_heads)).transpose(-1, -2)
        out = torch.cat([out[:, :, :p], out[:, :, p:] + local], dim=2)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = LocalPEAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, hw: tuple[int, int]):
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ResFormer(TokenBackbone):
    """A DeiT-style ViT with global-local positional embeddings; takes any multiple of the patch size.

    The forward paths are TokenBackbone's (timm's ViT): forward_features returns the normalised tokens
    (B, 1 + h*w, C), cls first; the head reads the cls token (global_pool='token', as the official model)
    or the mean patch token ('avg'); feature_info has one entry per block, each a (B, C, h, w) map.
    """

    output_fmt = "NLC"  # forward_features returns the tokens (B, 1 + N, C)

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, global_pool: str = "token", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, temperature: float = 10000.0):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = self.embed_dim = embed_dim
        self.global_pool = self.check_pool(global_pool)
        self.patch_size = patch_size
        self.input_divisor = self.min_input_size = patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = GlobalPosEmbed(embed_dim, temperature)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r)
                                    for r in drop_path_rates(drop_path_rate, [depth])[0])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]

        self.apply(init_trunc_normal)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if any(k in n for k in ("pos_embed", "local_pe", "cls_token"))}

    def _embed(self, x):
        x = self.patch_embed(x)
        hw = (x.shape[-2], x.shape[-1])  # no int(): under torch.export it would pin the size
        x = x.flatten(2).transpose(1, 2) + self.pos_embed(hw[0], hw[1])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x), hw

    def forward_features(self, x):
        if torch.jit.is_scripting():  # the blocks take the grid too (TokenBackbone's scripted loop passes none)
            x, hw = self._embed(x)
            for blk in self.blocks:
                x = blk(x, hw)
            return self.norm(x)
        else:
            return super().forward_features(x)

    def _run(self, blk, x, hw):
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)


_OFFICIAL_RENAMES = (("pos_embed.embed_layer.", "pos_embed.proj."), (".attn.get_v.", ".attn.local_pe."))


def checkpoint_filter_fn(state_dict: dict, model: ResFormer) -> dict:
    """Map an official ResFormer release (or our own state dict) to our key names.

    The official checkpoints wrap the weights in {'model': ...}. Official -> ours: pos_embed.embed_layer.* ->
    pos_embed.proj.*, blocks.{i}.attn.get_v.* -> blocks.{i}.attn.local_pe.*; every other name is the same
    (cls_token, patch_embed.proj, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head).
    There is no position table to resize: the global embedding is computed for each input size.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head_res") or k.startswith("pre_logits"):
            continue    # unused in the released models (None / Identity)
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(old, new)
        out[k] = v
    return out


_CFG = dict(reduction=16, crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225))
_NOTES = ("params/MACs: the README and paper print none for the backbones; the card holds DeiT's numbers, which "
          "ResFormer is (+ the 3x3 dw convs of GLPE); top-1 at 224 of the MR model trained at 224/160/128")


def _card(name: str, params: str, macs: float, top1: float) -> ModelCard:
    return ModelCard(paper=3, arxiv="2212.00776", repo="ruitian12/resformer", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1, notes=_NOTES)


def _create(kwargs, **defaults) -> ResFormer:
    return ResFormer(**{**defaults, **kwargs})


@register_model(_card("ResFormer-T-MR (resformer_tiny_patch16)", "5.7", 1.3, 73.85), **_CFG)
def resformer_tiny_patch16(**kwargs):
    return _create(kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register_model(_card("ResFormer-S-MR (resformer_small_patch16)", "22", 4.6, 82.16), **_CFG)
def resformer_small_patch16(**kwargs):
    return _create(kwargs, patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register_model(_card("ResFormer-B-MR (resformer_base_patch16)", "86", 17.6, 82.72), **_CFG)
def resformer_base_patch16(**kwargs):
    return _create(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model(ModelCard(paper=3, arxiv="2212.00776", repo="ruitian12/resformer",
                          official_name="(none: a reduced ResFormer for the demo and tests)", img_size=32,
                          status="reduced", notes="patch 4, width 96, 4 blocks, 3 heads: 0.45M params"),
                **_CFG)
def resformer_demo(**kwargs):
    return _create(kwargs, img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
