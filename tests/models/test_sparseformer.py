"""SparseFormer specifics: official key mapping, the sparse bilinear sampling against a direct
computation, RoI geometry, adaptive mixing, the token-set intermediates, bootstrapping from a timm ViT.

timm has no SparseFormer; equivalence with the official sparseformer/modeling.py (same weights, logits within
3e-6 for sparseformer_v1_tiny at 224x224 and 160x256, and within 3e-7 for a reduced bootstrapped layout with
PE injection, stage embeddings, a cls token and border sampling) was checked outside the repository.
"""
import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.sparseformer import (AdaptiveMixing, checkpoint_filter_fn, roi_adjust, sample_points,
                                         sampling_locations, sparseformer_from_vit)


def official_keys(conv_dim=96, tokens=49, points=36, widths=(256,) + (512,) * 8, num_classes=1000):
    """Key -> shape of the official v1 SparseFormer state dict, written from its definition (v1 config:
    64 heads, mixing biases, LN transitions, type-1 RoI adjust, pg inner width = width / 4): the early conv,
    initial_roi / initial_embedding tables, per unit norm1 / attn / norm2 / mlp, and in the first two units
    adaptive_mixing, roi_offset_module (+ bias), roi_adjust_module; transitions layers.{k}.0/1; norm, proj."""
    keys = {"feat_extractor.conv1.weight": (conv_dim, 3, 7, 7), "feat_extractor.conv1.bias": (conv_dim,),
            "initial_roi.weight": (tokens, 4), "initial_embedding.weight": (tokens, widths[0])}
    k = 0
    for i, d in enumerate(widths):
        if i and widths[i - 1] != d:
            keys.update({f"layers.{k}.0.weight": (d, widths[i - 1]), f"layers.{k}.0.bias": (d,),
                         f"layers.{k}.1.weight": (d,), f"layers.{k}.1.bias": (d,)})
            k += 1
        p = f"layers.{k}."
        s = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
             "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,)}
        if i < 2:
            inner, po = d // 4, max(points, 32)
            s.update({"adaptive_mixing.parameter_generator.0.weight": (d,),
                      "adaptive_mixing.parameter_generator.0.bias": (d,),
                      "adaptive_mixing.parameter_generator.1.weight": (inner, d),
                      "adaptive_mixing.parameter_generator.1.bias": (inner,),
                      "adaptive_mixing.parameter_generator.2.weight": (conv_dim ** 2 + po * points, inner),
                      "adaptive_mixing.parameter_generator.2.bias": (conv_dim ** 2 + po * points,),
                      "adaptive_mixing.m_beta": (conv_dim,), "adaptive_mixing.s_beta": (po,),
                      "adaptive_mixing.out_proj.weight": (d, conv_dim * po), "adaptive_mixing.out_proj.bias": (d,),
                      "roi_offset_module.0.weight": (d,), "roi_offset_module.0.bias": (d,),
                      "roi_offset_module.1.weight": (2 * points, d), "roi_offset_bias": (2 * points,),
                      "roi_adjust_module.0.weight": (d,), "roi_adjust_module.0.bias": (d,),
                      "roi_adjust_module.1.weight": (4, d)})
        keys.update({p + n: v for n, v in s.items()})
        k += 1
    keys["norm.weight"] = keys["norm.bias"] = (widths[-1],)
    keys["proj.weight"], keys["proj.bias"] = (num_classes, widths[-1]), (num_classes,)
    return keys


