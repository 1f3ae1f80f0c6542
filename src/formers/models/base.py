"""What every image backbone shares: the timm-style contract around a model's own forward.

A backbone subclasses `Backbone`, sets `num_classes`, `num_features`, `in_chans`,
`feature_info` and a `head`, and writes `forward_features`, `forward_head` and
`forward_intermediates`; the rest (classifier reset, input checks, weight-decay
exclusions) comes from here.
"""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.layers import check_image_input, feature_take_indices

__all__ = ["Backbone", "ChannelsLastPyramid", "Stage", "TokenBackbone", "init_trunc_normal", "stage_intermediates"]


class Backbone(nn.Module):
    num_classes: int
    num_features: int
    in_chans: int = 3
    global_pool: str = "avg"
    input_divisor: int = 1      # H and W must be multiples of this (1: any size)
    min_input_size: int = 1     # ... and at least this
    fixed_input_size = None     # (H, W) when the architecture takes one size only

    def check_input(self, x):
        return check_image_input(self, x, divisor=self.input_divisor, min_size=self.min_input_size,
                                 fixed_size=self.fixed_input_size)

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A new linear classifier for `num_classes` (0: none, forward returns pooled features);
        `global_pool=''` makes forward return the unpooled map."""
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (position tables, tokens, scales)."""
        keys = ("pos_embed", "cls_token", "relative_position_bias_table", "layer_scale", "gamma", "scale")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def init_trunc_normal(m: nn.Module):
    """The ViT/Swin init: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def stage_intermediates(stages, x, indices=None, stop_early: bool = False, intermediates_only: bool = False):
    """timm's forward_intermediates over `stages`, modules that each map a tensor to the next (NCHW maps):
    the outputs of the requested stages (indices as in feature_take_indices) and, unless
    `intermediates_only`, the last output (of every stage, or of the last requested one with `stop_early`)."""
    take, last = feature_take_indices(len(stages), indices)
    run = stages[:last + 1] if stop_early or intermediates_only else stages
    feats = []
    for i, stage in enumerate(run):
        x = stage(x)
        if i in take:
            feats.append(x)
    return feats if intermediates_only else (x, feats)


class ChannelsLastPyramid(Backbone):
    """The forward paths of a pyramid of stages on channels-last (B, H, W, C) maps with a final
    LayerNorm and an average-pooled linear head (Swin and the models that grew from it).

    A subclass builds `patch_embed`, the stages (in `self.stages`, or names them by overriding
    `feature_stages`), `norm`, `head_drop` and `head`; `stem` may add dropout after the embedding.
    forward_features returns the normalised NHWC map, as timm's Swin does.
    """

    output_fmt = "NHWC"

    @property
    def feature_stages(self) -> nn.ModuleList:
        return self.stages

    def stem(self, x):
        return self.patch_embed(x)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.feature_stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x):
        self.check_input(x)
        x = self.stem(x)
        for stage in self.feature_stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NHWC"):
            name = getattr(self, "model_name", type(self).__name__)
            raise ValueError(f"{name}: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self.check_input(x)
        all_stages = self.feature_stages
        take, last = feature_take_indices(len(all_stages), indices)
        stages = all_stages[:last + 1] if stop_early or intermediates_only else all_stages
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == len(all_stages) - 1 else x
                feats.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        if len(stages) == len(all_stages):
            x = self.norm(x)
        return x, feats


class Stage(nn.Module):
    """One pyramid stage: `downsample` (nn.Identity in the first), then `blocks`, each block run
    under activation checkpointing when `grad_checkpointing` is set. Subclasses build the two."""

    grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and x.requires_grad else block(x)
        return x


class TokenBackbone(Backbone):
    """The forward paths of a ViT-like model: one grid of tokens (prefix tokens such as cls first)
    through `self.blocks`, a final `norm`, and a head on the cls token (global_pool='token'), on the
    mean patch token ('avg'), or none ('': forward_head returns the tokens).

    A subclass builds `blocks`, `norm`, `head` (and, if it has one, `head_drop`), sets
    `num_prefix_tokens`, and writes `_embed(x) -> (tokens, (h, w))`; it overrides `_run(blk, x, hw)`
    when its blocks take more than the tokens. As timm's ViTs: feature_info has one entry per block,
    forward_features returns all normalised tokens, and forward_intermediates gives each requested
    block's patch tokens as an NCHW map (or NLC tokens), through the final norm when `norm=True`.
    """

    num_prefix_tokens = 1
    global_pool = "token"
    grad_checkpointing = False

    def _embed(self, x):
        raise NotImplementedError

    def _run(self, blk, x, hw):
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x):
        self.check_input(x)
        x, hw = self._embed(x)
        for blk in self.blocks:
            x = self._run(blk, x, hw)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        head_drop = getattr(self, "head_drop", None)
        if head_drop is not None:
            x = head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        if output_fmt not in ("NCHW", "NLC"):
            name = getattr(self, "model_name", type(self).__name__)
            raise ValueError(f"{name}: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self.check_input(x)
        take, last = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[:last + 1] if stop_early or intermediates_only else self.blocks
        x, (h, w) = self._embed(x)
        feats = []
        for i, blk in enumerate(blocks):
            x = self._run(blk, x, (h, w))
            if i in take:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
                feats.append(y.transpose(1, 2).reshape(y.shape[0], -1, h, w) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        if len(blocks) == len(self.blocks):
            x = self.norm(x)
        return x, feats
