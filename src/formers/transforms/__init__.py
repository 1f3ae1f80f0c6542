"""Whole-model transforms: functions `model -> model` that work on any registered model
they apply to, and raise `TransformError` (a ValueError naming the model and the reason)
on one they do not.

    import formers
    m = formers.create_model("swin_tiny_patch4_window7_224")
    m = formers.transforms.to_rmsnorm(m)          # same outputs, RMSNorm in place of LayerNorm

One module per paper (rmsnorm, matformer, lowrank, prune, sparse, fusegpt, otfusion);
each public function is reachable as `formers.transforms.<name>` without importing the
others. A transform that changes the model's structure records how (see base.py), so
`formers transform ... --out FILE` writes a checkpoint that `formers.transforms.load`
rebuilds.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import TransformError, applied_transforms, list_transforms, load, record_transform, register_transform

__all__ = ["TransformError", "applied_transforms", "list_transforms", "load", "record_transform",
           "register_transform"]

_SKIP = {"base", "cli"}


def _modules():
    return [m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SKIP and not m.name.startswith("_")]


def __getattr__(name: str):
    """`formers.transforms.to_rmsnorm` etc.: found in whichever module defines it (in its __all__)."""
    for mod_name in _modules():
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"module 'formers.transforms' has no attribute {name!r}")


def __dir__():
    names = set(__all__)
    for mod_name in _modules():
        names.update(getattr(importlib.import_module(f"{__name__}.{mod_name}"), "__all__", ()))
    return sorted(names)
