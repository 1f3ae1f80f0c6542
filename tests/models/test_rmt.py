"""RMT specifics: official key mapping, the MaSA maths (rotation, decay, decomposition), masks for any
input size, and numbers measured on the official model (qhfan/RMT) with the same weights."""
import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.layers.retention import (decay_mask_1d, manhattan_decay_mask, retention_log_decay, rotary_angles,
                                      rotate_every_two)
from formers.models.rmt import RMT, ManhattanSelfAttention, SpatialDecay, checkpoint_filter_fn

TINY = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), mlp_ratios=(3, 3, 3, 3),
            layer_scales=(False,) * 4)
# a small config with every kind of part: decomposed stages 1-3, layer scale in stages 3-4
SMALL_CFG = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 3, 4), init_values=(2, 2, 2, 2),
                 heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                 layer_scales=(False, False, True, True), projection=96)


def official_keys(embed_dims, depths, num_heads, mlp_ratios, layer_scales, in_chans=3, projection=1024,
                  num_classes=1000, **_):
    """Every state-dict key of the official `VisRetNet` and its shape, written out from its definition:
    PatchEmbed.proj = Sequential(conv, BN, GELU, conv, BN, GELU, conv, BN, GELU, conv, BN); per stage a
    RetNetRelPos2d (buffers angle (key_dim,), decay (heads,)), RetBlocks (retention_layer_norm, retention
    {q,k,v,out}_proj + lepe.conv 5x5 dw, final_layer_norm, ffn fc1/dwconv.conv 3x3/fc2, pos.conv 3x3,
    gamma_1/2 (1,1,1,C) with layerscale) and, but in the last, downsample {reduction conv 3x3, norm BN};
    then proj Linear(C, projection), norm BN(projection), head."""
    keys = {}

    def bn(prefix, c):
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    def conv(prefix, cout, cin, k):
        keys.update({f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)})

    def linear(prefix, cout, cin):
        keys.update({f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)})

    c0 = embed_dims[0]
    stem = [(0, c0 // 2, in_chans), (3, c0 // 2, c0 // 2), (6, c0, c0 // 2), (9, c0, c0)]
    for idx, cout, cin in stem:
        conv(f"patch_embed.proj.{idx}", cout, cin, 3)
        bn(f"patch_embed.proj.{idx + 1}", cout)
    for i, (d, depth, heads, ratio) in enumerate(zip(embed_dims, depths, num_heads, mlp_ratios)):
        keys[f"layers.{i}.Relpos.angle"] = (d // heads,)
        keys[f"layers.{i}.Relpos.decay"] = (heads,)
        hidden = int(ratio * d)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            for norm in ("retention_layer_norm", "final_layer_norm"):
                keys[f"{p}.{norm}.weight"] = keys[f"{p}.{norm}.bias"] = (d,)
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{p}.retention.{name}", d, d)
            keys[f"{p}.retention.lepe.conv.weight"], keys[f"{p}.retention.lepe.conv.bias"] = (d, 1, 5, 5), (d,)
            linear(f"{p}.ffn.fc1", hidden, d)
            linear(f"{p}.ffn.fc2", d, hidden)
            keys[f"{p}.ffn.dwconv.conv.weight"], keys[f"{p}.ffn.dwconv.conv.bias"] = (hidden, 1, 3, 3), (hidden,)
            keys[f"{p}.pos.conv.weight"], keys[f"{p}.pos.conv.bias"] = (d, 1, 3, 3), (d,)
            if layer_scales[i]:
                keys[f"{p}.gamma_1"] = keys[f"{p}.gamma_2"] = (1, 1, 1, d)
        if i < len(embed_dims) - 1:
            conv(f"layers.{i}.downsample.reduction", embed_dims[i + 1], d, 3)
            bn(f"layers.{i}.downsample.norm", embed_dims[i + 1])
    linear("proj", projection, embed_dims[-1])
    bn("norm", projection)
    linear("head", num_classes, projection)
    return keys


def random_official_sd(keys, seed=0):
    """Deterministic random weights under the official names (BN variances positive; Relpos left out:
    the official model keeps its own)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if ".Relpos." in k:
            continue
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) <= 1 and (k.endswith(".weight")):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1 or "gamma" in k:
            sd[k] = 0.1 * torch.randn(shape, generator=g) * (5 if "gamma" in k else 1)
        else:
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return sd


def _check_mapping(model, keys):
    sd = random_official_sd(keys)
    sd.update({k: torch.zeros(s) for k, s in keys.items() if ".Relpos." in k})  # as saved in the releases
    mapped = checkpoint_filter_fn({"model": sd}, model)
    own = model.state_dict()
    assert set(mapped) == set(own), (sorted(set(own) - set(mapped))[:5], sorted(set(mapped) - set(own))[:5])
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    n_relpos = sum(1 for k in keys if ".Relpos." in k)
    assert len(mapped) == len(keys) - n_relpos == len(own)
    again = checkpoint_filter_fn(mapped, model)  # our own names pass through unchanged
    assert set(again) == set(mapped) and all(torch.equal(again[k], mapped[k]) for k in mapped)
    return sd, mapped


def test_official_keys_fully_mapped_tiny():
    with torch.device("meta"):
        model = formers.create_model("rmt_tiny")
    keys = official_keys(**TINY)
    n_params = sum(math.prod(s) for k, s in keys.items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")) and ".Relpos." not in k)
    assert n_params == sum(p.numel() for p in model.parameters()) == 14_334_216  # the official log's n_parameters
    sd, mapped = _check_mapping(model, keys)  # on meta: the mapping needs only names and shapes
    # a few names spelled out
    assert torch.equal(mapped["stem.6.bn.running_var"], sd["patch_embed.proj.10.running_var"])
    assert torch.equal(mapped["stem.4.conv.weight"], sd["patch_embed.proj.6.weight"])
    assert torch.equal(mapped["stages.1.downsample.conv.weight"], sd["layers.0.downsample.reduction.weight"])
    assert torch.equal(mapped["stages.3.downsample.bn.bias"], sd["layers.2.downsample.norm.bias"])
    assert torch.equal(mapped["stages.2.blocks.7.attn.proj.weight"], sd["layers.2.blocks.7.retention.out_proj.weight"])
    assert torch.equal(mapped["stages.0.blocks.1.attn.lepe.weight"], sd["layers.0.blocks.1.retention.lepe.conv.weight"])
    assert torch.equal(mapped["stages.0.blocks.0.cpe.bias"], sd["layers.0.blocks.0.pos.conv.bias"])
    assert torch.equal(mapped["norm.running_mean"], sd["norm.running_mean"])


def test_official_keys_with_layer_scale_mapped():
    """B and L carry gamma_1/2 of shape (1, 1, 1, C); ours are (C,)."""
    model = RMT(**SMALL_CFG)
    keys = official_keys(**SMALL_CFG)
    assert sum(1 for k in keys if "gamma" in k) == 4
    sd, mapped = _check_mapping(model, keys)
    torch.testing.assert_close(mapped["stages.2.blocks.0.ls1.scale"], sd["layers.2.blocks.0.gamma_1"].flatten())
    torch.testing.assert_close(mapped["stages.3.blocks.0.ls2.scale"], sd["layers.3.blocks.0.gamma_2"].flatten())


def test_official_checkpoint_file_loads(tmp_path):
    """A release-style file ({'model': state_dict} with the Relpos buffers) loads through create_model."""
    keys = official_keys(**SMALL_CFG, num_classes=10)
    sd = random_official_sd(keys, seed=3)
    sd.update({k: torch.zeros(s) for k, s in keys.items() if ".Relpos." in k})
    path = str(tmp_path / "rmt.pth")
    torch.save({"model": sd, "epoch": 299}, path)
    cfg = {k: v for k, v in SMALL_CFG.items()}
    model = formers.create_model("rmt_demo", num_classes=10, checkpoint=path, **cfg)
    torch.testing.assert_close(model.stages[2].blocks[0].ls1.scale, sd["layers.2.blocks.0.gamma_1"].flatten())


# Logits of the official VisRetNet(**SMALL_CFG, num_classes=10) (classfication_release/RMT.py, run
# outside this repo) with random_official_sd(official_keys(**SMALL_CFG, num_classes=10), seed=11) and
# input torch.randn(2, 3, 40, 56, generator=Generator().manual_seed(12)); eval mode, fp32.
_OFFICIAL_LOGITS = [
    [0.2484965, -0.8378677, 0.6374427, 0.3109870, -1.5257002, 1.2505716, -1.2028092, 0.6562691, -2.2889798, -0.1022577],
    [0.8889345, -2.8096125, 1.7191281, 2.0555761, -2.3023701, -1.7872748, -1.1031742, 2.0739071, 0.0939522, -1.9890336],
]


def test_matches_official_logits():
    keys = official_keys(**SMALL_CFG, num_classes=10)
    model = RMT(num_classes=10, **SMALL_CFG).eval()
    model.load_state_dict(checkpoint_filter_fn(random_official_sd(keys, seed=11), model))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, torch.tensor(_OFFICIAL_LOGITS), atol=1e-5, rtol=0)


def test_variant_structure():
    expect = {  # decomposed stages, layer-scaled stages, heads ranges (official RMT_T3 / S / M2 / L6)
        "rmt_tiny": ((True, True, False, False), (False,) * 4, (4, 4, 6, 6)),
        "rmt_small": ((True, True, True, False), (False,) * 4, (4, 4, 6, 6)),
        "rmt_base": ((True, True, True, False), (False, False, True, True), (5, 5, 6, 6)),
        "rmt_large": ((True, True, True, False), (False, False, True, True), (6, 6, 6, 6)),
    }
    for name, (decomposed, scaled, ranges) in expect.items():
        with torch.device("meta"):
            model = formers.create_model(name)
        assert tuple(s.rel_pos.decomposed for s in model.stages) == decomposed, name
        assert tuple(s.blocks[0].attn.decomposed for s in model.stages) == decomposed, name
        assert tuple(s.rel_pos.heads_range for s in model.stages) == ranges, name
        assert tuple(s.rel_pos.init_value for s in model.stages) == (2, 2, 2, 2), name
        for stage, ls in zip(model.stages, scaled):
            blk = stage.blocks[-1]
            assert isinstance(blk.ls1, torch.nn.Identity) != ls, name
            assert blk.norm1.eps == blk.norm2.eps == 1e-6
        assert [s.downsample is None for s in model.stages] == [True, False, False, False]
        assert model.num_features == 1024 and model.head.in_features == 1024
    small = RMT(**SMALL_CFG)  # layer scales start at 1e-6 (the official layer_init_values)
    assert torch.all(small.stages[2].blocks[0].ls1.scale == 1e-6)
    assert torch.all(small.stages[3].blocks[0].ls2.scale == 1e-6)


def test_decay_rates_and_angles():
    """The per-head decay and rotary angles the official checkpoints store as Relpos.decay / .angle."""
    # RMT-T stage 1: 4 heads, init 2, range 4 -> gamma = 1 - 2^-(2 + h)
    torch.testing.assert_close(retention_log_decay(4, 2, 4).exp(), torch.tensor([0.75, 0.875, 0.9375, 0.96875]))
    # stage 3: 8 heads, range 6 -> exponents 2 + 6h/8
    torch.testing.assert_close(retention_log_decay(8, 2, 6), torch.log(1 - 2 ** -(2 + 0.75 * torch.arange(8.))))
    # RetNet's own rates: 1 - 2^(-5-h)
    torch.testing.assert_close(retention_log_decay(3, 5).exp(), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7]))
    theta = torch.tensor([10000 ** -(i / 7) for i in range(8)])
    torch.testing.assert_close(rotary_angles(16), theta.repeat_interleave(2))
    assert rotary_angles(16)[0] == 1 and math.isclose(rotary_angles(16)[-1].item(), 1e-4, rel_tol=1e-5)


def test_rotary_uses_flattened_raster_index():
    """theta_shift rotates by (h * W + w) x angle, a 1-D index, and rotates channel pairs (2i, 2i+1)."""
    rel = SpatialDecay(key_dim=8, num_heads=2, init_value=2, heads_range=4, decomposed=True)
    sin, cos, _ = rel(3, 5)
    assert sin.shape == (3, 5, 1, 8)
    angle = rotary_angles(8)
    torch.testing.assert_close(sin[2, 1, 0], torch.sin(11 * angle))  # 2 * 5 + 1
    torch.testing.assert_close(cos[1, 4, 0], torch.cos(9 * angle))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_every_two(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_decay_masks():
    log_decay = torch.tensor([-0.5, -0.1])
    m = manhattan_decay_mask(3, 4, log_decay)
    assert m.shape == (2, 12, 12)
    # token (2, 3) -> 11 and (0, 1) -> 1: Manhattan distance 2 + 2
    assert m[0, 11, 1].item() == pytest.approx(-2.0) and m[1, 1, 11].item() == pytest.approx(-0.4)
    assert torch.all(m.diagonal(dim1=1, dim2=2) == 0)
    m1 = decay_mask_1d(5, log_decay)
    assert m1[1, 4, 0].item() == pytest.approx(-0.4) and torch.equal(m1, m1.transpose(1, 2))
    causal = decay_mask_1d(4, log_decay, causal=True).exp()  # RetNet's D: gamma^(i-j) below the diagonal
    torch.testing.assert_close(causal[0], torch.tensor([[1, 0, 0, 0], [math.exp(-0.5), 1, 0, 0],
                                                        [math.exp(-1), math.exp(-0.5), 1, 0],
                                                        [math.exp(-1.5), math.exp(-1), math.exp(-0.5), 1]]))


def _reference_masa(attn, x, rel):
    """MaSA written out on 5-D tensors with complex rotation and einsum (independent of the module)."""
    b, h, w, c = x.shape
    n, d = attn.num_heads, attn.key_dim
    log_decay = rel.log_decay()
    pos = torch.arange(h * w, dtype=torch.float32).view(h, w, 1, 1)
    theta = 10000 ** -torch.linspace(0, 1, d // 2)
    rot = torch.polar(torch.ones(h, w, 1, d // 2), pos * theta)  # e^{i p theta}

    def rotate(t):
        return torch.view_as_real(torch.view_as_complex(t.view(b, h, w, n, d // 2, 2).contiguous()) * rot).flatten(-2)

    q = rotate(x @ attn.q.weight.T + attn.q.bias)
    k = rotate(x @ attn.k.weight.T + attn.k.bias)
    v_flat = x @ attn.v.weight.T + attn.v.bias
    v = v_flat.view(b, h, w, n, d)
    ih, iw = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    dh = (ih[:, None] - ih[None]).abs()
    dw = (iw[:, None] - iw[None]).abs()
    s = d ** -0.5
    if attn.decomposed:
        # rows: logits[b, n, h, w, w'] ; then columns on the rows' output
        a = torch.einsum("bhwnd,bhvnd->bnhwv", q, k) * s + dw[None, None, None] * log_decay[None, :, None, None, None]
        y = torch.einsum("bnhwv,bhvnd->bhwnd", a.softmax(-1), v)
        a = torch.einsum("bhwnd,bgwnd->bnwhg", q, k) * s + dh[None, None, None] * log_decay[None, :, None, None, None]
        out = torch.einsum("bnwhg,bgwnd->bhwnd", a.softmax(-1), y)
    else:
        dist = (dh[:, None, :, None] + dw[None, :, None, :])  # (h, w, h', w')
        a = torch.einsum("bhwnd,bgvnd->bnhwgv", q, k) * s
        a = a + dist[None, None] * log_decay[None, :, None, None, None, None]
        a = a.flatten(-2).softmax(-1).view_as(a)
        out = torch.einsum("bnhwgv,bgvnd->bhwnd", a, v)
    lepe = F.conv2d(v_flat.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=2, groups=c)
    out = out.reshape(b, h, w, c) + lepe.permute(0, 2, 3, 1)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("decomposed", [False, True])
def test_masa_maths(decomposed):
    torch.manual_seed(0)
    dim, heads, (h, w) = 24, 3, (5, 7)
    attn = ManhattanSelfAttention(dim, heads, decomposed).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.4)
    rel = SpatialDecay(dim // heads, heads, init_value=1, heads_range=3, decomposed=decomposed)
    x = torch.randn(2, h, w, dim)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rel(h, w)), _reference_masa(attn, x, rel), atol=1e-4, rtol=1e-4)


def test_decomposed_equals_whole_on_a_single_column():
    """With W = 1 the row attention is the identity and |dw| = 0: both forms are the same operator."""
    torch.manual_seed(0)
    whole, dec = ManhattanSelfAttention(16, 2, False).eval(), ManhattanSelfAttention(16, 2, True).eval()
    dec.load_state_dict(whole.state_dict())
    x = torch.randn(2, 6, 1, 16)
    with torch.no_grad():
        a = whole(x, SpatialDecay(8, 2, 2, 4, False)(6, 1))
        b = dec(x, SpatialDecay(8, 2, 2, 4, True)(6, 1))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_any_input_size_and_mask_cache():
    model = RMT(num_classes=5, **SMALL_CFG).eval()
    for size in [(64, 64), (40, 72), (33, 17), (1, 1)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            final, maps = model.forward_intermediates(x)
            assert model(x).shape == (1, 5)
        expect = [(math.ceil(size[0] / r), math.ceil(size[1] / r)) for r in (4, 8, 16, 32)]
        assert [tuple(m.shape[-2:]) for m in maps] == expect, size
        assert [m.shape[1] for m in maps] == [16, 32, 48, 64]
        assert final.shape == (1, 96, *expect[-1])
    rel = model.stages[0].rel_pos
    first = rel(10, 18)
    assert rel(10, 18) is first  # cached per size
    mask_h, mask_w = first[2]
    assert mask_h.shape == (2, 10, 10) and mask_w.shape == (2, 18, 18)
    whole = model.stages[3].rel_pos(3, 5)[2]
    assert whole.shape == (4, 15, 15)
    # dense-task sizes on meta (no compute): 512x512 and non-square
    with torch.device("meta"):
        big = formers.create_model("rmt_tiny")
        for size in [(512, 512), (512, 768)]:
            maps = big.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
            assert [tuple(m.shape[1:]) for m in maps] == [
                (c, size[0] // r, size[1] // r) for c, r in zip((64, 128, 256, 512), (4, 8, 16, 32))]


def test_inference_mode_masks_do_not_break_training():
    model = RMT(num_classes=3, **SMALL_CFG)
    x = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    model(x).sum().backward()  # masks cached under inference_mode must not be reused here
    assert model.stages[0].blocks[0].attn.q.weight.grad is not None


def test_head_is_projection_bn_swish_then_pool():
    model = formers.create_model("rmt_demo", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        last = model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
        proj = F.linear(last.permute(0, 2, 3, 1), model.proj.weight, model.proj.bias).permute(0, 3, 1, 2)
        bn = model.norm
        proj = (proj - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        proj = proj * bn.weight[:, None, None] + bn.bias[:, None, None]
        torch.testing.assert_close(feats, proj * torch.sigmoid(proj))
        torch.testing.assert_close(model(x), model.head(feats.mean((2, 3))))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


def test_macs_follow_the_released_code():
    """The paper prints 2.5 G for RMT-T; the released code counts 2.65 G with the authors' own fvcore
    script and 2.637 G with torch's counter (the official model, measured outside this repo)."""
    with torch.device("meta"):
        model = formers.create_model("rmt_tiny")
    assert formers.count_flops(model, (3, 224, 224)) == 2_637_220_864
