"""SVT specifics: official key mapping (DTCWT buffers dropped, q + kv fused), the scatter mixer against a
term-by-term complex reference, the token-labeling logits, other input sizes (the lowpass gate resampled).

timm has no SVT. Equivalence with the official svt.py (pytorch_wavelets installed outside the venv; svt_s,
all weights and BN statistics perturbed, 224 px): logits equal to 1.1e-6, checked outside the repository.
"""
import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.svt import ScatterMixer, checkpoint_filter_fn

SMALL = dict(stem=32, dims=(64, 128, 320, 448), depths=(3, 4, 6, 3), mlp=(8, 8, 4, 4))


def official_keys(stem, dims, depths, mlp, num_classes=1000, in_chans=3, map_size=56, num_blocks=4):
    """Key -> shape of the official SVT state dict (token_label=True), written from its definition.

    patch_embed1 = Stem: conv.0 (7x7 s2, no bias), BN conv.1, conv.3 / conv.6 (3x3, no bias), BN conv.4 / conv.7
    (each BN with running stats), proj (3x3 s2), norm; patch_embed{2..4} = DownSamples: proj (3x3 s2), norm.
    block{i}.{j}: norm1, attn, norm2, mlp (PVT2FFN: fc1, dwconv.dwconv 3x3 depthwise, fc2). Stage 1 blocks
    hold SVT_channel_mixing: complex_weight_ll (C, 56, 56), complex_weight_lh_{1,2} (2, 4, C/4, C/4),
    complex_weight_lh_b{1,2} (2, 4, C/4) and the pytorch_wavelets filter buffers xfm.{h0o (13 taps), h1o (19),
    h0a, h0b, h1a, h1b (14)}, ifm.{g0o (19), g1o (13), g0a, g0b, g1a, g1b (14)}, each (1, 1, taps, 1);
    later blocks hold Attention: q, kv, proj. norm{1..4}; post_network.0 = ClassBlock (norm1, attn.{q, kv, proj},
    norm2, mlp.fc1, mlp.fc2 with ratio mlp[-1]); head and aux_head."""
    keys = {}

    def lin(p, o, i):
        keys[p + ".weight"], keys[p + ".bias"] = (o, i), (o,)

    def ln(p, c):
        keys[p + ".weight"] = keys[p + ".bias"] = (c,)

    def bn(p, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.{n}"] = (c,)
        keys[p + ".num_batches_tracked"] = ()

    keys["patch_embed1.conv.0.weight"] = (stem, in_chans, 7, 7)
    keys["patch_embed1.conv.3.weight"] = keys["patch_embed1.conv.6.weight"] = (stem, stem, 3, 3)
    for n in (1, 4, 7):
        bn(f"patch_embed1.conv.{n}", stem)
    keys["patch_embed1.proj.weight"], keys["patch_embed1.proj.bias"] = (dims[0], stem, 3, 3), (dims[0],)
    ln("patch_embed1.norm", dims[0])
    for i in range(1, 4):
        keys[f"patch_embed{i + 1}.proj.weight"] = (dims[i], dims[i - 1], 3, 3)
        keys[f"patch_embed{i + 1}.proj.bias"] = (dims[i],)
        ln(f"patch_embed{i + 1}.norm", dims[i])
    for i, (d, depth, r) in enumerate(zip(dims, depths, mlp)):
        for j in range(depth):
            p = f"block{i + 1}.{j}."
            ln(p + "norm1", d)
            ln(p + "norm2", d)
            lin(p + "mlp.fc1", d * r, d)
            keys[p + "mlp.dwconv.dwconv.weight"], keys[p + "mlp.dwconv.dwconv.bias"] = (d * r, 1, 3, 3), (d * r,)
            lin(p + "mlp.fc2", d, d * r)
            if i == 0:
                bs = d // num_blocks
                keys[p + "attn.complex_weight_ll"] = (d, map_size, map_size)
                keys[p + "attn.complex_weight_lh_1"] = keys[p + "attn.complex_weight_lh_2"] = (2, num_blocks, bs, bs)
                keys[p + "attn.complex_weight_lh_b1"] = keys[p + "attn.complex_weight_lh_b2"] = (2, num_blocks, bs)
                for name, taps in (("h0o", 13), ("h1o", 19), ("h0a", 14), ("h0b", 14), ("h1a", 14), ("h1b", 14)):
                    keys[p + f"attn.xfm.{name}"] = (1, 1, taps, 1)
                for name, taps in (("g0o", 19), ("g1o", 13), ("g0a", 14), ("g0b", 14), ("g1a", 14), ("g1b", 14)):
                    keys[p + f"attn.ifm.{name}"] = (1, 1, taps, 1)
            else:
                lin(p + "attn.q", d, d)
                lin(p + "attn.kv", 2 * d, d)
                lin(p + "attn.proj", d, d)
        ln(f"norm{i + 1}", d)
    d = dims[-1]
    p = "post_network.0."
    ln(p + "norm1", d)
    ln(p + "norm2", d)
    lin(p + "attn.q", d, d)
    lin(p + "attn.kv", 2 * d, d)
    lin(p + "attn.proj", d, d)
    lin(p + "mlp.fc1", d * mlp[-1], d)
    lin(p + "mlp.fc2", d, d * mlp[-1])
    lin("head", num_classes, d)
    lin("aux_head", num_classes, d)
    return keys


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return formers.create_model("svt_h_s").eval()


def test_official_keys_fully_mapped(small):
    g = torch.Generator().manual_seed(0)
    official = {k: (torch.tensor(7) if not s else torch.randn(s, generator=g)) for k, s in official_keys(**SMALL).items()}
    mapped = checkpoint_filter_fn({"model": official}, small)
    own = small.state_dict()
    assert len(official) == 349
    assert set(mapped) == set(own)
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in own)
    buffers = sum(v.numel() for k, v in official.items() if "running" in k or "num_batches" in k or "fm." in k)
    assert sum(v.numel() for v in official.values()) == sum(p.numel() for p in small.parameters()) + buffers
    q, kv = official["block3.5.attn.q.weight"], official["block3.5.attn.kv.weight"]
    assert torch.equal(mapped["stages.2.blocks.5.attn.qkv.weight"], torch.cat([q, kv]))
    assert torch.equal(mapped["stages.0.downsample.conv.7.running_var"], official["patch_embed1.conv.7.running_var"])
    assert torch.equal(mapped["stages.1.downsample.proj.weight"], official["patch_embed2.proj.weight"])
    assert torch.equal(mapped["stages.0.blocks.2.mlp.dwconv.bias"], official["block1.2.mlp.dwconv.dwconv.bias"])
    assert torch.equal(mapped["stages.2.norm.weight"], official["norm3.weight"])
    assert torch.equal(mapped["norm.bias"], official["norm4.bias"])
    assert torch.equal(mapped["stages.0.blocks.1.attn.complex_weight_ll"], official["block1.1.attn.complex_weight_ll"])
    small_copy = formers.create_model("svt_h_s")
    small_copy.load_state_dict(mapped, strict=True)
    again = checkpoint_filter_fn(mapped, small)
    assert again.keys() == mapped.keys() and all(torch.equal(again[k], mapped[k]) for k in mapped)


