"""The plain pre-norm transformer block of ViT, on (..., N, C) tokens."""
import torch.nn as nn

from .attention import Attention
from .drop import DropPath
from .mlp import Mlp

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """x + DropPath(Attention(LN(x))), then x + DropPath(Mlp(LN(x))).

    Key names follow timm's ViT `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2),
    which is what most ViT-derived releases saved. Any leading dimensions are batch dimensions,
    so a block can run over many short sequences at once (TNT's per-patch inner transformer).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 act_layer=nn.GELU):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
