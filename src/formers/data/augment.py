"""Batched, seedable image transforms in torch: one call per batch, no per-image Python.

Training batches get a random crop of the zero-padded image (a shift of up to `pad`
pixels) or timm's RandomResizedCrop (`rrc`), where the data allow it a horizontal flip,
optionally timm's RandAugment (`formers.data.randaugment`); every batch is then scaled to
[0, 1], normalised with the training split's channel statistics, for a model with more
channels than the data (grayscale into an RGB model) repeated across channels, and
optionally randomly erased (timm's RandomErasing, "pixel" mode). `Mixup` (mixup / cutmix,
timm's batch mode) then mixes a batch and its labels into soft targets.

Every random draw of a step is made by `draw(n, generator)` from a generator seeded by
(seed, epoch, step), as uniforms that the transform turns into boxes once it sees the
images, so a resumed run sees exactly the augmentations an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["channel_stats", "BatchTransform", "Mixup", "AUGMENTS", "rrc_boxes", "erase_boxes"]

AUGMENTS = ("auto", "none", "crop", "crop-flip", "rrc", "rrc-flip")
_ATTEMPTS = 10          # timm's tries at a box that fits, for RandomResizedCrop and RandomErasing


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].double().div_(255.0)
        s += part.sum((0, 2, 3))
        s2 += part.pow(2).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


def _first_fit(fits: torch.Tensor) -> torch.Tensor:
    """Index of the first True attempt per row (0 where none fits: the caller falls back)."""
    return fits.float().argmax(1)


def rrc_boxes(u: dict, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """timm's RandomResizedCrop boxes (top, left, height, width), each (n,) long, from uniforms `u`
    (rrc_area, rrc_ratio: (n, 10); rrc_top, rrc_left: (n,)): the first of 10 tries whose box fits,
    else the centred crop of the whole image clamped to `ratio`."""
    area = h * w
    target = (scale[0] + (scale[1] - scale[0]) * u["rrc_area"].double()) * area
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u["rrc_ratio"].double())
    tw = torch.round(torch.sqrt(target * aspect)).long()
    th = torch.round(torch.sqrt(target / aspect)).long()
    fits = (tw <= w) & (th <= h)
    k = _first_fit(fits)[:, None]
    tw, th, found = tw.gather(1, k)[:, 0], th.gather(1, k)[:, 0], fits.any(1)
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    th, tw = torch.where(found, th, fh), torch.where(found, tw, fw)
    top = torch.floor(u["rrc_top"].double() * (h - th + 1)).long()
    left = torch.floor(u["rrc_left"].double() * (w - tw + 1)).long()
    top, left = torch.where(found, top, (h - fh) // 2), torch.where(found, left, (w - fw) // 2)
    return top, left, th, tw


def resized_crop(x: torch.Tensor, top, left, th, tw) -> torch.Tensor:
    """Box b of image b resized bilinearly to the image's own size (align_corners=False; as
    F.interpolate of the cut box: the boxes are never larger than the output, so no antialias)."""
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    u = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5) / w          # output centres, 0..1
    v = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5) / h
    sx = left.to(dev).double()[:, None] + u[None] * tw.to(dev).double()[:, None]   # input x, pixel units
    sy = top.to(dev).double()[:, None] + v[None] * th.to(dev).double()[:, None]
    # clamp to the box's edge pixels, as F.interpolate does at a crop's border
    sx = torch.minimum(torch.maximum(sx, left.to(dev)[:, None] + 0.5), (left + tw).to(dev)[:, None] - 0.5)
    sy = torch.minimum(torch.maximum(sy, top.to(dev)[:, None] + 0.5), (top + th).to(dev)[:, None] - 0.5)
    gx = (2 * sx / w - 1).to(dt)[:, None, :].expand(b, h, w)
    gy = (2 * sy / h - 1).to(dt)[:, :, None].expand(b, h, w)
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=False)


def erase_boxes(u: dict, h: int, w: int, min_area=0.02, max_area=1 / 3, min_aspect=0.3) -> tuple:
    """timm's RandomErasing boxes (top, left, height, width, erased) from uniforms `u` (erase_p: (n,);
    erase_area, erase_aspect: (n, 10); erase_top, erase_left: (n,)): an image is erased when
    erase_p < probability (the caller's test), in the first of 10 tries that fits strictly inside."""
    target = (min_area + (max_area - min_area) * u["erase_area"].double()) * (h * w)
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(lo + (hi - lo) * u["erase_aspect"].double())
    eh = torch.round(torch.sqrt(target * aspect)).long()
    ew = torch.round(torch.sqrt(target / aspect)).long()
    fits = (ew < w) & (eh < h)
    k = _first_fit(fits)[:, None]
    eh, ew = eh.gather(1, k)[:, 0], ew.gather(1, k)[:, 0]
    top = torch.floor(u["erase_top"].double() * (h - eh + 1)).long()
    left = torch.floor(u["erase_left"].double() * (w - ew + 1)).long()
    return top, left, eh, ew, fits.any(1)


class BatchTransform:
    """uint8 (B, C, H, W) -> normalised float (B, out_chans, H, W), with optional augmentation:
    `crop_pad` (shifted crop of the zero-padded image) or `rrc` ((scale, ratio) of timm's
    RandomResizedCrop), `hflip`, `rand_augment` (a RandAugment), `reprob` (random erasing); `mixup`
    (a Mixup) is drawn here too and applied by the task to the batch and its labels."""

    def __init__(self, mean, std, out_chans: int, crop_pad: int = 0, hflip: bool = False, rrc=None,
                 rand_augment=None, reprob: float = 0.0, mixup=None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.out_chans = out_chans
        self.crop_pad = crop_pad
        self.hflip = hflip
        self.rrc = rrc
        self.rand_augment = rand_augment
        self.reprob = float(reprob)
        self.mixup = mixup

    @property
    def augments(self) -> bool:
        return self.crop_pad > 0 or self.hflip or self.rrc is not None or self.rand_augment is not None \
            or self.reprob > 0 or self.mixup is not None

    def draw(self, n: int, generator: torch.Generator) -> dict:
        """The random parameters of `n` images (drawn for a whole global batch, then sliced). The
        draws of the crop-and-flip recipe come first and alone when nothing else is on."""
        p, g = self.crop_pad, generator
        out = {
            "shift": torch.randint(0, 2 * p + 1, (n, 2), generator=g) if p else None,
            "flip": torch.rand(n, generator=g) < 0.5 if self.hflip else None,
        }
        if self.rrc is not None:
            out.update(rrc_area=torch.rand(n, _ATTEMPTS, generator=g), rrc_ratio=torch.rand(n, _ATTEMPTS, generator=g),
                       rrc_top=torch.rand(n, generator=g), rrc_left=torch.rand(n, generator=g))
        if self.rand_augment is not None:
            out.update(self.rand_augment.draw(n, g))
        if self.reprob > 0:
            out.update(erase_p=torch.rand(n, generator=g), erase_area=torch.rand(n, _ATTEMPTS, generator=g),
                       erase_aspect=torch.rand(n, _ATTEMPTS, generator=g), erase_top=torch.rand(n, generator=g),
                       erase_left=torch.rand(n, generator=g),
                       erase_seed=torch.randint(0, 2 ** 62, (n,), generator=g))
        if self.mixup is not None:
            out.update(self.mixup.draw(n, g))
        return out

    @staticmethod
    def slice_params(params: dict | None, sl: slice) -> dict | None:
        if params is None:
            return None
        return {k: None if v is None else v[sl] for k, v in params.items()}

    def __call__(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        strong = params is not None and (self.rrc is not None or self.rand_augment is not None)
        x = x.float() if strong else x.float().div_(255.0)      # strong ops work on 0..255 grey levels
        if params is not None:
            if self.rrc is not None:
                box = rrc_boxes(params, x.shape[-2], x.shape[-1], *self.rrc)
                x = resized_crop(x, *box).round_().clamp_(0, 255)
            elif params.get("shift") is not None and self.crop_pad:
                x = self._shift(x, params["shift"].to(x.device))
            if params.get("flip") is not None:
                flip = params["flip"].to(x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
            if self.rand_augment is not None:
                x = self.rand_augment(x, params)
        if strong:
            x = x.div_(255.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if x.shape[1] != self.out_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.out_chans, -1, -1)
            elif self.out_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"cannot map {x.shape[1]}-channel images to a {self.out_chans}-channel model")
        if params is not None and self.reprob > 0:
            x = self._erase(x.contiguous(), params)
        return x.contiguous()

    def _erase(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Each chosen image gets one box of per-pixel N(0, 1) noise (in normalised units), timm's mode "pixel"."""
        top, left, eh, ew, fits = erase_boxes(params, x.shape[-2], x.shape[-1])
        chosen = (params["erase_p"] < self.reprob) & fits
        x = x.clone()
        for b in chosen.nonzero().flatten().tolist():
            g = torch.Generator().manual_seed(int(params["erase_seed"][b]))
            t, l, hh, ww = int(top[b]), int(left[b]), int(eh[b]), int(ew[b])
            x[b, :, t:t + hh, l:l + ww] = torch.randn((x.shape[1], hh, ww), generator=g).to(x)
        return x

    def _shift(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch: image b is cut at offset shift[b] = (dy, dx)."""
        b, _, h, w = x.shape
        p = self.crop_pad
        padded = F.pad(x, (p, p, p, p))
        rows = shift[:, 0:1] + torch.arange(h, device=x.device)          # (B, H)
        cols = shift[:, 1:2] + torch.arange(w, device=x.device)          # (B, W)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]   # (B, H, W, C)
        return out.permute(0, 3, 1, 2)


class Mixup:
    """timm's Mixup in its default "batch" mode: with probability `prob` a batch is mixed with itself
    reversed, by mixup (lam ~ Beta(mixup, mixup)) or, with probability `switch_prob` when both are on,
    cutmix (lam ~ Beta(cutmix, cutmix), one box cut from the reversed batch, lam corrected to the
    box's area); the labels become lam * onehot(y) + (1 - lam) * onehot(y reversed). Label smoothing
    is left to the loss (F.cross_entropy's on soft targets equals timm's mixup_target smoothing)."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5,
                 num_classes: int = 1000):
        self.mixup, self.cutmix, self.prob, self.switch_prob = float(mixup), float(cutmix), float(prob), \
            float(switch_prob)
        self.num_classes = int(num_classes)

    def draw(self, n: int, g: torch.Generator) -> dict:
        """One draw per global batch, repeated over its n images so that slicing keeps it."""
        on, switch, cy, cx = torch.rand(4, generator=g).tolist()
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or switch < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = _beta(alpha, g)
        if on >= self.prob:
            lam = 1.0

        def rep(v, dtype=torch.float64):
            return torch.full((n,), v, dtype=dtype)
        return {"mix_lam": rep(lam), "mix_cut": rep(use_cutmix, torch.bool), "mix_cy": rep(cy), "mix_cx": rep(cx)}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(params["mix_lam"][0])
        target = F.one_hot(y.long(), self.num_classes).to(torch.float32)
        if lam == 1.0:
            return x, target
        if bool(params["mix_cut"][0]):
            h, w = x.shape[-2:]
            ratio = math.sqrt(1 - lam)
            ch, cw = int(h * ratio), int(w * ratio)
            cy, cx = int(float(params["mix_cy"][0]) * h), int(float(params["mix_cx"][0]) * w)
            yl, yh = min(max(cy - ch // 2, 0), h), min(max(cy + (ch + 1) // 2, 0), h)
            xl, xh = min(max(cx - cw // 2, 0), w), min(max(cx + (cw + 1) // 2, 0), w)
            x = x.clone()
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            lam = 1 - (yh - yl) * (xh - xl) / (h * w)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        return x, target * lam + target.flip(0) * (1 - lam)


def _beta(alpha: float, g: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from `g`: X / (X + Y) with X, Y ~ Gamma(alpha), by Marsaglia-Tsang."""
    if alpha <= 0:
        return 1.0
    x, y = _gamma(alpha, g), _gamma(alpha, g)
    return x / (x + y) if x + y > 0 else 0.5


def _gamma(alpha: float, g: torch.Generator) -> float:
    boost = 1.0
    if alpha < 1:       # Gamma(a) = Gamma(a + 1) * U^(1/a)
        boost = float(torch.rand((), generator=g)) ** (1 / alpha)
        alpha += 1
    d = alpha - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        z = float(torch.randn((), generator=g))
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=g))
        if math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost
