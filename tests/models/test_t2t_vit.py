"""T2T-ViT specifics: official key mapping, the two attention scales, the Performer's random
features, the fixed sinusoid table, the soft-split grid, and other input sizes.

timm has no T2T-ViT, so there is no peer in the repo to compare logits with; equivalence with the
official models/t2t_vit.py (same weights -> same logits, t2t_vit_7 and t2t_vit_t_14) was checked
outside the repository.
"""
import math

import pytest
import torch

import formers
from formers.models.t2t_vit import (TokenAttention, TokenPerformer, TokensToToken, TokenTransformer,
                                    checkpoint_filter_fn, sinusoid_table)


def official_keys(tokens_type, embed_dim, depth, mlp_ratio, img=224, token_dim=64, in_chans=3, num_classes=1000):
    """Key -> shape of the official T2T_ViT state dict, written from its definition: a T2T_module with
    attention1 (input in_chans*7*7) and attention2 (input token_dim*3*3), each a Token_performer
    (kqv, proj, norm1, norm2, mlp as Sequential(Linear, GELU, Linear, Dropout), frozen w of
    token_dim/2 rows) or a Token_transformer (norm1, attn.qkv without bias, attn.proj, norm2,
    mlp.fc1/fc2 of ratio 1); project; cls_token; pos_embed (1, 1 + (img/16)^2, D); depth Blocks
    (qkv without bias); norm; head."""
    keys = {}
    for i, dim in ((1, in_chans * 49), (2, token_dim * 9)):
        p = f"tokens_to_token.attention{i}."
        t = token_dim
        if tokens_type == "performer":
            keys.update({p + "kqv.weight": (3 * t, dim), p + "kqv.bias": (3 * t,),
                         p + "proj.weight": (t, t), p + "proj.bias": (t,),
                         p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                         p + "norm2.weight": (t,), p + "norm2.bias": (t,),
                         p + "mlp.0.weight": (t, t), p + "mlp.0.bias": (t,),
                         p + "mlp.2.weight": (t, t), p + "mlp.2.bias": (t,), p + "w": (t // 2, t)})
        else:
            keys.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "attn.qkv.weight": (3 * t, dim),
                         p + "attn.proj.weight": (t, t), p + "attn.proj.bias": (t,),
                         p + "norm2.weight": (t,), p + "norm2.bias": (t,),
                         p + "mlp.fc1.weight": (t, t), p + "mlp.fc1.bias": (t,),
                         p + "mlp.fc2.weight": (t, t), p + "mlp.fc2.bias": (t,)})
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    keys["tokens_to_token.project.weight"], keys["tokens_to_token.project.bias"] = (d, token_dim * 9), (d,)
    keys["cls_token"], keys["pos_embed"] = (1, 1, d), (1, 1 + (img // 16) ** 2, d)
    for j in range(depth):
        b = f"blocks.{j}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                     b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                     b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    keys["norm.weight"], keys["norm.bias"] = (d,), (d,)
    keys["head.weight"], keys["head.bias"] = (num_classes, d), (num_classes,)
    return keys


def _random_sd(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in keys.items()}


@pytest.mark.parametrize("name,cfg", [
    ("t2t_vit_7", dict(tokens_type="performer", embed_dim=256, depth=7, mlp_ratio=2.0)),
    ("t2t_vit_t_14", dict(tokens_type="transformer", embed_dim=384, depth=14, mlp_ratio=3.0)),
])
def test_official_keys_fully_mapped(name, cfg):
    keys = official_keys(**cfg)
    with torch.device("meta"):
        model = formers.create_model(name)
    own = model.state_dict()
    official = {"state_dict_ema": {"module." + k: torch.empty(s, device="meta") for k, s in keys.items()}}
    mapped = checkpoint_filter_fn(official, model)
    assert len(mapped) == len(keys) == len(own)
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert tuple(v.shape) == tuple(own[k].shape), k
    # the official count (its frozen pos_embed and w included) is ours plus our buffers
    assert sum(math.prod(s) for s in keys.values()) == sum(t.numel() for t in own.values())


def test_official_weights_load_and_our_dict_passes_through():
    keys = official_keys("performer", 256, 7, 2.0)
    sd = _random_sd(keys)
    model = formers.create_model("t2t_vit_7")
    mapped = checkpoint_filter_fn(sd, model)
    model.load_state_dict(mapped, strict=True)
    assert torch.equal(model.tokens_to_token.attention1.mlp.fc1.weight, sd["tokens_to_token.attention1.mlp.0.weight"])
    assert torch.equal(model.tokens_to_token.attention2.mlp.fc2.bias, sd["tokens_to_token.attention2.mlp.2.bias"])
    assert torch.equal(model.tokens_to_token.attention1.w, sd["tokens_to_token.attention1.w"])  # loaded, not redrawn
    again = checkpoint_filter_fn(model.state_dict(), model)
    assert set(again) == set(model.state_dict())
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def _reference_attention(x, qkv_w, proj, scale):
    q, k, v = (x @ qkv_w.t()).chunk(3, dim=-1)
    a = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
    return v + proj(a @ v)


def test_t2t_attention_scales_by_its_input_width():
    """The official T2T-layer attention uses (input width)^-0.5: 147^-0.5 and 576^-0.5 for the two
    layers of a 3-channel model, not its head width 64^-0.5. A head-width scale fails this test."""
    model = formers.create_model("t2t_vit_t_14")
    a1, a2 = model.tokens_to_token.attention1.attn, model.tokens_to_token.attention2.attn
    assert a1.scale == pytest.approx(147 ** -0.5) and a2.scale == pytest.approx(576 ** -0.5)
    torch.manual_seed(0)
    layer = TokenAttention(147, 64).eval()
    x = torch.randn(2, 50, 147)
    with torch.no_grad():
        out = layer(x)
        right = _reference_attention(x, layer.qkv.weight, layer.proj, 147 ** -0.5)
        wrong = _reference_attention(x, layer.qkv.weight, layer.proj, 64 ** -0.5)
    torch.testing.assert_close(out, right, atol=1e-5, rtol=1e-5)
    assert (out - wrong).abs().max() > 1e-3
    # in_chans changes the first layer's width, and with it the scale
    one = formers.create_model("t2t_vit_t_14", in_chans=1)
    assert one.tokens_to_token.attention1.attn.scale == pytest.approx(49 ** -0.5)


def test_backbone_scale_of_the_released_weights():
    """The released checkpoints need q.k scaled by embed_dim^-0.5 in the backbone (the official
    factories set it for pretrained=True); qk_scale='head_dim' gives the from-scratch head_dim^-0.5."""
    default = formers.create_model("t2t_vit_7").eval()
    assert all(b.attn.scale == pytest.approx(256 ** -0.5) for b in default.blocks)
    scratch = formers.create_model("t2t_vit_7", qk_scale="head_dim").eval()
    assert all(b.attn.scale is None for b in scratch.blocks)  # None: SDPA's head_dim^-0.5 = 64^-0.5
    scratch.load_state_dict(default.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (default(x) - scratch(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="qk_scale"):
        formers.create_model("t2t_vit_7", qk_scale="head")


def test_performer_matches_its_formula_and_keeps_w():
    torch.manual_seed(0)
    layer = TokenPerformer(147, 64).eval()
    w = layer.w
    assert w.shape == (32, 64) and not any(p is w for p in layer.parameters())
    torch.testing.assert_close(w @ w.t(), 32.0 * torch.eye(32), atol=1e-4, rtol=0)  # orthogonal rows, norm sqrt(m)
    x = torch.randn(2, 40, 147)
    with torch.no_grad():
        h = layer.norm1(x)
        k, q, v = layer.kqv(h).split(64, dim=-1)  # k first, as in the official code

        def phi(t):
            return torch.exp(t @ w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(32)

        num = torch.einsum("btm,bdm->btd", phi(q), torch.einsum("bsd,bsm->bdm", v, phi(k)))
        den = torch.einsum("btm,bm->bt", phi(q), phi(k).sum(1))[..., None] + 1e-8
        y = v + layer.proj(num / den)
        ref = y + layer.mlp(layer.norm2(y))
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    # w travels with the weights: a fresh layer (another draw) gives the same output once loaded
    other = TokenPerformer(147, 64).eval()
    assert not torch.equal(other.w, w)
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)


def test_sinusoid_table_values():
    t = sinusoid_table(197, 256)
    assert t.shape == (1, 197, 256) and t.dtype == torch.float32
    for p, i in [(0, 0), (1, 0), (5, 3), (196, 10), (196, 255), (100, 128)]:
        angle = p / 10000 ** (2 * (i // 2) / 256)
        expect = math.sin(angle) if i % 2 == 0 else math.cos(angle)
        assert t[0, p, i].item() == pytest.approx(expect, abs=1e-6), (p, i)
    model = formers.create_model("t2t_vit_7")
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    torch.testing.assert_close(model.pos_embed, t, atol=0, rtol=0)


def test_soft_split_grid_and_t2t_shapes():
    assert TokensToToken.grid((224, 224)) == (14, 14)
    assert TokensToToken.grid((384, 384)) == (24, 24)
    assert TokensToToken.grid((225, 160)) == (14, 10)
    t2t = TokensToToken("transformer", 3, 96, 32).eval()
    assert isinstance(t2t.attention1, TokenTransformer)
    with torch.no_grad():
        tokens, hw = t2t(torch.randn(2, 3, 64, 96))
    assert hw == (4, 6) and tokens.shape == (2, 24, 96)


def test_other_input_sizes_resample_the_table():
    """At another size the table is resized bicubically on the fly; that equals building the model at
    that size and loading the 224 weights through checkpoint_filter_fn (the official transfer recipe)."""
    torch.manual_seed(0)
    m224 = formers.create_model("t2t_vit_7").eval()
    m288 = formers.create_model("t2t_vit_7", img_size=288).eval()
    m288.load_state_dict(checkpoint_filter_fn(m224.state_dict(), m288))
    assert m288.pos_embed.shape == (1, 1 + 18 * 18, 256)
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        torch.testing.assert_close(m224(x), m288(x), atol=1e-5, rtol=1e-5)
        out = m224(torch.randn(2, 3, 160, 96))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="t2t_vit_7"):
        m224(torch.randn(1, 3, 2, 64))


def test_intermediates_per_block():
    model = formers.create_model("t2t_vit_7").eval()
    assert [f["module"] for f in model.feature_info] == [f"blocks.{i}" for i in range(7)]
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, norm=True)
        tokens = model.forward_features(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
    assert [tuple(f.shape) for f in feats] == [(1, 256, 8, 6)] * 7
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(feats[-1].flatten(2).transpose(1, 2), tokens[:, 1:])
    assert [tuple(f.shape) for f in only] == [(1, 48, 256)] * 2


def test_demo_learns_a_few_steps():
    """t2t_vit_demo fits a small two-class problem (which half of the image is brighter) in a few steps."""
    torch.manual_seed(0)
    model = formers.create_model("t2t_vit_demo", num_classes=2, in_chans=1, img_size=32)
    x = torch.randn(64, 1, 32, 32)
    y = torch.randint(0, 2, (64,))
    x[:, :, :, :16] += (2 * y - 1).float().view(-1, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
