"""DAFormer: a MiT encoder under a context-aware fusion head, trained by DACS self-training for
unsupervised domain adaptation (labelled source images, unlabelled target images).

Paper: "DAFormer: Improving Network Architectures and Training Strategies for Domain-Adaptive Semantic
Segmentation", Hoyer, Dai and Van Gool, CVPR 2022, arXiv 2111.14887. Official code: lhoyer/DAFormer
(`mmseg/models/decode_heads/daformer_head.py`, `mmseg/models/uda/dacs.py`,
`mmseg/models/utils/dacs_transforms.py`, `mmseg/datasets/uda_dataset.py`, `mmseg/utils/utils.py`;
the final model: `configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py`).

The network, in three lines:
  the MiT encoder of SegFormer (segformer.py) gives four maps, strides 4/8/16/32;
  each is projected to 256 channels by a Linear, upsampled to stride 4 and concatenated (1024 channels);
  an ASPP-like fusion (1x1 conv + depthwise-separable 3x3 convs dilated 6/12/18, BN + ReLU, no image
      pooling) and a 3x3 bottleneck mix context across scales before the 1x1 classifier.

The training (`--objective dacs`, the `DACS` class below), per step:
  1. source cross-entropy, plus the thing-class feature distance (FD) to a frozen copy of the
     initial (ImageNet) model on the last encoder stage, where the downscaled source labels hold
     a thing class;
  2. the EMA teacher (alpha = min(1 - 1/(t+1), 0.999)) labels target images; one scalar weight per
     batch, the share of pixels with confidence >= 0.968;
  3. ClassMix pastes half the source classes onto the target image (labels and weights mixed alike),
     then colour jitter (kornia's old ColorJitter = ColorJiggle) and Gaussian blur; weighted
     cross-entropy on the mixed image.
  Rare Class Sampling (`RareClassSampler`) picks source images: a class by softmax((1 - f_c)/T),
  then an image holding more than `min_pixels` of it.

Choices made here (where the official code is specific to its setting):
- the pseudo-label rows that the final config ignores (15 at the top, 120 at the bottom of 512-px
  Cityscapes crops: the rectification border and the ego car) are off by default (`ignore_top`,
  `ignore_bottom`), since other data has no such artefacts;
- RCS's `min_pixels` (3000 at GTA's full label resolution) scales with the image area when not given:
  3000 / (1914 x 1052) of it; the re-crop loop (up to 10 random crops until the class keeps half of
  `min_pixels`) is not done: the segmentation task's crops are small pad-and-shift crops that keep
  almost all of an image;
- the three backward passes of the official step are two here (source CE + FD in one, as their
  gradients add), mathematically the same update; losses are means over all pixels, ignored ones
  counting as zero, as mmseg 0.16's cross-entropy with a weight does;
- the head's learning rate is not multiplied by 10 (the trainer has one learning rate).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.checkpoint import does_not_fit, release_state_dict
from formers.layers import ConvBnReLU, DropPath, Linear, SepConvBnReLU
from formers.registry import ModelCard, register_model
from formers.train.objectives import Objective, register_objective

from .segformer import SegFormer, map_official_keys
from .upernet import seg_classifier

__all__ = ["DAFormerHead", "DAFormer", "DACS", "RareClassSampler", "rcs_class_probs", "ema_alpha",
           "downscale_label_ratio", "mmseg_cross_entropy", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------------
# The network

class DAFormerHead(nn.Module):
    """Context-aware feature fusion: per level Linear(C_i -> E), bilinear upsampling (align_corners
    False) to the first level's size, concatenation in level order (c1..c4), then the fusion: a 1x1
    ConvBnReLU and depthwise-separable 3x3 ConvBnReLUs dilated by `dilations[1:]`, all over the
    concatenation, their outputs concatenated into a 3x3 ConvBnReLU bottleneck; Dropout2d; 1x1
    classifier (none for num_classes 0)."""

    def __init__(self, in_channels, embed_dim: int = 256, channels: int = 256, num_classes: int = 19,
                 dilations=(1, 6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.channels = channels
        self.num_classes = num_classes
        self.embed = nn.ModuleList([Linear(c, embed_dim) for c in in_channels])
        fused = embed_dim * len(in_channels)
        self.aspp = nn.ModuleList([ConvBnReLU(fused, channels, 1) if d == 1 else SepConvBnReLU(fused, channels, 3, d)
                                   for d in dilations])
        self.bottleneck = ConvBnReLU(channels * len(dilations), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = self.make_classifier(num_classes)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return seg_classifier(self.channels, num_classes)   # mmseg's BaseDecodeHead.conv_seg

    def forward(self, feats):
        size = feats[0].shape[2:]
        levels = []
        for i, f in enumerate(feats):
            y = self.embed[i](f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if i > 0:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            levels.append(y)
        x = torch.cat(levels, dim=1)
        x = self.bottleneck(torch.cat([branch(x) for branch in self.aspp], dim=1))
        return self.classifier(self.dropout(x))


class DAFormer(SegFormer):
    """MiT encoder + DAFormerHead: (B, C, H, W) -> logits (B, num_classes, ceil(H/4), ceil(W/4)).
    Everything but the head is SegFormer's (same encoder, same checkpoints for it)."""

    def __init__(self, num_classes: int = 19, head_dilations=(1, 6, 12, 18), **kwargs):
        self._dilations = tuple(head_dilations)
        super().__init__(num_classes=num_classes, **kwargs)

    def make_head(self, in_channels, decoder_dim: int, num_classes: int, dropout: float) -> nn.Module:
        return DAFormerHead(in_channels, decoder_dim, decoder_dim, num_classes, self._dilations, dropout)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the official UDA files (`model.` = student, `ema_model.` = teacher, `imnet_model.` =
# the frozen FD model; the student is taken, as tools/test.py does), plain mmseg segmentor files
# (`backbone.`, `decode_head.`), MiT ImageNet encoder files, and ours.

_HEAD = [  # official decode_head names -> ours
    (r"^decode_head\.embed_layers\.(\d+)\.proj\.", r"head.embed.\1."),
    (r"^decode_head\.fuse_layer\.aspp_modules\.(\d+)\.depthwise_conv\.", r"head.aspp.\1.depthwise."),
    (r"^decode_head\.fuse_layer\.aspp_modules\.(\d+)\.pointwise_conv\.", r"head.aspp.\1.pointwise."),
    (r"^decode_head\.fuse_layer\.aspp_modules\.(\d+)\.", r"head.aspp.\1."),
    (r"^decode_head\.fuse_layer\.bottleneck\.", "head.bottleneck."),
    (r"^decode_head\.conv_seg\.", "head.classifier."),
]


def checkpoint_filter_fn(state_dict: dict, model: DAFormer) -> dict:
    """Map a DAFormer checkpoint (official or ours) to our key names. An official UDA file gives its
    student (`model.*`); its `ema_model.*` and `imnet_model.*` copies are dropped. An encoder-only file
    (MiT ImageNet weights) leaves the head at its initialisation."""
    sd = release_state_dict(state_dict)
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if any(k.startswith("encoder.stages.") for k in sd):
        return sd
    out, unmapped = map_official_keys(sd, _HEAD)
    if not out or unmapped:
        raise does_not_fit(model, f"{len(unmapped)} key(s) are not those of an official DAFormer / MiT checkpoint: "
                                  f"{unmapped[:4]}")
    if not any(k.startswith("head.") for k in out):
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    return out


# ---------------------------------------------------------------------------------------------
# Variants. The paper's model is MiT-B5 with the fusion head, 19 Cityscapes classes, 512x512 crops.

_CFG = dict(first_conv="encoder.stages.0.patch_embed.proj", classifier="head.classifier", crop_pct=1.0,
            interpolation="bilinear", num_classes=19)
_B5 = dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_dim=256)


