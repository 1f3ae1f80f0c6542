"""timm's own model tests, run unmodified against formers.

`test_timm_models.py` loads `tests/test_models.py` from timm's sdist (pip downloads it once,
at test set-up; it is never copied into this repository) after this file has pointed timm's
factory functions at ours. timm's tests then build, list and describe our models:

- `timm.create_model` -> `formers.create_model` (every keyword timm's tests pass);
- `timm.list_models` -> the smallest paper variant of each of our families, filtered by timm's
  patterns. Two of timm's pattern lists are also read as the properties they stand for:
  NON_STD_FILTERS (recognised by its 'vit_*' entry) also matches our models whose
  forward_features returns tokens (`output_fmt == 'NLC'`), and EXCLUDE_JIT_FILTERS (recognised
  by its '*naflex*' entry) also excludes the models that declare TorchScript unsupported
  (`script_unsupported`, which says why). `module=` is ignored: every family of ours has
  forward_intermediates. `pretrained=True` lists nothing (there is no hub here);
- `timm.get_pretrained_cfg_value` / `list_pretrained` -> our pretrained_cfg.

Tests parametrized over timm's own model names (a model we do not have) are deselected. A model
whose features are a set of tokens rather than a map (`feature_maps = False`: SparseFormer's latent
tokens carry RoIs, not grid positions) skips timm's feature-map tests, with that reason.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools

import pytest
import torch

import formers
from formers.registry import model_entry


def _meta_build(name):
    with torch.device("meta"):
        return formers.create_model(name)


@functools.lru_cache(maxsize=1)
def families() -> dict[str, str]:
    """family -> its smallest paper variant (family: model file and the name's first word)."""
    best = {}
    for name in formers.list_models(task="classify"):  # the image-backbone contract
        entry = model_entry(name)
        if entry.card.status == "reduced":
            continue
        family = entry.module.rsplit(".", 1)[-1] + ":" + name.split("_")[0]
        n = sum(p.numel() for p in _meta_build(name).parameters())
        if family not in best or n < best[family][1]:
            best[family] = (name, n)
    return {f: v[0] for f, v in sorted(best.items())}


@functools.lru_cache(maxsize=None)
def _traits(name) -> tuple[bool, bool]:
    model = _meta_build(name)
    return getattr(model, "output_fmt", "NCHW") == "NLC", bool(getattr(model, "script_unsupported", ""))


def _patterns(p) -> list[str]:
    if not p:
        return []
    return [p] if isinstance(p, str) else list(p)


def _matches(name, patterns) -> bool:
    non_std, no_script = _traits(name)
    if "vit_*" in patterns and non_std:
        return True
    if "*naflex*" in patterns and no_script:
        return True
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    if pretrained:
        return []
    names = sorted(families().values())
    include = _patterns(filter)
    if include:
        names = [n for n in names if _matches(n, include)]
    exclude = _patterns(exclude_filters)
    return [n for n in names if not _matches(n, exclude)]


def list_pretrained(filter="", exclude_filters=""):
    return []


def get_pretrained_cfg_value(model_name, cfg_key):
    return model_entry(model_name).cfg.get(cfg_key)


_REDIRECTS = {"create_model": formers.create_model, "list_models": list_models,
              "list_pretrained": list_pretrained, "get_pretrained_cfg_value": get_pretrained_cfg_value}


@contextlib.contextmanager
def redirected():
    """timm's factory functions are ours while timm's test module is imported (it binds them by name
    then); afterwards timm is itself again, for the tests that use it as a peer in the same process."""
    import timm
    import timm.models
    saved = [(mod, key, getattr(mod, key)) for mod in (timm, timm.models) for key in _REDIRECTS]
    for mod, key, _ in saved:
        setattr(mod, key, _REDIRECTS[key])
    try:
        yield
    finally:
        for mod, key, value in saved:
            setattr(mod, key, value)


def pytest_configure(config):
    for mark in ("base", "cfg", "cfg_nonstd", "forward", "backward", "features", "torchscript",
                 "fxforward", "fxbackward", "timeout"):
        config.addinivalue_line("markers", f"{mark}: timm's marker")


_MAP_TESTS = ("test_model_forward_features", "test_model_forward_intermediates_features",
              "test_model_forward_intermediates", "test_prune_intermediate_layers_contract",
              "test_prune_intermediate_layers_params_used")


def pytest_collection_modifyitems(config, items):
    ours = set(formers.list_models(task="classify"))
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        if "timm_contract" not in str(item.fspath) or name is None:
            keep.append(item)
        elif name not in ours:
            drop.append(item)
        else:
            keep.append(item)
            if item.originalname in _MAP_TESTS and getattr(_meta_build(name), "feature_maps", True) is False:
                item.add_marker(pytest.mark.skip(reason=f"{name}: its features are a set of latent tokens with "
                                                        "RoIs, not a feature map (output_fmt='NLC' only)"))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
