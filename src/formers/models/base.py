"""What every image backbone shares: the timm-style contract around a model's own forward.

A backbone subclasses `Backbone`, sets `num_classes`, `num_features`, `in_chans`,
`feature_info` and a `head`, and writes `forward_features`, `forward_head` and
`forward_intermediates`; the rest (classifier reset, input checks, weight-decay
exclusions) comes from here.
"""
from __future__ import annotations

import torch.nn as nn

from formers.layers import check_image_input

__all__ = ["Backbone"]


class Backbone(nn.Module):
    num_classes: int
    num_features: int
    in_chans: int = 3
    global_pool: str = "avg"
    input_divisor: int = 1      # H and W must be multiples of this (1: any size)
    fixed_input_size = None     # (H, W) when the architecture takes one size only

    def check_input(self, x):
        return check_image_input(self, x, divisor=self.input_divisor, fixed_size=self.fixed_input_size)

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
