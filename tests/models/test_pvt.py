"""PVT v1 specifics: official key mapping, position-table resizing, the stage-4 cls token,
spatial-reduction attention, and the norms' epsilons.

timm has no PVT v1 (only pvt_v2), so there is no peer to compare logits with here; the
equivalence with the official classification/pvt.py was checked outside the repository.
"""
import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.pvt import SpatialReductionAttention, checkpoint_filter_fn

TINY = dict(depths=(2, 2, 2, 2), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))


def official_keys(depths, dims, mlp_ratios, sr_ratios, img=224, num_classes=1000, in_chans=3):
    """Key -> shape of the official PyramidVisionTransformer state dict, written from its definition:
    per stage i (1-based) a PatchEmbed{i} (conv k=s=4, then 2; LayerNorm), pos_embed{i} over the
    stage grid (+1 entry in the last stage for the cls token), block{i}.{j} with q / kv Linears,
    sr conv + norm only when sr > 1, proj, two LayerNorms and a 2-layer MLP; then cls_token, norm, head."""
    keys, grid, prev = {}, img // 4, in_chans
    for i, (depth, d, m, sr) in enumerate(zip(depths, dims, mlp_ratios, sr_ratios), start=1):
        patch = 4 if i == 1 else 2
        grid = grid if i == 1 else grid // 2
        keys[f"patch_embed{i}.proj.weight"] = (d, prev, patch, patch)
        keys[f"patch_embed{i}.proj.bias"] = (d,)
        keys[f"patch_embed{i}.norm.weight"] = keys[f"patch_embed{i}.norm.bias"] = (d,)
        keys[f"pos_embed{i}"] = (1, grid * grid + (i == len(depths)), d)
        for j in range(depth):
            b = f"block{i}.{j}."
            shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.q.weight": (d, d), "attn.q.bias": (d,),
                      "attn.kv.weight": (2 * d, d), "attn.kv.bias": (2 * d,), "attn.proj.weight": (d, d),
                      "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                      "mlp.fc1.weight": (d * m, d), "mlp.fc1.bias": (d * m,),
                      "mlp.fc2.weight": (d, d * m), "mlp.fc2.bias": (d,)}
            if sr > 1:
                shapes.update({"attn.sr.weight": (d, d, sr, sr), "attn.sr.bias": (d,),
                               "attn.norm.weight": (d,), "attn.norm.bias": (d,)})
            keys.update({b + k: v for k, v in shapes.items()})
        prev = d
    keys["cls_token"] = (1, 1, dims[-1])
    keys["norm.weight"] = keys["norm.bias"] = (dims[-1],)
    keys["head.weight"], keys["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    return keys


def _random_official_sd(seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in official_keys(**cfg).items()}


@pytest.fixture(scope="module")
def official_sd():
    return _random_official_sd(**TINY)


def test_official_keys_fully_mapped(official_sd):
    model = formers.create_model("pvt_tiny")
    own = model.state_dict()
    mapped = checkpoint_filter_fn({"model": official_sd}, model)  # the release's wrapper
    assert len(mapped) == len(official_sd) == len(own)
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    assert sum(v.numel() for v in official_sd.values()) == sum(p.numel() for p in model.parameters())
    # a few names spelled out: the cls token lives in the last stage
    assert torch.equal(mapped["stages.3.cls_token"], official_sd["cls_token"])
    assert torch.equal(mapped["stages.1.blocks.1.attn.sr.weight"], official_sd["block2.1.attn.sr.weight"])
    assert torch.equal(mapped["stages.0.patch_embed.norm.bias"], official_sd["patch_embed1.norm.bias"])
    # our own state dict passes through unchanged
    again = checkpoint_filter_fn(mapped, model)
    assert set(again) == set(mapped) and all(torch.equal(again[k], mapped[k]) for k in mapped)


def test_cls_token_only_in_last_stage():
    model = formers.create_model("pvt_tiny").eval()
    assert [s.cls_token is not None for s in model.stages] == [False, False, False, True]
    assert [tuple(s.pos_embed.shape) for s in model.stages] == [
        (1, 56 * 56, 64), (1, 28 * 28, 128), (1, 14 * 14, 320), (1, 7 * 7 + 1, 512)]
    assert [s.sr_ratio for s in (st.blocks[0].attn for st in model.stages)] == [8, 4, 2, 1]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (1, 50, 512)
        # the classifier reads token 0 (the cls token) after the final norm
        torch.testing.assert_close(model(x), model.head(tokens[:, 0]))
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, tokens)
        assert [m.shape[1:] for m in maps] == [(64, 56, 56), (128, 28, 28), (320, 14, 14), (512, 7, 7)]
        # the stage-4 map is the patch tokens only (cls dropped); norm=True gives the normalised ones
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed.flatten(2).transpose(1, 2), tokens[:, 1:])
    assert model.no_weight_decay() == {"stages.3.cls_token"}  # the official recipe decays pos tables


