"""Pre-LN -> Pre-RMSNorm and Pre-CRMSNorm (catalog 6): "Pre-RMSNorm and Pre-CRMSNorm
Transformers: Equivalent and Efficient Pre-LN Transformers", Jiang et al., NeurIPS 2023,
arXiv 2305.14858; code ZixuanJiang/pre-rmsnorm-transformer.

Claim: in a Pre-LN transformer every reader of the residual stream is a LayerNorm, and
LN(x) = LN(x - mean(x)), so the stream's mean is never used. Make every layer that writes
into the stream write a zero-mean vector (centre the rows of its weight and its bias), and
each LayerNorm may become an RMSNorm with the same gamma and beta: the outputs are the same
(up to rounding: 1e-10 in fp64, 1e-5 in fp32) and each norm skips its mean. Pre-CRMSNorm
goes one step further: a zero-mean d-vector is stored as its first d-1 entries (the last is
minus their sum), so the stream is one channel narrower and each reader norms the recovered
vector with the compressed formula (layers.CRMSNorm).

How a model is read here. A model is split into *streams*: the tensor that residual blocks
add into, from the layer that creates it (patch embedding, downsampling, a replacing layer)
to the layers that read it at its end. For each stream: its *sources* (the layers whose
output is its initial value: a Linear/Conv, whose rows are recentred, or any other module,
whose output is recentred by a wrapper `Centred`; position tables and class tokens added to
it are recentred in place), its *adders* (each block's output projections), its *norms*
(LayerNorms over the channel axis that read it: the block norms, the next downsampling's
norm, the final norm). A stream that something else reads directly (a convolution with no
norm before it: PVT's and CSWin's downsampling, a conv positional encoding x + dwconv(x),
CrossFormer++'s activation cooling; Swin's patch merging, whose LayerNorm over 2x2 concatenated
tokens sees how their means differ; a per-channel ResScale of the stream; BatchNorm or a
norm over (H, W, C)) carries its mean on to that reader: the transform cannot be exact
there. By default such a model raises TransformError naming each stream and the reason;
`partial=True` converts the streams that allow it and leaves the others with LayerNorm.

Streams are described per family, from the model code: Swin, CSWin and CrossFormer
(ChannelsLastPyramid), PVT, MetaFormer (ConvFormer/CAFormer), T2T-ViT, and plain ViTs (a
`layers.PatchEmbed`, position/class-token parameters, `layers.TransformerBlock`s, a norm). Other models raise
TransformError. With CRMSNorm the unnormalised stage maps that `forward_intermediates`
returns are the compressed (C-1 channels) zero-mean streams; with RMSNorm they are the
original maps minus their channel mean; the normalised outputs and logits are unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from formers.layers import CRMSNorm, LayerNormNoBias, PatchEmbed, RMSNorm, Scale

from .base import TransformError, model_name, record_transform, register_transform

PAPER = 6

__all__ = ["to_rmsnorm", "to_crmsnorm", "describe_streams", "Centred"]

_LAYER_NORMS = (nn.LayerNorm, LayerNormNoBias)


class Centred(nn.Module):
    """`inner`'s output minus its mean over the last (channel) axis; with `compress`, the last
    channel is then dropped (it is minus the sum of the others). For sources of a stream that are
    not a single linear map (a LayerNorm after the patch conv, concatenated convs)."""

    def __init__(self, inner: nn.Module, compress: bool = False):
        super().__init__()
        self.inner = inner
        self.compress = compress

    def forward(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        y = y - y.mean(-1, keepdim=True)
        return y[..., :-1] if self.compress else y


@dataclasses.dataclass
class Stream:
    where: str
    sources: list = dataclasses.field(default_factory=list)   # ("fold", module) | ("centre", module) | ("param", owner, attr)
    adders: list = dataclasses.field(default_factory=list)    # Linear / Conv2d modules whose output is added
    norms: list = dataclasses.field(default_factory=list)     # (LayerNorm module, groups)
    blockers: list = dataclasses.field(default_factory=list)  # why this stream cannot be made zero-mean exactly
    narrow_blockers: list = dataclasses.field(default_factory=list)  # why it cannot be stored one channel narrower

    def summary(self) -> str:
        return (f"{self.where}: {len(self.sources)} source(s), {len(self.adders)} adder(s), {len(self.norms)} norm(s)"
                + (f"; blocked: {'; '.join(self.blockers)}" if self.blockers else ""))


# ----------------------------------------------------------------------------- reading a model


def _out_projection(branch: nn.Module):
    """The last linear map of a residual branch (attention `proj`, MLP `fc2`, SepConv `pwconv2`), or None."""
    for attr in ("fc2", "proj", "pwconv2"):
        m = getattr(branch, attr, None)
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)):
            return m
    return None


class _Walker:
    """Builds the list of streams while a family walker visits the model in forward order."""

    # Pre-norm residual blocks whose forward is exactly x + f(norm1(x)); x + g(norm2(x)) (read in their files).
    BLOCKS = {"formers.models.swin.SwinBlock", "formers.models.cswin.CSWinBlock",
              "formers.models.crossformer.CrossFormerBlock", "formers.models.pvt.Block",
              "formers.models.metaformer.MetaFormerBlock", "formers.models.t2t_vit.Block",
              "formers.layers.transformer_block.TransformerBlock"}

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.streams: list[Stream] = []

    def name(self, m: nn.Module) -> str:
        return self.names.get(id(m), type(m).__name__)

    @property
    def cur(self) -> Stream:
        return self.streams[-1]

    def start(self, where: str, *sources):
        self.streams.append(Stream(where, list(sources)))

    def norm(self, m: nn.Module, groups: int = 1):
        if isinstance(m, _LAYER_NORMS) and len(getattr(m, "normalized_shape", (1,))) == 1:
            self.cur.norms.append((m, groups))
        else:
            self.block(f"{self.name(m)} is {type(m).__name__}, not a LayerNorm over the channel axis")

    def block(self, reason: str):
        self.cur.blockers.append(reason)

    def residual_block(self, blk: nn.Module):
        path = self.name(blk)
        if f"{type(blk).__module__}.{type(blk).__qualname__}" not in self.BLOCKS:
            self.block(f"{path} ({type(blk).__name__}) is not a block this transform has read")
            return
        for norm_attr, branch_attrs in (("norm1", ("attn", "token_mixer")), ("norm2", ("mlp",))):
            self.norm(getattr(blk, norm_attr))
            branch = next(getattr(blk, a) for a in branch_attrs if hasattr(blk, a))
            proj = _out_projection(branch)
            if proj is None:
                self.block(f"{self.name(branch)} ({type(branch).__name__}) ends in no linear map to recentre")
            else:
                self.cur.adders.append(proj)
            if type(branch).__name__ == "MapAttention":
                self.cur.narrow_blockers.append(f"{self.name(branch)} (MapAttention) reshapes its output to its "
                                                "input width, so its projection cannot be one channel narrower")
        for attr in ("cpe", "pos_embed"):
            if isinstance(getattr(blk, attr, None), nn.Conv2d):
                self.block(f"{path}.{attr}: x + dwconv(x) reads the stream itself (a per-channel kernel does not "
                           "commute with removing the mean)")
        for attr in ("res_scale1", "res_scale2", "ls1", "ls2", "layer_scale1", "layer_scale2"):
            if isinstance(getattr(blk, attr, None), Scale):
                self.block(f"{path}.{attr} scales the stream per channel (a zero-mean vector does not stay zero-mean)")


def _walk_pyramid(w: _Walker, model):
    from formers.models.crossformer import ActivationCooling, CrossScaleEmbedding
    from formers.models.cswin import MergeBlock
    from formers.models.swin import PatchMerging
    pe = model.patch_embed
    if isinstance(pe, (PatchEmbed, CrossScaleEmbedding)) and isinstance(pe.norm, _LAYER_NORMS) \
            and not getattr(pe, "norm_first", False):
        w.start("patch_embed", ("centre", pe.norm))
    else:
        raise TransformError(f"{model_name(model)}: patch embedding {type(pe).__name__} is not conv -> LayerNorm")
    for i, stage in enumerate(model.feature_stages):
        ds, where = stage.downsample, w.name(stage)
        if isinstance(ds, PatchMerging):          # concat 2x2 -> LN(4C) -> Linear
            w.block(f"{w.name(ds.norm)} normalises 2x2 tokens side by side: it removes the mean of their four "
                    "means, but reads how those means differ")
            w.start(where, ("fold", ds.reduction))
        elif isinstance(ds, CrossScaleEmbedding):  # LN -> concatenated convs
            w.norm(ds.norm)
            w.start(where, ("centre", ds))
        elif isinstance(ds, MergeBlock):          # conv on the raw stream -> LN
            w.block(f"{w.name(ds.conv)} (3x3 conv) reads the stream itself, with no norm before it")
            w.start(where, ("centre", ds.norm))
        elif not isinstance(ds, nn.Identity):
            raise TransformError(f"{model_name(model)}: downsampling {type(ds).__name__} is not described")
        blocks = getattr(stage, "blocks", None)
        for blk in [stage] if blocks is None else blocks:   # a stage without blocks is not described: a blocker
            w.residual_block(blk)
            cooling = getattr(blk, "cooling", None)
            if isinstance(cooling, ActivationCooling):
                w.block(f"{w.name(cooling.conv)} (activation cooling) applies a depthwise conv to the stream itself")
                w.start(w.name(cooling), ("centre", cooling.norm))
    w.norm(model.norm)


def _walk_pvt(w: _Walker, model):
    for i, stage in enumerate(model.stages):
        if i > 0:
            w.block(f"{w.name(stage.patch_embed.proj)} (the next stage's patch conv) reads the stream itself, "
                    "with no norm before it")
        sources = [("centre", stage.patch_embed.norm), ("param", stage, "pos_embed")]
        if stage.cls_token is not None:
            sources.append(("param", stage, "cls_token"))
        w.start(w.name(stage), *sources)
        for blk in stage.blocks:
            w.residual_block(blk)
    w.norm(model.norm)


def _walk_metaformer(w: _Walker, model):
    from formers.models.metaformer import Downsample
    w.start("stem", ("centre", model.stem.norm))
    for stage in model.stages:
        if isinstance(stage.downsample, Downsample):  # LN -> conv 3x3 s2
            w.norm(stage.downsample.norm)
            w.start(w.name(stage), ("fold", stage.downsample.conv))
        for blk in stage.blocks:
            w.residual_block(blk)
    w.norm(model.norm)


def _is_plain_vit(model) -> bool:
    """A ViT: `patch_embed` (layers.PatchEmbed), optional `cls_token` / `pos_embed` parameters added
    to the tokens, `blocks`, a final `norm` (layers.TransformerBlock models and the tests' toy)."""
    return (isinstance(getattr(model, "patch_embed", None), PatchEmbed) and isinstance(model.blocks, nn.Sequential
            | nn.ModuleList) and isinstance(getattr(model, "norm", None), nn.Module)
            and all(isinstance(getattr(model, a, None), (nn.Parameter, type(None))) for a in ("cls_token", "pos_embed")))


def _walk_plain_vit(w: _Walker, model):
    pe = model.patch_embed
    src = ("fold", pe.proj) if pe.norm is None else ("centre", pe.norm)
    w.start("patch_embed", src, *[("param", model, a) for a in ("pos_embed", "cls_token")
                                  if getattr(model, a, None) is not None])
    for blk in model.blocks:
        w.residual_block(blk)
    w.norm(model.norm)


def _walk_t2t(w: _Walker, model):
    """T2T-ViT: the T2T module ends in a Linear (`project`) that writes the tokens; class token and
    the fixed sinusoid table (a buffer) are added; then plain pre-norm blocks and a final norm."""
    w.start("tokens_to_token", ("fold", model.tokens_to_token.project), ("param", model, "cls_token"),
            ("param", model, "pos_embed"))
    for blk in model.blocks:
        w.residual_block(blk)
    w.norm(model.norm)


def _families():
    from formers.models.base import ChannelsLastPyramid
    from formers.models.metaformer import MetaFormer
    from formers.models.pvt import PyramidVisionTransformer
    from formers.models.t2t_vit import T2TViT
    return [(PyramidVisionTransformer, _walk_pvt), (MetaFormer, _walk_metaformer),
            (ChannelsLastPyramid, _walk_pyramid), (T2TViT, _walk_t2t)]


def _why_not(model: nn.Module) -> list[str]:
    """Reasons a model of a family without a description is no Pre-LN transformer in the paper's sense."""
    reasons, kinds = [], {type(m) for m in model.modules()}
    if any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds):
        reasons.append("it uses BatchNorm (statistics over the batch, not a LayerNorm over the channel axis)")
    if nn.GroupNorm in kinds:
        reasons.append("it normalises with GroupNorm over (C, H, W), not over the channel axis")
    if any(isinstance(getattr(m, a, None), nn.Conv2d) for m in model.modules() for a in ("cpe", "pos_embed")):
        reasons.append("its blocks add a conv positional encoding x + dwconv(x) that reads the stream itself")
    return reasons


