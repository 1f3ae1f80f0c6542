"""Reading and writing weights without ever unpickling code.

A checkpoint may be our own safetensors file, an official release (`.pth`, often wrapped
in {'model': ...} or {'state_dict': ...}, sometimes with a `module.` prefix) or a timm
file. `load_checkpoint` reads it safely, maps its key names through the model file's
`checkpoint_filter_fn`, and adapts what timm adapts: a classifier of another size is
dropped (left at its fresh init), a first conv of another channel count is converted.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import warnings

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "load_checkpoint", "save_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


_WRAPPERS = ("model", "state_dict", "model_state", "module", "net")


def read_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped, with any `module.` prefix stripped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refusing {path!r}: it is a pickle that needs code to load (weights_only=True failed: "
                f"{str(e).splitlines()[0]}). Convert it to safetensors where you trust it.") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated: {e}") from None
        sd = _unwrap(obj, use_ema, path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _unwrap(obj, use_ema: bool, path: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    order = (("state_dict_ema", "model_ema") if use_ema else ()) + _WRAPPERS
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key], False, path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path!r} has no tensors (keys: {sorted(obj)[:8]})")
    return tensors


def release_state_dict(state_dict: dict) -> dict:
    """A release file's dict as checkpoint_filter_fn works on it: the first wrapper it carries
    (`model`, `state_dict`, ..., `state_dict_ema`) opened, and a DataParallel `module.` prefix removed
    from every key that has one. Our own state dicts pass unchanged. read_state_dict does this for
    files; filters call it so that a dict from a plain torch.load works too."""
    for key in _WRAPPERS + ("state_dict_ema",):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Map a conv weight made for weight.shape[1] channels to in_chans (as timm's adapt_input_conv)."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, use_ema: bool = False):
    """Load a checkpoint of any supported format into `model` (in place) and return it."""
    name = getattr(model, "model_name", type(model).__name__)
    sd = read_state_dict(path, use_ema)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first_conv = cfg.get("first_conv")
    key = f"{first_conv}.weight" if first_conv else None
    if key in sd and key in own and sd[key].shape[1] != own[key].shape[1] and sd[key].dim() == 4:
        sd[key] = _adapt_first_conv(sd[key], own[key].shape[1])
    dropped = []
    classifier = cfg.get("classifier")
    for k in list(sd):
        if classifier and k.startswith(classifier + ".") and k in own and sd[k].shape != own[k].shape:
            dropped.append(k)
            del sd[k]
    if dropped:
        warnings.warn(f"{name}: classifier {classifier!r} of the checkpoint has another size; left at init")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} tensor(s) of {path!r} do not fit: " + "; ".join(bad[:5]))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in dropped]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{name}: {path!r} does not match the model: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    return model


def save_checkpoint(model: nn.Module, path: str, metadata: dict | None = None):
    """Save the model's weights as safetensors (tensors shared between modules stored once)."""
    from safetensors.torch import save_model
    meta = {"architecture": getattr(model, "model_name", type(model).__name__),
            "num_classes": str(getattr(model, "num_classes", ""))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    save_model(model, path, metadata=meta)