@register_model(ModelCard(paper=2, arxiv="2111.14887", repo="lhoyer/DAFormer", official_name="DAFormer (MiT-B5)",
                          params_m="85.2", img_size=512, task="segment",
                          notes="GTA->Cityscapes 68.3 mIoU (released checkpoint 68.85), Synthia->Cityscapes 60.9 "
                                "(16 classes), Cityscapes->ACDC 55.4, Cityscapes->DarkZurich 53.8 (README); "
                                "head 3,712,275 params for 19 classes; trained with --objective dacs"), **_CFG)
def daformer_mitb5(**kwargs):
    return DAFormer(**{**_B5, **kwargs})


@register_model(ModelCard(paper=2, arxiv="2111.14887", repo="lhoyer/DAFormer", official_name="DAFormer head on MiT-B0",
                          img_size=512, status="reduced", task="segment",
                          notes="not in the paper: the fusion head on the smallest MiT, for CPU-sized adaptation "
                                "runs (the mosaic ablation)"), **_CFG)
def daformer_mitb0(**kwargs):
    return DAFormer(**{**dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_dim=256), **kwargs})


# ---------------------------------------------------------------------------------------------
# The pieces of DACS training, each a function with the official semantics

def ema_alpha(step: int, alpha: float = 0.999) -> float:
    """The teacher's momentum at iteration `step` (>= 1): min(1 - 1/(step + 1), alpha)."""
    return min(1.0 - 1.0 / (step + 1), alpha)


