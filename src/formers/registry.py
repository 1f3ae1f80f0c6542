"""The model registry: one entry per named variant, each with the card of its paper.

A model file registers its variants with `@register_model(card)`; `create_model` builds
them, `list_models` finds them and `model_info` tells what the paper reported for them.
The paper catalog (`papers.tsv`, the 77 papers this library covers) is package data.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import fnmatch
import functools
import importlib.resources
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "ModelCard", "register_model", "create_model", "list_models", "model_info",
    "list_papers", "model_entry", "make_cfg",
]


@dataclass(frozen=True)
class ModelCard:
    """What the paper (or its official repository) reports for one variant.

    FLOPs in these papers are multiply-accumulates, so `macs_g` holds the number the
    paper prints as "FLOPs" (in G). `params_m` is the paper's own rounding, as printed.
    """
    paper: int                    # catalog id
    arxiv: str
    repo: str                     # official code, "owner/name"
    official_name: str = ""       # the variant's name in the paper / official code
    params_m: str | None = None   # as printed by the paper ("28", "11.9+0.2")
    macs_g: float | None = None
    img_size: int = 224
    top1: float | None = None
    status: str = "implemented"   # implemented | reduced (not in the paper: demo/test config)
    notes: str = ""
    task: str = "classify"        # the formers.tasks module that trains and evaluates it: classify | segment

    @property
    def title(self) -> str:
        return paper_catalog()[self.paper]["title"]

    def reported_params(self) -> tuple[float, float] | None:
        """(value in M, tolerance): 1% plus half a unit of the last digit the paper printed."""
        if not self.params_m:
            return None
        parts = self.params_m.split("+")
        value = sum(float(p) for p in parts)
        half_unit = sum(0.5 * 10 ** -len(p.split(".")[1]) if "." in p else 0.5 for p in parts)
        return value, 0.01 * value + half_unit


@dataclass
class _Entry:
    name: str
    fn: Callable[..., nn.Module]
    card: ModelCard
    module: str
    cfg: dict = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}


def make_cfg(**overrides) -> dict:
    """A pretrained_cfg with timm's keys and defaults."""
    cfg = dict(
        input_size=(3, 224, 224), num_classes=1000, interpolation="bicubic", crop_pct=0.9,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.proj", classifier="head", fixed_input_size=False,
    )
    cfg.update(overrides)
    return cfg


def register_model(card: ModelCard, reduction: int = 32, **cfg):
    """Register a variant builder `fn(**kwargs) -> nn.Module` under its function name.

    `cfg` overrides timm's pretrained_cfg keys; `pool_size` (the (H, W) of forward_features' map at the
    default input size) defaults to the input size over `reduction`, the final stride, rounded up.
    """
    def wrap(fn):
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        side = -(-card.img_size // reduction)
        cfg.setdefault("pool_size", (side, side))

        @functools.wraps(fn)
        def build(**kwargs):
            _BUILDING.append(name)  # so errors raised while building name the variant (building_name())
            try:
                return fn(**kwargs)
            finally:
                _BUILDING.pop()

        _REGISTRY[name] = _Entry(name, build, card, fn.__module__,
                                 make_cfg(input_size=(3, card.img_size, card.img_size), **cfg))
        return build
    return wrap


_BUILDING: list[str] = []


def building_name() -> str | None:
    """The registered variant being built right now (None outside a registered builder)."""
    return _BUILDING[-1] if _BUILDING else None


def _ensure_loaded():
    # Importing the models package runs every @register_model.
    import formers.models  # noqa: F401


def model_entry(name: str) -> _Entry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `formers list` shows them all"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def list_models(pattern: str = "*", module: str = "", task: str | None = None) -> list[str]:
    """Registered variant names matching an fnmatch pattern (and a model file, and the task on its card
    -- "classify", "segment", ... -- if given)."""
    _ensure_loaded()
    names = [n for n, e in _REGISTRY.items()
             if fnmatch.fnmatch(n, pattern) and (not module or e.module.endswith("." + module))
             and (task is None or e.card.task == task)]
    return sorted(names)


# create_model keywords of timm's that select nothing in our models: layer-config switches.
_TIMM_SWITCHES = ("scriptable", "exportable", "no_jit", "cache_dir")


def create_model(name: str, pretrained: bool = False, num_classes: int | None = None, img_size=None,
                 in_chans: int | None = None, checkpoint=None, strict: bool = True, *,
                 pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None, checkpoint_path=None,
                 features_only: bool = False, out_indices=None, feature_cls: str | None = None,
                 feature_cfg: dict | None = None, device=None, dtype=None, **overrides) -> nn.Module:
    """Build a registered variant, with timm's keywords.

    Keyword arguments that are None are dropped so the variant's defaults win (as in timm).
    `checkpoint` (or timm's `checkpoint_path`) is an official release file, a timm-format file, our
    own safetensors, or a folder holding config.json + model.safetensors (`formers.save_pretrained`);
    it is mapped through the model file's `checkpoint_filter_fn`. There is no hub: `pretrained=True`
    loads the file named by `checkpoint`, `checkpoint_path`, or `pretrained_cfg_overlay=dict(file=...)`.
    `features_only=True` returns a FeatureGetterNet over `out_indices` (formers.features).
    `device` builds the weights there (the meta device included); `dtype` casts them.
    A keyword the model does not take raises TypeError naming it.
    """
    entry = model_entry(name)
    for key in _TIMM_SWITCHES:
        overrides.pop(key, None)
    cfg = dict(entry.cfg)
    if isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    elif pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        raise TypeError(f"{name}: pretrained_cfg must be a dict (or a tag name), got {type(pretrained_cfg).__name__}")
    if pretrained_cfg_overlay:
        cfg.update(pretrained_cfg_overlay)
    source = checkpoint if checkpoint is not None else checkpoint_path
    if pretrained and source is None:
        source = cfg.get("file")
        if not source:
            raise ValueError(
                f"{name}: pretrained=True needs a local weights file (there is no hub here): pass "
                f"checkpoint='PATH' (an official release file, timm's weights or ours, or a save_pretrained folder) "
                f"or pretrained_cfg_overlay=dict(file='PATH')")
    if source is not None:  # a save_pretrained folder: its config.json gives the keywords not passed here
        from formers.checkpoint import pretrained_folder_args
        saved = pretrained_folder_args(source, name)
        num_classes, img_size, in_chans = (given if given is not None else saved.get(key) for key, given in
                                           (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)))
        saved = {k: v for k, v in saved.items() if k not in ("num_classes", "img_size", "in_chans")}
        overrides = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    feature_cfg = dict(feature_cfg or {})
    feature_cls = feature_cls or feature_cfg.pop("feature_cls", None)
    if out_indices is None:
        out_indices = feature_cfg.pop("out_indices", None)
    if features_only and feature_cls not in (None, "getter"):
        raise ValueError(f"{name}: feature_cls={feature_cls!r} is not supported; features come from "
                         f"forward_intermediates (feature_cls='getter')")
    if not features_only and out_indices is not None:
        raise TypeError(f"{name}: out_indices is a features_only keyword (pass features_only=True)")

    kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build(entry, kwargs)
    if dtype is not None:
        model.to(dtype=dtype)
    cfg["architecture"] = name
    cfg["num_classes"] = model.num_classes
    img = getattr(model, "img_size", None)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else img
        cfg["input_size"] = (getattr(model, "in_chans", 3), h, w)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    model.model_name = name
    if source is not None:
        from formers.checkpoint import load_checkpoint
        load_checkpoint(model, source, strict=strict)
    if features_only:
        from formers.features import FeatureGetterNet
        model = FeatureGetterNet(model, out_indices=out_indices, norm=bool(feature_cfg.pop("norm", False)))
    return model


