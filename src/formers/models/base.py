"""What every image backbone shares: the timm-style contract around a model's own forward.

A backbone subclasses `Backbone`, sets `num_classes`, `num_features`, `in_chans`,
`feature_info` and a `head`, and writes `forward_features`, `forward_head` and
`forward_intermediates`; the rest (classifier reset, input checks, weight-decay
exclusions) comes from here.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.layers import MAP_POOLS, TOKEN_POOLS, check_image_input, feature_take_indices, pool_map, pool_tokens

__all__ = ["Backbone", "ChannelsLastPyramid", "Stage", "TokenBackbone", "init_trunc_normal", "stage_intermediates"]


class Backbone(nn.Module):
    num_classes: int
    num_features: int
    in_chans: int = 3
    global_pool: str = "avg"
    input_divisor: int = 1      # H and W must be multiples of this (1: any size)
    min_input_size: int = 1     # ... and at least this
    fixed_input_size = None     # (H, W) when the architecture takes one size only
    script_unsupported = ""     # why torch.jit.script cannot compile this model ("" where it can)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a model that cannot be scripted says why in one line.
        if self.script_unsupported:
            name = getattr(self, "model_name", type(self).__name__)
            raise RuntimeError(f"{name}: TorchScript is not supported ({self.script_unsupported}); "
                               "export it with torch.export or `formers export` instead")
        return self

    def check_input(self, x):
        # Python only: a forward path calls it under `if not torch.jit.is_scripting():` (a scripted model
        # skips it; eager and torch.fx keep it, fx as one `image_checks` node of the graph)
        return check_image_input(self, x, divisor=self.input_divisor, min_size=self.min_input_size,
                                 fixed_size=self.fixed_input_size)

    pool_types = MAP_POOLS      # the global_pool values this model takes (TOKEN_POOLS for token models)
    final_norm_per_stage = True  # `norm` is sized for the last stage only (pruning before it drops it)
    head_norm = False           # `norm` acts on the pooled features (part of the head, pruned with it)

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    def _name(self) -> str:
        from formers.registry import building_name
        return getattr(self, "model_name", None) or building_name() or type(self).__name__

    def check_pool(self, global_pool: str) -> str:
        """`global_pool` if this model takes it; else a ValueError naming the model and what it takes."""
        if global_pool not in self.pool_types:
            allowed = ", ".join(repr(p) for p in self.pool_types)
            raise ValueError(f"{self._name()}: global_pool={global_pool!r} is not supported; use one of {allowed}")
        return global_pool

    def like_model(self, module: nn.Module) -> nn.Module:
        """A new module on this model's device and dtype, in its train/eval mode."""
        ref = next(self.parameters(), None)
        if ref is not None:
            module = module.to(device=ref.device, dtype=ref.dtype)
        return module.train(self.training)

    def _new_module(self, build):
        """build() made directly on this model's device (no CPU allocation for a meta or CUDA model)."""
        ref = next(self.parameters(), None)
        if ref is None:
            return build().train(self.training)
        with torch.device(ref.device):
            return self.like_model(build())

    def get_classifier(self) -> nn.Module:
        return self.head

    def make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A new classifier for `num_classes` (0: none, forward returns pooled features), fresh and
        trainable, on the model's device and dtype; `global_pool` None keeps the current pooling,
        '' makes forward return the unpooled features."""
        if global_pool is not None:
            self.global_pool = self.check_pool(global_pool)
        self.num_classes = num_classes
        self.head = self._new_module(lambda: self.make_classifier(num_classes))

    def _prune_container(self) -> str:
        """The attribute holding the modules feature_info indexes (`feature_info[i]['module']` = f'{name}.{i}')."""
        mods = [d["module"] for d in self.feature_info]
        prefix = mods[0].rsplit(".", 1)[0]
        if not all(m == f"{prefix}.{i}" for i, m in enumerate(mods)):
            raise NotImplementedError(f"{self._name()}: prune_intermediate_layers needs feature_info modules "
                                      f"'<name>.<index>', got {mods}")
        return prefix

    def prune_head(self):
        """Remove the classifier (and what only it uses); forward then returns unpooled features."""
        if self.head_norm:
            self.norm = nn.Identity()
        self.reset_classifier(0, "")

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's: drop the stages (blocks) after the last of `indices`, the final norm with `prune_norm`
        (or when a stage before the last ends the model and the norm is sized for the last), and the head
        with `prune_head` (or when the features no longer fit it). Returns the absolute take indices, for
        forward_intermediates(x, indices=...)."""
        name = self._prune_container()
        seq = getattr(self, name)
        take, last = feature_take_indices(len(seq), indices)
        prune_end = last < len(seq) - 1
        setattr(self, name, seq[:last + 1])
        if not self.head_norm and (prune_norm or (prune_end and self.final_norm_per_stage)):
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.prune_head()
        return take

    def init_non_persistent_buffers(self):
        """Recompute the buffers a state dict does not hold (index tables, fixed filters) in place, on
        their device: needed after building on the meta device and `to_empty()`."""
        for m in self.modules():
            if m is not self and hasattr(m, "init_non_persistent_buffers"):
                m.init_non_persistent_buffers()

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (position tables, tokens, scales)."""
        keys = ("pos_embed", "cls_token", "relative_position_bias_table", "layer_scale", "gamma", "scale")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def init_conv_fan_out(m: nn.Module):
    """The He-normal convolution init of the official PVT v2 / SegFormer code: normal(0, sqrt(2 / fan_out)),
    fan_out per group, zero bias."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


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
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        for stage in self.feature_stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = pool_map(x, self.global_pool, channels_last=True)
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
        if torch.jit.is_scripting():  # TorchScript has no activation checkpointing
            for block in self.blocks:
                x = block(x)
        else:
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
    __constants__ = ["num_prefix_tokens"]  # TorchScript reads no class attributes otherwise
    global_pool = "token"
    pool_types = TOKEN_POOLS
    final_norm_per_stage = False  # every block has the model's width: the final norm fits any of them
    grad_checkpointing = False

    def _embed(self, x):
        raise NotImplementedError

    def _run(self, blk, x, hw):
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        x, hw = self._embed(x)
        for blk in self.blocks:
            if torch.jit.is_scripting():  # TorchScript cannot pass a module to _run (nor checkpoint)
                x = blk(x)
            else:
                x = self._run(blk, x, hw)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = pool_tokens(x, self.global_pool, self.num_prefix_tokens)
        if hasattr(self, "head_drop"):
            x = self.head_drop(x)
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
                feats.append(y.transpose(1, 2).unflatten(-1, (h, w)) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        if len(blocks) == len(self.blocks):
            x = self.norm(x)
        return x, feats
