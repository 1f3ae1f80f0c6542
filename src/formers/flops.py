"""FLOP counting on torch.utils.flop_counter, with the CPU attention kernel counted.

`count_flops` returns multiply-accumulates (MACs), the unit the papers print as "FLOPs".
On CPU, F.scaled_dot_product_attention runs `_scaled_dot_product_flash_attention_for_cpu`,
which torch's counter does not know (it would count 0); we register its formula here.
A model built on the `meta` device is counted without any arithmetic.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["count_flops"]

_aten = torch.ops.aten


def _attention_flops(q_shape, k_shape, v_shape) -> int:
    # (..., heads, Lq, d) x (..., heads, Lk, d): QK^T and attn @ V, 2 flops per MAC
    lead = math.prod(q_shape[:-2])
    lq, d = q_shape[-2:]
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * lead * lq * lk * (d + dv)


def _register():
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    from torch.utils.flop_counter import flop_registry
    if fwd is not None and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _fwd(q, k, v, *args, out_shape=None, **kwargs):
            return _attention_flops(q, k, v)
    if bwd is not None and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return 2 * _attention_flops(q, k, v)  # dQ, dK, dV, dP: twice the forward


_register()


def count_flops(model: torch.nn.Module, input_size=(3, 224, 224), batch_size: int = 1,
                backward: bool = False) -> int:
    """Multiply-accumulates of one forward (and backward, if asked) pass on a random batch.

    The input is made on the model's device; a model on `meta` costs no compute.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(batch_size, *input_size, device=device)
    was_training = model.training
    model.train(backward)
    try:
        with FlopCounterMode(display=False) as counter:
            if backward:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
