"""Feature extraction as timm's `features_only=True`: a backbone cut after its last wanted stage.

`create_model(name, features_only=True, out_indices=...)` returns a `FeatureGetterNet`: the
model, pruned of the stages after the last index (and of its head and final norm), whose forward
returns the list of NCHW maps from `forward_intermediates`. `feature_info` is a `FeatureInfo`
with timm's methods (`channels()`, `reduction()`, `module_name()`), so detection and
segmentation code written for timm's feature extractors runs unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from formers.layers import feature_take_indices

__all__ = ["FeatureInfo", "FeatureGetterNet", "FEATURE_CLASSES"]

FEATURE_CLASSES = ("getter",)


class FeatureInfo:
    """The `feature_info` entries (dicts with num_chs, reduction, module) of the taken indices."""

    def __init__(self, feature_info: list[dict], out_indices):
        self.info = [dict(d) for d in feature_info]
        self.out_indices = tuple(out_indices)

    def _get(self, key, idx=None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None):
        rows = [self.info[i] for i in (self.out_indices if idx is None else idx)]
        return [{k: d[k] for k in (keys or d)} for d in rows]

    def __getitem__(self, i):
        return self.info[i]

    def __len__(self):
        return len(self.info)

    def __repr__(self):
        return f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()})"


class FeatureGetterNet(nn.Module):
    """A backbone that returns the maps of `out_indices` (timm's FeatureGetterNet).

    `norm=True` applies the final norm to the last stage's map (then the norm is kept); the
    stages after the last index, and the head, are pruned away through the model's own
    `prune_intermediate_layers`.
    """

    def __init__(self, model: nn.Module, out_indices=None, norm: bool = False, output_fmt: str = "NCHW",
                 prune: bool = True):
        super().__init__()
        name = getattr(model, "model_name", type(model).__name__)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{name}: features_only needs forward_intermediates, which this model lacks")
        n = len(model.feature_info)
        if out_indices is None:
            out_indices = getattr(model, "feature_out_indices", n)
        take, _ = feature_take_indices(n, out_indices)
        if prune and hasattr(model, "prune_intermediate_layers"):
            take = model.prune_intermediate_layers(take, prune_norm=not norm, prune_head=True)
            take, _ = feature_take_indices(n, take)
        self.model = model
        self.out_indices = tuple(take)
        self.norm = norm
        self.output_fmt = output_fmt
        self.feature_info = FeatureInfo(model.feature_info, take)
        self.model_name = name
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        self.default_cfg = self.pretrained_cfg
        self.in_chans = getattr(model, "in_chans", 3)

    def set_grad_checkpointing(self, enable: bool = True):
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
