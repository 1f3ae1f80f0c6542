"""CrossViT specifics: official and timm key mapping, equivalence with timm's CrossVit, the resize of
the input for the large-patch branch, other input sizes, CLS-only cross-attention, the averaged heads.

The equivalence with the official models/crossvit.py (same weights -> same logits, tiny, 9-dagger and
15-dagger-408) was checked outside the repository; timm's port is the peer tested here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.crossvit import CrossAttention, checkpoint_filter_fn

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=(96, 192), depths=((1, 4),) * 3, mlp_ratio=(4, 4), multi_conv=False)
NINE_DAGGER = dict(embed_dim=(128, 256), depths=((1, 3),) * 3, mlp_ratio=(3, 3), multi_conv=True)


def official_keys(embed_dim, depths, mlp_ratio, multi_conv, img_size=(240, 224), patch_size=(12, 16),
                  num_classes=1000, in_chans=3):
    """Key -> shape of the official VisionTransformer state dict, written from its definition: per
    branch b a patch embedding (one conv k=s=patch, or three convs 7x7 -> 3x3 -> 3x3 at proj.0/2/4),
    ParameterLists pos_embed.b / cls_token.b; per MultiScaleBlock i the branch blocks (timm Block),
    projs.b and revert_projs.b (LayerNorm, GELU, Linear at .0/.2) and fusion.b (a CrossAttentionBlock
    on the partner's width: norm1, attn.wq/wk/wv/proj); then norm.b and head.b."""
    keys, n = {}, len(embed_dim)
    for b, (s, p, d) in enumerate(zip(img_size, patch_size, embed_dim)):
        if multi_conv:
            for j, (co, ci, k) in zip((0, 2, 4), ((d // 4, in_chans, 7), (d // 2, d // 4, 3), (d, d // 2, 3))):
                keys[f"patch_embed.{b}.proj.{j}.weight"], keys[f"patch_embed.{b}.proj.{j}.bias"] = (co, ci, k, k), (co,)
        else:
            keys[f"patch_embed.{b}.proj.weight"], keys[f"patch_embed.{b}.proj.bias"] = (d, in_chans, p, p), (d,)
        keys[f"pos_embed.{b}"] = (1, 1 + (s // p) ** 2, d)
        keys[f"cls_token.{b}"] = (1, 1, d)
    for i, depth in enumerate(depths):
        for b, d in enumerate(embed_dim):
            o = embed_dim[(b + 1) % n]
            h = int(d * mlp_ratio[b])
            for j in range(depth[b]):
                pre = f"blocks.{i}.blocks.{b}.{j}."
                keys.update({pre + k: v for k, v in {
                    "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                    "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                    "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,),
                }.items()})
            for name, (di, do) in (("projs", (d, o)), ("revert_projs", (o, d))):
                pre = f"blocks.{i}.{name}.{b}."
                keys.update({pre + "0.weight": (di,), pre + "0.bias": (di,), pre + "2.weight": (do, di),
                             pre + "2.bias": (do,)})
            pre = f"blocks.{i}.fusion.{b}."
            keys[pre + "norm1.weight"] = keys[pre + "norm1.bias"] = (o,)
            for lin in ("wq", "wk", "wv", "proj"):
                keys[pre + f"attn.{lin}.weight"], keys[pre + f"attn.{lin}.bias"] = (o, o), (o,)
    for b, d in enumerate(embed_dim):
        keys[f"norm.{b}.weight"] = keys[f"norm.{b}.bias"] = (d,)
        keys[f"head.{b}.weight"], keys[f"head.{b}.bias"] = (num_classes, d), (num_classes,)
    return keys


def _random_sd(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in keys.items()}


@pytest.mark.parametrize("name,cfg", [("crossvit_tiny_240", TINY), ("crossvit_9_dagger_240", NINE_DAGGER)])
def test_official_keys_fully_mapped(name, cfg):
    with torch.device("meta"):
        model = formers.create_model(name)
    own = model.state_dict()
    official = official_keys(**cfg)
    mapped = checkpoint_filter_fn(_random_sd(official), model)
    assert set(mapped) == set(own)
    assert len(official) == len(own)
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    assert sum(math.prod(s) for s in official.values()) == sum(p.numel() for p in model.parameters())


def _timm_pair(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    model = formers.create_model(name).eval()
    model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model), strict=True)
    return ref, model


@pytest.mark.parametrize("name", ["crossvit_9_240", "crossvit_9_dagger_240"])
def test_timm_equivalence(name):
    ref, model = _timm_pair(name)
    assert {"pos_embed_0", "cls_token_1"} <= set(ref.state_dict())  # timm's flattened names were mapped
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
        ours = model.forward_intermediates(x, indices=[0, 2, 3, 5], intermediates_only=True)
        theirs = ref.forward_intermediates(x, indices=[0, 2, 3, 5], intermediates_only=True)
    assert [t.shape[-1] for t in ours] == [20, 20, 14, 14]  # branch-major: small patches, then large
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert model.feature_info == [{k: v for k, v in f.items()} for f in ref.feature_info]


def test_large_patch_branch_sees_the_input_resized_bicubically():
    model = formers.create_model("crossvit_9_240").eval()
    seen = []
    hooks = [pe.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for pe in model.patch_embed]
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert seen[0] is x
    torch.testing.assert_close(seen[1], F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False))
    assert [tuple(p.shape) for p in model.pos_embed] == [(1, 401, 128), (1, 197, 256)]


def test_408_variant_branch_sizes():
    with torch.device("meta"):
        model = formers.create_model("crossvit_15_dagger_408")
    assert model._branch_size((408, 408), 1) == (384, 384)
    assert model.grids == [34, 24]


def test_other_input_sizes_and_resized_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = formers.create_model("crossvit_9_240").eval()
    x = torch.randn(1, 3, 336, 480)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
    assert out.shape == (1, 1000)
    # the small branch keeps 336x480 (28x40 patches of 12); the large one is resized to 14/15 of it,
    # rounded to multiples of 16: 320x448 (20x28 patches)
    assert [tuple(f.shape) for f in feats] == [(1, 128, 28, 40), (1, 256, 20, 28)]
    # weights of the 240 model loaded into one built for 480 px: tables resized once, same outputs
    path = str(tmp_path / "w.pth")
    torch.save(model.state_dict(), path)
    big = formers.create_model("crossvit_9_240", img_size=480, checkpoint=path).eval()
    assert [tuple(p.shape) for p in big.pos_embed] == [(1, 1 + 40 * 40, 128), (1, 1 + 28 * 28, 256)]
    y = torch.randn(1, 3, 480, 480)
    with torch.no_grad():
        torch.testing.assert_close(big(y), model(y), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 12"):
        model(torch.randn(1, 3, 250, 240))


def test_gray_checkpoint_converts_both_branch_stems(tmp_path):
    torch.manual_seed(0)
    rgb = formers.create_model("crossvit_9_dagger_240")
    path = str(tmp_path / "w.pth")
    torch.save({"model": rgb.state_dict()}, path)
    gray = formers.create_model("crossvit_9_dagger_240", in_chans=1, checkpoint=path).eval()
    for b in range(2):
        torch.testing.assert_close(gray.patch_embed[b].proj[0].weight,
                                   rgb.patch_embed[b].proj[0].weight.sum(1, keepdim=True))
    x = torch.randn(1, 1, 240, 240)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_cross_attention_is_the_cls_query_over_all_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    q = attn.wq(x[:, :1]).reshape(2, 1, 4, 8).transpose(1, 2)
    k = attn.wk(x).reshape(2, 7, 4, 8).transpose(1, 2)
    v = attn.wv(x).reshape(2, 7, 4, 8).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)
    expected = attn.proj((w @ v).transpose(1, 2).reshape(2, 1, 32))
    torch.testing.assert_close(attn(x), expected)


def test_fusion_changes_only_the_cls_tokens():
    torch.manual_seed(0)
    model = formers.create_model("crossvit_demo").eval()
    blk = model.blocks[0]
    xs = [torch.randn(2, 65, 48), torch.randn(2, 17, 96)]
    with torch.no_grad():
        after_blocks = [b(x) for b, x in zip(blk.blocks, xs)]
        out = blk(xs)
    for a, o in zip(after_blocks, out):
        torch.testing.assert_close(o[:, 1:], a[:, 1:])
        assert not torch.allclose(o[:, :1], a[:, :1])


def test_head_averages_the_branch_logits_and_pre_logits_concatenate():
    torch.manual_seed(0)
    model = formers.create_model("crossvit_demo", num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        xs = model.forward_features(x)
        pooled = model.forward_head(xs, pre_logits=True)
        expected = (model.head[0](xs[0][:, 0]) + model.head[1](xs[1][:, 0])) / 2
        torch.testing.assert_close(model(x), expected)
    assert pooled.shape == (3, 48 + 96) == (3, model.num_features)


def test_demo_learns_a_fixed_batch(fit_losses):
    torch.manual_seed(0)
    model = formers.create_model("crossvit_demo", num_classes=4, in_chans=1)
    losses = fit_losses(model, torch.randn(16, 1, 32, 32), torch.arange(16) % 4, steps=25)
    assert losses[-1] < 0.5 * losses[0]


def test_grad_checkpointing_gives_the_same_gradients(assert_checkpointing_exact):
    torch.manual_seed(0)
    assert_checkpointing_exact(formers.create_model("crossvit_demo", num_classes=3), torch.randn(2, 3, 32, 32))