def _build(entry: _Entry, kwargs: dict) -> nn.Module:
    """entry.fn(**kwargs); a TypeError names the keyword at fault (each keyword is tried alone on
    the meta device to find it) and what went wrong."""
    try:
        return entry.fn(**kwargs)
    except TypeError as e:
        error = e
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if match:
        raise TypeError(f"{entry.name}: unknown keyword {match.group(1)!r} (this model does not take it)") from None
    culprits = []
    for key, value in kwargs.items():
        try:
            with torch.device("meta"):
                entry.fn(**{key: value})
        except TypeError:
            culprits.append(f"{key}={value!r}")
        except Exception:  # noqa: BLE001 - another error is not this keyword's type fault
            pass
    blame = f"{', '.join(culprits)}: " if culprits else ""
    raise TypeError(f"{entry.name}: cannot build with {blame}{error}") from None


def model_info(name: str) -> dict:
    """The card of a variant as a plain dict (paper title, arXiv id, reported numbers)."""
    entry = model_entry(name)
    info = {"name": name, "module": entry.module, "title": entry.card.title}
    info.update(asdict(entry.card))
    info["pretrained_cfg"] = dict(entry.cfg)
    return info


@lru_cache(maxsize=1)
def paper_catalog() -> dict[int, dict]:
    text = importlib.resources.files("formers").joinpath("papers.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {int(r["id"]): {"id": int(r["id"]), "title": r["title"], "code_url": r["code_url"]} for r in rows}


def list_papers() -> list[dict]:
    """All catalog papers, each with the registered models that implement it."""
    _ensure_loaded()
    papers = {pid: dict(row, models=[]) for pid, row in paper_catalog().items()}
    for name, entry in sorted(_REGISTRY.items()):
        papers[entry.card.paper]["models"].append(name)
    for pid, name in _paper_components():
        papers[pid]["models"].append(name)
    return [papers[pid] for pid in sorted(papers)]


def _paper_components() -> list[tuple[int, str]]:
    """Papers implemented as something other than a registered model: a module of
    formers.transforms or formers.attention that declares `PAPER = <catalog id>`, and the
    Long Range Arena benchmark itself (formers.lra)."""
    import importlib
    import pkgutil
    found = []
    for pkg_name, prefix in (("formers.transforms", "transforms."), ("formers.attention", "attention.")):
        pkg = importlib.import_module(pkg_name)
        for m in pkgutil.iter_modules(pkg.__path__):
            if m.name.startswith("_") or m.name in ("base", "cli"):
                continue
            mod = importlib.import_module(f"{pkg_name}.{m.name}")
            pid = getattr(mod, "PAPER", None)
            for one in (pid if isinstance(pid, (list, tuple)) else [pid]):
                if one is not None:
                    found.append((int(one), prefix + m.name))
    lra = importlib.import_module("formers.lra")
    if getattr(lra, "PAPER", None) is not None:
        found.append((int(lra.PAPER), "formers lra (benchmark)"))
    return sorted(found)
