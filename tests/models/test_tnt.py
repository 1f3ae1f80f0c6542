"""TNT specifics: official and timm key mapping (qk + v -> qkv), equivalence with timm's TNT, words
embedded per patch, other input sizes, the 0.5 mean/std config.

The equivalence with the official tnt_pytorch/tnt.py (same weights -> same logits, TNT-S) was
checked outside the repository; timm's port is the peer tested here.
"""
import math

import pytest
import torch

import formers
from formers.models.tnt import checkpoint_filter_fn

timm = pytest.importorskip("timm")


def official_keys(outer_dim=384, inner_dim=24, depth=12, patch=16, inner_stride=4, img=224, mlp_ratio=4,
                  num_classes=1000, in_chans=3):
    """Key -> shape of the official TNT state dict, written from its definition: patch_embed.proj (the
    7x7 word conv), proj_norm1 / proj / proj_norm2 (words -> patch token, proj with bias), cls_token,
    outer_tokens (unused), outer_pos, inner_pos (words, c); per block the inner and outer attention
    (qk: 2*dim x dim and v: dim x dim without bias, proj with bias), their norms and MLPs, and the
    block's proj_norm1 / proj (no bias) / proj_norm2; then norm and head."""
    words = math.ceil(patch / inner_stride) ** 2
    n = (img // patch) ** 2
    c, d, wc = inner_dim, outer_dim, words * inner_dim
    keys = {"patch_embed.proj.weight": (c, in_chans, 7, 7), "patch_embed.proj.bias": (c,),
            "proj_norm1.weight": (wc,), "proj_norm1.bias": (wc,), "proj.weight": (d, wc), "proj.bias": (d,),
            "proj_norm2.weight": (d,), "proj_norm2.bias": (d,), "cls_token": (1, 1, d),
            "outer_tokens": (1, n, d), "outer_pos": (1, n + 1, d), "inner_pos": (1, words, c)}
    for i in range(depth):
        for side, dim in (("inner", c), ("outer", d)):
            pre = f"blocks.{i}.{side}_"
            keys.update({pre + k: v for k, v in {
                "norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qk.weight": (2 * dim, dim),
                "attn.v.weight": (dim, dim), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (mlp_ratio * dim, dim),
                "mlp.fc1.bias": (mlp_ratio * dim,), "mlp.fc2.weight": (dim, mlp_ratio * dim), "mlp.fc2.bias": (dim,),
            }.items()})
        keys.update({f"blocks.{i}.proj_norm1.weight": (wc,), f"blocks.{i}.proj_norm1.bias": (wc,),
                     f"blocks.{i}.proj.weight": (d, wc), f"blocks.{i}.proj_norm2.weight": (d,),
                     f"blocks.{i}.proj_norm2.bias": (d,)})
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "head.weight": (num_classes, d), "head.bias": (num_classes,)})
    return keys


def test_official_keys_fully_mapped():
    with torch.device("meta"):
        model = formers.create_model("tnt_s_patch16_224")
    own = model.state_dict()
    official = official_keys()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in official.items()}
    mapped = checkpoint_filter_fn(sd, model)
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    # everything but the unused outer_tokens is a parameter of ours
    assert sum(math.prod(s) for k, s in official.items() if k != "outer_tokens") == \
        sum(p.numel() for p in model.parameters())
    # qk rows first, then v: q, k, v in our fused projection
    qkv = mapped["blocks.3.inner.attn.qkv.weight"]
    assert torch.equal(qkv[:48], sd["blocks.3.inner_attn.qk.weight"])
    assert torch.equal(qkv[48:], sd["blocks.3.inner_attn.v.weight"])
    assert torch.equal(mapped["pixel_pos_embed"], sd["inner_pos"])
    assert torch.equal(mapped["pos_embed"], sd["outer_pos"])


def test_timm_equivalence_tnt_s():
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224", pretrained=False).eval()
    assert tuple(ref.state_dict()["pixel_pos"].shape) == (1, 24, 4, 4)  # timm's own layout, remapped
    model = formers.create_model("tnt_s_patch16_224").eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
        ours = model.forward_intermediates(x, indices=[2, 11], intermediates_only=True)
        theirs = ref.forward_intermediates(x, indices=[2, 11], intermediates_only=True)
    for a, b in zip(ours, theirs):
        assert a.shape == (1, 384, 14, 14)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_timm_equivalence_other_config():
    """timm's TNT class on the demo's geometry (8 px patches, inner stride 2), qkv_bias on, a
    non-square input: the mapping does not depend on the 16/4 numbers."""
    from timm.models.tnt import TNT as TimmTNT
    torch.manual_seed(0)
    cfg = dict(img_size=(32, 48), patch_size=8, embed_dim=96, inner_dim=16, depth=2, num_heads_outer=4,
               num_heads_inner=2, first_stride=2, qkv_bias=True, num_classes=7)
    ref = TimmTNT(**cfg).eval()
    model = formers.create_model("tnt_demo", img_size=(32, 48), depth=2, qkv_bias=True, num_classes=7).eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_words_are_embedded_within_their_patch():
    """The word conv runs on each 16x16 patch alone (zero-padded at its border, not at the image's),
    so pixels of one patch never reach another patch's words."""
    torch.manual_seed(0)
    model = formers.create_model("tnt_s_patch16_224").eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :16, 16:] += 1.0  # patch (0, 1)
    with torch.no_grad():
        wx, wy = model.pixel_embed(x), model.pixel_embed(y)
    assert wx.shape == (4, 16, 24)
    torch.testing.assert_close(wx[[0, 2, 3]], wy[[0, 2, 3]], rtol=0, atol=0)
    assert not torch.allclose(wx[1], wy[1])
    # equal to the conv of the patch alone
    torch.testing.assert_close(wx[1], model.pixel_embed.proj(x[..., :16, 16:]).flatten(2).transpose(1, 2)[0])


def test_other_input_sizes_and_resized_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = formers.create_model("tnt_demo").eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 96, 6, 8), (1, 96, 6, 8)]
    path = str(tmp_path / "w.pth")
    torch.save({"state_dict": model.state_dict()}, path)
    big = formers.create_model("tnt_demo", img_size=64, checkpoint=path).eval()
    assert big.pos_embed.shape == (1, 1 + 8 * 8, 96)
    y = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(big(y), model(y), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, 3, 36, 32))


def test_config_uses_the_official_normalisation():
    info = formers.model_info("tnt_s_patch16_224")
    assert info["pretrained_cfg"]["mean"] == info["pretrained_cfg"]["std"] == (0.5, 0.5, 0.5)
    assert info["params_m"] == "23.8" and info["macs_g"] == 5.2


def test_demo_learns_a_fixed_batch(fit_losses):
    torch.manual_seed(0)
    model = formers.create_model("tnt_demo", num_classes=4, in_chans=1)
    losses = fit_losses(model, torch.randn(16, 1, 32, 32), torch.arange(16) % 4, steps=20)
    assert losses[-1] < 0.5 * losses[0]


def test_grad_checkpointing_gives_the_same_gradients(assert_checkpointing_exact):
    torch.manual_seed(0)
    assert_checkpointing_exact(formers.create_model("tnt_demo", num_classes=3), torch.randn(2, 3, 32, 32))
