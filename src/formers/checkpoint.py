"""Reading and writing weights without ever unpickling code.

A checkpoint may be our own safetensors file, a `save_pretrained` folder (config.json +
model.safetensors, the layout timm and HF put on the hub), an official release (`.pth`, often
wrapped in {'model': ...} or {'state_dict': ...}, sometimes with a `module.` prefix, sometimes
holding only its EMA weights) or a timm file. `load_checkpoint` reads it safely, maps its key
names through the model file's `checkpoint_filter_fn`, and adapts what timm adapts: a classifier
of another size is dropped (left at its fresh init), a first conv of another channel count is
converted.

What a file is comes from its first bytes, never from its name: a safetensors file under a
`.pth` name loads, and a JSON file, a directory or random bytes are each called what they are.
Weights formers writes carry a sha256 of their tensors (`tensors_sha256`) in the safetensors
metadata; it is checked on every load, so a damaged file is refused. Files without one (official
releases, timm's, older files of ours) load as before, reported as not verifiable.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Mapping
from typing import Union

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "load_checkpoint", "save_checkpoint", "save_pretrained", "CheckpointError",
           "release_state_dict", "unwrap_state_dict", "tensors_sha256", "does_not_fit"]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# The one order in which wrappers are opened (read_state_dict and release_state_dict alike):
# with use_ema=True an EMA entry is taken first; otherwise the plain weights win and the EMA
# entry is taken only when it is all there is (an EMA-only release, as the CSWin, T2T-ViT and
# TNT training scripts write).
EMA_KEYS = ("state_dict_ema", "model_ema")
WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "net")

DIGEST_KEY = "formers_sha256"      # safetensors metadata: tensors_sha256 of the stored tensors
ALIASES_KEY = "formers_aliases"    # safetensors metadata: {name: stored name} of tensors stored once
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
PRETRAINED_FORMAT = "formers-pretrained/1"
_TRAIN_STATE_PREFIXES = ("model/", "ema/", "optim/", "rng/")


def _model_name(model) -> str:
    return getattr(model, "model_name", type(model).__name__)


def does_not_fit(model, why: str) -> CheckpointError:
    """The error a checkpoint_filter_fn raises for weights it cannot map onto `model`."""
    return CheckpointError(f"{_model_name(model)}: the checkpoint does not fit this model: {why}")


# ---------------------------------------------------------------- unwrapping

def unwrap_state_dict(obj, use_ema: bool = False, where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: wrappers opened in the one documented order
    (EMA_KEYS first when use_ema, else WRAPPER_KEYS first and EMA_KEYS last), nested ones too;
    a DataParallel `module.` prefix removed from every key that has one; non-tensor entries
    (epoch, optimizer state, args) left out. Keys that are not strings are an error."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
    order = EMA_KEYS + WRAPPER_KEYS if use_ema else WRAPPER_KEYS + EMA_KEYS
    for _ in range(8):      # {'model': {'state_dict': ...}} and the like
        key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}, not a parameter name "
                                  f"(a state dict maps names such as 'head.weight' to tensors)")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def release_state_dict(state_dict: dict) -> dict:
    """A release file's dict as checkpoint_filter_fn works on it (unwrap_state_dict: the same walk
    read_state_dict makes for files), so that a dict from a plain torch.load works too. Our own
    state dicts pass unchanged."""
    return unwrap_state_dict(state_dict, False, "the state dict")


# ---------------------------------------------------------------- digests

def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A deterministic sha256 over the tensors: for each name in sorted order, the name, dtype and
    shape, then the bytes of its values (in row-major order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        h.update(json.dumps([k, str(t.dtype).replace("torch.", ""), list(t.shape)]).encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tensors_to_store(state_dict: Mapping[str, torch.Tensor], what: str):
    """(tensors, aliases): every tensor as its own contiguous CPU block; a tensor that is the very
    same view as one already kept (tied weights) is stored once and recorded as an alias."""
    out, aliases, seen, storages = {}, {}, {}, set()
    for k in sorted(state_dict):
        t = state_dict[k].detach()
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {what}: {k!r} is on the meta device (it holds no values)")
        t = t.cpu()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                aliases[k] = seen[ident]
                continue
            if ptr in storages:
                t = t.clone()       # another part of a buffer already stored: safetensors wants its own
            seen[ident] = k
            storages.add(ptr)
        out[k] = t.contiguous()
    return out, aliases


# ---------------------------------------------------------------- reading

def _sniff(path: str) -> str:
    """What the file is, from its first bytes: safetensors | zip | pickle | json | empty | unknown."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"        # 8-byte little-endian header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "zip"                # torch.save's default format
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"             # torch.save's legacy format, or a plain pickle
    if head.lstrip()[:1] in (b"{", b"[") and size < 64_000_000:
        return "json"
    return "unknown"


