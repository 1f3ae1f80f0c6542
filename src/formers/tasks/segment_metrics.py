"""Streamed semantic-segmentation metrics: one confusion matrix over the whole split.

    m = SegMetrics(num_classes=19)
    for x, y in loader:
        m.update(model(x), y)              # (B, K, H, W) logits or (B, H, W) class ids; y (B, H, W)
    m.reduce_(ctx.all_reduce_sum)          # under DDP: sum the states of every rank
    r = m.compute()                        # {"mIoU", "mAcc", "aAcc", "IoU", "Acc", ...} in percent
    print(m.table(classes))

mIoU is dataset-level, as mmseg's IoUMetric and detectron2's SemSegEvaluator compute it: the
intersections and unions of every pixel of the split are summed first, then divided per class,
never averaged over images. A class's IoU is undefined (NaN) when its union is empty (absent
from both predictions and targets); its Acc when it has no target pixel; the means are over the
classes with a defined value (mmseg's nanmean). Pixels whose target is ignore_index are skipped.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SegMetrics"]


class SegMetrics:
    """A (K, K) int64 confusion matrix, rows = target class, columns = predicted class."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if int(num_classes) < 1:
            raise ValueError(f"SegMetrics needs num_classes >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes ** 2, dtype=torch.int64, device=device)

    def reset(self):
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor):
        """pred: (B, H, W) integer class ids, or (B, K, H, W) scores (argmax over K); target: (B, H, W)."""
        k = self.num_classes
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1 or pred.shape[1] != k:
                raise ValueError(f"SegMetrics: scores {tuple(pred.shape)} must be (B, {k}, H, W) for targets "
                                 f"{tuple(target.shape)}")
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"SegMetrics: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} "
                             "differ in shape (upsample the logits to the label size first)")
        if target.is_floating_point() or pred.is_floating_point():
            raise ValueError("SegMetrics: targets must be integer class ids")
        dev = self.confusion.device
        target = target.reshape(-1).to(dev, torch.int64)
        pred = pred.reshape(-1).to(dev, torch.int64)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        bad = (target < 0) | (target >= k)
        if bad.any():
            ids = torch.unique(target[bad]).tolist()
            raise ValueError(f"SegMetrics: target class id(s) {ids[:10]} outside 0..{k - 1} "
                             f"(and not ignore_index={self.ignore_index})")
        bad = (pred < 0) | (pred >= k)
        if bad.any():
            ids = torch.unique(pred[bad]).tolist()
            raise ValueError(f"SegMetrics: predicted class id(s) {ids[:10]} outside 0..{k - 1}")
        self.confusion += torch.bincount(target * k + pred, minlength=k * k)

    # ---- state, for DDP: every rank's confusion matrices summed

    def state(self) -> torch.Tensor:
        """A copy of the flat (K*K,) int64 confusion matrix: sum these over ranks."""
        return self.confusion.clone()

    def merge_(self, other) -> "SegMetrics":
        """Add another state (a tensor from `state()` or a SegMetrics) into this one."""
        t = other.confusion if isinstance(other, SegMetrics) else torch.as_tensor(other)
        if t.numel() != self.confusion.numel():
            raise ValueError(f"SegMetrics: a state of {t.numel()} counts cannot merge into {self.num_classes} classes "
                             f"({self.confusion.numel()} counts)")
        self.confusion += self._as_counts(t)
        return self

    def load_state_(self, state) -> "SegMetrics":
        """Replace the counts with `state` (e.g. the all-reduced sum)."""
        self.reset()
        return self.merge_(state)

    def reduce_(self, fn) -> "SegMetrics":
        """counts = fn(state): `m.reduce_(ctx.all_reduce_sum)`; an fn that sums in place and returns None
        (torch.distributed.all_reduce) works too."""
        s = self.state()
        out = fn(s)
        return self.load_state_(s if out is None else out)

    def _as_counts(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).to(self.confusion.device)
        if t.is_floating_point():
            t = t.round()
        return t.to(torch.int64)

    # ---- results

    def matrix(self) -> torch.Tensor:
        """The (K, K) confusion matrix: [target class, predicted class] pixel counts."""
        return self.confusion.view(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        """mIoU, mAcc, aAcc (percent, nan-means over the classes with a defined value), IoU and Acc per class
        (percent, NaN where undefined), Dice per class and mDice, and the pixel count."""
        cm = self.matrix().double().cpu()
        tp = cm.diag()
        gt, pr = cm.sum(1), cm.sum(0)
        union = gt + pr - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan) * 100
        dice = torch.where(gt + pr > 0, 2 * tp / (gt + pr).clamp(min=1), nan) * 100
        total = float(cm.sum())

        def nanmean(v):
            v = v[~torch.isnan(v)]
            return float(v.mean()) if len(v) else float("nan")
        a_acc = float(tp.sum()) / total * 100 if total else float("nan")
        return {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": a_acc,
                "mDice": nanmean(dice), "IoU": iou.tolist(), "Acc": acc.tolist(), "Dice": dice.tolist(),
                "pixels": int(total)}

    def table(self, classes: list[str] | None = None, digits: int = 2) -> str:
        """The per-class IoU/Acc table and the summary line, laid out as mmseg prints them."""
        r = self.compute()
        classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        if len(classes) != self.num_classes:
            raise ValueError(f"SegMetrics.table: {len(classes)} class names for {self.num_classes} classes")

        def fmt(v):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"

        def grid(head, rows):
            w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
            line = "+" + "+".join("-" * (n + 2) for n in w) + "+"
            cells = lambda row: "|" + "|".join(f" {str(x):^{n}} " for x, n in zip(row, w)) + "|"
            return "\n".join([line, cells(head), line, *(cells(row) for row in rows), line])
        per_class = grid(["Class", "IoU", "Acc"],
                         [[c, fmt(i), fmt(a)] for c, i, a in zip(classes, r["IoU"], r["Acc"])])
        summary = grid(["aAcc", "mIoU", "mAcc"], [[fmt(r["aAcc"]), fmt(r["mIoU"]), fmt(r["mAcc"])]])
        return f"per class results:\n{per_class}\nSummary:\n{summary}"
