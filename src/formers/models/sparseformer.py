"""SparseFormer, and bootstrapping it from a ViT.

Papers: "SparseFormer: Sparse Visual Recognition via Limited Latent Tokens", Gao et al., arXiv 2304.03768
(the architecture, variants T/S/B), and (catalog id 14) "Bootstrapping SparseFormers from Vision Foundation
Models", Gao et al., arXiv 2312.01987 (initialise the dense blocks from a pre-trained ViT). Official code:
showlab/sparseformer (sparseformer/sparseformer/modeling.py, config.py, ckpt_utils.py).

The idea, in three lines:
  a small set of latent tokens (49-81), each with an embedding and a region of interest (RoI) in the image,
      replaces the patch grid; the image is read only through a cheap /4 convolutional feature map;
  focusing units let each token adjust its RoI, sample P points inside it (bilinear, pure torch via
      F.grid_sample) and decode them with channel and point mixing matrices generated from the token itself;
  a standard transformer ("cortex") then runs on the few latent tokens, so its cost does not grow with the image.

The latent tokens are a set, not a map: there is no NCHW feature pyramid. feature_info has one entry per
SparseFormer unit (module `layers.{k}`, reduction None) and forward_intermediates returns each unit's tokens
(B, N, C) with output_fmt='NLC'; asking for 'NCHW' raises a ValueError saying so. `forward_latents` also
returns the RoIs (x1, y1, x2, y2 in [0, 1] image coordinates) after every unit. Any input size works (RoIs
are relative to the image). `sparseformer_from_vit` maps a timm ViT's blocks, final norm and head into a
SparseFormer in the bootstrapping paper's layout.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import release_state_dict
from formers.layers import Attention, DropPath, Mlp, drop_path_rates, feature_take_indices
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["SparseFormer", "SparseFormerUnit", "AdaptiveMixing", "sample_points", "roi_adjust", "sampling_locations",
           "roi_position_encoding", "checkpoint_filter_fn", "sparseformer_from_vit"]

V1_FOCUS = ("attn", "roi", "sample", "mlp")       # v1: the focusing units (first two)
CORTEX = ("attn", "mlp")                           # a plain pre-norm transformer block
BTSP_FOCUS = ("sample", "pe", "attn", "mlp", "roi")  # bootstrapped: the focusing unit
BTSP_ENTRY = ("sample", "pe")                      # bootstrapped: the sampling step at the cortex width


# ---------------------------------------------------------------------------------------------
# RoI geometry and sparse sampling (all coordinates are (x, y) in [0, 1] of the image)

def roi_adjust(roi: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Move and rescale RoIs (..., 4) = (x1, y1, x2, y2) by delta (..., 4) = (dx, dy, dw, dh):
    centre += (dx, dy) * size, size *= exp(dw, dh) (size taken as |x2 - x1|, |y2 - y1|)."""
    centre = (roi[..., :2] + roi[..., 2:]) * 0.5
    size = (roi[..., 2:] - roi[..., :2]).abs()
    centre = centre + delta[..., :2] * size
    size = size * delta[..., 2:].exp()
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)


