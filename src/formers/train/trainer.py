"""Train any registered model on a data set of its task, on one CPU or under torchrun.

    from formers.train import TrainConfig, train
    summary = train(TrainConfig("swin_demo", dataset="digits", epochs=40, batch_size=32, lr=2e-3,
                                 img_size=16, out="runs/demo"))

The model's card names its task (formers.tasks): the task loads the data, makes the batches,
builds the objective and evaluates; everything else here is the same for every task.
One step: take the global batch the sampler names for (epoch, position), keep this
process's slice, augment it with the step's own generator, run `accum` micro-batches
(gradients synchronised on the last), clip, AdamW, schedule, EMA. Every `save_every`
steps and at each epoch's end the whole state goes to a checkpoint (see state.py);
`resume=True` continues from the newest one and, with the same seed, ends with the same
weights, bit for bit, as a run that was never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import torch

import formers
from formers.checkpoint import save_checkpoint

from .common import TrainingDiverged, autocast, check_model, default_img_size, weights_metadata
from .distributed import DistContext, setup, teardown
from .optim import OPTIMIZERS, SCHEDULES, ModelEma, WarmupSchedule, build_optimizer
from .report import MetricsLog, Progress, plot_curves
from .state import (atomic_replace, capture_rng, clean_temp, find_latest, load_optimizer, load_train_state,
                    optimizer_tensors, restore_rng, save_train_state)

__all__ = ["TrainConfig", "train", "RESUME_FREE"]


@dataclass
class TrainConfig:
    model: str
    dataset: str | None = None           # None: the task's default (digits for classification)
    data: str | None = None              # --data-dir / --data: a directory or file, by dataset
    epochs: int = 10
    batch_size: int = 128                # global: split across processes and accumulation steps
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float | None = None   # None: 1 epoch; always capped at WARMUP_CAP of the run's steps
    min_lr_ratio: float = 0.01
    label_smoothing: float | None = None  # None: 0.1, or 0 for a short run (< SHORT_RUN_EPOCHS epochs)
    clip_grad: float | None = None
    accum: int = 1
    ema: bool = False
    ema_decay: float = 0.998
    precision: str = "fp32"              # fp32 | bf16 | fp16 (autocast; weights stay fp32; fp16 with a grad scaler)
    channels_last: bool = False          # model and batches in channels-last memory format
    compile: bool = False                # torch.compile the training forward (eval and checkpoints use the module)
    img_size: int | None = None          # None: the data's size rounded up to what the model takes
    in_chans: int | None = None          # None: the data's channels (a grayscale set builds in_chans=1)
    model_kwargs: dict = field(default_factory=dict)
    objective: str = "ce"                # see objectives.py: ce | multires | matformer | sparse ...
    objective_kwargs: dict = field(default_factory=dict)
    augment: str = "auto"                # auto | none | crop | crop-flip | rrc | rrc-flip (auto: none for a short run)
    scale: list = field(default_factory=lambda: [0.08, 1.0])     # RandomResizedCrop's area range (rrc)
    ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # and its aspect-ratio range
    aa: str | None = None                # timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0                  # random erasing probability (timm's --reprob)
    mixup: float = 0.0                   # mixup alpha (0: off)
    cutmix: float = 0.0                  # cutmix alpha (0: off)
    mixup_prob: float = 1.0              # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5       # probability of cutmix rather than mixup when both are on
    opt: str = "adamw"                   # adamw | adam | sgd | momentum | lamb | rmsprop | any torch.optim name
    momentum: float = 0.9                # sgd / momentum / rmsprop
    lr_mult: dict = field(default_factory=dict)   # parameter-name pattern -> lr factor (encoder: 0.1)
    sched: str = "cosine"                # cosine | step | poly | constant, after the warm-up (and hold)
    warmup_hold_epochs: float = 0.0      # epochs at the peak lr between the warm-up and the decay
    decay_epochs: float = 1.0            # step: epochs between decays
    decay_rate: float = 0.1              # step: factor per decay
    poly_power: float = 1.0              # poly: (1 - t) ** power
    patience: int | None = None          # stop after this many epochs without a better headline metric
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    # the settings below do not change what is learned: a resumed run may change them
    out: str = "runs/train"
    save_every: int = 200                # steps between checkpoints (0: at epoch ends only)
    keep: int = 2                        # checkpoints kept
    eval_batch_size: int = 256
    device: str | None = None
    progress: bool = True
    loggers: list = field(default_factory=list)   # also log metrics.jsonl's rows to: tensorboard, csv (loggers.py)


RESUME_FREE = {"epochs", "out", "save_every", "keep", "eval_batch_size", "device", "progress", "loggers"}
# the default recipe. A warm-up longer than ~10% of a run hurts every short run (as in `formers lra`);
# a run of few epochs learns more without augmentation or label smoothing (it does not overfit yet)
WARMUP_CAP = 0.1
DEFAULT_WARMUP_EPOCHS = 1.0
DEFAULT_LABEL_SMOOTHING = 0.1
SHORT_RUN_EPOCHS = 10
_RESERVED_KWARGS = {"num_classes": "the data set's classes", "in_chans": "--in-chans", "img_size": "--img-size"}


def _log(ctx: DistContext, *msg):
    if ctx.is_main:
        print(*msg, flush=True)


def _seed_all(seed: int):
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _validate(cfg: TrainConfig):
    from formers.data import AUGMENTS
    from formers.tasks import task_of
    task = task_of(cfg.model)                  # unknown model: a clear error with suggestions
    task.check_dataset(cfg.dataset, cfg.model)
    def finite(v):
        return v is None or (isinstance(v, (int, float)) and math.isfinite(v))
    for opt, v in (("--lr", cfg.lr), ("--weight-decay", cfg.weight_decay), ("--warmup-epochs", cfg.warmup_epochs),
                   ("--min-lr-ratio", cfg.min_lr_ratio), ("--label-smoothing", cfg.label_smoothing),
                   ("--clip-grad", cfg.clip_grad), ("--ema-decay", cfg.ema_decay), ("--reprob", cfg.reprob),
                   ("--mixup", cfg.mixup), ("--cutmix", cfg.cutmix), ("--mixup-prob", cfg.mixup_prob),
                   ("--mixup-switch-prob", cfg.mixup_switch_prob), ("--momentum", cfg.momentum),
                   ("--warmup-hold-epochs", cfg.warmup_hold_epochs), ("--decay-epochs", cfg.decay_epochs),
                   ("--decay-rate", cfg.decay_rate), ("--poly-power", cfg.poly_power)):
        if not finite(v):
            raise ValueError(f"{opt} must be a finite number, got {v}")
    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_epochs is None or cfg.warmup_epochs >= 0,
         f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}"),
        (0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio (final lr / peak lr) must be in [0, 1], got {cfg.min_lr_ratio}"),
        (cfg.label_smoothing is None or 0 <= cfg.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}"),
        (cfg.clip_grad is None or cfg.clip_grad > 0, f"--clip-grad must be positive, got {cfg.clip_grad}"),
        (cfg.accum >= 1, f"--accum must be at least 1, got {cfg.accum}"),
        (0 < cfg.ema_decay < 1, f"--ema-decay must be in (0, 1), got {cfg.ema_decay}"),
        (cfg.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got {cfg.precision!r}"),
        (not (cfg.precision == "fp16" and cfg.objective == "dacs"),
         "--precision fp16 needs the gradient scaler on every backward; the dacs objective makes its own "
         "backward pass: use bf16 or fp32"),
        (cfg.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}, got {cfg.augment!r}"),
        (len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1] <= 1,
         f"--scale must be two numbers 0 < min <= max <= 1, got {cfg.scale}"),
        (len(cfg.ratio) == 2 and 0 < cfg.ratio[0] <= cfg.ratio[1],
         f"--ratio must be two numbers 0 < min <= max, got {cfg.ratio}"),
        (0 <= cfg.reprob <= 1, f"--reprob must be in [0, 1], got {cfg.reprob}"),
        (cfg.mixup >= 0 and cfg.cutmix >= 0, f"--mixup and --cutmix are Beta alphas >= 0, got {cfg.mixup}, "
                                             f"{cfg.cutmix}"),
        (0 <= cfg.mixup_prob <= 1 and 0 <= cfg.mixup_switch_prob <= 1,
         "--mixup-prob and --mixup-switch-prob must be in [0, 1]"),
        (cfg.sched in SCHEDULES, f"--sched must be one of {', '.join(SCHEDULES)}, got {cfg.sched!r}"),
        (cfg.warmup_hold_epochs >= 0, f"--warmup-hold-epochs must be >= 0, got {cfg.warmup_hold_epochs}"),
        (cfg.decay_epochs > 0 and 0 < cfg.decay_rate <= 1 and cfg.poly_power > 0,
         "--decay-epochs must be > 0, --decay-rate in (0, 1] and --poly-power > 0"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.patience is None or cfg.patience >= 1, f"--patience must be at least 1 epoch, got {cfg.patience}"),
        (isinstance(cfg.lr_mult, dict) and all(isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)
                                               for v in cfg.lr_mult.values()),
         f"--lr-mult takes PATTERN=FACTOR with a factor >= 0, got {cfg.lr_mult!r}"),
        (cfg.save_every >= 0, f"--save-every must be >= 0, got {cfg.save_every}"),
        (cfg.keep >= 1, f"--keep must be at least 1, got {cfg.keep}"),
        (cfg.img_size is None or cfg.img_size >= 1, f"--img-size must be positive, got {cfg.img_size}"),
        (cfg.in_chans is None or cfg.in_chans >= 1, f"--in-chans must be positive, got {cfg.in_chans}"),
        (cfg.limit_train is None or cfg.limit_train >= 1, f"--limit-train must be positive, got {cfg.limit_train}"),
        (cfg.limit_test is None or cfg.limit_test >= 1, f"--limit-test must be positive, got {cfg.limit_test}"),
        (isinstance(cfg.model_kwargs, dict), f"--model-kwargs must be a JSON object, got {cfg.model_kwargs!r}"),
        (isinstance(cfg.objective_kwargs, dict),
         f"--objective-kwargs must be a JSON object, got {cfg.objective_kwargs!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    strong = [flag for flag, on in (("--augment " + cfg.augment, cfg.augment.startswith("rrc")), ("--aa", cfg.aa),
                                    ("--reprob", cfg.reprob > 0), ("--mixup", cfg.mixup > 0),
                                    ("--cutmix", cfg.cutmix > 0)) if on]
    if strong and task.name != "classify":
        raise ValueError(f"{', '.join(strong)}: strong augmentation is for classifiers so far; {cfg.model} is a "
                         f"{task.name} model (use --augment crop-flip)")
    from .optim import optimizer_names
    if cfg.opt.lower() not in optimizer_names():
        raise ValueError(f"unknown --opt {cfg.opt!r}; choose one of {', '.join(OPTIMIZERS)} or a torch.optim class "
                         f"({', '.join(n for n in optimizer_names() if n not in OPTIMIZERS)})")
    if cfg.loggers:
        from .loggers import check_loggers
        check_loggers(cfg.loggers)                               # unknown name / tensorboard not installed
    if cfg.aa:
        from formers.data.randaugment import RandAugment
        RandAugment.from_string(cfg.aa)                          # a bad string fails before any data is read
    task.build_objective(cfg.objective, cfg.objective_kwargs, cfg.label_smoothing or 0.0)  # unknown name / bad kwargs
    for k, what in _RESERVED_KWARGS.items():
        if k in cfg.model_kwargs:
            raise ValueError(f"--model-kwargs may not set {k!r}; it comes from {what}")


def _merge_resumed(cfg: TrainConfig, saved: dict, explicit: set | None) -> TrainConfig:
    """The saved run's settings, with the free ones (epochs, out, ...) taken from `cfg` where given.
    A setting that changes what is learned and differs from the saved run is an error."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = names if explicit is None else (set(explicit) & names)
    auto = {"augment": "auto", "label_smoothing": None, "warmup_epochs": None,   # resolved when the run began
            "dataset": None}
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}"
             for k in sorted(given - RESUME_FREE) if k in saved and saved[k] != getattr(cfg, k)
             and not (k in auto and getattr(cfg, k) == auto[k])]
    given = {k for k in given if not (k in auto and getattr(cfg, k) == auto[k])}
    if diffs:
        raise ValueError("--resume with settings that differ from the checkpoint's run (" + "; ".join(diffs)
                         + "); drop them or start a new --out")
    merged = {k: saved[k] for k in names if k in saved}
    merged.update({k: getattr(cfg, k) for k in given & RESUME_FREE})
    return TrainConfig(**merged)


