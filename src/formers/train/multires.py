"""Multi-resolution training with a scale-consistency loss (ResFormer, catalog id 3, arXiv 2212.00776).

Each batch is replicated at every training size (resized with F.interpolate) and run through the same
model. The loss, as the official engine.py/losses.py compute it, is the mean over the sizes of

    CE(logits_s, y) + alpha * D(f_s, stop_grad(f_teacher))

where the sizes run from the largest down, the teacher of a size is the size just above it (the largest
size has no distillation term), f is the classifier's input (the normalised cls token: `--distillation-target
cls`) or the logits (`target="logit"`), and D is the official `smooth-l1` (F.smooth_l1_loss against the
teacher whitened by a parameter-free LayerNorm, eps 1e-6; `l2` and `cosine` are the other two choices).

    formers train resformer_demo --multi-res 16,24,32 ...
    formers train resformer_demo --objective multires --objective-kwargs '{"sizes": [16, 24, 32], "alpha": 0.5}'
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .objectives import Objective, register_objective

__all__ = ["MultiResObjective", "resize_batch", "consistency_loss"]

_DISTILL = ("smooth-l1", "l2", "cosine", "none")


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """The batch at size x size (bilinear; antialiased when shrinking); unchanged when it already is."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    shrink = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "smooth-l1") -> torch.Tensor:
    """The official scale-consistency distances between a student's features and a (detached) teacher's."""
    student, teacher = student.float(), teacher.float()
    if kind == "smooth-l1":
        return F.smooth_l1_loss(student, F.layer_norm(teacher, teacher.shape[-1:], eps=1e-6))
    if kind == "l2":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-6).mean()
    raise ValueError(f"unknown scale-consistency loss {kind!r}; choose one of {', '.join(_DISTILL)}")


@register_objective
class MultiResObjective(Objective):
    """ResFormer's multi-resolution objective; returns the largest size's logits for the training accuracy.

    sizes: the training sizes (any order; run largest first). alpha: weight of the consistency term.
    distill: smooth-l1 (official default) | l2 | cosine | none. target: cls (the classifier's input,
    official default) | logit. teacher: previous (the next larger size, as the official code) | largest.
    """
    name = "multires"

    def __init__(self, label_smoothing: float = 0.0, sizes=(), alpha: float = 1.0, distill: str = "smooth-l1",
                 target: str = "cls", teacher: str = "previous"):
        super().__init__(label_smoothing)
        if isinstance(sizes, (int, str)) or not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"multires: sizes must be a non-empty list of positive integers, got {sizes!r}")
        if distill not in _DISTILL:
            raise ValueError(f"multires: distill must be one of {', '.join(_DISTILL)}, got {distill!r}")
        if target not in ("cls", "logit"):
            raise ValueError(f"multires: target must be 'cls' or 'logit', got {target!r}")
        if teacher not in ("previous", "largest"):
            raise ValueError(f"multires: teacher must be 'previous' or 'largest', got {teacher!r}")
        self.sizes = sorted(set(sizes), reverse=True)
        self.alpha, self.distill, self.target, self.teacher = float(alpha), distill, target, teacher

    def _forward(self, model, x):
        """(logits, features to distil): the features are what the classifier receives (or the logits)."""
        if self.target == "logit":
            logits = model(x)
            return logits, logits
        raw = getattr(model, "module", model)     # DDP wraps the model; the hook goes on the real classifier
        seen = []
        handle = raw.get_classifier().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            logits = model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"multires: target='cls' needs the classifier to run once per forward, it ran "
                             f"{len(seen)} times; use target='logit'")
        return logits, seen[0]

    def __call__(self, model, x, y, step):
        total, teacher, first = 0.0, None, None
        for size in self.sizes:
            logits, feats = self._forward(model, resize_batch(x, size))
            loss = self.loss(logits, y)
            if teacher is not None and self.distill != "none" and self.alpha:
                loss = loss + self.alpha * consistency_loss(feats, teacher, self.distill)
            if teacher is None or self.teacher == "previous":
                teacher = feats.detach()
            total = total + loss
            first = logits if first is None else first
        return total / len(self.sizes), first
