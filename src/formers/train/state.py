"""Training checkpoints that lose nothing and cannot be half-written. No pickles.

A checkpoint is a pair in OUT/checkpoints/:

  step-00000420.safetensors   every tensor: model/..., ema/..., optim/<param name>/<key>,
                              rng/<rank>/torch, rng/<rank>/cuda<i>, rng/<rank>/numpy, rng/<rank>/python
  step-00000420.json          every scalar: step, epoch, position in the epoch's batch order,
                              optimizer hyper-parameters, schedule, EMA count, RNG scalars, the
                              run's config and progress, and the sha256 and size of the tensors file

Each file is written to a temporary name, fsynced and moved into place with os.replace;
the JSON goes last and is the commit mark, so a run killed at any instant leaves either
the previous checkpoint or the new one, never a mix. On load the tensors file is checked
against the size and sha256 the JSON recorded: damage is a clear CheckpointError.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re

import torch

from formers.checkpoint import CheckpointError

__all__ = ["FORMAT", "capture_rng", "restore_rng", "optimizer_tensors", "load_optimizer",
           "save_train_state", "load_train_state", "find_latest", "atomic_write", "clean_temp"]

FORMAT = "formers-train-state/1"
_NAME = re.compile(r"^step-(\d+)\.json$")


# ---------------------------------------------------------------- files

def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes):
    """Write `data` to `path` so that `path` is either its old content or all of the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_replace(tmp: str, path: str):
    """Move an already written file into place durably."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def clean_temp(directory: str):
    """Remove what a killed run can leave behind: temporary files, and tensors files whose JSON
    (the commit mark) was never written or was already pruned."""
    orphans = [p for p in glob.glob(os.path.join(directory, "step-*.safetensors"))
               if not os.path.exists(p[:-len(".safetensors")] + ".json")]
    for p in glob.glob(os.path.join(directory, "*.tmp*")) + orphans:
        try:
            os.remove(p)
        except OSError:
            pass


# ---------------------------------------------------------------- RNG

def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states as (tensors, JSON scalars)."""
    import numpy as np
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
               "python": [version, gauss_next]}
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict):
    import numpy as np
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss_next))


# ---------------------------------------------------------------- optimizer

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as tensors named optim/<param name>/<key> and JSON scalars."""
    sd = optimizer.state_dict()
    index_to_name = {}
    groups = []
    for g in sd["param_groups"]:
        names = g.get("param_names")
        if names is None:
            names = [str(i) for i in g["params"]]
        index_to_name.update(zip(g["params"], names))
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in g.items()})
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        name = index_to_name[idx]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{k}"] = v
            else:
                scalars.setdefault(name, {})[k] = v
    return tensors, {"param_groups": groups, "scalars": scalars, "class": type(optimizer).__name__}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    groups = meta["param_groups"]
    own = optimizer.state_dict()["param_groups"]
    if meta.get("class") != type(optimizer).__name__ or len(groups) != len(own) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, own)):
        raise CheckpointError("the checkpoint's optimizer does not match this model's parameters")
    state = {}
    for g in groups:
        names = g.get("param_names") or [str(i) for i in g["params"]]
        for idx, name in zip(g["params"], names):
            entry = {k[len(f"optim/{name}/"):]: v for k, v in tensors.items() if k.startswith(f"optim/{name}/")}
            entry.update(meta["scalars"].get(name, {}))
            if entry:
                state[idx] = entry
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- checkpoints

def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give every tensor its own copy where needed."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else None
        if key is not None and key in seen or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        elif key is not None:
            seen.add(key)
        out[k] = v
    return out


def save_train_state(directory: str, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                     keep: int = 2) -> str:
    """Write checkpoint `step` atomically, then drop all but the newest `keep`. Returns the JSON path."""
    from safetensors.torch import save as st_save
    os.makedirs(directory, exist_ok=True)
    stem = f"step-{step:08d}"
    blob = st_save(_unshare(tensors), metadata={"format": FORMAT})
    atomic_write(os.path.join(directory, stem + ".safetensors"), blob)
    meta = dict(meta, format=FORMAT, step=step, tensors=stem + ".safetensors",
                sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    json_path = os.path.join(directory, stem + ".json")
    atomic_write(json_path, json.dumps(meta, indent=1, allow_nan=True).encode())
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        for p in (old, old[:-5] + ".safetensors"):
            try:
                os.remove(p)
            except OSError:
                pass
    return json_path


def list_checkpoints(directory: str) -> list[str]:
    """The checkpoint JSON files of a directory, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return [os.path.join(directory, n) for _, n in sorted(found)]


def find_latest(directory: str) -> str | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_train_state(json_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(scalars, tensors) of a checkpoint, verified against the recorded size and sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    if not os.path.isfile(json_path):
        raise CheckpointError(f"checkpoint {json_path!r} does not exist")
    try:
        with open(json_path, "rb") as f:
            meta = json.loads(f.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {json_path!r} is corrupt: its JSON does not parse ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tensors" not in meta:
        raise CheckpointError(f"checkpoint {json_path!r} is not a {FORMAT} file")
    path = os.path.join(os.path.dirname(json_path), os.path.basename(meta["tensors"]))
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {json_path!r}: cannot read its tensors file {path!r}: {e}") from None
    if len(blob) != meta["bytes"]:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: {len(blob)} bytes, "
                              f"expected {meta['bytes']}; delete {os.path.basename(json_path)} to resume "
                              "from the one before")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: sha256 {digest[:12]}... does not match "
                              f"the recorded {meta['sha256'][:12]}...; delete {os.path.basename(json_path)} "
                              "to resume from the one before")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {e}") from None
    return meta, tensors