def _reference_mixer(mixer, x):
    """The official recipe term by term: real and imaginary parts through separate einsums."""
    b, h, w, c = x.shape
    low, high = mixer.dtcwt(x.permute(0, 3, 1, 2))
    low = low * mixer.complex_weight_ll
    nb, bs = mixer.num_blocks, mixer.block_size
    t = high.permute(5, 0, 2, 3, 4, 1).reshape(2, b, 6, h // 2, w // 2, nb, bs)
    xr, xi = t[0], t[1]
    w1, w2, b1, b2 = (mixer.complex_weight_lh_1, mixer.complex_weight_lh_2, mixer.complex_weight_lh_b1,
                      mixer.complex_weight_lh_b2)

    def mul(a, wt):
        return torch.einsum("...bd,bdk->...bk", a, wt)

    r1 = F.relu(mul(xr, w1[0]) - mul(xi, w1[1]) + b1[0])
    i1 = F.relu(mul(xr, w1[1]) + mul(xi, w1[0]) + b1[1])
    r2 = mul(r1, w2[0]) - mul(i1, w2[1]) + b2[0]
    i2 = mul(r1, w2[1]) + mul(i1, w2[0]) + b2[1]
    high = torch.stack([r2, i2], -1).reshape(b, 6, h // 2, w // 2, c, 2).permute(0, 4, 1, 2, 3, 5)
    return mixer.dtcwt.inverse(low, high).permute(0, 2, 3, 1)


def test_scatter_mixer_matches_complex_reference():
    torch.manual_seed(0)
    mixer = ScatterMixer(16, (8, 6))
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 8, 6, 16)
    torch.testing.assert_close(mixer(x), _reference_mixer(mixer, x), atol=1e-5, rtol=1e-5)
    # a constant map has no highpass; with zero biases the complex MLP keeps it at zero and a unit lowpass
    # gate passes the map through unchanged (the inverse DTCWT reconstructs it)
    with torch.no_grad():
        mixer.complex_weight_ll.fill_(1.0)
        mixer.complex_weight_lh_b1.zero_()
        mixer.complex_weight_lh_b2.zero_()
    const = torch.full((1, 8, 6, 16), 2.0)
    torch.testing.assert_close(mixer(const), const, atol=1e-5, rtol=0)


def test_token_label_logits(small):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = small.forward_features(x)
        logits = small(x)
    assert tokens.shape == (1, 1 + 49, 448)
    ref = small.head(tokens[:, 0]) + 0.5 * small.aux_head(tokens[:, 1:]).max(dim=1).values
    torch.testing.assert_close(logits, ref)
    m = formers.create_model("svt_demo", num_classes=5, token_label=False).eval()
    assert m.aux_head is None
    with torch.no_grad():
        t = m.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(m.forward_head(t), m.head(t[:, 0]))
    m.reset_classifier(0)
    assert m.forward_head(t).shape == (2, 112)


def test_other_input_sizes():
    torch.manual_seed(0)
    m = formers.create_model("svt_demo", num_classes=3).eval()
    gate = m.stages[0].blocks[0].attn
    for hw in ((32, 32), (48, 40), (16, 64)):
        with torch.no_grad():
            feats = m.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
        assert [tuple(f.shape[2:]) for f in feats] == [(-(-hw[0] // r), -(-hw[1] // r)) for r in (4, 8, 16, 32)]
    # the lowpass gate is resampled to other stage-1 map sizes (bilinear); at the built size it is the weight
    assert gate.lowpass_weight(8, 8) is gate.complex_weight_ll
    torch.testing.assert_close(gate.lowpass_weight(12, 10),
                               F.interpolate(gate.complex_weight_ll[None], size=(12, 10), mode="bilinear")[0])
    with pytest.raises(ValueError, match="multiple of 8"):
        m(torch.randn(1, 3, 36, 32))


def test_checkpoint_resizes_the_lowpass_gate():
    src = formers.create_model("svt_demo", num_classes=4)
    dst = formers.create_model("svt_demo", num_classes=6, img_size=48)
    mapped = checkpoint_filter_fn(src.state_dict(), dst)
    key = "stages.0.blocks.0.attn.complex_weight_ll"
    assert mapped[key].shape == (32, 12, 12)
    assert torch.equal(mapped["aux_head.weight"], dst.state_dict()["aux_head.weight"])  # other class count: left
    missing, unexpected = dst.load_state_dict({k: v for k, v in mapped.items() if not k.startswith("head.")},
                                              strict=False)
    assert missing == ["head.weight", "head.bias"] and not unexpected
