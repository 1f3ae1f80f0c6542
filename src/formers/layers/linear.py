"""A drop-in nn.Linear whose float32 CPU forward runs oneDNN's GEMM.

In eager mode on a CPU, `F.linear` on token-major activations (many rows M, few input features)
goes to aten::mm, which on this project's machine reaches 70-140 GFLOP/s for the shapes of a
vision backbone's first stages, while oneDNN's 1x1 convolution over the same memory read as a
channels-last map reaches 180-210 (`formers bench --machine` measures the limit; the shapes are
in the README's speed section). So for float32 CPU inputs with at least `MIN_ROWS` rows, `Linear`
views its (..., C) input as a (1, C, M, 1) channels-last map, convolves it with the (out, in, 1, 1)
view of its weight and reads the channels-last result back as (..., out): no copy on either side,
the same parameters and state-dict keys as nn.Linear, outputs equal up to float rounding (the two
kernels sum in different orders). Everything else (CUDA, bf16/fp16 and autocast, torch.compile,
which packs its own oneDNN linears, small inputs) takes `F.linear` unchanged, and so do TorchScript
and torch.fx symbolic tracing (the route checks are Python on the tensor's device and size).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.fx
import torch.nn.functional as F

__all__ = ["Linear", "linear", "MIN_ROWS"]

MIN_ROWS = 256  # below this many rows (e.g. a classifier head) aten's GEMM is as fast


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # first: nothing below becomes a guard or a graph break
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1] and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN's 1x1 convolution for float32 CPU inputs (module doc)."""
    if torch.jit.is_scripting():
        return F.linear(x, weight, bias)
    else:
        return _linear_eager(x, weight, bias)


def _linear_eager(x, weight, bias):
    if isinstance(x, torch.fx.Proxy) or not _onednn_ok(x, weight):
        return F.linear(x, weight, bias)
    *lead, c = x.shape
    y = F.conv2d(x.reshape(1, -1, 1, c).permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
