"""What every transform shares: a clear error, a record of structural changes, and the
registry that `formers transform NAME` reads.

A transform that changes shapes or module types (low-rank factors, pruned widths, a
nested FFN, removed blocks) calls `record_transform(model, name, **spec)` with a JSON-able
`spec` from which its `rebuild(model, **spec)` function re-creates the same structure on a
freshly built, untrained model. `save` writes the records into the safetensors metadata;
`load` builds the registered model, replays the records in order, then loads the weights.
Transforms that keep the structure (OT fusion of two equal models, say) record nothing.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch.nn as nn

__all__ = ["TransformError", "TransformEntry", "register_transform", "list_transforms", "get_transform",
           "record_transform", "applied_transforms", "save", "load", "model_name"]

_RECORD_ATTR = "_formers_transforms"


class TransformError(ValueError):
    """A transform cannot apply to this model; the message names the model and the reason."""


def model_name(model: nn.Module) -> str:
    """The registered name if the model came from create_model, else its class name (for messages)."""
    return getattr(model, "model_name", None) or type(model).__name__


@dataclasses.dataclass
class TransformEntry:
    name: str
    help: str
    add_arguments: Callable        # (argparse parser) -> None: the transform's own options
    run: Callable                  # (model, args) -> model, where args has the parsed options
    rebuild: Callable | None = None  # (model, **spec) -> model: replays a recorded structural change


_TRANSFORMS: dict[str, TransformEntry] = {}


def register_transform(name: str, help: str, add_arguments: Callable, run: Callable,
                       rebuild: Callable | None = None) -> TransformEntry:
    entry = TransformEntry(name, help, add_arguments, run, rebuild)
    _TRANSFORMS[name] = entry
    return entry


def _import_all():
    from . import _modules
    import importlib
    for m in _modules():
        importlib.import_module(f"formers.transforms.{m}")


def list_transforms() -> list[str]:
    _import_all()
    return sorted(_TRANSFORMS)


def get_transform(name: str) -> TransformEntry:
    _import_all()
    if name not in _TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose one of {', '.join(sorted(_TRANSFORMS)) or '(none)'}")
    return _TRANSFORMS[name]


def record_transform(model: nn.Module, name: str, **spec) -> nn.Module:
    """Remember that `name` changed this model's structure as `spec` describes (JSON-able)."""
    json.dumps(spec)   # fail now, not at save time
    records = list(getattr(model, _RECORD_ATTR, []))
    records.append({"name": name, "spec": spec})
    object.__setattr__(model, _RECORD_ATTR, records)
    return model


def applied_transforms(model: nn.Module) -> list[dict]:
    return list(getattr(model, _RECORD_ATTR, []))


def save(model: nn.Module, path: str, metadata: dict | None = None):
    """safetensors weights + what `load` needs: architecture, model kwargs, transform records."""
    from formers.checkpoint import save_checkpoint
    meta = dict(metadata or {})
    meta["transforms"] = applied_transforms(model)
    save_checkpoint(model, path, metadata=meta)


def load(path: str, name: str | None = None, **overrides) -> nn.Module:
    """Rebuild a transformed (or plain) model from a file written by `save` / `formers transform`."""
    import formers
    from formers.checkpoint import load_checkpoint
    from formers.train.common import read_weights_metadata
    meta = read_weights_metadata(path)
    name = name or meta.get("architecture")
    if not name:
        raise ValueError(f"{path!r} does not record its architecture; pass the model name")
    kwargs = dict(meta.get("model_kwargs") or {})
    for k in ("num_classes", "img_size", "in_chans"):
        if meta.get(k) is not None:
            kwargs[k] = meta[k]
    kwargs.update(overrides)
    model = formers.create_model(name, **kwargs)
    for rec in meta.get("transforms") or []:
        entry = get_transform(rec["name"])
        if entry.rebuild is None:
            raise ValueError(f"{path!r} records transform {rec['name']!r}, which cannot rebuild a structure")
        model = entry.rebuild(model, **rec["spec"])
        record_transform(model, rec["name"], **rec["spec"])
    load_checkpoint(model, path)
    return model