def _json_error(path: str) -> CheckpointError:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return CheckpointError(f"{path!r} is not a PyTorch checkpoint or safetensors file "
                               f"(it starts like JSON text but does not parse)")
    if isinstance(data, dict) and str(data.get("format", "")).startswith("formers-train-state"):
        tensors = data.get("tensors")
        held = f" (its tensors are in {os.path.join(os.path.dirname(path), os.path.basename(tensors))!r})" \
            if isinstance(tensors, str) else ""
        return CheckpointError(
            f"{path!r} is a training checkpoint (step {data.get('step', '?')}){held}, not a weights file: "
            f"pass it to `formers train --resume`, or pass the run's best.safetensors / final.safetensors as weights")
    if isinstance(data, dict) and "architecture" in data and "model_args" in data:
        return CheckpointError(f"{path!r} is the config.json of a save_pretrained folder: pass the folder "
                               f"{os.path.dirname(os.path.abspath(path))!r} instead")
    return CheckpointError(f"{path!r} is a JSON file, not weights (a PyTorch checkpoint or safetensors file)")


def _directory(path: str) -> str:
    """The weights file of a save_pretrained folder; any other directory is an error saying so."""
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(weights):
        return weights
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(f"checkpoint {path!r} is a folder with config.json but no {WEIGHTS_NAME}")
    inside = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt")))
    hint = f"; it holds {', '.join(inside[:4])}: pass one of those" if inside else ""
    raise CheckpointError(f"checkpoint {path!r} is a directory, not a weights file (nor a save_pretrained "
                          f"folder with {CONFIG_NAME} + {WEIGHTS_NAME}){hint}")


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is not a readable safetensors file (truncated or "
                              f"damaged): {e}") from None
    if sd and all(k.startswith(_TRAIN_STATE_PREFIXES) for k in sd):
        json_path = path[:-len(".safetensors")] + ".json" if path.endswith(".safetensors") else "its step-N.json"
        raise CheckpointError(f"{path!r} holds the tensors of a training checkpoint (model/, optim/, rng/ ...), "
                              f"not weights: pass {json_path!r} to `formers train --resume`")
    verified = False
    if DIGEST_KEY in meta:
        digest = tensors_sha256(sd)
        if digest != meta[DIGEST_KEY]:
            raise CheckpointError(f"checkpoint {path!r} is damaged: the sha256 of its tensors ({digest[:12]}...) "
                                  f"is not the one recorded when it was written ({meta[DIGEST_KEY][:12]}...)")
        verified = True
    if ALIASES_KEY in meta:
        for alias, kept in json.loads(meta[ALIASES_KEY]).items():
            sd[alias] = sd[kept]
    return sd, {"format": "safetensors", "verified": verified, "metadata": meta}


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")


def _pickle_imports(path: str) -> list[str] | None:
    """The globals the pickles at the start of a file import, read with pickletools (nothing is
    run); None when not even the first one parses (the bytes are damaged, not a pickle)."""
    import pickletools
    found, parsed = [], 0
    with open(path, "rb") as f:
        while True:
            strings, names = [], []
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name in _STRING_OPS:
                        strings.append(arg if isinstance(arg, str) else repr(arg))
                    elif op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        names.append(".".join(strings[-2:]) or "?")
            except Exception:  # noqa: BLE001 - whatever genops trips on, the stream ends here
                break
            parsed += 1
            found += names
    return found if parsed else None


