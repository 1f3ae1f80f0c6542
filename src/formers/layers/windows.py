"""Window attention parts (Swin and its descendants): partition, reverse, shift masks,
relative position bias."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["window_partition", "window_reverse", "window_region_ids", "window_attention_mask",
           "relative_position_index", "relative_position_bias"]


def window_partition(x, wh: int, ww: int):
    """(B, H, W, C) -> (B, nW, wh*ww, C); H and W must be multiples of the window."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x, wh: int, ww: int, h: int, w: int):
    """(B, nW, wh*ww, C) -> (B, H, W, C), the inverse of window_partition."""
    b, _, _, c = x.shape
    x = x.view(b, h // wh, w // ww, wh, ww, c).transpose(2, 3)
    return x.reshape(b, h, w, c)


def window_region_ids(h: int, w: int, wh: int, ww: int, sh: int, sw: int, valid_h: int, valid_w: int,
                      device=None):
    """Region labels of a (h, w) map seen after a cyclic shift by (-sh, -sw).

    Tokens of one window may attend to each other only when their labels agree: the shift
    brings together pieces of the map that were not neighbours, and padding (rows >= valid_h,
    cols >= valid_w of the unshifted map) gets label -1 so real tokens never attend to it.
    """
    def bands(n, win, s):
        ids = torch.zeros(n, dtype=torch.long, device=device)
        if s:
            ids[n - win:n - s] = 1
            ids[n - s:] = 2
        return ids
    ids = bands(h, wh, sh)[:, None] * 3 + bands(w, ww, sw)[None, :]
    pad = torch.zeros(h, w, dtype=torch.bool, device=device)
    pad[valid_h:, :] = True
    pad[:, valid_w:] = True
    pad = torch.roll(pad, shifts=(-sh, -sw), dims=(0, 1))
    return ids.masked_fill(pad, -1)


def window_attention_mask(ids, wh: int, ww: int, value: float = -100.0):
    """(nW, N, N) additive mask from region labels (see window_region_ids): `value` where they differ."""
    win = window_partition(ids[None, :, :, None].float(), wh, ww)[0, :, :, 0]  # (nW, N)
    differ = win[:, :, None] != win[:, None, :]
    return torch.zeros(differ.shape, device=ids.device).masked_fill(differ, value)


def relative_position_index(wh: int, ww: int):
    """(N, N) index into a ((2wh-1)*(2ww-1), heads) bias table for an wh x ww window."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def relative_position_bias(table, index):
    """Gather a ((2wh-1)*(2ww-1), heads) table with an (N, N) index into an (heads, N, N) bias."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