def describe_streams(model: nn.Module) -> list[Stream]:
    """The residual streams of `model` with their sources, adders, reader norms and blockers."""
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    walk = next((walk for cls, walk in _families() if isinstance(model, cls)), None)
    if walk is None and _is_plain_vit(model):
        walk = _walk_plain_vit
    if walk is not None:
        w = _Walker(model)
        walk(w, model)
        return w.streams
    reasons = _why_not(model)
    detail = "; ".join(reasons) if reasons else "no description of its residual streams"
    raise TransformError(f"{model_name(model)}: Pre-RMSNorm does not apply to {type(model).__name__}: {detail} "
                         "(described: Swin, CSWin, CrossFormer, PVT, ConvFormer/CAFormer, T2T-ViT, plain ViTs)")


# ----------------------------------------------------------------------------- rewriting it


def _parents(model: nn.Module) -> dict:
    """id(module) -> (parent, attribute name) for every submodule."""
    out = {}
    for parent in model.modules():
        for attr, child in parent.named_children():
            out.setdefault(id(child), (parent, attr))
    return out


def _replace(parents: dict, old: nn.Module, new: nn.Module):
    parent, attr = parents[id(old)]
    setattr(parent, attr, new)
    parents[id(new)] = (parent, attr)


@torch.no_grad()
def _fold(m: nn.Module, compress: bool, parents: dict):
    """Centre a Linear's / Conv2d's output rows (weight and bias); with `compress`, drop the last row."""
    m.weight.sub_(m.weight.mean(0, keepdim=True))
    if m.bias is not None:
        m.bias.sub_(m.bias.mean())
    if not compress:
        return
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features - 1, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
    else:
        new = nn.Conv2d(m.in_channels, m.out_channels - 1, m.kernel_size, m.stride, m.padding, m.dilation,
                        m.groups, m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
    new.weight.copy_(m.weight[:-1])
    if m.bias is not None:
        new.bias.copy_(m.bias[:-1])
    new.train(m.training)
    _replace(parents, m, new)


@torch.no_grad()
def _new_norm(ln: nn.Module, compress: bool, groups: int) -> nn.Module:
    dim = ln.weight.shape[0] if ln.weight is not None else ln.normalized_shape[-1]
    affine, bias = ln.weight is not None, getattr(ln, "bias", None) is not None
    kw = dict(eps=ln.eps, affine=affine, bias=bias)
    new = CRMSNorm(dim, groups=groups, **kw) if compress else RMSNorm(dim, **kw)
    ref = ln.weight if affine else ln.bias
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    if affine:
        new.weight.copy_(ln.weight)
    if bias:
        new.bias.copy_(ln.bias)
    return new.train(ln.training)


@torch.no_grad()
def _convert(model: nn.Module, mode: str, partial: bool) -> nn.Module:
    name = model_name(model)
    streams = describe_streams(model)
    if mode == "crms":
        for s in streams:
            s.blockers += s.narrow_blockers
    blocked = [s for s in streams if s.blockers]
    if blocked and not partial:
        why = " | ".join(f"stream {s.where}: {'; '.join(s.blockers)}" for s in blocked)
        raise TransformError(f"{name}: {len(blocked)} of {len(streams)} residual streams cannot be made zero-mean "
                             f"exactly, so Pre-{mode.upper()}Norm would change the outputs: {why} "
                             "(partial=True converts the others and keeps LayerNorm on these)")
    todo = [s for s in streams if not s.blockers]
    if not todo:
        raise TransformError(f"{name}: no residual stream can be converted: "
                             + " | ".join(f"{s.where}: {'; '.join(s.blockers)}" for s in streams))
    compress = mode == "crms"
    parents = _parents(model)
    for s in todo:
        for ln, groups in s.norms:
            _replace(parents, ln, _new_norm(ln, compress, groups))
        for src in s.sources:
            if src[0] == "fold":
                _fold(src[1], compress, parents)
            elif src[0] == "centre":
                _replace(parents, src[1], Centred(src[1], compress))
            else:
                owner, attr = src[1], src[2]
                p = getattr(owner, attr)
                v = p - p.mean(-1, keepdim=True)
                v = v[..., :-1] if compress else v
                if attr in owner._buffers:       # a fixed table (T2T-ViT's sinusoids) stays a buffer
                    owner._buffers[attr] = v.contiguous()
                else:
                    setattr(owner, attr, nn.Parameter(v.contiguous(), requires_grad=p.requires_grad))
        for m in s.adders:
            _fold(m, compress, parents)
    return model


def to_rmsnorm(model: nn.Module, partial: bool = False) -> nn.Module:
    """Pre-LN -> Pre-RMSNorm in place: every stream-writing layer recentred, every LayerNorm reading
    a stream replaced by an RMSNorm with the same gamma/beta. Same outputs (eval mode).
    Raises TransformError where a stream is read other than through a LayerNorm (see the module
    docstring), unless `partial`, which converts the streams that allow it."""
    _convert(model, "rms", partial)
    return record_transform(model, "rmsnorm", mode="rms", partial=partial)


def to_crmsnorm(model: nn.Module, partial: bool = False) -> nn.Module:
    """Pre-LN -> Pre-CRMSNorm in place: as to_rmsnorm, and each converted stream is stored with one
    channel fewer (its last entry dropped), its readers CRMSNorms that recover it."""
    _convert(model, "crms", partial)
    return record_transform(model, "rmsnorm", mode="crms", partial=partial)


def _rebuild(model: nn.Module, mode: str, partial: bool = False) -> nn.Module:
    return _convert(model, mode, partial)


def _add_arguments(p):
    p.add_argument("--compressed", action="store_true", help="Pre-CRMSNorm (stream one channel narrower)")
    p.add_argument("--partial", action="store_true",
                   help="convert the streams that allow it, keep LayerNorm on the others (else: error)")


def _run(model, args):
    return (to_crmsnorm if args.compressed else to_rmsnorm)(model, partial=args.partial)


register_transform("rmsnorm", "Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm (same outputs, no mean in the norms)",
                   _add_arguments, _run, _rebuild)