def test_official_keys_fully_mapped():
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in official_keys().items()}
    model = formers.create_model("sparseformer_tiny")
    own = model.state_dict()
    mapped = checkpoint_filter_fn({"model": official}, model)
    assert len(mapped) == len(official) == len(own) and set(mapped) == set(own)
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    assert sum(v.numel() for v in official.values()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(mapped["layers.1.fc.weight"], official["layers.1.0.weight"])
    assert torch.equal(mapped["layers.1.norm.bias"], official["layers.1.1.bias"])
    assert torch.equal(mapped["stem.weight"], official["feat_extractor.conv1.weight"])
    assert torch.equal(mapped["latent_roi"], official["initial_roi.weight"])
    assert torch.equal(mapped["head.weight"], official["proj.weight"])
    assert torch.equal(mapped["layers.2.roi_offset_module.1.weight"], official["layers.2.roi_offset_module.1.weight"])
    again = checkpoint_filter_fn(mapped, model)
    assert set(again) == set(mapped) and all(again[k] is mapped[k] for k in mapped)
    assert [u.attn.num_heads for u in model.units()] == [64] * 9  # v1: 64 heads at every width


def _direct_bilinear(feat, points, border: bool):
    """Bilinear interpolation written out: pixel centres at (i + 0.5) / W; the four neighbours weighted by
    the fractional offsets; outside neighbours read 0 ('zeros'), or the coordinate is clamped ('border')."""
    b, c, h, w = feat.shape
    px = points[..., 0] * w - 0.5
    py = points[..., 1] * h - 0.5
    if border:
        px, py = px.clamp(0, w - 1), py.clamp(0, h - 1)
    x0, y0 = px.floor(), py.floor()
    out = 0
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # (B, N, P)
            vals = torch.gather(feat.flatten(2), 2, idx.flatten(1)[:, None].expand(-1, c, -1))
            vals = vals.reshape(b, c, *idx.shape[1:]).permute(0, 2, 3, 1)
            out = out + vals * (wgt * inside)[..., None]
    return out


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_sampling_matches_direct_bilinear(padding_mode):
    torch.manual_seed(0)
    feat = torch.randn(2, 5, 7, 9)
    points = torch.rand(2, 6, 11, 2) * 1.4 - 0.2  # some points fall outside the image
    got = sample_points(feat, points, padding_mode)
    assert got.shape == (2, 6, 11, 5)
    torch.testing.assert_close(got, _direct_bilinear(feat, points, padding_mode == "border"), atol=1e-5, rtol=1e-5)
    # a point on a pixel centre reads that pixel exactly
    centre = torch.tensor([[[[(3 + 0.5) / 9, (2 + 0.5) / 7]]]]).expand(2, 1, 1, 2)
    torch.testing.assert_close(sample_points(feat, centre)[:, 0, 0], feat[:, :, 2, 3])


def test_roi_geometry():
    roi = torch.tensor([[[0.2, 0.4, 0.6, 0.5]]])
    out = roi_adjust(roi, torch.tensor([[[0.5, -1.0, 0.0, torch.log(torch.tensor(2.0))]]]))
    # centre (0.4, 0.45) + (0.5 * 0.4, -1 * 0.1) = (0.6, 0.35); size (0.4, 0.1 * 2)
    torch.testing.assert_close(out, torch.tensor([[[0.4, 0.25, 0.8, 0.45]]]))
    torch.manual_seed(0)
    offsets = torch.randn(1, 1, 36, 2) * 5 + 3  # any scale and shift
    pts = sampling_locations(roi, offsets)
    torch.testing.assert_close(pts.mean(2), torch.tensor([[[0.4, 0.45]]]))  # centred on the RoI
    torch.testing.assert_close(pts.std(2), torch.tensor([[[0.4, 0.1]]]) / 3, atol=1e-5, rtol=1e-4)  # std = size / 3


def test_adaptive_mixing_maths():
    torch.manual_seed(0)
    for bias in (True, False):
        mix = AdaptiveMixing(in_dim=6, num_points=5, dim=16, inner_dim=8, bias=bias).eval()
        for p in mix.parameters():
            torch.nn.init.normal_(p, std=0.3)
        x, sampled = torch.randn(2, 3, 16), torch.randn(2, 3, 5, 6)
        params = mix.parameter_generator(x)
        ch = params[..., :36].reshape(2, 3, 6, 6)
        pt = params[..., 36:].reshape(2, 3, 32, 5)  # 32 output points: max(P, 32)
        y = torch.einsum("bnpc,bncd->bnpd", sampled, ch)
        if bias:
            y = F.gelu(y + mix.m_beta)
        y = torch.einsum("bnqp,bnpd->bnqd", pt, y)
        if bias:
            y = y + mix.s_beta[:, None]
        ref = mix.out_proj(F.gelu(y).flatten(2))
        with torch.no_grad():
            torch.testing.assert_close(mix(sampled, x), ref, atol=1e-5, rtol=1e-5)


def test_init_rois_and_sampling_grid():
    model = formers.create_model("sparseformer_tiny")
    roi = model.latent_roi.detach()
    # token i*7+j: x from i, y from j, half-size boxes spanning [0, 1]
    torch.testing.assert_close(roi[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(roi[1], torch.tensor([0.0, 1 / 12, 0.5, 1 / 12 + 0.5]))
    torch.testing.assert_close(roi[7], torch.tensor([1 / 12, 0.0, 1 / 12 + 0.5, 0.5]))
    torch.testing.assert_close(roi[48], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    grid = model.layers[0].roi_offset_bias.detach().view(36, 2)
    torch.testing.assert_close(grid[1] - grid[0], torch.tensor([1 / 6, 0.0]))  # x varies fastest
    torch.testing.assert_close(grid[6] - grid[0], torch.tensor([0.0, 1 / 6]))
    assert model.layers[0].roi_adjust_module[1].weight.abs().sum() == 0  # RoIs start still
    assert model.no_weight_decay() == {"latent_roi"}


@pytest.mark.parametrize("size", [(32, 48), (97, 64)])
def test_other_input_sizes_and_token_intermediates(size):
    model = formers.create_model("sparseformer_demo").eval()
    x = torch.randn(2, 3 if model.in_chans == 3 else 1, *size)
    with torch.no_grad():
        out = model(x)
        final, feats = model.forward_intermediates(x, output_fmt="NLC")
        tokens, rois = model.forward_latents(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert [tuple(f.shape) for f in feats] == [(2, 16, 64)] + [(2, 16, 96)] * 3
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(model.head(model.norm(tokens.mean(1))), out)  # pool, then the final norm
    assert len(rois) == 4 and rois[-1].shape == (2, 16, 4)
    with pytest.raises(ValueError, match="not a feature map"):
        model.forward_intermediates(x)


def test_bootstrap_from_timm_vit_keeps_each_block_function():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sf = sparseformer_from_vit(vit, num_latent_tokens=16).eval()
    units = sf.units()
    assert len(units) == 2 + 12 and units[0].dim == 96 and units[2].dim == 192
    assert [u.attn.num_heads for u in units[2:]] == [3] * 12 and units[0].attn.num_heads == 1  # head width 64
    tokens = torch.randn(2, 17, 192)
    with torch.no_grad():
        x = tokens
        for blk, unit in zip(vit.blocks, units[2:]):
            torch.testing.assert_close(unit(None, x, None)[0], blk(x), atol=1e-5, rtol=1e-5)
            x = blk(x)
        y = tokens
        for unit in units[2:]:
            y = unit(None, y, None)[0]
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        # head: cls token -> final norm -> classifier, as the ViT's
        torch.testing.assert_close(sf.forward_head(y), vit.forward_head(vit.norm(x)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sf.cls_token, vit.cls_token[0] + vit.pos_embed[0, :1])
        assert sf(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert sf.cls_token_unit == 2 and sf.global_pool == "token"
    # from a state dict, keeping the last 8 blocks (as the official ViT-B configs keep 8 of 12)
    sf8 = sparseformer_from_vit(vit.state_dict(), num_blocks=8, num_heads=3)
    assert len(sf8.units()) == 10
    torch.testing.assert_close(sf8.units()[2].attn.qkv.weight, vit.blocks[4].attn.qkv.weight)


def test_bootstrap_refuses_blocks_it_cannot_copy_and_takes_fc_norm():
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match="ls1.gamma"):
        sparseformer_from_vit(timm.create_model("vit_tiny_patch16_224", init_values=1e-5, depth=2))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, global_pool="avg", class_token=False,
                            fc_norm=True, depth=2)
    sf = sparseformer_from_vit(vit)
    assert sf.global_pool == "avg" and sf.cls_token is None and sf.num_latent_tokens == 49
    assert torch.equal(sf.norm.weight, vit.fc_norm.weight) and torch.equal(sf.head.weight, vit.head.weight)
