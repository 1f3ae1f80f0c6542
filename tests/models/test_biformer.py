"""BiFormer specifics: official key mapping, bi-level routing attention against a per-region
reference, the stage-4 attention's quirks, padding for any input size, the BatchNorm buffers.

timm has no BiFormer, so there is no peer to compare logits with here; the equivalence with the
official models/biformer.py (auto_pad=False at 224 and auto_pad=True at other sizes) was checked
outside the repository.
"""
import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.biformer import AttentionLePE, BiLevelRoutingAttention, checkpoint_filter_fn

TINY = dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512), topks=(1, 4, 16, -2))


def official_keys(depths, dims, topks, mlp_ratio=3, lepe=5, cpe=3, num_classes=1000, in_chans=3):
    """Key -> shape of the official BiFormer state dict, written from its definition:
    downsample_layers.0 is the stem (conv, BN, GELU, conv, BN), downsample_layers.1-3 conv + BN;
    stages.{i}.{j} blocks: pos_embed (dw conv), norm1, attn, norm2, mlp (Linear, Identity, GELU, Linear).
    BRA blocks (topk > 0) hold attn.qkv.qkv (q, k: qk_dim = dim each, v: dim; with bias), attn.wo and
    attn.lepe; topk -2 blocks hold AttentionLePE's attn.qkv (no bias), attn.proj and attn.lepe.
    Every BatchNorm saves running_mean / running_var / num_batches_tracked. Then norm (BN) and head."""
    keys = {}

    def conv(p, cout, cin, k):
        keys[p + ".weight"], keys[p + ".bias"] = (cout, cin, k, k), (cout,)

    def bn(p, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.{n}"] = (c,)
        keys[f"{p}.num_batches_tracked"] = ()

    def linear(p, cout, cin, bias=True):
        keys[p + ".weight"] = (cout, cin)
        if bias:
            keys[p + ".bias"] = (cout,)

    conv("downsample_layers.0.0", dims[0] // 2, in_chans, 3)
    bn("downsample_layers.0.1", dims[0] // 2)
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    bn("downsample_layers.0.4", dims[0])
    for i in range(1, len(dims)):
        conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
        bn(f"downsample_layers.{i}.1", dims[i])
    for i, (depth, d, topk) in enumerate(zip(depths, dims, topks)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            conv(p + "pos_embed", d, 1, cpe)
            keys[p + "norm1.weight"] = keys[p + "norm1.bias"] = (d,)
            conv(p + "attn.lepe", d, 1, lepe)
            if topk > 0:
                linear(p + "attn.qkv.qkv", 3 * d, d)
                linear(p + "attn.wo", d, d)
            else:
                linear(p + "attn.qkv", 3 * d, d, bias=False)
                linear(p + "attn.proj", d, d)
            keys[p + "norm2.weight"] = keys[p + "norm2.bias"] = (d,)
            linear(p + "mlp.0", mlp_ratio * d, d)
            linear(p + "mlp.3", d, mlp_ratio * d)
    bn("norm", dims[-1])
    linear("head", num_classes, dims[-1])
    return keys


def _random_official_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(**TINY).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return formers.create_model("biformer_tiny").eval()


def test_official_keys_fully_mapped(tiny):
    official = _random_official_sd()
    own = tiny.state_dict()
    mapped = checkpoint_filter_fn({"model": official}, tiny)  # the release's wrapper
    assert len(mapped) == len(official) == len(own) == 264
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert tuple(v.shape) == tuple(own[k].shape), k
    n_params = sum(p.numel() for p in tiny.parameters())
    n_buffers = sum(v.numel() for k, v in official.items() if "running" in k or "num_batches" in k)
    assert sum(v.numel() for v in official.values()) == n_params + n_buffers
    # a few names spelled out
    assert torch.equal(mapped["stages.0.downsample.3.weight"], official["downsample_layers.0.3.weight"])
    assert torch.equal(mapped["stages.2.downsample.1.running_var"], official["downsample_layers.2.1.running_var"])
    assert torch.equal(mapped["stages.1.blocks.1.cpe.weight"], official["stages.1.1.pos_embed.weight"])
    assert torch.equal(mapped["stages.2.blocks.7.attn.qkv.weight"], official["stages.2.7.attn.qkv.qkv.weight"])
    assert torch.equal(mapped["stages.0.blocks.0.attn.proj.bias"], official["stages.0.0.attn.wo.bias"])
    assert torch.equal(mapped["stages.3.blocks.1.attn.qkv.weight"], official["stages.3.1.attn.qkv.weight"])
    assert torch.equal(mapped["stages.3.blocks.0.mlp.fc2.weight"], official["stages.3.0.mlp.3.weight"])
    assert torch.equal(mapped["norm.running_mean"], official["norm.running_mean"])
    # the weights load, BN buffers included
    tiny.load_state_dict(mapped, strict=True)
    assert tiny.norm.num_batches_tracked.item() == 1000
    # names saved through DDP or a torch.distributed checkpoint wrapper map the same way
    wrapped = {"module." + k.replace("stages.2.", "stages.2._checkpoint_wrapped_module."): v
               for k, v in official.items()}
    assert set(checkpoint_filter_fn(wrapped, tiny)) == set(own)
    # our own state dict passes through unchanged
    again = checkpoint_filter_fn(mapped, tiny)
    assert set(again) == set(mapped) and all(torch.equal(again[k], mapped[k]) for k in mapped)


def _reference_bra(attn, x, heads):
    """BRA written region by region (a loop, for the test only): region means, top-k affinity with
    scale qk_dim ** -0.5 (the full qk_dim), softmax attention over the routed regions' tokens with the
    same scale, LePE on the V map, output Linear."""
    b, h, w, c = x.shape
    s, qk, topk = attn.n_win, attn.qk_dim, attn.topk
    rh, rw = h // s, w // s
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:]
    scale = qk ** -0.5

    def region(t, r):
        j, i = divmod(r, s)
        return t[:, j * rh:(j + 1) * rh, i * rw:(i + 1) * rw].reshape(b, rh * rw, -1)

    out = torch.zeros(b, h, w, c)
    for bi in range(b):
        q_r = torch.stack([region(q, r)[bi].mean(0) for r in range(s * s)])
        k_r = torch.stack([region(k, r)[bi].mean(0) for r in range(s * s)])
        routed = ((q_r * scale) @ k_r.T).topk(topk, dim=-1).indices
        for r in range(s * s):
            qq = region(q, r)[bi].reshape(-1, heads, qk // heads).transpose(0, 1)
            kk = torch.cat([region(k, int(t))[bi] for t in routed[r]]).reshape(-1, heads, qk // heads).transpose(0, 1)
            vv = torch.cat([region(v, int(t))[bi] for t in routed[r]]).reshape(-1, heads, c // heads).transpose(0, 1)
            o = ((qq @ kk.transpose(-1, -2)) * scale).softmax(-1) @ vv  # (heads, n, c/heads)
            j, i = divmod(r, s)
            out[bi, j * rh:(j + 1) * rh, i * rw:(i + 1) * rw] = o.transpose(0, 1).reshape(rh, rw, c)
    lepe = F.conv2d(v.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=attn.lepe.padding,
                    groups=c).permute(0, 2, 3, 1)
    return (out + lepe) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("topk", [1, 3])
def test_bra_matches_region_by_region_reference(topk):
    torch.manual_seed(0)
    dim, heads = 16, 4  # per-head width 4: a per-head scale would be 0.5, the full-qk_dim one is 0.25
    attn = BiLevelRoutingAttention(dim, heads, n_win=3, qk_dim=dim, topk=topk, side_dwconv=5).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    assert attn.scale == dim ** -0.5
    x = torch.randn(2, 6, 9, dim)  # 3x3 regions of 2x3 tokens
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_bra(attn, x, heads), atol=1e-5, rtol=1e-5)


def test_bra_gather_and_routing():
    torch.manual_seed(0)
    x_reg = torch.randn(2, 9, 4, 5)
    idx = torch.randint(0, 9, (2, 9, 3))
    got = BiLevelRoutingAttention.gather_regions(x_reg, idx)
    expect = torch.stack([torch.cat([x_reg[b, idx[b, r, t]] for t in range(3)]) for b in range(2) for r in range(9)])
    assert torch.equal(got, expect.reshape(2, 9, 12, 5))
    # routing is a hard, gradient-free choice (the official code detaches q and k first)
    attn = BiLevelRoutingAttention(8, 2, n_win=3, topk=2)
    q = torch.randn(1, 9, 4, 8, requires_grad=True)
    idx = attn.route(q, q * 2)
    assert not idx.requires_grad and idx.shape == (1, 9, 2)
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(8, 2, n_win=2, topk=5)


def test_bra_pads_like_official_auto_pad():
    """A map that does not split into n_win x n_win regions is zero-padded at the bottom/right
    before the qkv Linear (padded tokens take part unmasked, as with the official auto_pad) and
    the output cropped back."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(16, 2, n_win=3, topk=2).eval()
    x = torch.randn(1, 7, 8, 16)
    with torch.no_grad():
        out = attn(x)
        padded = attn(F.pad(x, (0, 0, 0, 1, 0, 2)))  # 9x9: nothing more to pad
    assert out.shape == x.shape
    torch.testing.assert_close(out, padded[:, :7, :8])


def test_stage4_attention_quirks():
    with torch.device("meta"):
        model = formers.create_model("biformer_base")
    # BRA heads are qk_dim // 32; the stage-4 AttentionLePE keeps its default of 8 heads
    heads = [s.blocks[0].attn.num_heads for s in model.stages]
    assert heads == [3, 6, 12, 8]
    assert [s.blocks[0].attn.topk for s in model.stages[:3]] == [1, 4, 16]
    assert all(s.blocks[0].attn.n_win == 7 for s in model.stages[:3])
    last = model.stages[3].blocks[0].attn
    assert isinstance(last, AttentionLePE) and last.qkv.bias is None
    assert model.stages[0].blocks[0].attn.qkv.bias is not None
    # its LePE acts on the block input, not on V; the scale is the usual head_dim ** -0.5
    attn = AttentionLePE(32, 8).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 5, 32)
    t = x.reshape(2, 15, 32)
    q, k, v = (t @ attn.qkv.weight.T).reshape(2, 15, 3, 8, 4).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-1, -2)) * 4 ** -0.5).softmax(-1) @ v
    o = o.transpose(1, 2).reshape(2, 3, 5, 32)
    lepe = F.conv2d(x.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=2, groups=32)
    ref = (o + lepe.permute(0, 2, 3, 1)) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (512, 512), (320, 448), (200, 300), (97, 61)])
def test_any_input_size_feature_shapes(size):
    """Stride-2 convs round up, BRA pads each map to a multiple of 7 regions: any size works."""
    with torch.device("meta"):
        model = formers.create_model("biformer_tiny")
        x = torch.randn(1, 3, *size)
        feats = model.forward_intermediates(x, intermediates_only=True)
    h, w = size
    for i, f in enumerate(feats):
        r = 2 ** (i + 2)
        assert tuple(f.shape) == (1, model.feature_info[i]["num_chs"], -(-h // r), -(-w // r))


def test_non_square_forward_and_intermediates():
    torch.manual_seed(0)
    model = formers.create_model("biformer_tiny", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 160, 96)  # stage maps 40x24 .. 5x3: padded to 42x28, 21x14, 14x7
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        out = model(x)
        torch.testing.assert_close(final, model.forward_features(x))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
    assert torch.isfinite(out).all() and out.shape == (1, 1000)
    torch.testing.assert_close(normed, final)  # the final BatchNorm on the stage-4 map
    torch.testing.assert_close(out, model.head(final.mean((2, 3))))


def test_batchnorm_buffers_cfg_and_drop_path():
    model = formers.create_model("biformer_small", drop_path_rate=0.2)
    sd = model.state_dict()
    for p in ("stages.0.downsample.1", "stages.0.downsample.4", "stages.3.downsample.1", "norm"):
        for n in ("running_mean", "running_var", "num_batches_tracked"):
            assert f"{p}.{n}" in sd
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 6
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for s in model.stages for b in s.blocks)
    rates = [getattr(b.drop_path, "p", 0.0) for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 30))
    assert model.no_weight_decay() == set()  # the official recipe names no parameter of this model
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["first_conv"] == "stages.0.downsample.0"
    assert model.get_submodule(cfg["first_conv"]).stride == (2, 2)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = formers.create_model("biformer_demo", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], atol=1e-6, rtol=1e-5)
