"""RandAugment as timm configures it (`--aa rand-m9-mstd0.5-inc1`), batched in pure torch.

timm applies RandAugment to one PIL image at a time; here a whole batch goes through each operation
at once, every image with its own draws, in float tensors holding integer values 0..255 and rounded
to integers after every operation, as a uint8 PIL image is. The semantics are timm's (its
`auto_augment.py`): `num_layers` operations per image chosen uniformly with replacement from the
15-op set, each applied with probability `prob`, at a magnitude drawn from N(m, mstd) and clipped to
[0, mmax]; "increasing" ops (inc1) grow more severe with the magnitude. The point ops equal PIL's
(autocontrast, equalize, invert, posterize, solarize, solarize-add; brightness, colour, contrast
and sharpness up to one grey level of rounding); the geometric ones (rotate, shear, translate) sample
bilinearly where timm picks bilinear or bicubic at random, and fill with the data's mean colour.

    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1", img_mean=(72, 72, 72))
    params = ra.draw(n, generator)              # all random draws of n images
    x = ra(x, params)                            # x: float (n, C, H, W), integer values 0..255
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

__all__ = ["RandAugment", "OPS", "INCREASING_OPS"]

_DENOM = 10.0   # magnitudes are on timm's 0..10 scale

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


# ---------------------------------------------------------------- the operations (x: (b, C, H, W), v: (b,))

def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point), (b, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor): degenerate + factor * (x - degenerate), cut to 0..255."""
    return (degenerate + _per_image(factor) * (x - degenerate)).clamp(0, 255).floor()


def auto_contrast(x, _v=None):
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    out = (x * scale - lo * scale).floor().clamp(0, 255)
    return torch.where(hi > lo, out, x)


