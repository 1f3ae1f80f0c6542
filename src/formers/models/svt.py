"""SVT: the Scattering Vision Transformer.

Paper (catalog id 54): "Scattering Vision Transformer: Spectral Mixing Matters", Patro & Agneeswaran,
arXiv 2311.01310 (NeurIPS 2023). Official code: badripatro/svt (svt.py; the H-S/B/L models are svt_s/b/l).

The idea, in three lines:
  in the first stage, tokens are mixed in the wavelet domain: a level-1 dual-tree complex wavelet transform
      (DTCWT) splits the map into a full-size lowpass and six oriented complex highpass subbands, then inverts;
  the lowpass is gated by a learned element-wise weight; the highpass channels go through a two-layer complex
      MLP that is block-diagonal over 4 channel groups (the "Einstein blending" einsum), ReLU between;
  the later stages use plain multi-head attention; a class-attention block over [mean token; tokens] reads out,
      and (token labeling) the logits add half of the best token's auxiliary logits.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.checkpoint import release_state_dict
from formers.layers import Attention, DropPath, Mlp, drop_path_rates, feature_take_indices, sdpa
from formers.layers.mlp import DWConvMlp
from formers.layers.wavelets import DTCWT
from formers.layers.pool import TOKEN_POOLS
from formers.models.base import Backbone, Stage, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["SVT", "ScatterMixer", "checkpoint_filter_fn"]


def _lowpass_at(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (C, h0, w0) lowpass gate at an (h, w) map: bilinear, or as it is at its own size (under
    torch.compile / torch.export it always resamples, exact at the same size, so no test pins the size)."""
    if not torch.compiler.is_compiling() and (weight.shape[-2], weight.shape[-1]) == (h, w):
        return weight
    return F.interpolate(weight[None], size=(h, w), mode="bilinear", align_corners=False)[0]


torch.fx.wrap("_lowpass_at")  # the gate follows the input's size: one eager node under torch.fx


class ScatterMixer(nn.Module):
    """SVT's spectral token mixer on channels-last (B, H, W, C) maps (the official SVT_channel_mixing).

    lowpass * complex_weight_ll (C, h, w): built for the map size at the model's img_size and bilinearly
    resampled for other sizes (the official weight is fixed: 56x56 for 224 inputs);
    highpass (C channels as `num_blocks` groups of C/num_blocks, each orientation and position alike):
    z -> relu(z W1 + b1) -> (.) W2 + b2 with complex W, b, applied as one real einsum on [Re | Im].
    Computed in float32 as the official code does.
    """

    def __init__(self, dim: int, size: tuple[int, int], num_blocks: int = 4, biort: str = "near_sym_b"):
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"ScatterMixer: dim {dim} must be divisible by num_blocks {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, dim // num_blocks
        nb, bs = num_blocks, self.block_size
        self.biort = biort
        self.dtcwt = DTCWT(biort)
        self.complex_weight_ll = nn.Parameter(torch.randn(dim, *size) * 0.02)
        self.complex_weight_lh_1 = nn.Parameter(torch.randn(2, nb, bs, bs) * 0.02)   # (real, imag)
        self.complex_weight_lh_2 = nn.Parameter(torch.randn(2, nb, bs, bs) * 0.02)
        self.complex_weight_lh_b1 = nn.Parameter(torch.randn(2, nb, bs) * 0.02)
        self.complex_weight_lh_b2 = nn.Parameter(torch.randn(2, nb, bs) * 0.02)

    @torch.no_grad()
    def init_non_persistent_buffers(self):
        """Refill the DTCWT's filter buffers (not in the state dict) in place, on their device."""
        fresh = DTCWT(self.biort)
        for name, buf in self.dtcwt.named_buffers():
            buf.copy_(getattr(fresh, name))

    @staticmethod
    def _as_real(w, b):
        """A complex block matrix (2, nb, d, k) as the real (nb, 2d, 2k) acting on [Re | Im], and its bias."""
        re_, im = w.unbind(0)
        return torch.cat([torch.cat([re_, im], -1), torch.cat([-im, re_], -1)], -2), b.permute(1, 0, 2).flatten(1)

    def lowpass_weight(self, h: int, w: int) -> torch.Tensor:
        return _lowpass_at(self.complex_weight_ll, h, w)

    def forward(self, x):
        dtype = x.dtype
        # sizes read one by one (torch.fx traces them) and never -1 (a batch of 0 works)
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        low, high = self.dtcwt(x.permute(0, 3, 1, 2).float())
        low = low * self.lowpass_weight(h, w).float()  # the FFT-domain product in float32, whatever the model's dtype
        nb, bs = self.num_blocks, self.block_size
        # (B, C, 6, h/2, w/2, 2) -> (..., nb, [Re | Im] of each group)
        z = high.permute(0, 2, 3, 4, 1, 5).unflatten(4, (nb, bs)).transpose(-1, -2).flatten(-2)
        # float32 weights too: a bf16 / fp16 model still mixes in float32
        w1, b1 = self._as_real(self.complex_weight_lh_1.float(), self.complex_weight_lh_b1.float())
        w2, b2 = self._as_real(self.complex_weight_lh_2.float(), self.complex_weight_lh_b2.float())
        z = F.relu(torch.einsum("...nd,ndk->...nk", z, w1) + b1)
        z = torch.einsum("...nd,ndk->...nk", z, w2) + b2
        high = z.unflatten(-1, (2, bs)).transpose(-1, -2).flatten(4, 5).permute(0, 4, 1, 2, 3, 5)
        return self.dtcwt.inverse(low, high).permute(0, 2, 3, 1).to(dtype)


