"""Conv -> BatchNorm -> ReLU, the building block of the dense-prediction heads (mmcv's `ConvModule`
with `norm_cfg=BN`, `act_cfg=ReLU`; the attribute names `conv` and `bn` are mmcv's, so official
checkpoints map key for key)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["ConvBnReLU", "SepConvBnReLU"]


class ConvBnReLU(nn.Module):
    """k x k conv (no bias: the BatchNorm has one), BatchNorm2d, ReLU (`act=False`: none). Padding
    defaults to `dilation * (k // 2)`, which keeps the size at stride 1. The conv gets mmcv's
    initialisation (Kaiming normal, fan_out, for ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        padding = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SepConvBnReLU(nn.Module):
    """Depthwise-separable conv (mmcv's `DepthwiseSeparableConvModule`): a depthwise k x k
    ConvBnReLU (optionally dilated), then a pointwise 1 x 1 ConvBnReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        self.depthwise = ConvBnReLU(in_chs, in_chs, kernel_size, dilation=dilation, groups=in_chs)
        self.pointwise = ConvBnReLU(in_chs, out_chs, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
