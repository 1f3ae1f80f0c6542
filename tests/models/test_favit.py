"""FaViT specifics: official key mapping, the factorization attention against a direct (unfold +
adaptive-pool) computation, the large-pad reflection, other input sizes.

timm has no FaViT; the equivalence with the official classification/favit.py (same weights, logits
within 1e-6 at 224x224, 256x192 and 200x232) was checked outside the repository.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import formers
from formers.models.favit import FactorizationAttention, checkpoint_filter_fn, reflect_pad

B0 = dict(dims=(32, 64, 128, 256), depths=(2, 2, 6, 2), heads=(1, 2, 4, 8), mlp=(8, 6, 4, 4), srs=(8, 4, 2, 1))


def official_keys(dims, depths, heads, mlp, srs, num_classes=1000, in_chans=3):
    """Key -> shape of the official FactorizationTransformer state dict, written from its definition:
    per stage i (1-based) patch_embed{i} (conv 7x7 or 3x3 + LayerNorm), block{i}.{j} and norm{i}; in a
    block's attn, q, kv_g / sr / norm / local_conv_g on the C_g global channels, kv_l (depthwise 3x3 +
    pointwise) on the rest, and per local group fcs / single_heads (per-head widths) / local_convs, proj;
    the FFN is fc1, dwconv.dwconv, fc2; then head."""
    keys, prev = {}, in_chans
    for i, (d, depth, h, m, sr) in enumerate(zip(dims, depths, heads, mlp, srs), start=1):
        k = 7 if i == 1 else 3
        keys[f"patch_embed{i}.proj.weight"], keys[f"patch_embed{i}.proj.bias"] = (d, prev, k, k), (d,)
        keys[f"patch_embed{i}.norm.weight"] = keys[f"patch_embed{i}.norm.bias"] = (d,)
        mul = [2, 7, 7] if sr > 1 else [1, 7]
        single = [d // sum(mul) * x for x in mul]
        cg, cl = single[0], d - single[0]
        for j in range(depth):
            b = f"block{i}.{j}."
            s = {"norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "attn.q.weight": (d, d), "attn.q.bias": (d,),
                 "attn.kv_g.weight": (2 * cg, cg), "attn.kv_g.bias": (2 * cg,),
                 "attn.kv_l.depth_conv.weight": (cl, 1, 3, 3), "attn.kv_l.depth_conv.bias": (cl,),
                 "attn.kv_l.point_conv.weight": (cl, cl, 1, 1), "attn.kv_l.point_conv.bias": (cl,),
                 "attn.sr.weight": (cg, cg, sr, sr), "attn.sr.bias": (cg,),
                 "attn.norm.weight": (cg,), "attn.norm.bias": (cg,),
                 "attn.local_conv_g.weight": (cg, 1, 3, 3), "attn.local_conv_g.bias": (cg,),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                 "mlp.fc1.weight": (d * m, d), "mlp.fc1.bias": (d * m,),
                 "mlp.dwconv.dwconv.weight": (d * m, 1, 3, 3), "mlp.dwconv.dwconv.bias": (d * m,),
                 "mlp.fc2.weight": (d, d * m), "mlp.fc2.bias": (d,)}
            for g, c in enumerate(single[1:]):
                w = c // h
                s.update({f"attn.fcs.{g}.weight": (w, w), f"attn.fcs.{g}.bias": (w,),
                          f"attn.single_heads.{g}.weight": (2 * w, w), f"attn.single_heads.{g}.bias": (2 * w,),
                          f"attn.local_convs.{g}.weight": (c, 1, 3, 3), f"attn.local_convs.{g}.bias": (c,)})
            keys.update({b + k: v for k, v in s.items()})
        keys[f"norm{i}.weight"] = keys[f"norm{i}.bias"] = (d,)
        prev = d
    keys["head.weight"], keys["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    return keys


def test_official_keys_fully_mapped():
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) for k, s in official_keys(**B0).items()}
    model = formers.create_model("favit_b0")
    own = model.state_dict()
    mapped = checkpoint_filter_fn({"model": official}, model)
    assert len(mapped) == len(official) == len(own) and set(mapped) == set(own)
    for k, v in mapped.items():
        assert v.shape == own[k].shape, k
    assert sum(v.numel() for v in official.values()) == sum(p.numel() for p in model.parameters()) == 3_427_704
    assert torch.equal(mapped["stages.2.blocks.5.attn.local_kv.1.weight"], official["block3.5.attn.single_heads.1.weight"])
    assert torch.equal(mapped["stages.0.blocks.0.attn.global_v_conv.bias"], official["block1.0.attn.local_conv_g.bias"])
    assert torch.equal(mapped["stages.3.blocks.1.mlp.dwconv.weight"], official["block4.1.mlp.dwconv.dwconv.weight"])
    assert torch.equal(mapped["stages.3.norm.weight"], official["norm4.weight"])
    again = checkpoint_filter_fn(mapped, model)
    assert set(again) == set(mapped) and all(again[k] is mapped[k] for k in mapped)
    model.load_state_dict(mapped)


def _reference_fasa(attn: FactorizationAttention, x, h, w):
    """FaSA written out directly: nn.Unfold for the dilated windows, AdaptiveAvgPool over the flattened
    (windows x channels) axis, explicit softmax attention, per-head query interleaving."""
    b, n, dim = x.shape
    cg = attn.dims[0]
    heads = attn.num_heads
    q = x @ attn.q.weight.T + attn.q.bias
    red = attn.global_sr(x[..., :cg].transpose(1, 2).reshape(b, cg, h, w))
    hr, wr = red.shape[-2:]
    red = F.layer_norm(red.flatten(2).transpose(1, 2), (cg,), attn.global_norm.weight, attn.global_norm.bias)
    kv = red @ attn.global_kv.weight.T + attn.global_kv.bias
    k, v = kv[..., :cg], kv[..., cg:]
    v = v + attn.global_v_conv(v.transpose(1, 2).reshape(b, cg, hr, wr)).flatten(2).transpose(1, 2)
    p = (q[..., :cg] @ k.transpose(1, 2) * cg ** -0.5).softmax(-1)
    outs = [p @ v]
    ql = q[..., cg:].reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    kvl = attn.local_kv_pw(attn.local_kv_dw(x[..., cg:].reshape(b, h, w, -1).permute(0, 3, 1, 2)))
    start_q, start_c = 0, 0
    for g, c in enumerate(attn.dims[1:]):
        ch = c // heads
        qg = ql[..., start_q:start_q + ch]
        kvg = kvl[:, start_c:start_c + c]
        start_q, start_c = start_q + ch, start_c + c
        d = attn.dilations[g]
        s = 6 * d + 1
        kvg = F.pad(kvg, (0, -w % s, 0, -h % s), mode="reflect")
        cols = nn.Unfold(7, dilation=d, stride=s)(kvg)  # (B, c*49, L)
        cols = cols.reshape(b, heads, ch, 49, -1).permute(0, 1, 3, 4, 2).reshape(b, heads, 49, -1)
        pooled = nn.AdaptiveAvgPool2d((None, ch))(cols)
        kvt = attn.local_kv[g](attn.local_fc[g](pooled))
        kt, vt = kvt[..., :ch], kvt[..., ch:]
        vt = vt + attn.local_v_conv[g](vt.transpose(2, 3).reshape(b, c, 7, 7)).reshape(b, heads, ch, 49).transpose(2, 3)
        pg = (qg @ kt.transpose(-1, -2) * ch ** -0.5).softmax(-1)
        outs.append((pg @ vt).permute(0, 2, 1, 3).reshape(b, n, c))
    return torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("dim,heads,sr,hw", [(64, 2, 4, (28, 28)), (48, 3, 2, (15, 22)), (32, 4, 1, (9, 11))])
def test_factorization_attention_matches_direct_computation(dim, heads, sr, hw):
    torch.manual_seed(0)
    attn = FactorizationAttention(dim, heads, sr).eval()
    for prm in attn.parameters():
        nn.init.normal_(prm, std=0.2)
    h, w = hw
    x = torch.randn(2, h * w, dim)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), _reference_fasa(attn, x, h, w), atol=1e-5, rtol=1e-4)
    assert attn.dims == ([dim // 16 * 2, dim // 16 * 7, dim // 16 * 7] if sr > 1 else [dim // 8, dim // 8 * 7])


def test_reflect_pad_beyond_one_reflection():
    x = torch.arange(4.0).reshape(1, 1, 1, 4)                     # 0 1 2 3
    torch.testing.assert_close(reflect_pad(x, 0, 3), F.pad(x, (0, 3, 0, 0), mode="reflect"))  # one reflection
    # 0 1 2 3 | 2 1 0 | then the padded row 0123210 reflects on: 1 2 3
    assert reflect_pad(x, 0, 6)[0, 0, 0].tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    col = torch.tensor([5.0]).reshape(1, 1, 1, 1)
    assert reflect_pad(col, 2, 3).shape == (1, 1, 3, 4) and (reflect_pad(col, 2, 3) == 5).all()


@pytest.mark.parametrize("size", [(29, 29), (64, 96), (100, 130)])
def test_other_input_sizes(size):
    model = formers.create_model("favit_demo").eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert model(x).shape == (1, 1000)
        torch.testing.assert_close(model.forward_head(final), model(x))
    expect, side = [], list(size)
    for i in range(4):
        side = [-(-s // (4 if i == 0 else 2)) for s in side]  # conv 7 s4 p3, then conv 3 s2 p1: ceil
        expect.append((model.feature_info[i]["num_chs"], *side))
    assert [tuple(m.shape[1:]) for m in maps] == expect


def test_too_small_input_is_a_clear_error():
    model = formers.create_model("favit_demo")
    assert model.min_input_size == 29  # stage-1 map (ceil(H/4)) must hold one 8x8 reduction cell
    with pytest.raises(ValueError, match="at least 29"):
        model(torch.randn(1, 3, 28, 40))


def test_drop_path_rates_and_norms():
    model = formers.create_model("favit_b0", drop_path_rate=0.1)
    rates = [getattr(b.drop_path, "p", 0.0) for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12))
    s = model.stages[0]
    assert s.patch_embed.norm.eps == 1e-5 and s.norm.eps == 1e-6 and s.blocks[0].norm1.eps == 1e-6
    assert s.blocks[0].attn.global_norm.eps == 1e-5
    assert s.patch_embed.proj.kernel_size == (7, 7) and s.patch_embed.proj.stride == (4, 4)
    assert model.stages[1].patch_embed.proj.kernel_size == (3, 3)


def test_demo_learns_a_tiny_task():
    """A few steps on two separable classes drive the loss down (the whole path is trainable)."""
    torch.manual_seed(0)
    model = formers.create_model("favit_demo", num_classes=2, in_chans=1)
    x = torch.randn(16, 1, 32, 32)
    y = torch.arange(16) % 2
    x[y == 1, :, :16] += 1.5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