class MapAttention(Attention):
    """Multi-head self-attention (no spatial reduction) on a channels-last (B, H, W, C) map."""

    def forward(self, x):
        return self.attend(x.flatten(1, 2)).unflatten(1, (x.shape[1], x.shape[2]))


class Block(nn.Module):
    """x + mixer(LN(x)), then x + PVTv2-FFN(LN(x)); the mixer is the scatter mixer or attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, scatter_size=None, drop_path: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if scatter_size is not None:
            self.attn = ScatterMixer(dim, scatter_size)
        else:
            self.attn = MapAttention(dim, num_heads, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Stage 1's patch embedding: conv7 s2 + BN-ReLU, two conv3 + BN-ReLU, conv3 s2, LayerNorm -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, hidden: int, dim: int):
        super().__init__()
        layers = []
        for cin, k, s in ((in_chans, 7, 2), (hidden, 3, 1), (hidden, 3, 1)):
            layers += [nn.Conv2d(cin, hidden, k, s, k // 2, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(self.conv(x)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """conv3 s2 + LayerNorm between stages, channels-last in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class SVTStage(Stage):
    """Patch embedding, blocks, then the stage's LayerNorm (Identity in the last stage: the final norm
    comes after the class-attention block)."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.downsample, self.blocks, self.norm = downsample, nn.ModuleList(blocks), norm

    def forward(self, x):
        if torch.jit.is_scripting():  # no super() (nor activation checkpointing) in TorchScript
            x = self.downsample(x)
            for block in self.blocks:
                x = block(x)
            return self.norm(x)
        else:
            return self.norm(super().forward(x))


class ClassAttention(nn.Module):
    """The cls token (first) queries all tokens, itself included."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q = self.q(x[:, :1]).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(sdpa(q, k, v).transpose(1, 2).flatten(2))


