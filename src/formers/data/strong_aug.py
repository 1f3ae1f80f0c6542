"""The strong augmentations of DACS/DAFormer self-training, in plain torch, with explicit random draws.

DAFormer (lhoyer/DAFormer, `mmseg/models/utils/dacs_transforms.py`) mixes a source image into a target
image by classes (ClassMix), then jitters its colours and blurs it. Its colour jitter is kornia 0.5.8's
`ColorJitter`, which kornia has since renamed `ColorJiggle` (today's `ColorJitter` follows torchvision
and gives other colours for the same factors); this file reproduces the old semantics:

- brightness: additive, `x + (b - 1)`, clipped to [0, 1];
- contrast: multiplicative, `x * c`, clipped;
- saturation: the HSV saturation times `s`, clipped;
- hue: the HSV hue shifted by `h` turns of the colour circle;
- the four applied in one random order, on images in [0, 1] (DACS de-normalises first).

Every function takes its random draws as arguments (or a `torch.Generator`), so a training step that
draws them from its own generator is reproducible and resumable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rgb_to_hsv", "hsv_to_rgb", "color_jiggle", "draw_jiggle", "gaussian_kernel1d", "dacs_blur_kernel_size",
           "gaussian_blur", "class_mix_masks", "one_mix"]


# ---------------------------------------------------------------- colour

def rgb_to_hsv(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with hue in radians [0, 2 pi), saturation and value in [0, 1]."""
    r, g, b = x.unbind(-3)
    hi, lo = x.amax(-3), x.amin(-3)
    span = hi - lo
    sat = span / torch.where(hi == 0, torch.ones_like(hi), hi + eps)
    safe = torch.where(span == 0, torch.ones_like(span), span)
    # the sextant of the first largest channel (red wins ties, then green)
    hue = torch.where((r >= g) & (r >= b), (g - b) / safe,
                      torch.where(g >= b, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = (hue / 6.0) % 1.0 * (2 * math.pi)
    hue = hue.masked_fill(hue >= 2 * math.pi, 0.0)
    return torch.stack((hue, sat, hi), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_hsv."""
    hue, sat, val = x.unbind(-3)
    h6 = hue / (2 * math.pi) * 6.0
    sector = torch.floor(h6) % 6
    frac = h6 - torch.floor(h6)
    p = val * (1 - sat)
    q = val * (1 - frac * sat)
    t = val * (1 - (1 - frac) * sat)
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))
    out = []
    for ch in range(3):
        y = table[5][ch]
        for k in range(4, -1, -1):
            y = torch.where(sector == k, table[k][ch], y)
        out.append(y)
    return torch.stack(out, dim=-3)


def _per_image(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def color_jiggle(x: torch.Tensor, brightness, contrast, saturation, hue, order) -> torch.Tensor:
    """kornia's ColorJiggle (DACS's colour jitter) on (B, 3, H, W) images in [0, 1], with the factors
    given: `brightness`, `contrast`, `saturation` (B,) around 1, `hue` (B,) in turns around 0, and
    `order` a permutation of (0, 1, 2, 3) = (brightness, contrast, saturation, hue) shared by the batch.
    A step whose factors are all neutral is skipped, as kornia does."""
    x = x.clamp(0, 1)
    factors = (brightness, contrast, saturation, hue)
    neutral = (1.0, 1.0, 1.0, 0.0)
    for i in [int(v) for v in order]:
        f = torch.as_tensor(factors[i], dtype=torch.float32)
        if bool((f == neutral[i]).all()):
            continue
        f = _per_image(f, x)
        if i == 0:
            x = (x + (f - 1)).clamp(0, 1)
        elif i == 1:
            x = (x * f).clamp(0, 1)
        else:
            hsv = rgb_to_hsv(x)
            h, s, v = hsv.unbind(-3)
            if i == 2:
                s = (s * f[:, 0]).clamp(0, 1)
            else:
                h = torch.remainder(h + f[:, 0] * (2 * math.pi), 2 * math.pi)
                h = h.masked_fill(h >= 2 * math.pi, 0.0)
            x = hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return x.clamp(0, 1)


def draw_jiggle(n: int, strength: float, generator: torch.Generator) -> dict:
    """The random factors of `color_jiggle` for n images with every strength `strength` (DACS: 0.2):
    brightness, contrast and saturation ~ U(1 - s, 1 + s) (brightness and contrast at least 0), hue ~
    U(-s, s), and one random order."""
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)
    s = float(strength)
    return dict(brightness=uniform(max(0.0, 1 - s), 1 + s), contrast=uniform(max(0.0, 1 - s), 1 + s),
                saturation=uniform(max(0.0, 1 - s), 1 + s), hue=uniform(-s, s),
                order=torch.randperm(4, generator=generator))


# ---------------------------------------------------------------- blur

def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """A normalised Gaussian of `size` taps centred on the middle one (half-integer offsets for even sizes)."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2) / (2.0 * float(sigma) ** 2))
    return (g / g.sum()).float()


def dacs_blur_kernel_size(side: int) -> int:
    """DACS's blur kernel for an image side: about a tenth of it, made odd (floor(ceil(0.1 n) - 0.5 +
    ceil(0.1 n) % 2)), e.g. 51 for 512 px, 7 for 64 px."""
    c = math.ceil(0.1 * side)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_blur(x: torch.Tensor, kernel_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding (kornia's GaussianBlur2d)."""
    ky, kx = kernel_size
    c = x.shape[1]
    gy = gaussian_kernel1d(ky, sigma).to(x.device, x.dtype).view(1, 1, ky, 1).expand(c, 1, ky, 1)
    gx = gaussian_kernel1d(kx, sigma).to(x.device, x.dtype).view(1, 1, 1, kx).expand(c, 1, 1, kx)
    x = F.pad(x, ((kx - 1) // 2, kx // 2, (ky - 1) // 2, ky // 2), mode="reflect")
    return F.conv2d(F.conv2d(x, gy, groups=c), gx, groups=c)


# ---------------------------------------------------------------- ClassMix

def class_mix_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DACS's ClassMix masks for a batch of source label maps (B, H, W): (B, H, W) bool, True where the
    source pixel is pasted.

    As the official `get_class_masks` does, the classes come from the *whole batch* (the ignore id
    included, when present), and each image pastes a random half of them (ceil(n / 2), drawn per image):
    an image may draw classes it does not contain, so it can paste fewer than half of its own."""
    classes = torch.unique(labels)
    n = len(classes)
    take = (n + n % 2) // 2
    masks = []
    for lab in labels:
        chosen = classes[torch.randperm(n, generator=generator)[:take].to(classes.device)]
        masks.append(torch.isin(lab, chosen))
    return torch.stack(masks)


def one_mix(mask: torch.Tensor, pasted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`pasted` where mask, `base` elsewhere; mask (B, H, W) broadcast over channels of (B, C, H, W)."""
    m = mask if mask.dim() == pasted.dim() else mask.unsqueeze(1)
    return torch.where(m, pasted, base)