def _params_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, resume: bool | str = False, explicit: set | None = None) -> dict:
    """Run (or continue, with `resume`) one training run; returns the summary written to summary.json.

    `resume`: True continues from the newest checkpoint in OUT/checkpoints (a ValueError if there is
    none: a run the user believes is continued never silently starts over), a path continues from
    that checkpoint's JSON. `explicit`: the config fields the user set (the CLI passes them so that a
    resumed run takes the rest from its checkpoint). A run that does not fit in memory raises
    `formers.cli.OutOfMemory` naming the model, image size, batch size and (where known) the need."""
    from formers.cli import check_out_dir, resolve_device
    check_out_dir(cfg.out)
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data) if cfg.data else None,
                              model_kwargs=dict(cfg.model_kwargs or {}))
    state = None
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    if resume:
        json_path = resume if isinstance(resume, str) else find_latest(ckpt_dir)
        if json_path is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir} to continue from; drop --resume to start "
                             "a new run there, or give the --out of the run to continue")
        state = load_train_state(json_path)
        cfg = _merge_resumed(cfg, state[0]["config"], explicit)
    if cfg.dataset is None:
        from formers.tasks import task_of
        cfg = dataclasses.replace(cfg, dataset=task_of(cfg.model).default_dataset)
    _validate(cfg)
    resolve_device(cfg.device)          # a device this machine lacks: one line, before the data is read
    try:
        run = _Run(cfg, state, resume_asked=bool(resume))
        ctx = setup(cfg.device)
        run.ctx = ctx
    except Exception as e:
        _raise_if_oom(e, cfg, cfg.img_size, "preparing the data")
        raise
    try:
        summary = run.run()
    except BaseException as e:
        if ctx.initialized_here:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        _raise_if_oom(e, run.cfg, run.img_size, f"step {run.progress['step'] + 1}" if hasattr(run, "progress")
                      else "building the model")
        raise
    teardown(ctx)
    return summary


