"""A tiny test-only backbone, registered for the training tests and removed after them.

Run as a script it registers the model and runs the `formers` command line, so subprocess
and torchrun tests can train it:  python tests/train/train_helpers.py train tiny_trainnet ...
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

from formers.layers import DropPath
from formers.models.base import Backbone
from formers.registry import _REGISTRY, ModelCard, register_model

NAME = "tiny_trainnet"
HERE = os.path.dirname(os.path.abspath(__file__))


class TinyTrainNet(Backbone):
    """Two strided convs, a residual block with drop-path, a learned 'pos_embed', dropout, a head."""
    input_divisor = 4

    def __init__(self, num_classes=1000, in_chans=3, img_size=16, drop_rate=0.1, drop_path_rate=0.1, width=24):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = 2 * width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1), nn.GroupNorm(1, width), nn.GELU(),
                                  nn.Conv2d(width, 2 * width, 3, 2, 1), nn.GroupNorm(1, 2 * width), nn.GELU())
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 * width, 1, 1))
        self.block = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.GELU())
        self.drop_path = DropPath(drop_path_rate)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(2 * width, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=2 * width, reduction=4, module="block")]

    def forward_features(self, x):
        self.check_input(x)
        x = self.stem(x) + self.pos_embed
        return x + self.drop_path(self.block(x))

    def forward_head(self, x, pre_logits=False):
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)


def tiny_trainnet(**kwargs):
    return TinyTrainNet(**kwargs)


def register():
    if NAME not in _REGISTRY:
        register_model(ModelCard(paper=1, arxiv="", repo="", status="reduced", img_size=16,
                                 notes="test-only"))(tiny_trainnet)


def unregister():
    _REGISTRY.pop(NAME, None)


def resumed_digests(full, step: int, out) -> tuple[list, list]:
    """(the full run's, a run resumed from its checkpoint at `step` into `out`'s) parameter digests."""
    import json

    from formers.cli import main
    ckpt = os.path.join(full, "checkpoints", f"step-{step:08d}.json")
    assert main(["train", NAME, "--out", str(out), "--resume", ckpt, "--no-progress"]) == 0
    def digests(run):
        with open(os.path.join(run, "summary.json")) as f:
            return json.load(f)["param_digests"]
    return digests(full), digests(out)


def script_cmd(*args) -> list[str]:
    """A command line that runs `formers ARGS` with the tiny model registered."""
    return [sys.executable, os.path.join(HERE, "train_helpers.py"), *map(str, args)]


def torchrun_cmd(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(HERE, "train_helpers.py"), *map(str, args)]


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("FORMERS_DEBUG", None)
    return env


if __name__ == "__main__":
    register()
    from formers.cli import main
    sys.exit(main(sys.argv[1:]))