def test_norm_eps_and_cfg():
    """Block and final norms use eps 1e-6, but the official PatchEmbed and SRA norms are plain
    nn.LayerNorm (1e-5); an atol-1e-5 logit check does not notice the difference, so check it here."""
    model = formers.create_model("pvt_tiny")
    for s in model.stages:
        assert s.patch_embed.norm.eps == 1e-5
        for blk in s.blocks:
            assert blk.norm1.eps == blk.norm2.eps == 1e-6
            if blk.attn.sr_ratio > 1:
                assert blk.attn.norm.eps == 1e-5
    assert model.norm.eps == 1e-6
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"  # official eval: Resize(256), crop 224
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).stride == (4, 4)


def test_drop_path_rises_linearly_over_all_blocks():
    model = formers.create_model("pvt_small", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "p", 0.0) for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 16))


def test_spatial_reduction_attention_maths():
    torch.manual_seed(0)
    dim, heads, sr, (h, w) = 20, 4, 2, (4, 6)
    attn = SpatialReductionAttention(dim, heads, sr).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, h * w, dim)
    # reference: K/V from the conv-reduced, normalised map; heads split the channels in order
    red = F.conv2d(x.transpose(1, 2).reshape(2, dim, h, w), attn.sr.weight, attn.sr.bias, stride=sr)
    red = F.layer_norm(red.flatten(2).transpose(1, 2), (dim,), attn.norm.weight, attn.norm.bias, 1e-5)
    q = (x @ attn.q.weight.T + attn.q.bias).reshape(2, h * w, heads, -1)
    kv = red @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :dim].reshape(2, -1, heads, dim // heads), kv[..., dim:].reshape(2, -1, heads, dim // heads)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * (dim // heads) ** -0.5
    out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(2, h * w, dim)
    ref = out @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (h, w)), ref, atol=1e-5, rtol=1e-5)
    assert k.shape[1] == (h // sr) * (w // sr)


@pytest.mark.parametrize("size", [(320, 320), (256, 320)])
def test_pos_embed_resized_for_other_inputs(official_sd, size):
    """A 224 model with official weights runs at other sizes by resizing its tables on the fly;
    a model built for that size, loading the same 224 checkpoint (resized once by the filter),
    gives the same logits; the resizing is bilinear (align_corners=False) and keeps the cls entry."""
    m224 = formers.create_model("pvt_tiny").eval()
    m224.load_state_dict(checkpoint_filter_fn(official_sd, m224))
    mbig = formers.create_model("pvt_tiny", img_size=size).eval()
    mbig.load_state_dict(checkpoint_filter_fn(official_sd, mbig))
    h4, w4 = size[0] // 32, size[1] // 32
    pos4 = mbig.stages[3].pos_embed
    assert pos4.shape == (1, 1 + h4 * w4, 512)
    assert torch.equal(pos4[:, 0], official_sd["pos_embed4"][:, 0])
    grid = official_sd["pos_embed4"][:, 1:].reshape(1, 7, 7, 512).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(h4, w4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pos4[:, 1:], expect)
    assert mbig.stages[0].pos_embed.shape == (1, size[0] // 4 * size[1] // 4, 64)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = m224(x)
        torch.testing.assert_close(out, mbig(x), atol=1e-5, rtol=1e-5)
        maps = m224.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]


def test_input_must_be_multiple_of_32():
    model = formers.create_model("pvt_tiny")
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 224, 240))
    with pytest.raises(ValueError, match="multiple of 32"):
        formers.create_model("pvt_tiny", img_size=200)
