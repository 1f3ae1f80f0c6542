"""AdamW with the usual weight-decay exclusions, a warmup + cosine schedule, and a weight EMA.

Weight decay skips 1-D parameters (norm scales, biases) and whatever the model names in
`no_weight_decay()` (position tables, tokens, layer scales). The schedule is a pure
function of the optimizer step, so its whole state is one integer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "WarmupCosine", "ModelEma"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and the rest, each with its parameter names in order."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name.endswith(".bias") or name in skip or any(
            name.startswith(k + ".") for k in skip)
        group = no_decay if excluded else decay
        group[0].append(name)
        group[1].append(p)
    groups = []
    for (names, params), wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "param_names": names, "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


class WarmupCosine:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine down to lr*min_ratio."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_ratio: float = 0.01):
        self.optimizer = optimizer
        self.total = max(1, total_steps)
        self.warmup = max(0, min(warmup_steps, self.total - 1))
        self.min_ratio = min_ratio
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self):
        f = self.factor(self.step_count)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self):
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total": self.total, "warmup": self.warmup,
                "min_ratio": self.min_ratio, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict):
        # total/warmup stay as built (a resumed run may have been given more epochs)
        self.step_count = int(state["step_count"])
        self._apply()


class ModelEma:
    """An exponential moving average of a model's weights (buffers copied), kept in fp32.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so short runs are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.998):
        import copy
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module):
        d = self.current_decay()
        self.num_updates += 1
        ema_sd = self.module.state_dict()
        floats_e, floats_m = [], []
        for k, v in model.state_dict().items():
            e = ema_sd[k]
            if e.is_floating_point():
                floats_e.append(e)
                floats_m.append(v.detach())
            else:
                e.copy_(v)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)

    def state_dict(self) -> dict:
        return self.module.state_dict()