def sampling_locations(roi: torch.Tensor, offsets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Absolute sampling points (B, N, P, 2) from RoIs (B, N, 4) and raw offsets (B, N, P, 2).

    The offsets of a token are standardised over its P points per axis (mean 0, unbiased std 1/3,
    eps 1e-5 added to the std) and scaled by the RoI's signed width and height around its centre, so
    the points spread over the RoI whatever the raw offsets' scale."""
    offsets = (offsets - offsets.mean(dim=2, keepdim=True)) / (3 * (offsets.std(dim=2, keepdim=True) + eps))
    centre = (roi[..., :2] + roi[..., 2:]) * 0.5
    size = roi[..., 2:] - roi[..., :2]
    return centre[:, :, None] + offsets * size[:, :, None]


def sample_points(feat: torch.Tensor, points: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear samples (B, N, P, C) of an NCHW map at points (B, N, P, 2) given as (x, y) in [0, 1].

    Pixel centres sit at ((i + 0.5) / W, (j + 0.5) / H) (align_corners=False); outside the map
    `padding_mode` 'zeros' reads 0 for missing neighbours, 'border' clamps to the edge."""
    out = F.grid_sample(feat, points * 2.0 - 1.0, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.permute(0, 2, 3, 1)  # (B, C, N, P) -> (B, N, P, C)


@torch.no_grad()
def roi_position_encoding(roi: torch.Tensor, dim: int, max_temperature: float = 128.0) -> torch.Tensor:
    """Sinusoidal code (B, N, dim) of RoIs (B, N, 4) for the bootstrapped model's PE injection:
    each coordinate * pi times dim/4 frequencies geometric from 1 to max_temperature; per coordinate
    the sines of the even frequencies, then the cosines of the odd ones. No gradient (as official)."""
    freqs = torch.linspace(0, math.log(max_temperature), dim // 4, dtype=roi.dtype, device=roi.device).exp()
    phase = (roi * math.pi)[..., None] * freqs  # (B, N, 4, dim/4)
    return torch.cat([phase[..., 0::2].sin(), phase[..., 1::2].cos()], dim=-1).flatten(2)


# ---------------------------------------------------------------------------------------------
# Blocks

class AdaptiveMixing(nn.Module):
    """Decode a token's P sampled vectors (C channels each) with mixing weights generated from the token.

    A LayerNorm + two Linears turn the token into a C x C channel-mixing matrix and a P_out x P
    point-mixing matrix (P_out = max(P, 32)); samples @ channel + bias, GELU, point @ that + bias, GELU
    (without biases, the bootstrapped setting: no GELU between the two), then `out_proj` maps the flattened
    P_out x C result back to the token width.
    """

    def __init__(self, in_dim: int, num_points: int, dim: int, inner_dim: int, bias: bool = True, norm_eps=1e-6):
        super().__init__()
        self.in_dim = in_dim
        self.num_points = num_points
        self.out_points = max(num_points, 32)
        self.parameter_generator = nn.Sequential(
            nn.LayerNorm(dim, eps=norm_eps), nn.Linear(dim, inner_dim),
            nn.Linear(inner_dim, in_dim * in_dim + self.out_points * num_points))
        if bias:
            self.m_beta = nn.Parameter(torch.zeros(in_dim))
            self.s_beta = nn.Parameter(torch.zeros(self.out_points))
        else:
            self.m_beta = self.s_beta = None
        self.out_proj = nn.Linear(in_dim * self.out_points, dim)
        self.act = nn.GELU()

    def init_weights(self):
        ln = self.parameter_generator[0]
        nn.init.constant_(ln.weight, ln.normalized_shape[0] ** -0.5)  # a unit-norm output
        last = self.parameter_generator[-1]
        nn.init.zeros_(last.weight)
        c, p, po = self.in_dim, self.num_points, self.out_points
        with torch.no_grad():  # xavier on the matrices the biases stand for (shapes as the official init)
            nn.init.xavier_uniform_(last.bias[:c * c].view(c, c))
            nn.init.xavier_uniform_(last.bias[c * c:].view(p, po))

    def forward(self, sampled: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, p, c = sampled.shape[0], sampled.shape[1], sampled.shape[2], sampled.shape[3]
        # explicit sizes, no -1: a batch of zero images reshapes too
        params = self.parameter_generator(x).reshape(b * n, c * c + self.out_points * p)
        channel, point = params.split([c * c, self.out_points * p], dim=-1)
        out = sampled.reshape(b * n, p, c)
        if self.m_beta is not None:
            out = torch.baddbmm(self.m_beta.view(1, 1, c), out, channel.reshape(b * n, c, c))
            out = torch.baddbmm(self.s_beta.view(1, -1, 1), point.reshape(b * n, self.out_points, p), self.act(out))
        else:
            # no GELU between the two mixings without biases (the bootstrapped models), as official
            out = torch.bmm(point.reshape(b * n, self.out_points, p), out @ channel.reshape(b * n, c, c))
        return self.out_proj(self.act(out).reshape(b, n, self.out_points * c))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation (for CLIP-bootstrapped cortex blocks)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SparseFormerUnit(nn.Module):
    """One SparseFormer unit: a sequence of ops on (tokens, RoIs), run `repeats` times with shared weights.

    Ops: 'attn' x + Attn(LN(x)); 'mlp' x + Mlp(LN(x)); 'roi' RoIs adjusted by LN + Linear(->4) of the
    tokens (v1; with `roi_mlp`, LN, Linear, GELU, Linear as in the bootstrapped model); 'sample' x +
    AdaptiveMixing(points sampled in the RoIs, x), the points' offsets from LN + Linear of x plus a
    learned per-point bias; 'pe' x + LN + Linear of the RoIs' sinusoidal code. Each residual branch (and,
    in v1, the RoI delta) goes through stochastic depth with the repeat's own rate. With
    `stage_embedding`, a learned vector per repeat is added to the tokens first.
    """

    def __init__(self, dim: int, ops, feat_dim: int, num_points: int, num_heads: int, repeats: int = 1,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, mixing_bias: bool = True, pg_inner_dim=0.25,
                 roi_mlp: bool = False, stage_embedding: bool = False, act_layer=nn.GELU,
                 padding_mode: str = "zeros", drop_path=(0.0,)):
        super().__init__()
        unknown = set(ops) - {"attn", "mlp", "roi", "sample", "pe"}
        if unknown:
            raise ValueError(f"SparseFormerUnit: unknown ops {sorted(unknown)}")
        self.dim = dim
        self.ops = tuple(ops)
        self.repeats = repeats
        self.num_points = num_points
        self.padding_mode = padding_mode
        self.drop_roi = not roi_mlp  # v1 (type-1 RoI adjust) drops the RoI delta with the residual branches
        self.stage_embedding = nn.Parameter(torch.zeros(repeats, dim)) if stage_embedding and repeats > 1 else None
        if "sample" in ops:
            inner = int(pg_inner_dim * dim) if isinstance(pg_inner_dim, float) else pg_inner_dim
            self.adaptive_mixing = AdaptiveMixing(feat_dim, num_points, dim, inner, mixing_bias, norm_eps)
            self.roi_offset_module = nn.Sequential(nn.LayerNorm(dim, eps=norm_eps),
                                                   nn.Linear(dim, 2 * num_points, bias=False))
            self.roi_offset_bias = nn.Parameter(torch.zeros(2 * num_points))
        if "attn" in ops:
            if dim % num_heads:
                raise ValueError(f"SparseFormerUnit: width {dim} is not divisible by {num_heads} heads")
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn = Attention(dim, num_heads, qkv_bias=True)
        if "mlp" in ops:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        if "roi" in ops:
            layers = [nn.LayerNorm(dim, eps=norm_eps)]
            layers += [nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4, bias=False)] if roi_mlp else \
                [nn.Linear(dim, 4, bias=False)]
            self.roi_adjust_module = nn.Sequential(*layers)
        if "pe" in ops:
            self.pe_transition = nn.Sequential(nn.LayerNorm(dim, eps=norm_eps), nn.Linear(dim, dim))
        rates = list(drop_path) + [drop_path[-1]] * (repeats - len(drop_path))
        self.drop_paths = nn.ModuleList(DropPath(r) if r > 0 else nn.Identity() for r in rates[:repeats])

    def init_weights(self):
        """The official special inits: unit-norm LayerNorms and zero last Linears for the RoI and offset
        heads (RoIs start still), sampling offsets on a centred sqrt(P) x sqrt(P) grid."""
        for name in ("roi_adjust_module", "roi_offset_module"):
            seq = getattr(self, name, None)
            if seq is not None:
                nn.init.constant_(seq[0].weight, self.dim ** -0.5)
                nn.init.zeros_(seq[-1].weight)
        if hasattr(self, "adaptive_mixing"):
            self.adaptive_mixing.init_weights()
            root = math.isqrt(self.num_points)
            with torch.no_grad():
                if root * root == self.num_points:
                    ticks = torch.linspace(0.5 / root, 1 - 0.5 / root, root)
                    grid = torch.stack([ticks.repeat(root), ticks.repeat_interleave(root)], dim=-1)  # x fastest
                    self.roi_offset_bias.copy_((grid - 0.5).flatten())
                else:
                    nn.init.uniform_(self.roi_offset_bias, -0.5, 0.5)

    def sample(self, feat, x, roi):
        b, n, _ = x.shape
        offsets = (self.roi_offset_module(x) + self.roi_offset_bias).view(b, n, self.num_points, 2)
        points = sampling_locations(roi, offsets)
        return self.adaptive_mixing(sample_points(feat, points, self.padding_mode), x)

    def step(self, feat, x, roi, drop):
        for op in self.ops:
            if op == "attn":
                x = x + drop(self.attn(self.norm1(x)))
            elif op == "mlp":
                x = x + drop(self.mlp(self.norm2(x)))
            elif op == "roi":
                delta = self.roi_adjust_module(x[:, -roi.shape[1]:])
                roi = roi_adjust(roi, drop(delta) if self.drop_roi else delta)
            elif op == "sample":
                x = x + drop(self.sample(feat, x, roi))
            else:  # "pe"
                x = x + self.pe_transition(roi_position_encoding(roi, self.dim))
        return x, roi

    def forward(self, feat, x, roi):
        for i in range(self.repeats):
            if self.stage_embedding is not None:
                x = x + self.stage_embedding[i]
            x, roi = self.step(feat, x, roi, self.drop_paths[i])
        return x, roi


class Transition(nn.Module):
    """Linear to the next unit's width, then (v1) a LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps) if norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.fc(x))


def _v1_ops(num_units: int):
    return [V1_FOCUS, V1_FOCUS] + [CORTEX] * (num_units - 2)


class SparseFormer(Backbone):
    """SparseFormer: early conv, latent tokens + RoIs, units (with Linear transitions where the width
    changes), then pool -> LayerNorm -> head.

    `widths`/`repeats`/`ops` give one entry per unit (ops default: v1, two sampling units then plain
    blocks). Heads: `head_dim` sets width // head_dim per unit, else `num_heads` everywhere (v1: 64).
    `cls_token_unit` >= 0 puts a learned cls token in front of the latent tokens before that unit
    (bootstrapped models); `global_pool` 'avg' (v1) or 'token'. forward_features returns the tokens
    (B, N, C) before the final norm, which (as officially) is applied after pooling.
    """

    feature_maps = False  # a token set: forward_intermediates gives (B, N, C) with output_fmt='NLC' only
    output_fmt = "NLC"    # forward_features returns the latent tokens (B, N, C)
    script_unsupported = ("each unit runs its configured list of op names, dispatched in Python to submodules "
                          "that only some units have, and the units are reached through a generator")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, conv_dim: int = 96,
                 num_latent_tokens: int = 49, num_points: int = 36, widths=(256,) + (512,) * 8,
                 repeats=(4,) + (1,) * 8, ops=None, num_heads: int = 64, head_dim: int | None = None,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, mixing_bias: bool = True, pg_inner_dim=0.25,
                 roi_mlp: bool = False, transition_norm: bool = True, stage_embedding: bool = False,
                 shared_token_embedding: bool = False, cls_token_unit: int = -1, quick_gelu: bool = False,
                 padding_mode: str = "zeros", global_pool: str = "avg", head_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        ops = _v1_ops(len(widths)) if ops is None else ops
        if not len(widths) == len(repeats) == len(ops):
            raise ValueError("widths, repeats and ops need one entry per unit")
        # 'token' needs a cls token (cls_token_unit >= 0)
        self.pool_types = ("token", "avg", "") if cls_token_unit >= 0 else ("avg", "")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.global_pool = self.check_pool(global_pool)
        self.num_features = widths[-1]
        self.num_latent_tokens = num_latent_tokens
        self.cls_token_unit = cls_token_unit
        self.grad_checkpointing = False

        self.stem = nn.Conv2d(in_chans, conv_dim, 7, stride=2, padding=3)
        self.stem_pool = nn.MaxPool2d(3, 2, 1)
        self.latent_roi = nn.Parameter(torch.zeros(num_latent_tokens, 4))
        self.latent_embed = nn.Parameter(torch.zeros(1 if shared_token_embedding else num_latent_tokens, widths[0]))
        self.cls_token = nn.Parameter(torch.zeros(1, widths[-1])) if cls_token_unit >= 0 else None

        dpr = drop_path_rates(drop_path_rate, repeats)
        self.layers = nn.ModuleList()
        self.feature_info = []
        self.unit_ids = []
        for i, (width, rep, unit_ops) in enumerate(zip(widths, repeats, ops)):
            if i > 0 and widths[i - 1] != width:
                self.layers.append(Transition(widths[i - 1], width, transition_norm, norm_eps))
            heads = width // head_dim if head_dim else num_heads
            act = QuickGELU if quick_gelu and rep == 1 else nn.GELU
            self.layers.append(SparseFormerUnit(
                width, unit_ops, conv_dim, num_points, heads, rep, mlp_ratio, norm_eps, mixing_bias, pg_inner_dim,
                roi_mlp, stage_embedding, act, padding_mode, dpr[i] or [0.0]))
            self.unit_ids.append(len(self.layers) - 1)
            self.feature_info.append(dict(num_chs=width, reduction=None, module=f"layers.{len(self.layers) - 1}"))
        self.norm = nn.LayerNorm(widths[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes, bias=head_bias) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        self.apply(init_trunc_normal)
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")
        for unit in self.units():
            unit.init_weights()
            if unit.stage_embedding is not None:
                nn.init.normal_(unit.stage_embedding)
        nn.init.trunc_normal_(self.latent_embed, std=1.0)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token)
        # RoIs: the whole image, and the first root^2 tokens on a root x root grid of half-size boxes
        # (token i * root + j at x = i / (root - 1), y = j / (root - 1), as the official init)
        self.latent_roi[:, :2] = 0.0
        self.latent_roi[:, 2:] = 1.0
        root = math.isqrt(self.num_latent_tokens)
        if root > 1:
            ticks = torch.arange(root, dtype=torch.float32) / (root - 1)
            xy = torch.stack([ticks.repeat_interleave(root), ticks.repeat(root)], dim=-1) * 0.5
            self.latent_roi[:root * root] = torch.cat([xy, xy + 0.5], dim=-1)

    def units(self) -> list[SparseFormerUnit]:
        return [self.layers[i] for i in self.unit_ids]

    def no_weight_decay(self) -> set[str]:
        return {"latent_roi"}  # as official

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        take, last = feature_take_indices(len(self.unit_ids), indices)
        prune_end = last < len(self.unit_ids) - 1
        self.layers = self.layers[:self.unit_ids[last] + 1]
        self.unit_ids = self.unit_ids[:last + 1]
        if prune_end and self.cls_token_unit > last:
            self.cls_token, self.cls_token_unit = None, -1
        if prune_norm or prune_end or prune_head:
            self.norm = nn.Identity()  # the final norm acts on pooled (or the last unit's) tokens
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def image_features(self, x):
        """The early convolution: conv 7x7 s2, ReLU, max-pool 3 s2, then each pixel's channels
        standardised (no affine, eps 1e-5): the (B, conv_dim, H/4, W/4) map tokens sample from."""
        x = self.stem_pool(F.relu(self.stem(x)))
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-5).permute(0, 3, 1, 2)

    def _run(self, x, stop_after: int | None = None):
        """Yield (unit index, tokens, RoIs) after every unit."""
        self.check_input(x)
        b = x.shape[0]
        feat = self.image_features(x)
        # copies, not expand() views: a view of a parameter made under no_grad still claims requires_grad
        tokens = self.latent_embed.repeat(b, self.num_latent_tokens // self.latent_embed.shape[0], 1)
        roi = self.latent_roi.repeat(b, 1, 1)
        u = 0
        for layer in self.layers:
            if isinstance(layer, Transition):
                tokens = layer(tokens)
                continue
            if u == self.cls_token_unit:
                tokens = torch.cat([self.cls_token.repeat(b, 1, 1), tokens], dim=1)
            if self.grad_checkpointing and tokens.requires_grad:
                tokens, roi = checkpoint(layer, feat, tokens, roi, use_reentrant=False)
            else:
                tokens, roi = layer(feat, tokens, roi)
            yield u, tokens, roi
            if stop_after is not None and u >= stop_after:
                return
            u += 1

    def forward_latents(self, x):
        """(tokens (B, N, C) before the final norm, [RoIs (B, N_latent, 4) after every unit])."""
        rois = []
        for _, tokens, roi in self._run(x):
            rois.append(roi)
        return tokens, rois

    def forward_features(self, x):
        for _, tokens, _ in self._run(x):
            pass
        return tokens

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        if self.global_pool:
            x = self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Each requested unit's tokens (B, N, C) (output_fmt='NLC'; `norm` applies the final LayerNorm
        to the last unit's). There is no NCHW form: the tokens are a set with moving RoIs, not a grid."""
        name = getattr(self, "model_name", type(self).__name__)
        if output_fmt != "NLC":
            raise ValueError(f"{name}: the latent tokens are a set of {self.num_latent_tokens} tokens with RoIs, "
                             f"not a feature map, so there is no {output_fmt!r} output for dense tasks; use "
                             "output_fmt='NLC' for the (B, N, C) tokens (forward_latents also gives the RoIs)")
        num_units = len(self.unit_ids)
        take, last = feature_take_indices(num_units, indices)
        stop = last if stop_early or intermediates_only else None
        feats = []
        for u, tokens, _ in self._run(x, stop):
            if u in take:
                feats.append(self.norm(tokens) if norm and u == num_units - 1 else tokens)
        return feats if intermediates_only else (tokens, feats)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the official (v2-refactor, "*_converted.pth") names, and ViT bootstrapping

_RENAMES = (("feat_extractor.conv1.", "stem."), ("initial_roi.weight", "latent_roi"),
            ("initial_embedding.weight", "latent_embed"), ("cls_embedding.weight", "cls_token"), ("proj.", "head."))
_TRANSITION = re.compile(r"^layers\.(\d+)\.([01])\.(.*)$")
_STAGE_EMB = re.compile(r"^(layers\.\d+)\.stage_embedding\.weight$")


def checkpoint_filter_fn(state_dict: dict, model: SparseFormer) -> dict:
    """Map an official SparseFormer checkpoint (the v2-refactor layout of modeling.py; or our own state
    dict) to our key names.

    Official -> ours: feat_extractor.conv1.* -> stem.*, initial_roi.weight -> latent_roi,
    initial_embedding.weight -> latent_embed, cls_embedding.weight -> cls_token, proj.* -> head.*;
    transitions layers.{k}.0 / layers.{k}.1 -> layers.{k}.fc / layers.{k}.norm;
    layers.{k}.stage_embedding.weight -> layers.{k}.stage_embedding; every other name inside a unit
    (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2, adaptive_mixing.*, roi_offset_module.*,
    roi_offset_bias, roi_adjust_module.*, pe_transition.*) and norm.* are the same.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        t = _TRANSITION.match(k)
        if t:
            k = f"layers.{t.group(1)}.{'fc' if t.group(2) == '0' else 'norm'}.{t.group(3)}"
        s = _STAGE_EMB.match(k)
        if s:
            k = f"{s.group(1)}.stage_embedding"
        out[k] = v
    return out


_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def sparseformer_from_vit(vit, num_blocks: int | None = None, num_heads: int | None = None,
                          focus_dim: int | None = None, num_classes: int | None = None, **kwargs) -> SparseFormer:
    """A SparseFormer whose cortex is a pre-trained ViT's transformer blocks (the bootstrapping paper).

    `vit` is a timm VisionTransformer or its state dict (timm key names: blocks.{i}.norm1 / attn.qkv /
    attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, head, cls_token, pos_embed). The layout is the
    bootstrapped one: a focusing unit (sample, PE, attn, MLP, RoI; 4 repeats, width `focus_dim`,
    default half the ViT width; heads of the ViT's head width throughout), a Linear to the ViT width, a sampling + PE unit, then one plain unit
    per inherited block, the last `num_blocks` of the ViT (default: all; the official ViT-B/L configs keep
    8 of 12 / 16 of 24 blocks). The blocks, final norm (eps taken from the ViT) and head are copied, so
    each cortex unit computes exactly its ViT block; with a cls token the model pools it (inserted before
    the first cortex unit, initialised to the ViT's cls token plus its position embedding). The focusing
    part is freshly initialised. Other SparseFormer arguments (num_latent_tokens, num_points, conv_dim, ...)
    pass through `kwargs`.
    """
    sd = vit if isinstance(vit, dict) else vit.state_dict()
    extra = sorted({k.split(".", 2)[2] for k in sd if k.startswith("blocks.") and not _VIT_BLOCK.match(k)})
    if extra:
        raise ValueError(f"sparseformer_from_vit: the ViT blocks hold parts a plain pre-norm block lacks: {extra[:4]} "
                         "(layer scale, q/k norms?), so they cannot be copied as they compute")
    if "fc_norm.weight" in sd and "norm.weight" not in sd:  # timm ViTs that average-pool normalise after it
        sd = {**sd, "norm.weight": sd["fc_norm.weight"], "norm.bias": sd["fc_norm.bias"]}
    if num_heads is None:
        if isinstance(vit, dict):
            raise ValueError("sparseformer_from_vit: pass num_heads= with a state dict (it is not in the weights)")
        num_heads = vit.blocks[0].attn.num_heads
    depth = 1 + max(int(m.group(1)) for m in map(_VIT_BLOCK.match, sd) if m)
    num_blocks = depth if num_blocks is None else num_blocks
    if not 0 < num_blocks <= depth:
        raise ValueError(f"sparseformer_from_vit: num_blocks={num_blocks}, the ViT has {depth} blocks")
    dim = sd["blocks.0.norm1.weight"].shape[0]
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    eps = vit.norm.eps if not isinstance(vit, dict) and isinstance(vit.norm, nn.LayerNorm) else 1e-6
    has_cls = "cls_token" in sd
    head = sd.get("head.weight")
    focus_dim = focus_dim or dim // 2
    cfg = dict(conv_dim=64, num_latent_tokens=48 if has_cls else 49, num_points=16, pg_inner_dim=128,
               widths=(focus_dim, dim) + (dim,) * num_blocks, repeats=(4, 1) + (1,) * num_blocks,
               ops=[BTSP_FOCUS, BTSP_ENTRY] + [CORTEX] * num_blocks, head_dim=dim // num_heads,
               mlp_ratio=mlp_ratio, norm_eps=eps, mixing_bias=False, roi_mlp=True, transition_norm=False,
               stage_embedding=True, shared_token_embedding=True, cls_token_unit=2 if has_cls else -1,
               padding_mode="border", global_pool="token" if has_cls else "avg",
               num_classes=head.shape[0] if head is not None and num_classes is None else (num_classes or 0))
    cfg.update(kwargs)
    model = SparseFormer(**cfg)
    own = model.state_dict()
    mapped = {}
    first = depth - num_blocks
    for k, v in sd.items():
        m = _VIT_BLOCK.match(k)
        if m and int(m.group(1)) >= first:
            unit = model.unit_ids[2 + int(m.group(1)) - first]
            mapped[f"layers.{unit}.{m.group(2)}.{m.group(3)}"] = v
        elif k in ("norm.weight", "norm.bias") or (k.startswith("head.") and own.get(k) is not None
                                                    and own[k].shape == v.shape):
            mapped[k] = v
    if has_cls and model.cls_token is not None:
        cls = sd["cls_token"].reshape(1, -1)
        if "pos_embed" in sd and sd["pos_embed"].shape[1] > 1:
            cls = cls + sd["pos_embed"][0, :1]
        mapped["cls_token"] = cls
    missing = [k for k in mapped if k not in own or own[k].shape != mapped[k].shape]
    if missing:
        raise ValueError(f"sparseformer_from_vit: cannot place {missing[:4]} into the SparseFormer")
    model.load_state_dict(mapped, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# Variants: SparseFormer v1 (ImageNet-1K, 224x224; imagenet/README: params, GFLOPs, top-1).

_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stem", classifier="head",
            pool_size=None)  # forward_features is a set of latent tokens with RoIs, not a map


def _card(name: str, params: str, macs: float | None, top1: float, notes: str = "") -> ModelCard:
    return ModelCard(paper=14, arxiv="2304.03768", repo="showlab/sparseformer", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1, notes=notes)


def _v1(widths, num_latent_tokens, kwargs, drop_path_rate):
    kwargs.setdefault("drop_path_rate", drop_path_rate)
    return SparseFormer(**{"conv_dim": 96, "num_points": 36, "widths": widths, "repeats": (4,) + (1,) * (len(widths) - 1),
                           "num_latent_tokens": num_latent_tokens, **kwargs})


# The README's GFLOPs are fvcore counts (the official code calls FlopCountAnalysis), which skip the
# token-generated mixing products (aten::baddbmm, no fvcore handle): we count them, 0.112 / 0.146 / 0.185 G.
# Without them our counts are 2.066 / 3.844 / 7.802 G; with them 2.178 (+8.9%) / 3.990 (+5.0%) / 7.987 G
# (+2.4%), so T and S carry no macs_g (the 5% check would fail or sit on its edge) and B keeps 7.8.
_MACS_NOTE = "README: {paper}G (fvcore, mixing matmuls uncounted); ours {ours} GMACs with them, {without} without"


@register_model(_card("SparseFormer-T (sparseformer_v1_tiny)", "32", None, 81.0,
                      _MACS_NOTE.format(paper=2.0, ours=2.178, without=2.066)), **_CFG)
def sparseformer_tiny(**kwargs):
    return _v1((256,) + (512,) * 8, 49, kwargs, 0.2)


@register_model(_card("SparseFormer-S (sparseformer_v1_small)", "48", None, 82.0,
                      _MACS_NOTE.format(paper=3.8, ours=3.990, without=3.844)), **_CFG)
def sparseformer_small(**kwargs):
    return _v1((320,) + (640,) * 8, 64, kwargs, 0.3)


@register_model(_card("SparseFormer-B (sparseformer_v1_base)", "81", 7.8, 82.6), **_CFG)
def sparseformer_base(**kwargs):
    return _v1((384,) + (768,) * 10, 81, kwargs, 0.4)


@register_model(ModelCard(paper=14, arxiv="2304.03768", repo="showlab/sparseformer", official_name="", img_size=32,
                          status="reduced", notes="a small v1 layout for quick runs at 32x32: 16 latent tokens, "
                          "9 points, conv width 32, widths 64 then 96 (two sampling units, two plain), head width 32"), **_CFG)
def sparseformer_demo(**kwargs):
    return SparseFormer(**{"img_size": 32, "conv_dim": 32, "num_latent_tokens": 16, "num_points": 9,
                           "widths": (64, 96, 96, 96), "repeats": (2, 1, 1, 1), "head_dim": 32, **kwargs})
