"""ResFormer specifics: official key mapping, the global-local positional embedding (the sin-cos map, the
shared zero-initialised V conv), any multiple of the patch size (square or not), per-block features.

timm has no ResFormer. Equivalence with the official image_classification/models.py (same weights, get_v
randomised, logits equal to 4e-7 at 64, 96 and 224 px; it only takes square inputs) was checked outside
the repository.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.resformer import LocalPEAttention, checkpoint_filter_fn, sincos_2d


def official_keys(dim=192, depth=12, heads=3, patch=16, in_chans=3, num_classes=1000, mlp_ratio=4):
    """Key -> shape of the official ResFormer state dict, written from its definition: cls_token,
    patch_embed.proj (conv k=s=patch), pos_embed.embed_layer (3x3 depth-wise conv), blocks.{i} with
    norm1, attn.qkv (bias), attn.proj, attn.get_v (3x3 depth-wise conv over head_dim channels), norm2,
    mlp.fc1, mlp.fc2; then norm and head (pre_logits is an Identity, head_res is None: no keys)."""
    hd, hid = dim // heads, dim * mlp_ratio
    keys = {"cls_token": (1, 1, dim), "patch_embed.proj.weight": (dim, in_chans, patch, patch),
            "patch_embed.proj.bias": (dim,), "pos_embed.embed_layer.weight": (dim, 1, 3, 3),
            "pos_embed.embed_layer.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                     p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                     p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                     p + "attn.get_v.weight": (hd, 1, 3, 3), p + "attn.get_v.bias": (hd,),
                     p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                     p + "mlp.fc1.weight": (hid, dim), p + "mlp.fc1.bias": (hid,),
                     p + "mlp.fc2.weight": (dim, hid), p + "mlp.fc2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim),
                 "head.bias": (num_classes,)})
    return keys


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return formers.create_model("resformer_tiny_patch16").eval()


def test_official_keys_fully_mapped(tiny):
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in official_keys().items()}
    mapped = checkpoint_filter_fn({"model": official}, tiny)
    own = tiny.state_dict()
    assert len(official) == len(mapped) == len(own) == 177
    assert set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    assert sum(v.numel() for v in official.values()) == sum(p.numel() for p in tiny.parameters())
    assert torch.equal(mapped["pos_embed.proj.weight"], official["pos_embed.embed_layer.weight"])
    assert torch.equal(mapped["blocks.7.attn.local_pe.bias"], official["blocks.7.attn.get_v.bias"])
    again = checkpoint_filter_fn(mapped, tiny)
    assert again.keys() == mapped.keys() and all(torch.equal(again[k], mapped[k]) for k in mapped)
    ddp = checkpoint_filter_fn({"module." + k: v for k, v in official.items()}, tiny)
    assert set(ddp) == set(own)


def test_sincos_map_values():
    """Row r (1-based) of an h-row grid sits at angle r / h * 2 pi; channel 2k is sin(angle / T^(2k/(C/2))),
    2k+1 the cos at the same frequency; rows take the first C/2 channels, columns the rest."""
    h, w, c = 3, 5, 16
    m = sincos_2d(h, w, c)[0]
    assert m.shape == (c, h, w)
    r, col = 1, 3                                     # 0-based indices: positions 2 of 3 and 4 of 5
    for k in range(c // 4):
        f = 10000 ** (2 * k / (c // 2))
        ay, ax = 2 / (3 + 1e-6) * 2 * math.pi / f, 4 / (5 + 1e-6) * 2 * math.pi / f
        assert m[2 * k, r, col].item() == pytest.approx(math.sin(ay), abs=1e-6)
        assert m[2 * k + 1, r, col].item() == pytest.approx(math.cos(ay), abs=1e-6)
        assert m[c // 2 + 2 * k, r, col].item() == pytest.approx(math.sin(ax), abs=1e-6)
        assert m[c // 2 + 2 * k + 1, r, col].item() == pytest.approx(math.cos(ax), abs=1e-6)
    # the last row/column sits at 2 pi on every grid: the embedding is a function of relative position
    assert torch.allclose(sincos_2d(7, 7, c)[0, :, -1, -1], sincos_2d(14, 14, c)[0, :, -1, -1], atol=1e-5)


def test_local_pe_is_one_conv_shared_by_heads():
    torch.manual_seed(0)
    attn = LocalPEAttention(24, num_heads=3).eval()
    b, h, w = 2, 3, 4
    x = torch.randn(b, 1 + h * w, 24)
    q, k, v = attn.qkv(x).reshape(b, -1, 3, 3, 8).permute(2, 0, 3, 1, 4)
    plain = F.scaled_dot_product_attention(q, k, v)
    # zero-initialised, as in the official code: a fresh module is plain attention
    assert torch.count_nonzero(attn.local_pe.weight) == 0
    ref = attn.proj(plain.transpose(1, 2).reshape(b, -1, 24))
    torch.testing.assert_close(attn(x, (h, w)), ref)
    with torch.no_grad():
        attn.local_pe.weight.normal_()
        attn.local_pe.bias.normal_()
    out = plain.clone()
    for head in range(3):      # per head, the same conv on that head's V map; the cls token gets nothing
        vmap = v[:, head, 1:].transpose(1, 2).reshape(b, 8, h, w)
        lpe = F.conv2d(vmap, attn.local_pe.weight, attn.local_pe.bias, padding=1, groups=8)
        out[:, head, 1:] += lpe.flatten(2).transpose(1, 2)
    ref = attn.proj(out.transpose(1, 2).reshape(b, -1, 24))
    torch.testing.assert_close(attn(x, (h, w)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (224, 224)])
def test_any_multiple_of_the_patch(tiny, hw):
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = tiny(x)
        final, feats = tiny.forward_intermediates(x, indices=[0, 11])
        tokens = tiny.forward_features(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    h, w = hw[0] // 16, hw[1] // 16
    assert tokens.shape == (1, 1 + h * w, 192)
    assert [f.shape for f in feats] == [(1, 192, h, w)] * 2
    torch.testing.assert_close(final, tokens)
    # the last block's map is the unnormalised patch tokens
    with torch.no_grad():
        normed = tiny.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    torch.testing.assert_close(normed.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_global_pe_is_computed_per_grid(tiny):
    """A non-square grid uses the per-axis map (rows from h, columns from w), not a resampled table."""
    pe = tiny.pos_embed(4, 6)
    ref = F.conv2d(sincos_2d(4, 6, 192), tiny.pos_embed.proj.weight, tiny.pos_embed.proj.bias, padding=1, groups=192)
    torch.testing.assert_close(pe, ref.flatten(2).transpose(1, 2))
    assert not any("pos_embed" in k and v.dim() == 3 for k, v in tiny.state_dict().items())


def test_bad_sizes_and_pooling(tiny):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny(torch.randn(1, 3, 72, 64))
    m = formers.create_model("resformer_demo", num_classes=3, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = m.forward_features(x)
        torch.testing.assert_close(m.forward_head(t, pre_logits=True), t[:, 1:].mean(1))
    assert {"cls_token", "pos_embed.proj.weight", "blocks.0.attn.local_pe.weight"} <= m.no_weight_decay()