def equalize(x, _v=None):
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(1)        # last non-empty bin
    step = (h * w - hist.gather(1, last[:, None])[:, 0]) // 255
    before = hist.cumsum(1) - hist                                                        # pixels below each bin
    lut = ((step[:, None] // 2 + before) // step.clamp_min(1)[:, None]).clamp(max=255)
    out = lut.gather(1, flat).to(x.dtype).view(b, c, h, w)
    keep = (step == 0).view(b, c, 1, 1)                                                   # one grey level only
    return torch.where(keep, x, out)


def invert(x, _v=None):
    return 255.0 - x


def posterize(x, bits):
    drop = (8 - bits.clamp(0, 8)).to(torch.float32)
    unit = _per_image(2.0 ** drop)
    return torch.floor(x / unit) * unit


def solarize(x, threshold):
    return torch.where(x >= _per_image(threshold), 255.0 - x, x)


def solarize_add(x, add, threshold=128):
    return torch.where(x < threshold, (x + _per_image(add)).clamp(max=255), x)


def color(x, factor):
    return _blend(_grey(x).expand_as(x), x, factor)


def contrast(x, factor):
    mean = torch.floor(_grey(x).mean((1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x, factor):
    """PIL's SMOOTH filter (3x3, centre 5, others 1, /13, rounded), its border pixels left as they are."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = torch.floor(F.conv2d(x, kernel, groups=c) / 13 + 0.5)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def _affine(x, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Output pixel centre (u, v) samples the input at matrix @ (u, v, 1), in pixel units with pixel
    centres at i + 0.5 (PIL's Image.transform(AFFINE) convention); outside the image: `fill`."""
    b, c, h, w = x.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device) + 0.5,
                          torch.arange(w, dtype=x.dtype, device=x.device) + 0.5, indexing="ij")
    pts = torch.stack([u, v, torch.ones_like(u)], -1).view(1, h * w, 3)
    src = pts @ matrix.transpose(1, 2)                                        # (b, HW, 2) input (x, y)
    inside = ((src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)).view(b, 1, h, w)
    grid = torch.stack([2 * src[..., 0] / w - 1, 2 * src[..., 1] / h - 1], -1).view(b, h, w, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside, out, fill.view(1, c, 1, 1)).round().clamp(0, 255)


def _matrices(b, device, a=1.0, bb=0.0, cc=0.0, d=0.0, e=1.0, f=0.0):
    m = torch.zeros(b, 2, 3, device=device)
    for k, val in enumerate((a, bb, cc, d, e, f)):
        m[:, k // 3, k % 3] = val
    return m


def rotate(x, degrees, fill):
    """Counter-clockwise by `degrees` about the image centre, as PIL's Image.rotate."""
    h, w = x.shape[-2:]
    a = -torch.deg2rad(degrees.float())
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2, h / 2
    m = _matrices(len(x), x.device, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return _affine(x, m, fill)


def shear_x(x, factor, fill):
    return _affine(x, _matrices(len(x), x.device, bb=factor), fill)


def shear_y(x, factor, fill):
    return _affine(x, _matrices(len(x), x.device, d=factor), fill)


def translate_x_rel(x, pct, fill):
    return _affine(x, _matrices(len(x), x.device, cc=pct * x.shape[-1]), fill)


def translate_y_rel(x, pct, fill):
    return _affine(x, _matrices(len(x), x.device, f=pct * x.shape[-2]), fill)


# ---------------------------------------------------------------- magnitude -> argument (timm's level functions)

def _signed(v, sign):
    return torch.where(sign, -v, v)


def _enhance(m, sign):
    return 0.1 + 1.8 * m / _DENOM


def _enhance_increasing(m, sign):
    return (1.0 + _signed(0.9 * m / _DENOM, sign)).clamp_min(0.1)


_ARGS = {
    "Rotate": lambda m, s: _signed(30.0 * m / _DENOM, s),
    "Posterize": lambda m, s: torch.floor(4 * m / _DENOM),
    "PosterizeIncreasing": lambda m, s: 4 - torch.floor(4 * m / _DENOM),
    "Solarize": lambda m, s: torch.floor(256 * m / _DENOM).clamp(max=256),
    "SolarizeIncreasing": lambda m, s: 256 - torch.floor(256 * m / _DENOM).clamp(max=256),
    "SolarizeAdd": lambda m, s: torch.floor(110 * m / _DENOM).clamp(max=128),
    "ShearX": lambda m, s: _signed(0.3 * m / _DENOM, s),
    "ShearY": lambda m, s: _signed(0.3 * m / _DENOM, s),
    "TranslateXRel": lambda m, s: _signed(0.45 * m / _DENOM, s),
    "TranslateYRel": lambda m, s: _signed(0.45 * m / _DENOM, s),
}
for _name in ("Color", "Contrast", "Brightness", "Sharpness"):
    _ARGS[_name] = _enhance
    _ARGS[_name + "Increasing"] = _enhance_increasing

_FUNCS = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
          "Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color,
          "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x,
          "ShearY": shear_y, "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _func(name: str):
    return _FUNCS[name.replace("Increasing", "")]


def apply_op(name: str, x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor):
    """One named op on every image of x, at per-image magnitudes (0..10) and negation flags."""
    arg = _ARGS[name](magnitude, sign) if name in _ARGS else None
    if name in _GEOMETRIC:
        return _func(name)(x, arg, fill)
    return _func(name)(x, arg)


class RandAugment:
    """timm's RandAugment: `num_layers` ops per image, each applied with `prob`, magnitude ~ N(m, mstd)."""

    def __init__(self, magnitude: float = 9, num_layers: int = 2, prob: float = 0.5, magnitude_std: float = 0.0,
                 magnitude_max: float = _DENOM, increasing: bool = False, img_mean=(128, 128, 128)):
        self.magnitude, self.num_layers, self.prob = float(magnitude), int(num_layers), float(prob)
        self.magnitude_std, self.magnitude_max = float(magnitude_std), float(magnitude_max)
        self.ops = INCREASING_OPS if increasing else OPS
        self.fill = torch.tensor([float(v) for v in img_mean])

    @classmethod
    def from_string(cls, spec: str, img_mean=(128, 128, 128)) -> "RandAugment":
        """timm's config string, e.g. "rand-m9-mstd0.5-inc1": m magnitude, n layers, p probability,
        mstd magnitude noise (> 100: uniform in [0, m]), mmax upper bound, inc increasing ops."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"--aa {spec!r}: only timm's RandAugment strings ('rand-m9-mstd0.5-inc1') are "
                             "supported")
        kw = {}
        for part in parts[1:]:
            key, val = (re.split(r"(\d.*)", part) + [""])[:2]
            names = {"m": "magnitude", "n": "num_layers", "p": "prob", "mstd": "magnitude_std",
                     "mmax": "magnitude_max", "inc": "increasing"}
            if key not in names or not val:
                raise ValueError(f"--aa {spec!r}: unknown section {part!r} (known: m, n, p, mstd, mmax, inc)")
            try:
                number = float(val)
            except ValueError:
                raise ValueError(f"--aa {spec!r}: {part!r} needs a number") from None
            kw[names[key]] = bool(int(number)) if key == "inc" else number
        if kw.get("magnitude_std", 0) > 100:
            kw["magnitude_std"] = math.inf
        if "num_layers" in kw and (kw["num_layers"] < 0 or kw["num_layers"] != int(kw["num_layers"])):
            raise ValueError(f"--aa {spec!r}: n must be a whole number >= 0")
        return cls(img_mean=img_mean, **kw)

    def draw(self, n: int, g: torch.Generator) -> dict:
        """Every random choice for n images: op ids, applied flags, magnitudes, negation flags (n, layers)."""
        shape = (n, self.num_layers)
        op = torch.randint(len(self.ops), shape, generator=g)
        applied = torch.rand(shape, generator=g) < self.prob
        if self.magnitude_std == math.inf:
            mag = torch.rand(shape, generator=g) * self.magnitude
        else:
            mag = self.magnitude + self.magnitude_std * torch.randn(shape, generator=g)
        mag = mag.clamp(0, self.magnitude_max)
        sign = torch.rand(shape, generator=g) > 0.5
        return {"ra_op": op, "ra_applied": applied, "ra_magnitude": mag, "ra_sign": sign}

    def __call__(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        fill = self.fill.to(x.device)
        fill = fill[:x.shape[1]] if x.shape[1] <= len(fill) else fill[:1].expand(x.shape[1])
        x = x.clone()
        for layer in range(self.num_layers):
            op = params["ra_op"][:, layer].to(x.device)
            on = params["ra_applied"][:, layer].to(x.device)
            for k, name in enumerate(self.ops):
                sel = (op == k) & on
                if sel.any():
                    x[sel] = apply_op(name, x[sel], params["ra_magnitude"][:, layer].to(x.device)[sel],
                                      params["ra_sign"][:, layer].to(x.device)[sel], fill)
        return x