class ClassBlock(nn.Module):
    """Updates the cls token only: cls += CA(LN(x)); cls += MLP(LN(cls))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


def _init_weights(m: nn.Module):
    """The official init: ViT's for Linear and LayerNorm, He-normal (fan-out) convs with zero bias."""
    init_trunc_normal(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SVT(Backbone):
    """Scattering Vision Transformer: 4 stages (strides 4-32), the first `scatter_stages` mixing with DTCWT.

    Takes inputs whose sides are multiples of 2**(scatter_stages + 2) (the scattered maps must be even).
    forward_features returns the normalised tokens (B, 1 + N, C) after the class-attention block, cls first.
    With token_label=True (the released training) the logits are head(cls) + 0.5 * max over tokens of
    aux_head(token), in training and evaluation alike (the official mix-token training needs token-label
    targets and is not reproduced).
    """

    output_fmt = "NLC"  # forward_features returns [mean token; tokens] after the class-attention block
    pool_types = TOKEN_POOLS

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, stem_hidden_dim: int = 32,
                 embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14), mlp_ratios=(8, 8, 4, 4),
                 depths=(3, 4, 6, 3), scatter_stages: int = 1, token_label: bool = True, global_pool: str = "token",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn_drop_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = embed_dims[-1]
        self.global_pool = self.check_pool(global_pool)
        self.token_label = token_label
        self.input_divisor = self.min_input_size = 2 ** (scatter_stages + 2)
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else img_size
        dpr = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            down = ConvStem(in_chans, stem_hidden_dim, dim) if i == 0 else Downsample(embed_dims[i - 1], dim)
            size = (ih // 2 ** (i + 2), iw // 2 ** (i + 2)) if i < scatter_stages else None
            blocks = [Block(dim, num_heads[i], mlp_ratios[i], size, dpr[i][j], attn_drop_rate) for j in range(depth)]
            last = i == len(depths) - 1
            stages.append(SVTStage(down, blocks, nn.Identity() if last else nn.LayerNorm(dim, eps=1e-6)))
        self.stages = nn.ModuleList(stages)
        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], num_heads[-1], mlp_ratios[-1])])
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = (nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()) \
            if token_label else None
        self.feature_info = [dict(num_chs=d, reduction=2 ** (i + 2), module=f"stages.{i}")
                             for i, d in enumerate(embed_dims)]
        self.apply(_init_weights)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        super().reset_classifier(num_classes, global_pool)
        if self.token_label:
            self.aux_head = self._new_module(lambda: self.make_classifier(num_classes))

    def prune_head(self):
        self.post_network = nn.ModuleList()  # the class-attention read-out serves the head only
        super().prune_head()

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _read_out(self, x):
        """The last stage's map -> [mean token; tokens] through the class-attention block, normalised."""
        tokens = x.flatten(1, 2)
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        for blk in self.post_network:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        for stage in self.stages:
            x = stage(x)
        return self._read_out(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "":
            return x
        cls = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        cls = self.head_drop(cls)
        if pre_logits:
            return cls
        out = self.head(cls)
        if self.aux_head is not None and self.num_classes > 0:
            out = out + 0.5 * self.aux_head(x[:, 1:]).amax(dim=1)
        return out

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{getattr(self, 'model_name', 'SVT')}: output_fmt must be 'NCHW' or 'NHWC', "
                             f"got {output_fmt!r}")
        self.check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        feats = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == len(self.stages) - 1 else x
                feats.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        return (self._read_out(x) if len(stages) == len(self.stages) else x), feats


_OFFICIAL = re.compile(r"^(patch_embed|block|norm)(\d)(.*)$")


def checkpoint_filter_fn(state_dict: dict, model: SVT) -> dict:
    """Map an official SVT checkpoint (or our own state dict) to our key names.

    Official -> ours: patch_embed1.* -> stages.0.downsample.* (the conv stem), patch_embed{i}.* ->
    stages.{i-1}.downsample.*, block{i}.{j}.* -> stages.{i-1}.blocks.{j}.* (attention q and kv Linears
    concatenated into qkv; mlp.dwconv.dwconv -> mlp.dwconv), norm{i} -> stages.{i-1}.norm for the first
    three stages and norm4 -> norm. The DTCWT filter buffers (attn.xfm.*, attn.ifm.*) are dropped (ours
    are constants); post_network, head and aux_head keep their names. The lowpass gate complex_weight_ll
    is resized (bilinear) when the model was built for another input size; an aux_head of another class
    count is left at the model's init, as the loader does for head.
    """
    state_dict = release_state_dict(state_dict)
    last = len(model.stages)
    out = {}
    for k, v in state_dict.items():
        if ".attn.xfm." in k or ".attn.ifm." in k:
            continue
        m = _OFFICIAL.match(k)
        if m:
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "patch_embed":
                k = f"stages.{i - 1}.downsample{rest}"
            elif kind == "block":
                k = f"stages.{i - 1}.blocks{rest}".replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")
            else:
                k = "norm" + rest if i == last else f"stages.{i - 1}.norm{rest}"
        out[k] = v
    from formers.checkpoint import does_not_fit
    for k in [k for k in out if k.startswith("stages.") and (".attn.q." in k)]:
        kv = k.replace(".attn.q.", ".attn.kv.")
        if kv not in out or out[k].dim() != out[kv].dim() or out[k].shape[1:] != out[kv].shape[1:]:
            raise does_not_fit(model, f"{k} needs its {kv} partner of the same width (SVT keeps q and kv apart)")
        out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(k), out.pop(kv)], dim=0)
    own = model.state_dict()
    for k, v in list(out.items()):
        if k.endswith("complex_weight_ll") and k in own and v.shape != own[k].shape:
            if v.dim() != own[k].dim() or v.dim() < 3 or v.shape[:-2] != own[k].shape[:-2]:
                raise does_not_fit(model, f"{k} has shape {tuple(v.shape)}; the model's is {tuple(own[k].shape)}")
            out[k] = F.interpolate(v[None].float(), size=own[k].shape[-2:], mode="bilinear",
                                   align_corners=False)[0].to(v.dtype)
        elif k.startswith("aux_head.") and k in own and v.shape != own[k].shape:
            if v.dim() != own[k].dim() or v.shape[1:] != own[k].shape[1:]:
                raise does_not_fit(model, f"{k} has shape {tuple(v.shape)}; the model's is {tuple(own[k].shape)}")
            out[k] = own[k]
    return out