def _raise_if_oom(e: BaseException, cfg: TrainConfig, img_size, where: str):
    """An allocator failure becomes one OutOfMemory naming what was asked for and what it needed."""
    from formers.cli import OutOfMemory, available_memory, fmt_bytes, is_out_of_memory, requested_bytes
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(e, OutOfMemory):      # an estimate made before any allocation: say what run it was
        if str(e).startswith(cfg.model):
            raise e
        raise OutOfMemory(f"{cfg.model}, batch {cfg.batch_size}, on {dev}: {e}") from None
    if not is_out_of_memory(e):
        return
    need = requested_bytes(e)
    free = available_memory()
    raise OutOfMemory(
        f"{cfg.model} at {img_size}x{img_size} px, batch {cfg.batch_size}, on {dev}, while {where}"
        + (f": an allocation of {fmt_bytes(need)} failed" if need else "")
        + (f" ({fmt_bytes(free)} of host memory available)" if free and dev == "cpu" else "")
        + "; lower --img-size or --batch-size (or use --accum)") from None


class _Run:
    def __init__(self, cfg: TrainConfig, state, resume_asked: bool):
        from formers.tasks import task_of
        self.cfg = cfg
        self.task = task_of(cfg.model)
        self.state = state
        self.resume_asked = resume_asked
        self.notes: list[str] = []
        self.recipe_why: dict = {}
        self.ctx: DistContext | None = None
        self.t_start = time.perf_counter()
        self.last_plot = -float("inf")
        self._prepare_data()

    # ------------------------------------------------------------ setup

    def _prepare_data(self):
        cfg = self.cfg
        data = self.task.load_data(cfg)
        if len(data.y_test) == 0:
            raise ValueError(f"{data.name} data from {data.source!r} has no test images to evaluate the run on")
        self.in_chans = cfg.in_chans or data.channels
        if data.channels not in (1, self.in_chans):
            raise ValueError(f"{data.name} images have {data.channels} channels; --in-chans {self.in_chans} "
                             f"cannot take them (use --in-chans {data.channels})")
        size = cfg.img_size or default_img_size(cfg.model, data.size, self.in_chans, data.num_classes,
                                                cfg.model_kwargs)
        self.img_size = size
        self.act_bytes = check_model(cfg.model, data.num_classes, self.in_chans, size, cfg.model_kwargs)
        # the checkpoints record the sizes actually used, so a resumed run never re-derives them
        self.cfg = cfg = dataclasses.replace(cfg, img_size=size, in_chans=self.in_chans)
        self.data = data.resized(size)
        self.cfg = cfg = self._resolve_recipe(cfg, len(data.y_train), data.hflip)
        self.train_tf, self.test_tf, (self.mean, self.std) = self.task.transforms(self.data, self.in_chans, size,
                                                                                   cfg.augment, cfg)

    def _resolve_recipe(self, cfg: TrainConfig, n_train: int, hflip: bool) -> TrainConfig:
        """Turn the 'auto' settings into the values used, and cap the warm-up at WARMUP_CAP of the run.
        The checkpoints record the resolved values, so a resumed run keeps them."""
        short = cfg.epochs < SHORT_RUN_EPOCHS
        why = {}
        if cfg.augment == "auto":
            cfg = dataclasses.replace(cfg, augment="none" if short else ("crop-flip" if hflip else "crop"))
            why["augment"] = f"auto: {'a short run' if short else 'padded crop' + (' + flip' if hflip else '')}"
        if cfg.label_smoothing is None:
            cfg = dataclasses.replace(cfg, label_smoothing=0.0 if short else DEFAULT_LABEL_SMOOTHING)
            why["label_smoothing"] = "auto" + (": a short run" if short else "")
        steps_per_epoch = max(1, n_train // max(1, cfg.batch_size))
        asked = DEFAULT_WARMUP_EPOCHS if cfg.warmup_epochs is None else cfg.warmup_epochs
        cap = WARMUP_CAP * cfg.epochs
        if asked > cap:
            if cfg.warmup_epochs is not None:
                self.notes.append(f"note: --warmup-epochs {cfg.warmup_epochs:g} is longer than "
                                  f"{WARMUP_CAP:.0%} of the run's {cfg.epochs * steps_per_epoch} steps; "
                                  f"capped at {cap:g} epochs (a longer warm-up hurts a short run)")
            why["warmup"] = f"capped at {WARMUP_CAP:.0%} of the run"
            asked = cap
        elif cfg.warmup_epochs is None:
            why["warmup"] = "default"
        self.recipe_why = why
        return dataclasses.replace(cfg, warmup_epochs=float(asked))

    def recipe_line(self) -> str:
        """The run's first printed line: the optimizer, schedule and regularisation actually used."""
        cfg, why = self.cfg, self.recipe_why
        steps = self.scheduler.warmup
        total = self.scheduler.total
        opt = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD (Nesterov)", "momentum": "SGD", "lamb": "LAMB",
               "rmsprop": "RMSprop"}.get(cfg.opt.lower(), cfg.opt)
        if cfg.opt.lower() in ("sgd", "momentum", "rmsprop"):
            opt += f" momentum {cfg.momentum:g}"
        parts = [f"recipe: {opt} lr {cfg.lr:g} wd {cfg.weight_decay:g}"
                 + "".join(f", {k} x{v:g}" for k, v in cfg.lr_mult.items()),
                 f"warm-up {steps} steps ({steps / self.steps_per_epoch:.2g} epochs"
                 + (f", {why['warmup']}" if "warmup" in why else "") + ")",
                 (f"hold {self.scheduler.hold} steps, " if self.scheduler.hold else "")
                 + {"cosine": f"cosine over {total} steps to {cfg.min_lr_ratio:g}x lr",
                    "poly": f"poly (power {cfg.poly_power:g}) over {total} steps to {cfg.min_lr_ratio:g}x lr",
                    "step": f"x{cfg.decay_rate:g} every {self.scheduler.decay_steps} steps (floor "
                            f"{cfg.min_lr_ratio:g}x lr)",
                    "constant": "constant lr"}[cfg.sched],
                 f"label smoothing {cfg.label_smoothing:g}"
                 + (f" ({why['label_smoothing']})" if "label_smoothing" in why else ""),
                 f"augmentation {cfg.augment}" + (f" ({why['augment']})" if "augment" in why else "")
                 + (f" scale {cfg.scale[0]:g}-{cfg.scale[1]:g}" if cfg.augment.startswith("rrc") else "")]
        if cfg.aa:
            parts.append(f"RandAugment {cfg.aa}")
        if cfg.reprob:
            parts.append(f"random erasing {cfg.reprob:g}")
        if cfg.mixup or cfg.cutmix:
            parts.append(f"mixup {cfg.mixup:g} cutmix {cfg.cutmix:g} (p {cfg.mixup_prob:g}, switch "
                         f"{cfg.mixup_switch_prob:g})")
        if cfg.clip_grad:
            parts.append(f"clip {cfg.clip_grad:g}")
        if cfg.precision == "fp16":
            parts.append("fp16 with loss scaling")
        if cfg.channels_last:
            parts.append("channels-last")
        if cfg.compile:
            parts.append("torch.compile")
        if cfg.ema:
            parts.append(f"EMA {cfg.ema_decay:g}")
        if cfg.objective != "ce":
            parts.append(f"objective {cfg.objective}")
        return ", ".join(parts)

    def _build(self):
        from formers.data import EpochSampler
        cfg, ctx = self.cfg, self.ctx
        per_step = ctx.world_size * cfg.accum
        if cfg.batch_size % per_step:
            raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --accum "
                             f"= {ctx.world_size} x {cfg.accum} = {per_step}")
        self.micro = cfg.batch_size // per_step
        self._check_memory(ctx.device)
        self.objective = self.task.build_objective(cfg.objective, cfg.objective_kwargs, cfg.label_smoothing)
        # the optional hooks of objectives.Objective (a duck-typed objective may lack them)
        attach = getattr(self.objective, "attach", None)
        if attach is not None:
            attach(self.data, self.train_tf, cfg.seed, accum=cfg.accum, rank=ctx.rank)
        own = getattr(self.objective, "sampler", None)
        self.sampler = ((own(self.data, cfg.batch_size, cfg.seed) if own is not None else None)
                        or EpochSampler(len(self.data.y_train), cfg.batch_size, cfg.seed))
        self.objective_state = getattr(self.objective, "state_tensors", dict)
        self.objective_fields = getattr(self.objective, "step_fields", dict)
        self.steps_per_epoch = len(self.sampler)
        _seed_all(cfg.seed)
        model = formers.create_model(cfg.model, num_classes=self.data.num_classes, in_chans=self.in_chans,
                                     img_size=self.img_size, **cfg.model_kwargs)
        self.model = self.objective.prepare(model).to(ctx.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema else None
        # fp16's loss scaling (bf16 and fp32 need none); its state is checkpointed, so resume stays exact
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.opt, cfg.momentum, cfg.lr_mult)
        if cfg.lr_mult:
            matched = {p for g in self.optimizer.param_groups if g["lr_scale"] != 1.0 for p in g["param_names"]}
            if not matched and all(v != 1.0 for v in cfg.lr_mult.values()):
                raise ValueError(f"--lr-mult {', '.join(cfg.lr_mult)}: no parameter of {cfg.model} matches "
                                 f"(its top-level modules: {', '.join(n for n, _ in self.model.named_children())})")
        total = cfg.epochs * self.steps_per_epoch
        warm = min(round(cfg.warmup_epochs * self.steps_per_epoch), math.floor(WARMUP_CAP * total))
        spe = self.steps_per_epoch
        self.scheduler = WarmupSchedule(self.optimizer, total, warm, cfg.min_lr_ratio, cfg.sched,
                                        hold_steps=round(cfg.warmup_hold_epochs * spe),
                                        decay_steps=max(1, round(cfg.decay_epochs * spe)), decay_rate=cfg.decay_rate,
                                        power=cfg.poly_power)
        # dropout / drop-path draws differ between processes (the data slices do too)
        _seed_all(cfg.seed * 1000 + 17 + ctx.rank)
        if ctx.device.type == "cuda":
            self.data.x_train, self.data.y_train = self.data.x_train.to(ctx.device), self.data.y_train.to(ctx.device)
            self.data.x_test, self.data.y_test = self.data.x_test.to(ctx.device), self.data.y_test.to(ctx.device)
        self.progress = dict(epoch=0, position=0, step=0, best_acc=-1.0, best_epoch=0, best_weights=None,
                             elapsed=0.0, train_time=0.0, train_images=0, last_eval=None,
                             ep_loss=0.0, ep_correct=0, ep_seen=0, ep_counted=0, ep_time=0.0)

    def _check_memory(self, device: torch.device):
        """Refuse, before building anything, a micro-batch whose activations cannot fit: a CPU run that
        outgrows memory is killed by the kernel, with no error to report."""
        from formers.cli import OutOfMemory, available_memory, fmt_bytes
        need = self.act_bytes * self.micro
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = available_memory()
        if free is not None and need > free:
            raise OutOfMemory(f"{self.cfg.model} at {self.img_size}x{self.img_size} px, micro-batch {self.micro} "
                              f"(batch {self.cfg.batch_size}), on {device.type}: its activations need about "
                              f"{fmt_bytes(need)} and {fmt_bytes(free)} is free; lower --img-size or "
                              f"--batch-size (or use --accum)")

    def _restore(self, meta: dict, tensors: dict):
        cfg, ctx = self.cfg, self.ctx
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        self.model.load_state_dict(model_sd, strict=True)
        if self.ema is not None:
            ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
            if not ema_sd:
                raise ValueError("--ema was given but the checkpoint's run had no EMA")
            self.ema.module.load_state_dict(ema_sd, strict=True)
            self.ema.num_updates = int(meta["ema"]["num_updates"])
        load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.progress.update(meta["progress"])
        saved = {k[len("objective/"):]: v for k, v in tensors.items() if k.startswith("objective/")}
        if saved or hasattr(self.objective, "load_state_tensors"):
            self.objective.load_state_tensors(saved, self.progress["step"])
        self.progress.setdefault("ep_counted", self.progress["ep_seen"])   # older checkpoints counted images
        if meta["progress"]["epoch"] < cfg.epochs and self.scheduler.total != meta["scheduler"]["total"]:
            _log(ctx, f"note: --epochs changed to {cfg.epochs}; the learning-rate schedule is stretched to match")
        rank_rng = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng/{ctx.rank}/")}
        if meta["world_size"] == ctx.world_size and rank_rng:
            restore_rng(rank_rng, meta["rng"][str(ctx.rank)])
        else:
            _log(ctx, f"note: the checkpoint was written by {meta['world_size']} process(es), this run has "
                      f"{ctx.world_size}: same data order, but dropout draws (and float sums) differ")
            _seed_all(cfg.seed * 1000 + 17 + ctx.rank + 7919 * self.progress["step"])

    # ------------------------------------------------------------ checkpoints and outputs

    def _save_state(self):
        ctx = self.ctx
        rng_t, rng_s = capture_rng()
        everyone = ctx.gather_objects((rng_t, rng_s))
        if not ctx.is_main:
            return
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update({f"objective/{k}": v for k, v in self.objective_state().items()})
        opt_t, opt_meta = optimizer_tensors(self.optimizer)
        tensors.update(opt_t)
        rng_meta = {}
        for r, (t, s) in enumerate(everyone):
            tensors.update({f"rng/{r}/{k}": v for k, v in t.items()})
            rng_meta[str(r)] = s
        self.progress["elapsed"] = self._elapsed()
        meta = {
            "config": dataclasses.asdict(self.cfg),
            "world_size": ctx.world_size,
            "img_size": self.img_size, "in_chans": self.in_chans,
            "progress": dict(self.progress),
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": {"num_updates": self.ema.num_updates} if self.ema is not None else None,
            "rng": rng_meta,
        }
        save_train_state(self.ckpt_dir, self.progress["step"], tensors, meta, keep=self.cfg.keep)

    def _save_weights(self, module, name: str, which: str, epoch: int, acc: float | None):
        meta = weights_metadata(
            img_size=self.img_size, in_chans=self.in_chans, model_kwargs=self.cfg.model_kwargs,
            mean=self.mean, std=self.std, dataset=self.cfg.dataset, classes=self.data.classes,
            weights=which, epoch=epoch, **{f"test_{self.task.headline_field}": acc}, step=self.progress["step"])
        path = os.path.join(self.cfg.out, name)
        tmp = f"{path}.tmp{os.getpid()}"
        save_checkpoint(module, tmp, metadata=meta)
        atomic_replace(tmp, path)
        return path

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.ckpt_dir = os.path.join(cfg.out, "checkpoints")
        self._build()
        _log(ctx, self.recipe_line())
        for note in self.notes:
            _log(ctx, note)
        if ctx.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            clean_temp(self.ckpt_dir)
            clean_temp(cfg.out)
        self.metrics = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"))
        self.elapsed_before = 0.0
        resumed_step = None
        if self.state is not None:
            meta, tensors = self.state
            self._restore(meta, tensors)
            self.state = None
            self.elapsed_before = self.progress["elapsed"]
            resumed_step = self.progress["step"]
            rows = self.metrics.truncate_after(resumed_step) if ctx.is_main else []
            _log(ctx, f"resumed from step {self.progress['step']} (epoch {self.progress['epoch'] + 1}, "
                      f"batch {self.progress['position']} of {self.steps_per_epoch}) in {self.ckpt_dir}")
        else:
            rows = []
            if ctx.is_main:
                old = find_latest(self.ckpt_dir)
                if old is not None:
                    print(f"note: {cfg.out} held an earlier run; starting a new one (use --resume to continue)",
                          flush=True)
                for p in os.listdir(self.ckpt_dir):
                    if p.startswith("step-"):
                        os.remove(os.path.join(self.ckpt_dir, p))
                self.metrics.reset()
        self.rows = rows
        nparams = sum(p.numel() for p in self.model.parameters())
        _log(ctx, f"{cfg.model} ({nparams / 1e6:.2f}M params, {self.in_chans}x{self.img_size}x{self.img_size}) on "
                  f"{self.data.describe()}; {cfg.epochs} epochs x {self.steps_per_epoch} steps of {cfg.batch_size}"
                  + (f" ({ctx.world_size} processes x {cfg.accum} x {self.micro})"
                     if ctx.world_size > 1 or cfg.accum > 1 else "")
                  + f", {ctx.device.type}, {cfg.precision}")

        raw = self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # a conv over one input channel may get its weight gradient in another (equivalent) stride
            # order than DDP's bucket; DDP copies it and warns once per process: harmless here
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.model = DDP(raw, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        if ctx.is_main and cfg.loggers:
            from .loggers import open_loggers
            self.metrics.loggers = open_loggers(cfg.loggers, cfg.out, rows, resumed_step)
        try:
            while self.progress["epoch"] < cfg.epochs and not self._out_of_patience():
                self._train_epoch(raw)
        except KeyboardInterrupt:
            _log(ctx, f"\ninterrupted at step {self.progress['step']}; continue with --resume "
                      f"(from the last checkpoint in {self.ckpt_dir})")
            raise
        finally:
            self.metrics.close()        # the loggers flush what they got, however the loop ended
        return self._finish(raw)

    def _out_of_patience(self) -> bool:
        """Early stopping: `patience` epochs have passed since the best one (the last is saved as usual)."""
        pr, patience = self.progress, self.cfg.patience
        if patience is None or pr["epoch"] - pr["best_epoch"] < patience:
            return False
        self.stopped_early = pr["epoch"]
        _log(self.ctx, f"early stop after epoch {pr['epoch']}: no better test {self.task.headline_label} for "
                       f"{patience} epochs (best {pr['best_acc']:.2f}% at epoch {pr['best_epoch']})")
        return True

    def _train_epoch(self, raw):
        from formers.data import BatchTransform, shard_slice, step_generator
        cfg, ctx, pr = self.cfg, self.ctx, self.progress
        epoch, B = pr["epoch"], cfg.batch_size
        data, dev = self.data, ctx.device
        mine = shard_slice(B, ctx.rank, ctx.world_size)
        bar = Progress(self.steps_per_epoch, pr["position"], f"epoch {epoch + 1}/{cfg.epochs}",
                       ctx.is_main and cfg.progress)
        ddp = ctx.distributed
        self.model.train()
        for pos, batch in self.sampler.batches(epoch, pr["position"]):
            t0 = time.perf_counter()
            params = self.train_tf.draw(B, step_generator(cfg.seed, epoch, pos)) if self.train_tf.augments else None
            idx = batch[mine].to(dev)
            params = BatchTransform.slice_params(params, mine)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.long, device=dev)
            counted = 0
            for m in range(cfg.accum):
                sl = slice(m * self.micro, (m + 1) * self.micro)
                xb, yb = self.task.make_batch(self.train_tf, data.x_train[idx[sl]], data.y_train[idx[sl]],
                                              BatchTransform.slice_params(params, sl))
                if cfg.channels_last and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                sync = m == cfg.accum - 1 or not ddp
                with contextlib.nullcontext() if sync else self.model.no_sync():
                    with autocast(dev, cfg.precision):
                        loss, logits = self.objective(self.model, xb, yb, pr["step"])
                    self.scaler.scale(loss / cfg.accum).backward()
                loss_sum += loss.detach() * len(yb)
                hits, n = self.task.step_stats(logits, yb)
                correct += hits
                counted += n
            seen = self.micro * cfg.accum
            step_loss = float(loss_sum) / seen
            if not torch.isfinite(torch.tensor(step_loss)):
                raise TrainingDiverged(f"the loss became {step_loss} at step {pr['step'] + 1}; lower --lr, "
                                       "or use --clip-grad / --precision fp32")
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)      # skipped (and the scale lowered) when fp16 gradients overflowed
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(raw)
            dt = time.perf_counter() - t0
            pr["step"] += 1
            pr["position"] = pos + 1
            pr["ep_loss"] += float(loss_sum)
            pr["ep_correct"] += int(correct)
            pr["ep_seen"] += seen
            pr["ep_counted"] += counted
            pr["ep_time"] += dt
            pr["train_time"] += dt
            pr["train_images"] += B
            if ctx.is_main:
                row = {"kind": "step", "step": pr["step"], "epoch": epoch + (pos + 1) / self.steps_per_epoch,
                       "loss": step_loss, "acc": 100.0 * int(correct) / max(counted, 1), "lr": lr,
                       **self.objective_fields()}
                self.metrics.write(row)
                self.rows.append(row)
                bar.update(loss=f"{pr['ep_loss'] / pr['ep_seen']:.4f}",
                           acc=f"{100.0 * pr['ep_correct'] / max(pr['ep_counted'], 1):.1f}%",
                           **{"img/s": f"{B * (pos + 1) / max(pr['ep_time'], 1e-9):.0f}"})
            if cfg.save_every and pr["step"] % cfg.save_every == 0 and pos + 1 < self.steps_per_epoch:
                self._save_state()
        bar.close()
        self._end_epoch(raw)

    def _end_epoch(self, raw):
        cfg, ctx, pr = self.cfg, self.ctx, self.progress
        epoch = pr["epoch"]
        task = self.task
        sums = ctx.all_reduce_sum(torch.tensor([pr["ep_loss"], pr["ep_correct"], pr["ep_seen"], pr["ep_counted"]],
                                               dtype=torch.float64))
        train_loss, train_acc = float(sums[0] / sums[2]), float(100.0 * sums[1] / sums[3])
        imgs_per_s = self.steps_per_epoch * cfg.batch_size / max(pr["ep_time"], 1e-9)
        ctx.average_norm_stats(raw)
        if self.ema is not None:
            ctx.average_norm_stats(self.ema.module)
        res = task.evaluate(raw, self.data, self.test_tf, cfg.eval_batch_size, ctx.device, cfg.precision, ctx)
        row = {"kind": "epoch", "step": pr["step"], "epoch": epoch + 1, "train_loss": train_loss,
               "train_acc": train_acc, **task.epoch_fields(res, "test"),
               "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": imgs_per_s, "epoch_time": pr["ep_time"]}
        head = f"test_{task.headline_field}"
        candidates = [("model", raw, res[task.headline])]
        if self.ema is not None:
            ema_res = task.evaluate(self.ema.module, self.data, self.test_tf, cfg.eval_batch_size, ctx.device,
                                    cfg.precision, ctx)
            row.update(task.epoch_fields(ema_res, "ema_test"))
            candidates.append(("ema", self.ema.module, ema_res[task.headline]))
        which, module, acc = max(candidates, key=lambda c: c[2])
        improved = acc > pr["best_acc"]
        pr.update(last_eval={k: row[k] for k in row if k.startswith(("test", "ema", "train"))})
        if improved:
            pr.update(best_acc=acc, best_epoch=epoch + 1, best_weights=which)
        if ctx.is_main:
            self.metrics.write(row)
            self.rows.append(row)
            ema_txt = f" ema {row['ema_' + head]:.2f}%" if "ema_" + head in row else ""
            label = task.headline_label
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:5.2f}%  "
                  f"test loss {res['loss']:.4f} {label} {res[task.headline]:5.2f}%{ema_txt}  "
                  f"(best {pr['best_acc']:.2f}%)  {imgs_per_s:,.0f} img/s  {pr['ep_time']:.1f}s", flush=True)
            if improved:
                self._save_weights(module, "best.safetensors", which, epoch + 1, acc)
            # redrawn at most every 15 s (a plot costs ~0.3 s of CPU) and always after the last epoch
            if epoch + 1 == cfg.epochs or time.perf_counter() - self.last_plot >= 15.0:
                plot_curves(self.rows, os.path.join(cfg.out, "curves.png"), title=f"{cfg.model} on {cfg.dataset}",
                            metric=task.headline_field)
                self.last_plot = time.perf_counter()
        pr.update(epoch=epoch + 1, position=0, ep_loss=0.0, ep_correct=0, ep_seen=0, ep_counted=0, ep_time=0.0)
        self._save_state()

    def _finish(self, raw) -> dict:
        cfg, ctx, pr = self.cfg, self.ctx, self.progress
        digests = ctx.gather_objects(_params_digest(raw))
        hf = self.task.headline_field
        summary = None
        if ctx.is_main:
            out = cfg.out
            files = {"final": self._save_weights(raw, "final.safetensors", "model", pr["epoch"],
                                                 (pr["last_eval"] or {}).get(f"test_{hf}"))}
            if self.ema is not None:
                files["final_ema"] = self._save_weights(self.ema.module, "final_ema.safetensors", "ema",
                                                        pr["epoch"], (pr["last_eval"] or {}).get(f"ema_test_{hf}"))
            files.update(best=os.path.join(out, "best.safetensors"), curves=os.path.join(out, "curves.png"),
                         metrics=os.path.join(out, "metrics.jsonl"),
                         checkpoint=find_latest(self.ckpt_dir))
            last = pr["last_eval"] or {}
            summary = {
                "model": cfg.model, "dataset": cfg.dataset, "data": self.data.source,
                "train_images": len(self.data.y_train), "test_images": len(self.data.y_test),
                "classes": self.data.classes, "img_size": self.img_size, "in_chans": self.in_chans,
                "params_m": sum(p.numel() for p in raw.parameters()) / 1e6,
                "epochs": pr["epoch"], "steps": pr["step"], "batch_size": cfg.batch_size,
                "stopped_early": getattr(self, "stopped_early", None), "task": self.task.name, "headline": f"test_{hf}",
                f"best_test_{hf}": pr["best_acc"], "best_epoch": pr["best_epoch"], "best_weights": pr["best_weights"],
                **{f"final_{k}": v for k, v in last.items() if k.startswith("test_")},
                f"final_ema_test_{hf}": last.get(f"ema_test_{hf}"),
                "train_img_per_s": pr["train_images"] / max(pr["train_time"], 1e-9),
                "train_time_s": pr["train_time"], "wall_time_s": self._elapsed(),
                "world_size": ctx.world_size, "device": str(ctx.device), "threads": torch.get_num_threads(),
                "param_digests": digests, "files": files, "config": dataclasses.asdict(cfg),
            }
            with open(os.path.join(out, "summary.json.tmp"), "w") as f:
                json.dump(summary, f, indent=1)
            atomic_replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
            what = "accuracy" if hf == "acc" else self.task.headline_label
            print(f"done: best test {what} {pr['best_acc']:.2f}% (epoch {pr['best_epoch']}, "
                  f"{pr['best_weights']} weights), {summary['train_img_per_s']:,.0f} img/s, "
                  f"{summary['wall_time_s']:.0f}s", flush=True)
            print(f"  curves:      {files['curves']}", flush=True)
            print(f"  best:        {files['best']}", flush=True)
            print(f"  final:       {files['final']}", flush=True)
            print(f"  checkpoint:  {files['checkpoint']}  (continue with --resume)", flush=True)
            print(f"  summary:     {os.path.join(out, 'summary.json')}", flush=True)
            if ctx.distributed and len(set(digests)) != 1:
                warnings.warn("the processes ended with different weights", stacklevel=1)
        return summary