def rcs_class_probs(freq: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Rare Class Sampling: P(c) = softmax((1 - f_c) / T) over the classes' pixel frequencies f."""
    freq = torch.as_tensor(freq, dtype=torch.float64)
    return torch.softmax((1.0 - freq / freq.sum()) / temperature, dim=0)


def downscale_label_ratio(labels: torch.Tensor, scale: int, min_ratio: float, num_classes: int,
                          ignore_index: int = 255) -> torch.Tensor:
    """(B, H, W) labels -> (B, H // scale, W // scale): per block the majority class if its share of the
    block (ignore pixels counted as a class of their own) is at least `min_ratio`, else ignore."""
    if scale < 1:
        raise ValueError(f"downscale_label_ratio: scale must be >= 1, got {scale}")
    y = labels.long().clone()
    y[y == ignore_index] = num_classes
    one_hot = F.one_hot(y, num_classes + 1).permute(0, 3, 1, 2).float()
    share, out = F.avg_pool2d(one_hot, kernel_size=scale).max(dim=1)
    out[out == num_classes] = ignore_index
    out[share < min_ratio] = ignore_index
    return out


def mmseg_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                        ignore_index: int = 255) -> torch.Tensor:
    """mmseg 0.16's decode-head loss: scores upsampled to the label size, per-pixel cross-entropy (0 at
    ignored pixels), times the pixel weights, averaged over *all* pixels."""
    if tuple(logits.shape[-2:]) != tuple(y.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), y, reduction="none", ignore_index=ignore_index)
    if weight is not None:
        loss = loss * weight
    return loss.mean()


class RareClassSampler:
    """The source batches of Rare Class Sampling, with EpochSampler's interface: `len(sampler)` batches
    per epoch, `batches(epoch, start)` yields (position, indices). Each index: a class c drawn with
    `rcs_class_probs` of the source pixel frequencies, then an image with more than `min_pixels` pixels of
    c, uniformly. Batch k of epoch e depends only on (seed, e, k), so a resumed run sees the same batches."""

    def __init__(self, labels: torch.Tensor, num_classes: int, batch_size: int, seed: int = 0,
                 temperature: float = 0.01, min_pixels: int = 3000, ignore_index: int = 255):
        n = len(labels)
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
        y = labels.reshape(n, -1).long()
        counts = torch.zeros(n, num_classes + 1, dtype=torch.long)
        counts.scatter_add_(1, torch.where(y == ignore_index, num_classes, y), torch.ones_like(y))
        counts = counts[:, :num_classes]
        total = counts.sum(0)
        self.classes = [c for c in range(num_classes) if total[c] > 0]
        self.pools = {c: torch.nonzero(counts[:, c] > min_pixels).flatten() for c in self.classes}
        empty = [c for c in self.classes if len(self.pools[c]) == 0]
        if empty:
            raise ValueError(f"rare class sampling: classes {empty} have no training image with more than "
                             f"{min_pixels} pixels of them; lower rcs_min_pixels")
        self.probs = rcs_class_probs(total[self.classes].double(), temperature)
        self.num_samples, self.batch_size, self.seed = n, batch_size, seed

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def batches(self, epoch: int, start: int = 0):
        from formers.data.sampler import _mix
        for k in range(start, len(self)):
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, k, 0x5C5))
            picks = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=g)
            idx = [self.pools[self.classes[int(c)]] for c in picks]
            yield k, torch.stack([pool[torch.randint(len(pool), (1,), generator=g)][0] for pool in idx])


