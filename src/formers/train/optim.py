"""Optimizers with the usual weight-decay exclusions, a warm-up + decay schedule, and a weight EMA.

Weight decay skips 1-D parameters (norm scales, biases) and whatever the model names in
`no_weight_decay()` (position tables, tokens, layer scales). `--opt` picks the optimizer by timm's
names (adamw, the default; adam; sgd = Nesterov momentum; momentum = plain momentum; lamb; rmsprop)
or any `torch.optim` class by its name (nadam, radam, adamax, ...). `--lr-mult PATTERN=FACTOR`
scales the learning rate of the parameters whose names match (`encoder=0.1`: every parameter under
`encoder.`; fnmatch patterns too), as the dense papers train a pretrained backbone at 0.1x.

The schedule (`--sched`: cosine, the default; step; poly; constant) is a pure function of the
optimizer step, so its whole state is one integer: a linear warm-up, an optional hold at the peak,
then the decay over the remaining steps, down to lr * min_ratio.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "Lamb", "WarmupSchedule", "WarmupCosine", "ModelEma",
           "OPTIMIZERS", "SCHEDULES", "lr_factor_of", "optimizer_names"]

OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "lamb", "rmsprop")
SCHEDULES = ("cosine", "step", "poly", "constant")


def lr_factor_of(name: str, lr_mult: dict | None) -> float:
    """The learning-rate factor of parameter `name`: the first pattern of `lr_mult` that matches it
    (a prefix of dotted names, or an fnmatch pattern), else 1."""
    for pattern, factor in (lr_mult or {}).items():
        if name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern):
            return float(factor)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, lr_mult: dict | None = None) -> list[dict]:
    """The optimizer's groups: decayed weights and the rest (per learning-rate factor when `lr_mult`
    is given), each with its parameter names in order and its "lr_scale"."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name.endswith(".bias") or name in skip or any(
            name.startswith(k + ".") for k in skip)
        key = (excluded, lr_factor_of(name, lr_mult))
        names, params = groups.setdefault(key, ([], []))
        names.append(name)
        params.append(p)
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[0], k[1]))    # without lr_mult: decay, then no decay
    return [{"params": groups[k][1], "param_names": groups[k][0], "weight_decay": 0.0 if k[0] else weight_decay,
             "lr_scale": k[1]} for k in order]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, opt: str = "adamw", momentum: float = 0.9,
                    lr_mult: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer `opt` over `param_groups`; each group's lr is lr * its lr_scale."""
    groups = param_groups(model, weight_decay, lr_mult)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    name = opt.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    if name == "lamb":
        return Lamb(groups, lr=lr)
    if name == "rmsprop":   # timm's: alpha 0.9, eps 1e-8 (not TF's 1e-3 epsilon placement)
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-8, momentum=momentum)
    by_name = _torch_optimizers()
    if name in by_name:
        return by_name[name](groups, lr=lr)
    raise ValueError(f"unknown --opt {opt!r}; choose one of {', '.join(optimizer_names())}")


_UNSUITED = {"lbfgs", "sparseadam", "muon"}   # need a closure, sparse gradients, or 2-D parameters only


def _torch_optimizers() -> dict:
    return {k.lower(): v for k, v in vars(torch.optim).items()
            if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
            and k.lower() not in _UNSUITED}


def optimizer_names() -> list[str]:
    """What --opt accepts: timm's names, then the torch.optim classes by lower-case name."""
    return list(OPTIMIZERS) + sorted(k for k in _torch_optimizers() if k not in OPTIMIZERS)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) as timm's `Lamb` defaults it: Adam moments with bias correction, the
    update plus weight decay scaled by the trust ratio ||w|| / ||update|| (1 where either is 0) on the
    decayed groups only, the gradients first clipped to a global norm of `max_grad_norm`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 max_grad_norm: float | None = 1.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        clip = 1.0
        if self.max_grad_norm is not None and grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in grads]))
            clip = (norm / self.max_grad_norm).clamp(min=1.0)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad / clip
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                c1, c2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                update = (m / c1) / (v.sqrt() / math.sqrt(c2) + group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


class WarmupSchedule:
    """Linear warm-up from lr/(warmup+1) to lr over `warmup` steps, `hold` steps at lr, then `kind`
    down to lr*min_ratio at the last step: cosine; step (x decay_rate every decay_steps, floored at
    min_ratio); poly ((1 - t)^power, mmseg's); constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_ratio: float = 0.01, kind: str = "cosine", hold_steps: int = 0, decay_steps: int = 1,
                 decay_rate: float = 0.1, power: float = 1.0):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown --sched {kind!r}; choose one of {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.total = max(1, total_steps)
        self.warmup = max(0, min(warmup_steps, self.total - 1))
        self.hold = max(0, min(hold_steps, self.total - 1 - self.warmup))
        self.kind, self.decay_steps, self.decay_rate, self.power = kind, max(1, decay_steps), decay_rate, power
        self.min_ratio = min_ratio
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        start = self.warmup + self.hold
        if step < start or self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return max(self.min_ratio, self.decay_rate ** ((step - start) // self.decay_steps))
        t = min(1.0, (step - start) / max(1, self.total - start))
        if self.kind == "poly":
            return self.min_ratio + (1 - self.min_ratio) * (1 - t) ** self.power
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


WarmupCosine = WarmupSchedule      # the default kind; the name older code imports


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
