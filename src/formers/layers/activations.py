"""Activations introduced by the MetaFormer papers and reused by their token mixers."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import is_traced

__all__ = ["StarReLU", "SquaredReLU", "apply_act"]


def _scale_square_shift_(r: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """scale * r^2 + bias written into r (r holds relu(x) and nothing else holds r)."""
    return r.square_().mul_(scale).add_(bias)


class _StarReLUFn(torch.autograd.Function):
    """s * relu(x)^2 + b in one output buffer (eager autograd would keep three full-size temporaries
    alive, and on a CPU each fresh buffer of a large map costs its page faults); backward recomputes
    relu(x) from the saved input."""

    @staticmethod
    def forward(ctx, x, scale, bias):
        ctx.save_for_backward(x, scale)
        return _scale_square_shift_(torch.relu(x), scale, bias)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        r = torch.relu(x)
        grad_x = grad_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * r * (2 * scale)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * r.square()).sum().reshape(scale.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum().reshape(scale.shape)
        return grad_x, grad_scale, grad_bias


class StarReLU(nn.Module):
    """s * relu(x)^2 + b with learnable scalars s and b."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0, learnable: bool = True):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor([bias]), requires_grad=learnable)

    def forward(self, x):
        # TorchScript, fx and torch.compile take the formula (inductor fuses it anyway); so does autocast
        if torch.jit.is_scripting():
            return self.scale * F.relu(x).square() + self.bias
        else:
            if is_traced(x) or x.dtype != self.scale.dtype:
                return self.scale * F.relu(x).square() + self.bias
            return _StarReLUFn.apply(x, self.scale, self.bias)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


def apply_act(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(x); with autograd off, in place on x for GELU, ReLU and StarReLU (x must be a fresh
    intermediate, e.g. an MLP's fc1 output), which spares one large allocation per call. torch.fx
    and torch.compile get act(x); TorchScript cannot pass a module to a function, so a scripted
    caller calls act(x) itself (`if torch.jit.is_scripting()`)."""
    if not torch.is_grad_enabled() and not is_traced(x):
        if type(act) is nn.GELU:
            return torch.ops.aten.gelu_(x, approximate=act.approximate)
        if type(act) is nn.ReLU:
            return x.relu_()
        if type(act) is StarReLU and x.dtype == act.scale.dtype:
            return _scale_square_shift_(x.relu_(), act.scale, act.bias)
    return act(x)