_CFG = dict(crop_pct=0.9, interpolation="bicubic", first_conv="stages.0.downsample.conv.0")
_NOTES = ("trained with token labeling (eval logits add 0.5 x the best token's aux_head logits); no released "
          "checkpoints (logs only). MACs: the README prints {paper}G FLOPs; the official code counted by its own "
          "util/flops_counter.py (module hooks, ptflops: Linear/Conv/BN/ReLU only) gives {ptflops} GMac, and torch's "
          "flop counter, which also sees the attention matmuls, the DTCWT convolutions and the einsums, {ours} GMACs "
          "(ours and the official model alike), so macs_g is left empty")


def _card(name: str, params: str, top1: float, paper: float, ptflops: float, ours: float, note: str = "") -> ModelCard:
    return ModelCard(paper=54, arxiv="2311.01310", repo="badripatro/svt", official_name=name, params_m=params,
                     macs_g=None, img_size=224, top1=top1,
                     notes=_NOTES.format(paper=paper, ptflops=ptflops, ours=ours) + note)


def _create(kwargs, **defaults) -> SVT:
    return SVT(**{**defaults, **kwargs})


@register_model(_card("SVT-H-S (svt_s)", "22.0", 84.2, 3.9, 4.13, 5.15), **_CFG)
def svt_h_s(**kwargs):
    return _create(kwargs, stem_hidden_dim=32, embed_dims=(64, 128, 320, 448), num_heads=(2, 4, 10, 14),
                   mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3))


@register_model(_card("SVT-H-B (svt_b)", "32.8", 85.2, 6.3, 6.53, 7.70), **_CFG)
def svt_h_b(**kwargs):
    return _create(kwargs, stem_hidden_dim=64, embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16),
                   mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 12, 3))


@register_model(_card("SVT-H-L (svt_l)", "54.6", 85.7, 12.7, 13.39, 15.78,
                      "; params: the README prints 54.0M, but the official svt_l builds 54.59M (counted by running "
                      "it; ours is the same), 1.1% more, so params_m carries the code's count"), **_CFG)
def svt_h_l(**kwargs):
    return _create(kwargs, stem_hidden_dim=64, embed_dims=(96, 192, 384, 512), num_heads=(3, 6, 12, 16),
                   mlp_ratios=(8, 8, 4, 4), depths=(3, 6, 18, 3))


@register_model(ModelCard(paper=54, arxiv="2311.01310", repo="badripatro/svt",
                          official_name="(none: a reduced SVT for the demo and tests)", img_size=32,
                          status="reduced", notes="widths 32-112, depths 1-2, scatter stage 1 on an 8x8 map (32 px input)"),
                **_CFG)
def svt_demo(**kwargs):
    return _create(kwargs, img_size=32, stem_hidden_dim=16, embed_dims=(32, 64, 96, 112), num_heads=(1, 2, 3, 4),
                   mlp_ratios=(4, 4, 4, 3), depths=(1, 1, 2, 1))
