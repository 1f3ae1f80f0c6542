"""`formers lra`: train and evaluate one cell of the LRA table, or time every mechanism (Table 2).

    formers lra listops --attention performer --steps 500 --scale 0.25 --out runs/lra
    formers lra --speed --attention softmax,linear --lengths 1024,2048,4096 --out runs/lra-speed

A cell writes <out>/lra-<task>-<attention>.json (task, attention, substitute flag, steps, seq_len,
params, train/val/test accuracy, seconds). Substitute data (every task but ListOps) says so in the
JSON and on the console.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from formers.cli import check_out_dir, nonnegative_int, positive_float, positive_int
from formers.data.lra import TASKS

__all__ = ["add_parser", "train_cell", "lr_factor"]


def _ints(s: str) -> list[int]:
    try:
        values = [int(v) for v in s.split(",") if v]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {s!r}")
    return values


def _nonnegative_float(text: str) -> float:
    from formers.cli import finite_float
    v = finite_float(text)
    if v < 0:
        import argparse
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _mechanisms() -> str:
    try:
        from formers.attention import list_attentions
        return ", ".join(list_attentions())
    except Exception as e:   # noqa: BLE001 - the help must still print
        return f"(cannot list them: {type(e).__name__}: {e})"


def add_parser(subparsers):
    mechanisms = _mechanisms()
    p = subparsers.add_parser("lra", help="Long Range Arena: train one task with one attention, or --speed",
                              description=__doc__.splitlines()[0],
                              epilog=f"registered mechanisms (--attention): {mechanisms}")
    p.add_argument("task", nargs="?", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--attention", default=None,
                   help=f"registered mechanism (default softmax; one of {mechanisms}); "
                        "with --speed a comma list (default: all registered)")
    p.add_argument("--attn-options", default=None, help="JSON dict of mechanism options, e.g. '{\"k\": 32}'")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps, at least 1 (default: the config's)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="listops: max length; text/retrieval: bytes per document")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None, help="the config's base lr (default: the config's)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=None)
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="default: the config's, at most 10%% of --steps")
    p.add_argument("--scale", type=positive_float, default=1.0, help="width multiplier (e.g. 0.25 for CPU)")
    p.add_argument("--depth", type=positive_int, default=None)
    p.add_argument("--train-size", type=positive_int, default=None, help="examples to build/use for training")
    p.add_argument("--test-size", type=positive_int, default=None)
    p.add_argument("--val-size", type=positive_int, default=None)
    p.add_argument("--cache-dir", default=None, help="dataset cache (default ~/.cache/formers/lra)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--out", default="runs/lra", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    # speed / memory table
    p.add_argument("--speed", action="store_true", help="steps/s and peak memory per mechanism and length")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--time-cap", type=positive_float, default=20.0, help="--speed: seconds of timed steps per cell")
    p.add_argument("--cell-timeout", type=positive_float, default=120.0,
                   help="--speed: seconds before a cell is 'timeout'")
    p.add_argument("--mem-cap", type=positive_float, default=6.0,
                   help="--speed: GB a cell may allocate before it is 'oom'")
    p.set_defaults(func=_run)
    return p


def _run(args):
    check_out_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {}
    if args.attn_options:
        try:
            options = json.loads(args.attn_options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--attn-options is not JSON: {e}") from None
        if not isinstance(options, dict):
            raise ValueError("--attn-options must be a JSON object")
    if args.speed:
        from .speed import run_speed
        names = None if args.attention in (None, "", "all") else args.attention.split(",")
        return run_speed(names, _ints(args.lengths), args.out, batch_size=args.batch_size or 1, scale=args.scale,
                         time_cap=args.time_cap, cell_timeout=args.cell_timeout, threads=args.threads or 1,
                         attn_options=options, mem_cap_gb=args.mem_cap)
    if not args.task:
        raise ValueError(f"give a task ({', '.join(TASKS)}) or --speed")
    if args.task not in TASKS:
        raise ValueError(f"unknown LRA task {args.task!r}; choose one of {', '.join(TASKS)}")
    from formers.attention import attention_class
    args.attention = args.attention or "softmax"
    attention_class(args.attention)                     # unknown name -> ValueError before any work
    summary = train_cell(args.task, args.attention, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup=args.warmup, scale=args.scale, depth=args.depth, train_size=args.train_size,
                         val_size=args.val_size, test_size=args.test_size, cache_dir=args.cache_dir,
                         seed=args.seed, out=args.out, progress=not args.no_progress, attn_options=options)
    tag = " [SUBSTITUTE data]" if summary["substitute"] else ""
    print(f"{summary['task']} / {summary['attention']}{tag}: test {summary['test_acc']:.2f}%  "
          f"train {summary['train_acc']:.2f}%  ({summary['steps']} steps, {summary['seconds']:.0f} s) "
          f"-> {summary['path']}")
    return 0


def data_params(task: str, seq_len, train_size, val_size, test_size, seed: int) -> dict:
    params = dict(train=train_size, val=val_size, test=test_size, seed=seed)
    if seq_len is not None:
        if task == "listops":
            if seq_len < 8:
                raise ValueError(f"--seq-len for listops must be >= 8, got {seq_len}")
            params.update(max_length=seq_len, min_length=seq_len // 4 if seq_len != 2000 else 500)
        elif task in ("text", "retrieval"):
            if seq_len < 64:
                raise ValueError(f"--seq-len for {task} must be >= 64, got {seq_len}")
            params["seq_len"] = seq_len
        else:
            fixed = {"image": 1024, "pathfinder32": 1024, "pathfinder128": 16384}[task]
            if seq_len != fixed:
                raise ValueError(f"--seq-len: {task} has a fixed length of {fixed} pixels")
    return params


def lr_factor(step: int, steps: int, warmup: int, schedule: str, config_warmup: int) -> float:
    """The LRA schedules. rsqrt: linear warmup then 1/sqrt(step), normalised so that the peak equals the
    config's peak (base lr / sqrt(config warmup)) even when a short run shortens the warmup.
    cosine: linear warmup then half a cosine to 0 (peak = base lr)."""
    s = step + 1
    warm = min(1.0, s / max(warmup, 1))
    if schedule == "rsqrt":
        return warm * math.sqrt(max(warmup, 1) / max(s, warmup)) / math.sqrt(max(config_warmup, 1))
    progress = min(1.0, max(0.0, (s - warmup) / max(steps - warmup, 1)))
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(model, data, x, y, batch_size: int, limit: int | None = None) -> float:
    model.eval()
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if len(y) == 0:
        return float("nan")
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size]
        correct += (model(xb, data.mask(xb)).argmax(-1) == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(y)


def train_cell(task: str, attention: str, steps=None, seq_len=None, batch_size=None, lr=None, weight_decay=None,
               warmup=None, scale: float = 1.0, depth=None, train_size=None, val_size=None, test_size=None,
               cache_dir=None, seed: int = 0, out: str = "runs/lra", progress: bool = True,
               attn_options: dict | None = None) -> dict:
    from formers.data.lra import load_task
    from formers.train.report import Progress

    from .model import build_model, config_dict, task_config
    t0 = time.time()
    data = load_task(task, cache_dir=cache_dir, **data_params(task, seq_len, train_size, val_size, test_size, seed))
    print(data.describe(), file=sys.stderr)
    if len(data.y_train) == 0:
        raise ValueError(f"{task}: the training split is empty")
    base = task_config(task)
    cfg = task_config(task, scale, depth=depth, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
    steps = cfg.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    warm = warmup if warmup is not None else min(cfg.warmup, max(1, steps // 10))
    torch.manual_seed(seed)
    model = build_model(task, attention, data.vocab_size, data.seq_len, data.num_classes, scale=scale,
                        attn_options=attn_options, depth=depth)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos" not in n and "cls" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos" not in n and "cls" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, warm, cfg.schedule, base.warmup if cfg.schedule == "rsqrt" else 1))
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    bs = min(cfg.batch_size, n)
    bar = Progress(steps, 0, f"{task}/{attention}", progress)
    perm, pos, losses = torch.randperm(n, generator=g), 0, []
    t_train = time.time()
    model.train()
    for step in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + bs]
        pos += bs
        xb, yb = data.x_train[idx], data.y_train[idx]
        loss = F.cross_entropy(model(xb, data.mask(xb)), yb)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{task}/{attention}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.time() - t_train
    eval_bs = max(bs, 32)
    summary = dict(
        task=task, attention=attention, substitute=data.substitute, data=data.source,
        steps=steps, seq_len=data.seq_len, batch_size=bs, params=params, scale=scale,
        config=config_dict(model.cfg), attn_options=attn_options or {},
        train_examples=n, test_examples=len(data.y_test),
        train_acc=accuracy(model, data, data.x_train, data.y_train, eval_bs, limit=1000),
        val_acc=accuracy(model, data, data.x_val, data.y_val, eval_bs),
        test_acc=accuracy(model, data, data.x_test, data.y_test, eval_bs),
        final_loss=sum(losses[-20:]) / len(losses[-20:]),
        chance=100.0 * torch.bincount(data.y_test, minlength=data.num_classes).max().item() / max(len(data.y_test), 1),
        train_seconds=train_seconds, seconds=time.time() - t0, torch_threads=torch.get_num_threads(),
    )
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"lra-{task}-{attention}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    summary["path"] = path
    return summary
