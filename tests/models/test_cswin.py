"""CSWin: official checkpoints map key by key; the reshaped stripe attention equals a stripe-by-stripe
reference (both branches, LePE per stripe, the scale, padded stripes masked or not); any size works.

timm has no CSWin, so there is no peer to compare against here; the logits were checked against the
official microsoft/CSWin-Transformer code outside the repository (see the model file's docstring).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.cswin import CrossShapedAttention, CSWinTransformer, checkpoint_filter_fn

TINY = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), img=224)


def official_cswin_keys(embed_dim, depths, num_heads, split_size, img, num_classes=1000, mlp_ratio=4):
    """Key names and shapes of a microsoft/CSWin-Transformer `CSWinTransformer` state dict, as its
    model definition lays them out: a Sequential stem (conv at index 0, LN at 2), blocks in
    `stage{s}.{j}` with `qkv`/`proj` on the block and one depthwise `attns.{b}.get_v` per branch
    (one branch, over all channels, in the last stage or where the map equals the stripe width),
    `merge{s}` (conv 3x3 + LN) between stages; no buffers."""
    keys = {"stage1_conv_embed.0.weight": (embed_dim, 3, 7, 7), "stage1_conv_embed.0.bias": (embed_dim,),
            "stage1_conv_embed.2.weight": (embed_dim,), "stage1_conv_embed.2.bias": (embed_dim,)}
    res, n = img // 4, len(depths)
    for i, depth in enumerate(depths):
        dim = embed_dim * 2 ** i
        one_branch = i == n - 1 or res == split_size[i]
        branch_dim = dim if one_branch else dim // 2
        for j in range(depth):
            p = f"stage{i + 1}.{j}."
            keys.update({p + "qkv.weight": (3 * dim, dim), p + "qkv.bias": (3 * dim,),
                         p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                         p + "proj.weight": (dim, dim), p + "proj.bias": (dim,),
                         p + "mlp.fc1.weight": (mlp_ratio * dim, dim), p + "mlp.fc1.bias": (mlp_ratio * dim,),
                         p + "mlp.fc2.weight": (dim, mlp_ratio * dim), p + "mlp.fc2.bias": (dim,),
                         p + "norm2.weight": (dim,), p + "norm2.bias": (dim,)})
            for b in range(1 if one_branch else 2):
                keys[p + f"attns.{b}.get_v.weight"] = (branch_dim, 1, 3, 3)
                keys[p + f"attns.{b}.get_v.bias"] = (branch_dim,)
        if i < n - 1:
            keys.update({f"merge{i + 1}.conv.weight": (2 * dim, dim, 3, 3), f"merge{i + 1}.conv.bias": (2 * dim,),
                         f"merge{i + 1}.norm.weight": (2 * dim,), f"merge{i + 1}.norm.bias": (2 * dim,)})
            res = math.ceil(res / 2)
    dim = embed_dim * 2 ** (n - 1)
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim),
                 "head.bias": (num_classes,)})
    return keys


@pytest.fixture(scope="module")
def official_tiny():
    g = torch.Generator().manual_seed(0)
    return {k: 0.02 * torch.randn(s, generator=g) for k, s in official_cswin_keys(**TINY).items()}


def test_official_keys_all_mapped(official_tiny, tmp_path):
    sd = official_tiny
    assert len(sd) == 418  # what the official definition saves for CSWin-T (checked against it)
    assert sum(v.numel() for v in sd.values()) == 22_320_552  # CSWin-T: 22.32M (the paper rounds to 23M)
    path = str(tmp_path / "cswin_tiny_224.pth")
    torch.save({"state_dict_ema": sd, "state_dict": sd}, path)  # timm-train layout of the release files
    model = formers.create_model("cswin_64_12211_tiny_224", checkpoint=path)  # strict: every tensor used
    own = model.state_dict()
    assert len(own) == len(sd)
    assert all(own[k].shape == v.shape for k, v in checkpoint_filter_fn(sd, model).items())
    pairs = {"stage1_conv_embed.0.weight": "patch_embed.proj.weight",
             "stage1_conv_embed.2.bias": "patch_embed.norm.bias",
             "stage3.20.qkv.weight": "stages.2.blocks.20.attn.qkv.weight",
             "stage2.1.attns.1.get_v.weight": "stages.1.blocks.1.attn.lepe.1.weight",
             "stage4.0.attns.0.get_v.bias": "stages.3.blocks.0.attn.lepe.0.bias",
             "merge3.conv.weight": "stages.3.downsample.conv.weight"}
    for theirs, ours in pairs.items():
        torch.testing.assert_close(own[ours], sd[theirs], rtol=0, atol=0)
    # our own format passes through unchanged
    assert checkpoint_filter_fn(own, model).keys() == own.keys()


def test_variant_configs():
    with torch.device("meta"):
        large = formers.create_model("cswin_144_24322_large_384")
        tiny = formers.create_model("cswin_64_12211_tiny_224")
    # CSWin-L keeps 24 heads in its last stage (head dim 48), not 48; one global branch there
    attn = large.stages[3].blocks[0].attn
    assert (attn.heads, attn.windows, attn.dim // attn.heads) == (24, [(None, None)], 48)
    # 384 models widen the stripes of stages 3 to 12; stripes: stage 1 width 1, stage 2 width 2
    assert large.stages[2].blocks[0].attn.windows == [(None, 12), (12, None)]
    assert [s.blocks[0].attn.windows[0] for s in tiny.stages[:3]] == [(None, 1), (None, 2), (None, 7)]
    assert tiny.stages[2].blocks[0].attn.heads == 4  # half of stage 3's 8 heads per branch
    assert [f["num_chs"] for f in tiny.feature_info] == [64, 128, 256, 512]


def _reference_branch(q, k, v, conv, heads, wh, ww, pad_mask):
    """One branch of cross-shaped attention, window by window: (H, W, c) q, k, v of one image."""
    h, w, c = q.shape
    wh, ww = wh or h, ww or w
    top, left = (-h % wh) // 2, (-w % ww) // 2
    d = c // heads
    out = torch.zeros(h, w, c)
    for r0 in range(-top, h, wh):
        for c0 in range(-left, w, ww):
            real = torch.zeros(wh, ww, dtype=torch.bool)
            win = [torch.zeros(wh, ww, c) for _ in range(3)]
            rs, re, cs, ce = max(r0, 0), min(r0 + wh, h), max(c0, 0), min(c0 + ww, w)
            real[rs - r0:re - r0, cs - c0:ce - c0] = True
            for t, src in zip(win, (q, k, v)):
                t[real] = src[rs:re, cs:ce].reshape(-1, c)
            qw, kw, vw = (t.reshape(-1, heads, d).transpose(0, 1) for t in win)  # (heads, N, d)
            logits = qw @ kw.transpose(-1, -2) * d ** -0.5
            if pad_mask:
                logits = logits.masked_fill(~real.reshape(1, 1, -1), float("-inf"))
            o = (logits.softmax(-1) @ vw).transpose(0, 1).reshape(wh, ww, c)
            pos = conv(win[2].permute(2, 0, 1)[None])[0].permute(1, 2, 0)  # LePE on this window only
            out[rs:re, cs:ce] = (o + pos)[real].reshape(re - rs, ce - cs, c)
    return out


@pytest.mark.parametrize("h,w,sw,full,pad_mask", [
    (6, 8, 2, False, True),    # no padding
    (7, 5, 3, False, True),    # both branches padded, masked
    (7, 5, 3, False, False),   # padded as the official segmentation backbone (zeros take part)
    (4, 5, 7, False, True),    # map narrower than a stripe
    (5, 6, 7, True, True),     # the last stage: one global branch
])
def test_stripe_attention_matches_stripe_by_stripe_reference(h, w, sw, full, pad_mask):
    torch.manual_seed(0)
    dim, heads = 16, 4
    attn = CrossShapedAttention(dim, heads, sw, full=full, pad_mask=pad_mask).eval()
    for conv in attn.lepe:
        torch.nn.init.normal_(conv.weight, std=0.3)
    x = torch.randn(2, h, w, dim)
    with torch.no_grad():
        ours = attn(x)
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        branches = [(None, None)] if full else [(None, sw), (sw, None)]  # vertical stripes first
        c = dim // len(branches)
        refs = []
        for i in range(2):
            parts = [_reference_branch(q[i, ..., b * c:(b + 1) * c], k[i, ..., b * c:(b + 1) * c],
                                       v[i, ..., b * c:(b + 1) * c], attn.lepe[b], heads // len(branches),
                                       *win, pad_mask)
                     for b, win in enumerate(branches)]
            refs.append(attn.proj(torch.cat(parts, -1)))
    torch.testing.assert_close(ours, torch.stack(refs), atol=1e-5, rtol=1e-5)


def test_padding_mask_changes_only_padded_maps():
    torch.manual_seed(0)
    masked = CrossShapedAttention(16, 4, 3, pad_mask=True).eval()
    plain = CrossShapedAttention(16, 4, 3, pad_mask=False).eval()
    plain.load_state_dict(masked.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 6, 9, 16)
        torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=0)
        x = torch.randn(1, 7, 9, 16)
        assert (masked(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize("hw,maps", [
    ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
    ((512, 512), [(128, 128), (64, 64), (32, 32), (16, 16)]),
    ((300, 452), [(75, 113), (38, 57), (19, 29), (10, 15)]),  # the official segmentation backbone's sizes
])
def test_any_size_gives_the_stage_maps(hw, maps):
    with torch.device("meta"):
        model = formers.create_model("cswin_64_12211_tiny_224")
        feats = model.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == maps


def test_real_forward_on_padded_odd_sizes():
    torch.manual_seed(0)
    model = CSWinTransformer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 7, 7),
                             num_classes=3).eval()
    with torch.no_grad():
        for hw in [(3, 3), (37, 61), (96, 64)]:
            out = model(torch.randn(2, 3, *hw))
            assert out.shape == (2, 3) and torch.isfinite(out).all()
        # one image alone or in a batch gives the same logits (no leakage between images through padding)
        x = torch.randn(3, 3, 45, 70)
        torch.testing.assert_close(model(x[1:2]), model(x)[1:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        model(torch.randn(1, 3, 2, 64))


def test_large_macs_are_those_of_the_official_code():
    """CSWin-L's MACs are not on its card (the paper prints 31.5G, 5.2% below its own code): pin the
    count of the official model at 224 (33.13 GMACs with torch's counter) instead."""
    with torch.device("meta"):
        model = formers.create_model("cswin_144_24322_large_224")
    assert abs(formers.count_flops(model) / 1e9 - 33.13) < 0.01 * 33.13
