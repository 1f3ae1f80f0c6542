"""FuseGPT on a byte-level GPT trained on the Python standard library's sources (CPU, minutes).

    python -m formers.sequence.fusegpt_demo --minutes 4 --remove 1 2

Trains GPT for a time budget, then for each K in --remove compares, on held-out files, the
validation loss / perplexity of: the dense model; K blocks removed (least Macro Influence
first) with no fine-tune; plain removal + the recovery fine-tune; FuseGPT (fusion + the same
fine-tune). Prints one table; --out writes it as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from formers.sequence import GPT, random_windows, stdlib_corpus
from formers.transforms.fusegpt import fusegpt


@torch.no_grad()
def evaluate(model, windows):
    model.eval()
    return sum(float(model.loss(x, y)) for x, y in windows) / len(windows)


def train(model, corpus, minutes, batch, context, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < minutes * 60:
        frac = (time.time() - t0) / (minutes * 60)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        x, y = random_windows(corpus.train, batch, context, g)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
    return step, sum(losses[-20:]) / len(losses[-20:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--remove", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-batch", type=int, default=16)
    p.add_argument("--val-batches", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--base-lr", type=float, default=9.65e-6)
    p.add_argument("--coef-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = stdlib_corpus(args.max_bytes, seed=args.seed)
    model = GPT(context=args.context, dim=args.dim, depth=args.depth, num_heads=args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(corpus.train)} train bytes ({corpus.files[0]} files), {len(corpus.val)} val bytes "
          f"({corpus.files[1]} files); GPT {n_params / 1e6:.3f}M params")
    steps, train_loss = train(model, corpus, args.minutes, args.batch, args.context, args.lr, args.seed)
    gv = torch.Generator().manual_seed(args.seed + 1)
    val = [random_windows(corpus.val, args.batch, args.context, gv) for _ in range(args.val_batches)]
    gc = torch.Generator().manual_seed(args.seed + 2)
    calib = [random_windows(corpus.train, args.calib_batch, args.context, gc) for _ in range(args.calib_batches)]
    dense = evaluate(model, val)
    rows = [dict(setting="dense", blocks=args.depth, params=n_params, val_loss=dense)]
    print(f"trained {steps} steps in {args.minutes} min, train loss {train_loss:.3f}; dense val loss {dense:.4f} "
          f"(ppl {math.exp(dense):.3f})")
    for k in args.remove:
        for name, fuse, epochs in (("removal, no fine-tune", False, 0), ("removal + fine-tune", False, args.epochs),
                                   ("FuseGPT (fusion + fine-tune)", True, args.epochs)):
            torch.manual_seed(args.seed)
            log = []
            t0 = time.time()
            m = fusegpt(copy.deepcopy(model), calib, remove=k, fuse=fuse, epochs=epochs, lr=args.base_lr,
                        coef_lr=args.coef_lr, rank=args.rank, log=log.append)
            v = evaluate(m, val)
            rows.append(dict(setting=f"-{k}: {name}", blocks=len(m.blocks), val_loss=v,
                             params=sum(q.numel() for q in m.parameters()),
                             removed=[d["removed"][1] for d in log], seconds=round(time.time() - t0, 1)))
    print(f"{'setting':38s} {'blocks':>6s} {'params':>9s} {'val loss':>9s} {'ppl':>7s}  removed")
    for r in rows:
        print(f"{r['setting']:38s} {r['blocks']:6d} {r['params']:9d} {r['val_loss']:9.4f} "
              f"{math.exp(r['val_loss']):7.3f}  {r.get('removed', '')}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), steps=steps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
