"""Training objectives: what one micro-batch's loss is, pluggable by name.

The trainer asks its objective for `(loss, logits)` of each micro-batch, so a technique
that trains differently (several input sizes at once, several nested sub-networks at
once, an extra regulariser) is one class here or in its own module, not a fork of the
trainer:

    formers train resformer_tiny --objective multires --objective-kwargs '{"sizes": [16, 24, 32]}'

An objective is built once per run from its keyword arguments, may change the model
before the optimizer sees it (`prepare`), and is called inside autocast. Objectives
that live beside their paper's code are found through `_PROVIDERS` (module imported on
first use), so this file never imports them.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

__all__ = ["Objective", "register_objective", "build_objective", "list_objectives"]

_OBJECTIVES: dict[str, type] = {}
# name -> module that registers it when imported (kept here so `list_objectives` can name them)
_PROVIDERS = {
    "multires": "formers.train.multires",
    "matformer": "formers.transforms.matformer",
    "sparse": "formers.transforms.sparse",
    "lowrank": "formers.transforms.lowrank",
    "dacs": "formers.models.dense.daformer",
}


def register_objective(cls):
    """Class decorator: `@register_objective class MyObjective(Objective): name = "mine"`."""
    _OBJECTIVES[cls.name] = cls
    return cls


class Objective:
    """Plain cross-entropy with label smoothing: the default (`--objective ce`)."""
    name = "ce"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Called once on the freshly built model (before it moves to the device and before
        the optimizer is made); return the model to train. Must be deterministic, so that a
        resumed run rebuilds the same structure."""
        return model

    def attach(self, data, transform, seed: int, accum: int = 1, rank: int = 0):
        """Called once the data set and the training transform are ready (an objective that draws its own
        images, such as DACS's target images, keeps them); `accum` micro-batches make one step."""

    def sampler(self, data, batch_size: int, seed: int):
        """The sampler of training batches (EpochSampler's interface), or None for the trainer's own."""
        return None

    def state_tensors(self) -> dict:
        """Tensors that a checkpoint must keep for a resumed run to continue bit for bit (a teacher's
        weights); `load_state_tensors(tensors, step)` gets them back when the run resumes at `step`."""
        return {}

    def load_state_tensors(self, tensors: dict, step: int):
        if tensors:
            raise ValueError(f"the checkpoint holds state of another objective than {self.name!r}")

    def step_fields(self) -> dict:
        """Numbers of the last micro-batch to add to the metrics.jsonl step row (a loss's parts)."""
        return {}

    def loss(self, logits, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; a model whose training forward returns several logits (UniFormer-light's
        (head, cls head)) gets the mean of their losses, as its official training does."""
        if isinstance(logits, (tuple, list)):
            return sum(self.loss(one, y) for one in logits) / len(logits)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        """Return (loss, logits) for one micro-batch (the first logits, for the metrics, where the
        model returns several); `step` counts optimizer steps from 0."""
        out = model(x)
        return self.loss(out, y), out[0] if isinstance(out, (tuple, list)) else out


register_objective(Objective)


def list_objectives() -> list[str]:
    return sorted(set(_OBJECTIVES) | set(_PROVIDERS))


def build_objective(name: str, kwargs: dict | None = None, label_smoothing: float = 0.0) -> Objective:
    if name not in _OBJECTIVES and name in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[name])
        except ImportError as e:
            raise ValueError(f"--objective {name}: its module {_PROVIDERS[name]} cannot be imported ({e})") from None
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown --objective {name!r}; choose one of {', '.join(list_objectives())}")
    cls = _OBJECTIVES[name]
    try:
        return cls(label_smoothing=label_smoothing, **(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"--objective {name}: bad --objective-kwargs {kwargs!r} ({e})") from None
