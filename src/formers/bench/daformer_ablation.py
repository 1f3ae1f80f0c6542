"""DAFormer's training components, measured one by one on the mosaic (a reduced-scale substitute for
GTA -> Cityscapes): `make daformer-ablation`, or

    python -m formers.bench.daformer_ablation --out runs/daformer-ablation --epochs 6 --seeds 0 1

1. An "ImageNet" encoder: the MiT-B0 encoder pretrained to classify Fashion-MNIST items (the
   objects the mosaic pastes, as ImageNet holds GTA's cars and people), grey, 32 px, in neither
   domain's colours or textures. Every run starts from it; the feature distance pulls towards it.
2. Runs on `mosaic-uda-night` (labelled source images, unlabelled images of the "night" domain, its
   test split; `--dataset mosaic-uda` takes the harder "target" domain, which also changes textures):
   source-only (`ce`), DACS (teacher alpha 0.99, ClassMix, jitter, blur), + RCS, + FD, and
   DAFormer's full recipe (RCS + thing-class FD + alpha 0.999), each with every seed.
3. A table of target mIoU (best epoch and last epoch, mean over seeds) in OUT/ablation.md and .json.

Reduced-scale settings, stated: 64 px images; the fusion head at 64 channels instead of 256 (the
same structure: at 256 its 3x3 bottleneck alone costs more than the whole MiT-B0 at this size); the
feature distance on the encoder's third stage (stride 16): at stride 32 a 64 px image has 2 x 2
cells, and a cell is rarely 75% one item.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

__all__ = ["pretrain_encoder", "RUNS", "main"]

# name -> (objective, objective kwargs); the FD runs compare the third encoder stage (see above)
RUNS = {
    "source only": ("ce", {}),
    "DACS": ("dacs", {"alpha": 0.99, "rcs": False, "fd_lambda": 0.0}),
    "DACS + RCS": ("dacs", {"alpha": 0.99, "rcs": True, "fd_lambda": 0.0}),
    "DACS + FD": ("dacs", {"alpha": 0.99, "rcs": False, "fd_level": -2}),
    "DACS + RCS + FD": ("dacs", {"alpha": 0.99, "rcs": True, "fd_level": -2}),
    "DAFormer (RCS + FD, alpha 0.999)": ("dacs", {"alpha": 0.999, "rcs": True, "fd_level": -2}),
}
HEAD_DIM = 64


def pretrain_encoder(path: str, images: int = 20000, epochs: int = 1, seed: int = 0, log=print) -> dict:
    """Train MiT-B0 + global pooling + a linear classifier on grey 32 px Fashion-MNIST items, then save a
    whole daformer_mitb0 (this encoder, a freshly initialised head) to `path`. Returns the test accuracy."""
    import torch.nn as nn
    import torch.nn.functional as F

    import formers
    from formers.checkpoint import save_checkpoint
    from formers.data.datasets import load_fashion_mnist
    torch.manual_seed(seed)
    data = load_fashion_mnist()
    model = formers.create_model("daformer_mitb0", num_classes=13, img_size=64, decoder_dim=HEAD_DIM)
    encoder = model.encoder
    classifier = nn.Linear(encoder.embed_dims[-1], 10)
    params = list(encoder.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)

    def batch(x):
        x = F.pad(x.float() / 255.0, (2, 2, 2, 2)).expand(-1, 3, -1, -1)
        return (x - 0.5) / 0.25

    def logits(x):
        return classifier(encoder(batch(x))[-1].mean((2, 3)))
    n = min(images, len(data.y_train))
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    t0, g = time.perf_counter(), torch.Generator().manual_seed(seed)
    encoder.train()
    for step in range(steps):
        idx = torch.randint(n, (128,), generator=g)
        loss = F.cross_entropy(logits(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(f"  pretrain step {step + 1}/{steps}: loss {loss.item():.3f}")
    encoder.eval()
    with torch.no_grad():
        hits = sum(int((logits(data.x_test[i:i + 500]).argmax(1) == data.y_test[i:i + 500]).sum())
                   for i in range(0, 2000, 500))
    acc = 100.0 * hits / 2000
    save_checkpoint(model, path, metadata={"what": "MiT-B0 pretrained on Fashion-MNIST (ImageNet substitute)",
                                           "fashion_mnist_test_acc": f"{acc:.2f}"})
    log(f"pretrained encoder: Fashion-MNIST test accuracy {acc:.2f}% (first 2000 test images), "
        f"{time.perf_counter() - t0:.0f}s -> {path}")
    return {"fashion_mnist_acc": acc, "seconds": time.perf_counter() - t0}


def _table(results: dict) -> str:
    lines = ["| training | target mIoU, best epoch | target mIoU, last epoch | per seed (best) |",
             "|---|---|---|---|"]
    for name, runs in results.items():
        best = [r["best"] for r in runs]
        last = [r["last"] for r in runs]
        spread = f" ± {statistics.stdev(best):.2f}" if len(best) > 1 else ""
        lines.append(f"| {name} | {statistics.mean(best):.2f}{spread} | {statistics.mean(last):.2f} | "
                     + ", ".join(f"{b:.2f}" for b in best) + " |")
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    return "\n".join(lines) + f"\n\nseeds {', '.join(str(s) for s in seeds)}\n"


def _merge(path: str, settings: dict, results: dict) -> dict:
    """Add these runs to the file's, one per (row, seed): several processes may run different rows or
    seeds into one folder, and a rerun of a (row, seed) replaces its result."""
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f).get("results", {})
    for name, runs in results.items():
        by_seed = {r["seed"]: r for r in merged.get(name, [])}
        by_seed.update({r["seed"]: r for r in runs})
        merged[name] = [by_seed[k] for k in sorted(by_seed)]
    settings = {k: v for k, v in settings.items() if k != "runs"}
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": settings, "results": merged}, f, indent=1)
    os.replace(path + ".tmp", path)
    return merged


def main(argv=None) -> dict:
    from formers.train import TrainConfig, train
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/daformer-ablation")
    p.add_argument("--train", type=int, default=1000, help="source and target training images")
    p.add_argument("--test", type=int, default=500, help="target test images")
    p.add_argument("--dataset", default="mosaic-uda-night", choices=["mosaic-uda-night", "mosaic-uda"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="which rows (names of RUNS)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    pretrained = os.path.join(args.out, "pretrained_mitb0.safetensors")
    if not os.path.exists(pretrained):
        pretrain_encoder(pretrained)
    results = {}
    for name in args.runs:
        objective, kwargs = RUNS[name]
        results[name] = []
        for seed in args.seeds:
            out = os.path.join(args.out, name.split(" (")[0].replace(" + ", "+").replace(" ", "-").lower(),
                               f"seed{seed}")
            s = train(TrainConfig("daformer_mitb0", dataset=args.dataset, objective=objective, objective_kwargs=kwargs,
                                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, img_size=64,
                                  limit_train=args.train, limit_test=args.test, seed=seed, out=out, progress=False,
                                  model_kwargs={"decoder_dim": HEAD_DIM, "checkpoint": os.path.abspath(pretrained)}))
            results[name].append({"seed": seed, "best": s["best_test_miou"], "last": s["final_test_miou"],
                                  "best_epoch": s["best_epoch"], "seconds": s["wall_time_s"], "out": out})
            results = _merge(os.path.join(args.out, "ablation.json"), vars(args), results)
    table = _table({k: results[k] for k in RUNS if k in results})
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
