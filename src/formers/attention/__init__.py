"""Sequence token mixers with one interface, so every mechanism runs in the same model
under the same budget (Long Range Arena, `formers lra`).

    from formers.attention import build_attention, list_attentions
    mix = build_attention("performer", dim=64, num_heads=4, max_len=1024)
    y = mix(x, mask)        # x (B, N, dim); mask (B, N) bool, True = a real token, or None

A mechanism is a class registered with `@register_attention("name")`, constructed as
`cls(dim, num_heads, max_len, causal=False, dropout=0.0, **options)`; its forward maps
(B, N, dim) to (B, N, dim) and must ignore padded positions (mask False) as keys and
never let them change the real tokens' outputs. One module per mechanism (softmax,
linear, performer, linformer, local, ecoformer, urpe, gmm_mask, memoryformer, lmuformer,
retention); modules are found without a central list.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch.nn as nn

__all__ = ["register_attention", "build_attention", "list_attentions", "attention_class"]

_ATTENTIONS: dict[str, type] = {}


def register_attention(name: str):
    def deco(cls):
        if not issubclass(cls, nn.Module):
            raise TypeError(f"attention {name!r} must be an nn.Module")
        cls.attention_name = name
        _ATTENTIONS[name] = cls
        return cls
    return deco


def _import_all():
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


def list_attentions() -> list[str]:
    _import_all()
    return sorted(_ATTENTIONS)


def attention_class(name: str) -> type:
    if name not in _ATTENTIONS:
        _import_all()
    if name not in _ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(sorted(_ATTENTIONS))}")
    return _ATTENTIONS[name]


def build_attention(name: str, dim: int, num_heads: int, max_len: int, causal: bool = False,
                    dropout: float = 0.0, **options) -> nn.Module:
    cls = attention_class(name)
    if dim % num_heads:
        raise ValueError(f"attention {name!r}: dim {dim} must be divisible by num_heads {num_heads}")
    try:
        return cls(dim=dim, num_heads=num_heads, max_len=max_len, causal=causal, dropout=dropout, **options)
    except TypeError as e:
        raise ValueError(f"attention {name!r}: bad options {options!r} ({e})") from None