def _raw(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)   # DDP's wrapped module


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _losses(out, y, weight, model, ignore_index):
    """The mmseg loss of every score map a model returns, with its `loss_weights` (aux heads)."""
    if not isinstance(out, (tuple, list)):
        return mmseg_cross_entropy(out, y, weight, ignore_index)
    w = getattr(_raw(model), "loss_weights", None) or (1.0,) * len(out)
    return sum(wi * mmseg_cross_entropy(o, y, weight, ignore_index) for wi, o in zip(w, out))


class _Capture:
    """A forward hook that keeps the output of one module while `on`."""

    def __init__(self, module: nn.Module):
        self.on, self.value = False, None
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.on:
            self.value = _first(output)

    @contextlib.contextmanager
    def grab(self):
        self.on, self.value = True, None
        try:
            yield self
        finally:
            self.on = False


@register_objective
class DACS(Objective):
    """DAFormer's self-training (`formers train daformer_mitb0 --dataset mosaic-uda --objective dacs`).

    The data set must carry unlabelled target images (`x_target`, e.g. `mosaic-uda`); the model is
    evaluated on the target test split. Keyword arguments (`--objective-kwargs`), defaults = the final
    DAFormer config except where the module docstring says why:
      alpha 0.999 (teacher EMA cap), pseudo_threshold 0.968, ignore_top / ignore_bottom 0 (pseudo-label
      rows weighted 0), mix "class" (or "none": plain self-training on the target image),
      color_jitter_strength 0.2, color_jitter_p 0.2 (jitter when U(0,1) > p), blur True (when U > 0.5),
      fd_lambda 0.005 (0: no feature distance), fd_classes (default: the data set's thing classes),
      fd_min_ratio 0.75, fd_level -1 (the encoder stage compared), fd_checkpoint (the frozen model's
      weights; default: the student's initial ones), rcs True, rcs_temperature 0.01,
      rcs_min_pixels (default: 3000 scaled to the image area).
    """
    name = "dacs"

    def __init__(self, label_smoothing: float = 0.0, alpha: float = 0.999, pseudo_threshold: float = 0.968,
                 ignore_top: int = 0, ignore_bottom: int = 0, mix: str = "class", color_jitter_strength: float = 0.2,
                 color_jitter_p: float = 0.2, blur: bool = True, fd_lambda: float = 0.005, fd_classes=None,
                 fd_min_ratio: float = 0.75, fd_level: int = -1, fd_checkpoint: str | None = None, rcs: bool = True,
                 rcs_temperature: float = 0.01, rcs_min_pixels: int | None = None):
        super().__init__(label_smoothing)
        if label_smoothing:
            raise ValueError("--objective dacs uses plain cross-entropy; drop --label-smoothing")
        if mix not in ("class", "none"):
            raise ValueError(f"--objective dacs: mix must be 'class' or 'none', got {mix!r}")
        if not 0 <= alpha < 1 or not 0 < pseudo_threshold <= 1 or fd_lambda < 0 or rcs_temperature <= 0:
            raise ValueError("--objective dacs: need 0 <= alpha < 1, 0 < pseudo_threshold <= 1, fd_lambda >= 0 "
                             "and rcs_temperature > 0")
        self.alpha, self.threshold = float(alpha), float(pseudo_threshold)
        self.ignore_top, self.ignore_bottom = int(ignore_top), int(ignore_bottom)
        self.mix, self.jitter_s, self.jitter_p, self.blur = mix, float(color_jitter_strength), float(color_jitter_p), blur
        self.fd_lambda, self.fd_classes, self.fd_min_ratio, self.fd_level = float(fd_lambda), fd_classes, \
            float(fd_min_ratio), int(fd_level)
        self.fd_checkpoint = fd_checkpoint
        self.rcs, self.rcs_temperature, self.rcs_min_pixels = bool(rcs), float(rcs_temperature), rcs_min_pixels
        self.teacher = self.fd_model = None
        self.data = self.transform = None
        self.stats: dict = {}
        self._updated_at = -1        # the last step whose teacher update was made (step 0's copies the student)
        self._calls: tuple[int, int] = (-1, 0)

    # -- set-up, called by the trainer

    def prepare(self, model: nn.Module) -> nn.Module:
        info = getattr(model, "feature_info", None)
        if not info:
            raise ValueError(f"--objective dacs needs a model with feature_info (its encoder stages); "
                             f"{type(model).__name__} has none")
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.fd_lambda > 0:
            # the frozen "ImageNet" model: `fd_checkpoint`'s weights, else the student's initial ones (a
            # pretrained encoder, when the run loads one through --model-kwargs '{"checkpoint": ...}')
            self.fd_model = copy.deepcopy(model).eval()
            if self.fd_checkpoint:
                from formers.checkpoint import load_checkpoint
                load_checkpoint(self.fd_model, self.fd_checkpoint)
            for p in self.fd_model.parameters():
                p.requires_grad_(False)
            module = info[self.fd_level]["module"]
            self._student_feat = _Capture(model.get_submodule(module))
            self._fd_feat = _Capture(self.fd_model.get_submodule(module))
        return model

    def attach(self, data, transform, seed: int, accum: int = 1, rank: int = 0):
        if getattr(data, "x_target", None) is None:
            raise ValueError(f"--objective dacs adapts to unlabelled target images; the {data.name} data set has "
                             "none (use --dataset mosaic-uda, or a data set with x_target)")
        self.data, self.transform, self.seed, self.accum, self.rank = data, transform, seed, accum, rank
        self.num_classes, self.ignore_index = data.num_classes, data.ignore_index
        if self.fd_lambda > 0:
            classes = data.thing_ids if self.fd_classes is None else self.fd_classes
            if not classes:
                raise ValueError(f"--objective dacs: the {data.name} data set names no thing classes; give "
                                 "fd_classes or fd_lambda 0")
            self.fd_class_ids = torch.tensor(sorted(int(c) for c in classes))

    def sampler(self, data, batch_size: int, seed: int):
        if not self.rcs:
            return None
        h, w = data.y_train.shape[-2:]
        min_pixels = self.rcs_min_pixels if self.rcs_min_pixels is not None else round(3000 * h * w / (1914 * 1052))
        return RareClassSampler(data.y_train, data.num_classes, batch_size, seed, self.rcs_temperature,
                                min_pixels, data.ignore_index)

    def state_tensors(self) -> dict:
        return {f"teacher/{k}": v for k, v in self.teacher.state_dict().items()}

    def load_state_tensors(self, tensors: dict, step: int):
        sd = {k[len("teacher/"):]: v for k, v in tensors.items() if k.startswith("teacher/")}
        self.teacher.load_state_dict(sd, strict=True)
        self._updated_at = step - 1   # the teacher was saved before step `step`'s update

    def step_fields(self) -> dict:
        return dict(self.stats)

    # -- one micro-batch

    def _generator(self, step: int) -> torch.Generator:
        from formers.data import step_generator
        last, k = self._calls
        k = k + 1 if last == step else 0
        self._calls = (step, k)
        return step_generator(self.seed, 0xDAC5, step, stream=self.rank * 1024 + k)

    @torch.no_grad()
    def _update_teacher(self, student: nn.Module, step: int):
        a = ema_alpha(step, self.alpha)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)

    @torch.no_grad()
    def _pseudo_labels(self, xt: torch.Tensor):
        """The teacher in training mode (BatchNorm on batch statistics, as the official one runs) but with
        dropout and drop-path off."""
        self.teacher.train()
        for m in self.teacher.modules():
            if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
                m.training = False
        logits = _first(self.teacher(xt)).float()
        logits = F.interpolate(logits, size=xt.shape[-2:], mode="bilinear", align_corners=False)
        prob, label = logits.softmax(1).max(1)
        weight = torch.full_like(prob, float((prob >= self.threshold).float().mean()))
        if self.ignore_top:
            weight[:, :self.ignore_top] = 0
        if self.ignore_bottom:
            weight[:, -self.ignore_bottom:] = 0
        return label, weight

    def _strong(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Colour jitter then blur (each decided once for the batch, drawn per image), as DACS does."""
        from formers.data.strong_aug import color_jiggle, dacs_blur_kernel_size, draw_jiggle, gaussian_blur
        mean, std = self.transform.image.mean.to(x.device), self.transform.image.std.to(x.device)
        jitter, blur = float(torch.rand((), generator=g)), float(torch.rand((), generator=g))
        out = []
        for i in range(len(x)):
            xi = x[i:i + 1]
            if jitter > self.jitter_p and xi.shape[1] == 3:
                f = draw_jiggle(1, self.jitter_s, g)
                xi = (color_jiggle(xi * std + mean, f["brightness"], f["contrast"], f["saturation"], f["hue"],
                                   f["order"]) - mean) / std
            if self.blur and blur > 0.5 and xi.shape[1] == 3:
                sigma = 0.15 + float(torch.rand((), generator=g))
                k = (dacs_blur_kernel_size(xi.shape[2]), dacs_blur_kernel_size(xi.shape[3]))
                xi = gaussian_blur(xi, k, sigma)
            out.append(xi)
        return torch.cat(out)

    def _feature_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feat = self._student_feat.value
        self.fd_model.to(x.device).eval()
        with torch.no_grad(), self._fd_feat.grab():
            self.fd_model(x)
        ref = self._fd_feat.value
        scale = y.shape[-1] // feat.shape[-1]
        coarse = downscale_label_ratio(y, scale, self.fd_min_ratio, self.num_classes, self.ignore_index)
        fh, fw = feat.shape[-2:]
        coarse = F.pad(coarse, (0, max(0, fw - coarse.shape[-1]), 0, max(0, fh - coarse.shape[-2])),
                       value=self.ignore_index)[:, :fh, :fw]
        mask = torch.isin(coarse, self.fd_class_ids.to(y.device))
        dist = (feat.float() - ref.float()).norm(dim=1)
        self.stats["fd_pixels"] = int(mask.sum())
        if not mask.any():      # no thing pixel at this scale: no term (the official mean would be NaN)
            return dist.sum() * 0.0
        return self.fd_lambda * dist[mask].mean()

    def __call__(self, model, x, y, step: int):
        if self.data is None:
            raise RuntimeError("the dacs objective was not attached to its data (Objective.attach)")
        student = _raw(model)
        g = self._generator(step)
        self.teacher.to(x.device)
        if step > self._updated_at:      # at the start of every step; at step 0 (alpha 0) a copy of the student
            self._update_teacher(student, step)
            self._updated_at = step
        # 1. source: cross-entropy (+ feature distance), backward now (as the official first passes)
        sync = getattr(model, "no_sync", None)
        with (sync() if sync is not None else contextlib.nullcontext()):
            with (self._student_feat.grab() if self.fd_model is not None else contextlib.nullcontext()):
                out = model(x)
            src_loss = _losses(out, y, None, model, self.ignore_index)
            fd = self._feature_distance(x, y) if self.fd_model is not None else src_loss.new_zeros(())
            ((src_loss + fd) / self.accum).backward()
        logits = F.interpolate(_first(out).detach(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        # 2. target: pseudo-labels from the teacher
        idx = torch.randint(len(self.data.x_target), (len(x),), generator=g)
        params = self.transform.draw(len(x), g) if self.transform.augments else None
        xt, _ = self.transform(self.data.x_target[idx].to(x.device),
                               torch.zeros((len(x),) + tuple(self.data.x_target.shape[-2:]), dtype=torch.long,
                                           device=x.device), params)
        pseudo, weight = self._pseudo_labels(xt)
        # 3. ClassMix + strong augmentation, weighted cross-entropy on the mixed image
        if self.mix == "class":
            from formers.data.strong_aug import class_mix_masks, one_mix
            masks = class_mix_masks(y, g)
            xm, ym = one_mix(masks, x, xt), one_mix(masks, y, pseudo)
            wm = one_mix(masks, torch.ones_like(weight), weight)
        else:
            xm, ym, wm = xt, pseudo, weight
        xm = self._strong(xm, g)
        mix_loss = _losses(model(xm), ym, wm, model, self.ignore_index)
        self.stats = {"src_loss": float(src_loss.detach()), "fd_loss": float(fd.detach()),
                      "mix_loss": float(mix_loss.detach()),
                      "pseudo_weight": float(weight.max()), **({"fd_pixels": self.stats.get("fd_pixels", 0)}
                                                               if self.fd_model is not None else {})}
        return mix_loss + (src_loss + fd).detach(), logits