def _unpickling_error(path: str, kind: str, error: Exception) -> CheckpointError:
    """Say what a pickle torch's safe loader refused is: one that imports code, or damaged bytes."""
    import re
    text = str(error)
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    imports = [named.group(1)] if named else (_pickle_imports(path) if kind == "pickle" else None)
    if imports:
        needs = ", ".join(list(dict.fromkeys(imports))[:4])
        return CheckpointError(f"refusing {path!r}: it is a pickle that needs code to load (it imports {needs}; "
                               f"torch.load(weights_only=True) refused it). Convert it to safetensors where you "
                               f"trust it.")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = detail.group(1).strip() if detail else (text.strip().splitlines() or [type(error).__name__])[0]
    return CheckpointError(f"checkpoint {path!r} is corrupt or truncated: its pickle does not parse ({detail[:160]})")


def _read_torch(path: str, kind: str, use_ema: bool) -> tuple[dict, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, kind, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if kind == "zip" and ("not in a subdirectory" in str(e) or ".pkl" in str(e)):
            raise CheckpointError(f"{path!r} is a zip archive but not a PyTorch checkpoint ({first})") from None
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated: {type(e).__name__}: {first}") from None
    sd = unwrap_state_dict(obj, use_ema, f"checkpoint {path!r}")
    if not sd:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(f"checkpoint {path!r} has no tensors (keys: {keys})")
    return sd, {"format": "torch", "verified": False, "metadata": {}}


def read_checkpoint(path: PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, info) of a checkpoint file or save_pretrained folder. info: `format`
    (safetensors | torch), `verified` (its recorded sha256 matched; False where it records
    none), `metadata` (the safetensors metadata), `path` (the file read)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _directory(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a regular file")
    kind = _sniff(path)
    if kind == "empty":
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    if kind == "json":
        raise _json_error(path)
    if kind == "unknown":
        raise CheckpointError(f"{path!r} is not a PyTorch checkpoint or safetensors file "
                              f"(its first bytes are neither)")
    if kind == "safetensors":
        sd, info = _read_safetensors(path)
        sd = unwrap_state_dict(sd, use_ema, f"checkpoint {path!r}")   # a `module.` prefix, as for .pth files
    else:
        sd, info = _read_torch(path, kind, use_ema)
    info["path"] = path
    return sd, info


def read_state_dict(path: PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (or save_pretrained folder), unwrapped, with any `module.`
    prefix stripped, and checked against its recorded sha256 where it has one."""
    return read_checkpoint(path, use_ema)[0]


# ---------------------------------------------------------------- loading

def _adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Map a conv weight made for weight.shape[1] channels to in_chans (as timm's adapt_input_conv)."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def load_checkpoint(model: nn.Module, path, strict: bool = True, use_ema: bool = False):
    """Load a checkpoint into `model` (in place) and return it.

    `path`: a file of any supported format, a save_pretrained folder, or a state dict already in
    memory. use_ema=True takes the EMA weights where the file holds both. Afterwards
    `model.checkpoint_verified` says whether the file's recorded sha256 was checked (False for
    files that record none: official releases, timm's, older files)."""
    name = _model_name(model)
    if isinstance(path, Mapping):
        where = "the state dict given"
        sd, info = unwrap_state_dict(path, use_ema, where), {"verified": False}
    else:
        sd, info = read_checkpoint(path, use_ema)
        where = repr(info["path"])
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (checkpoint {where})") from None
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{name}: checkpoint {where} does not fit this model: mapping its keys "
                                  f"failed ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    def as_tuple(v):  # timm's cfg names one layer or a tuple of them
        return tuple(v) if isinstance(v, (tuple, list)) else ((v,) if v else ())

    for first_conv in as_tuple(cfg.get("first_conv")):
        key = f"{first_conv}.weight"
        if (key in sd and key in own and sd[key].dim() == 4 and own[key].dim() == 4
                and sd[key].shape[1] != own[key].shape[1]):
            sd[key] = _adapt_first_conv(sd[key], own[key].shape[1])
    dropped = []
    classifier = as_tuple(cfg.get("classifier"))
    for k in list(sd):
        if (any(k.startswith(c + ".") for c in classifier) and k in own and sd[k].shape != own[k].shape
                and sd[k].dim() == own[k].dim()):
            dropped.append(k)
            del sd[k]
    if dropped:
        warnings.warn(f"{name}: classifier {', '.join(classifier)!r} of the checkpoint has another size; left at init")
    bad = [f"{k}: the model expects {tuple(own[k].shape)}, the file has {tuple(v.shape)}"
           for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} tensor(s) of {where} do not fit: " + "; ".join(bad[:5]))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in dropped]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{name}: {where} does not match the model: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    model.checkpoint_verified = bool(info.get("verified"))
    return model


# ---------------------------------------------------------------- writing

def save_checkpoint(model: nn.Module, path: PathLike, metadata: dict | None = None):
    """Save the model's weights as safetensors, with the sha256 of its tensors in the metadata
    (tensors shared between modules stored once)."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tensors, aliases = _tensors_to_store(model.state_dict(), _model_name(model))
    meta = {"format": "pt", "architecture": _model_name(model),
            "num_classes": str(getattr(model, "num_classes", ""))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    meta[DIGEST_KEY] = tensors_sha256(tensors)
    save_file(tensors, path, metadata=meta)


def _json_safe(value):
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _build_args(model: nn.Module, extra: dict | None) -> dict:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    args = {"num_classes": getattr(model, "num_classes", cfg.get("num_classes"))}
    in_chans = getattr(model, "in_chans", None)
    args["in_chans"] = in_chans if isinstance(in_chans, int) else (cfg.get("input_size") or (3,))[0]
    img = getattr(model, "img_size", None)
    if isinstance(img, (list, tuple)) and len(img) == 2 and img[0] == img[1]:
        img = img[0]
    if img is not None:
        args["img_size"] = img
    args.update(extra or {})
    return _json_safe(args)


def save_pretrained(model: nn.Module, directory: PathLike, model_args: dict | None = None) -> str:
    """Write `directory/config.json` + `directory/model.safetensors` (the layout timm and HF put on
    the hub) and return the directory; `create_model(name, checkpoint=directory)` rebuilds the model.

    config.json holds `architecture`, the model's `pretrained_cfg`, its `card` (model_info) and the
    constructor keywords (`model_args`: num_classes, in_chans, img_size as built, plus `model_args`
    given here for any other keyword the model was built with)."""
    from formers.registry import model_info
    directory = os.fspath(directory)
    name = getattr(model, "model_name", None)
    if not name:
        raise ValueError(f"save_pretrained needs a model built by formers.create_model (it records the "
                         f"architecture); {type(model).__name__} has no model_name")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    args = _build_args(model, model_args)
    card = {k: v for k, v in model_info(name).items() if k != "pretrained_cfg"}
    config = {"architecture": name, "format": PRETRAINED_FORMAT, "num_classes": args.get("num_classes"),
              "num_features": getattr(model, "num_features", None), "model_args": args,
              "pretrained_cfg": _json_safe(getattr(model, "pretrained_cfg", {}) or {}), "card": _json_safe(card)}
    weights = os.path.join(directory, WEIGHTS_NAME)
    save_checkpoint(model, weights + ".tmp", metadata={"model_kwargs": args})
    os.replace(weights + ".tmp", weights)
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))
    return directory


def pretrained_folder_args(source, name: str) -> dict:
    """The build keywords (`model_args`) of a save_pretrained folder; {} when `source` is anything
    else. A folder whose config.json names another architecture than `name` is a CheckpointError."""
    if not isinstance(source, (str, os.PathLike)):
        return {}
    source = os.fspath(source)
    config_path = os.path.join(source, CONFIG_NAME)
    if not (os.path.isdir(source) and os.path.isfile(config_path)):
        return {}
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path!r} does not parse as JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path!r} holds a {type(config).__name__}, not a config object")
    arch = config.get("architecture")
    if arch and arch != name:
        raise CheckpointError(f"{name}: the folder {source!r} holds weights of {arch!r} (its {CONFIG_NAME} "
                              f"says so): build it with create_model({arch!r}, checkpoint={source!r})")
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise CheckpointError(f"{config_path!r}: model_args is a {type(args).__name__}, not a dict of keywords")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
