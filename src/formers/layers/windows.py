"""Window attention parts (Swin and its descendants): partition, reverse, shift masks,
relative position bias."""
from typing import Optional

import torch

__all__ = ["window_partition", "window_reverse", "window_region_ids", "window_attention_mask",
           "relative_position_index", "relative_position_bias", "compiling", "pad_hw", "crop_hw", "contiguous_output"]


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, wh*ww, C); H and W must be multiples of the window."""
    b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed: traceable by torch.fx
    x = x.view(b, h // wh, wh, w // ww, ww, c).transpose(2, 3)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """(B, nW, wh*ww, C) -> (B, H, W, C), the inverse of window_partition."""
    b, c = x.shape[0], x.shape[3]
    x = x.view(b, h // wh, w // ww, wh, ww, c).transpose(2, 3)
    return x.reshape(b, h, w, c)


def _shift_bands(n: int, win: int, s: int, device: Optional[torch.device]) -> torch.Tensor:
    """Labels along one axis after a cyclic shift by -s: 0 before the last window, 1 for the part of the
    last window that was there before the shift, 2 for what the shift wrapped around."""
    ids = torch.zeros(n, dtype=torch.long, device=device)
    if s != 0:
        ids[n - win:n - s] = 1
        ids[n - s:] = 2
    return ids


def window_region_ids(h: int, w: int, wh: int, ww: int, sh: int, sw: int, valid_h: int, valid_w: int,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """Region labels of a (h, w) map seen after a cyclic shift by (-sh, -sw).

    Tokens of one window may attend to each other only when their labels agree: the shift
    brings together pieces of the map that were not neighbours, and padding (rows >= valid_h,
    cols >= valid_w of the unshifted map) gets label -1 so real tokens never attend to it.
    Plain tensor code of the sizes (TorchScript, torch.export with symbolic sizes).
    """
    ids = _shift_bands(h, wh, sh, device)[:, None] * 3 + _shift_bands(w, ww, sw, device)[None, :]
    rows = torch.arange(h, device=device)[:, None] >= valid_h
    cols = torch.arange(w, device=device)[None, :] >= valid_w
    pad = torch.roll(rows | cols, shifts=(-sh, -sw), dims=(0, 1))
    return ids.masked_fill(pad, -1)


def window_attention_mask(ids: torch.Tensor, wh: int, ww: int, value: float = -100.0) -> torch.Tensor:
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
    n = index.shape[0]  # explicit sizes, no -1: torch.export keeps symbolic group sizes short formulas
    return table[index.view(n * n)].view(n, n, table.shape[1]).permute(2, 0, 1)


def compiling() -> bool:
    """True under torch.compile / torch.export, where sizes may be symbolic: constants (masks, tables)
    are then computed in the graph instead of read from a cache keyed by sizes, and padding is applied
    (by zero where none is needed) instead of decided in Python. False in eager mode and TorchScript."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_compiling()


def pad_hw(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """(B, H, W, C) padded with zeros at the bottom/right to multiples of (multiple_h, multiple_w); x itself
    when it already fits (eager), a pad by a possibly-zero amount under torch.compile / torch.export."""
    h, w = x.shape[1], x.shape[2]
    # rounded up by floor division, not `-h % m`: under torch.export the sizes of the later stages stay
    # short formulas of the input's (nested modulos of negatives grow and slow the trace down)
    ph, pw = (h + multiple_h - 1) // multiple_h * multiple_h - h, (w + multiple_w - 1) // multiple_w * multiple_w - w
    if compiling() or ph != 0 or pw != 0:
        x = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def crop_hw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H', W', C) -> its top-left (B, h, w, C): the inverse of pad_hw (x itself when nothing was padded).
    Under torch.compile / torch.export a gather of the rows and columns: a slice would be contiguous for
    some sizes and not others, and torch.export would specialise the program to the traced case."""
    if compiling():
        return x.index_select(1, torch.arange(h, device=x.device)).index_select(2, torch.arange(w, device=x.device))
    if x.shape[1] != h or x.shape[2] != w:
        x = x[:, :h, :w]
    return x


def contiguous_output(x: torch.Tensor) -> torch.Tensor:
    """An attention output, as a contiguous copy under torch.compile / torch.export (x itself otherwise).
    Its memory layout depends on the sdpa kernel (the CPU flash kernel's is (B, N, heads, d), the math
    one's (B, heads, N, d)); torch.export records a reshape that is a view for the traced kernel as a
    view, which a later decomposition (the ONNX exporter's, to the math kernel) can no longer take."""
    if compiling():
        return x.clone(memory_format=torch.contiguous_format)
    return x
