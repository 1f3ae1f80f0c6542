"""UniFormer specifics: official key mapping (plain, S-dagger conv stem, layer scale, light models),
the CBlock / SABlock maths, the light models' token pruning (which also runs at eval), input sizes.

timm has no UniFormer, so there is no peer to compare logits with here; the equivalence with the
official uniformer.py / uniformer_light.py was checked outside the repository.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.models.uniformer import (CBlock, EvoSABlock, SABlock, UniFormer, UniFormerLight, checkpoint_filter_fn,
                                      pool_score)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_keys(depths, dims, mlp_ratio, conv_stem=False, layer_scale=False, light=False,
                  num_classes=1000, in_chans=3):
    """Key -> shape of the official state dict, written from its definition.

    patch_embed{i}: PatchEmbed (proj conv k=s=4 then 2, norm LayerNorm) or, with conv_stem, head_embedding
    (proj.{0: conv3x3 s2 to d/2, 1: BN, 2: GELU, 3: conv3x3 s2, 4: BN}) for stage 1 and middle_embedding
    (proj.{0: conv3x3 s2, 1: BN}) after it; the light file keeps PatchEmbeds after its conv stem.
    blocks1/2: CBlock (pos_embed dw3x3, norm1 BN, conv1 1x1, attn dw5x5, conv2 1x1, norm2 BN, CMlp 1x1 convs);
    blocks3/4: SABlock (pos_embed dw3x3, norm1 LN, attn.qkv / attn.proj Linears, norm2 LN, Mlp Linears,
    gamma_1/gamma_2 (dim,) under layer scale); then norm (BN) and head. The light model adds cls_token,
    cls_upsample, norm_cls and head_cls."""
    keys = {}

    def bn(prefix, d):
        keys.update({f"{prefix}.{k}": (() if k == "num_batches_tracked" else (d,)) for k in BN})

    def conv(prefix, cout, cin, k):
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (cout, cin, k, k), (cout,)

    prev = in_chans
    for i, (depth, d) in enumerate(zip(depths, dims), start=1):
        pe = f"patch_embed{i}"
        if conv_stem and i == 1:
            conv(f"{pe}.proj.0", d // 2, prev, 3)
            bn(f"{pe}.proj.1", d // 2)
            conv(f"{pe}.proj.3", d, d // 2, 3)
            bn(f"{pe}.proj.4", d)
        elif conv_stem and not light:
            conv(f"{pe}.proj.0", d, prev, 3)
            bn(f"{pe}.proj.1", d)
        else:
            conv(f"{pe}.proj", d, prev, 4 if i == 1 else 2)
            keys[f"{pe}.norm.weight"] = keys[f"{pe}.norm.bias"] = (d,)
        h = int(d * mlp_ratio)
        for j in range(depth):
            b = f"blocks{i}.{j}"
            keys[f"{b}.pos_embed.weight"], keys[f"{b}.pos_embed.bias"] = (d, 1, 3, 3), (d,)
            if i <= 2:
                bn(f"{b}.norm1", d)
                conv(f"{b}.conv1", d, d, 1)
                keys[f"{b}.attn.weight"], keys[f"{b}.attn.bias"] = (d, 1, 5, 5), (d,)
                conv(f"{b}.conv2", d, d, 1)
                bn(f"{b}.norm2", d)
                conv(f"{b}.mlp.fc1", h, d, 1)
                conv(f"{b}.mlp.fc2", d, h, 1)
            else:
                for n in ("norm1", "norm2"):
                    keys[f"{b}.{n}.weight"] = keys[f"{b}.{n}.bias"] = (d,)
                keys[f"{b}.attn.qkv.weight"], keys[f"{b}.attn.qkv.bias"] = (3 * d, d), (3 * d,)
                keys[f"{b}.attn.proj.weight"], keys[f"{b}.attn.proj.bias"] = (d, d), (d,)
                keys[f"{b}.mlp.fc1.weight"], keys[f"{b}.mlp.fc1.bias"] = (h, d), (h,)
                keys[f"{b}.mlp.fc2.weight"], keys[f"{b}.mlp.fc2.bias"] = (d, h), (d,)
                if layer_scale:
                    keys[f"{b}.gamma_1"] = keys[f"{b}.gamma_2"] = (d,)
        prev = d
    bn("norm", dims[-1])
    keys["head.weight"], keys["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    if light:
        keys["cls_token"] = (1, 1, dims[2])
        keys["cls_upsample.weight"], keys["cls_upsample.bias"] = (dims[3], dims[2]), (dims[3],)
        keys["norm_cls.weight"] = keys["norm_cls.bias"] = (dims[3],)
        keys["head_cls.weight"], keys["head_cls.bias"] = (num_classes, dims[3]), (num_classes,)
    return keys


S_DIMS = (64, 128, 320, 512)
OFFICIAL = {
    "uniformer_xxs": dict(depths=(2, 5, 8, 2), dims=(56, 112, 224, 448), mlp_ratio=3, conv_stem=True, light=True),
    "uniformer_xs": dict(depths=(3, 5, 9, 3), dims=(64, 128, 256, 512), mlp_ratio=3, conv_stem=True, light=True),
    "uniformer_small": dict(depths=(3, 4, 8, 3), dims=S_DIMS, mlp_ratio=4),
    "uniformer_small_plus": dict(depths=(3, 5, 9, 3), dims=S_DIMS, mlp_ratio=4, conv_stem=True),
    "uniformer_base_ls": dict(depths=(5, 8, 20, 7), dims=S_DIMS, mlp_ratio=4, layer_scale=True),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_keys_fully_mapped(name):
    """Every official key maps onto one of ours with the same shape, and nothing of ours is left over."""
    with torch.device("meta"):
        model = formers.create_model(name)
        official = {k: torch.empty(s, device="meta") for k, s in official_keys(**OFFICIAL[name]).items()}
    own = model.state_dict()
    mapped = checkpoint_filter_fn({"model": official}, model)  # the release's wrapper
    assert len(mapped) == len(official)
    assert set(mapped) == set(own)
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if v.shape != own[k].shape}
    assert not bad, bad
    n_official = sum(v.numel() for k, v in official.items() if not re.search(r"running_|num_batches", k))
    assert n_official == sum(p.numel() for p in model.parameters())


def test_mapping_puts_tensors_in_the_right_place():
    g = torch.Generator().manual_seed(0)
    cfg = OFFICIAL["uniformer_small_plus"]
    official = {k: torch.randn(s, generator=g) if s else torch.tensor(7) for k, s in official_keys(**cfg).items()}
    with torch.device("meta"):
        model = formers.create_model("uniformer_small_plus")
    mapped = checkpoint_filter_fn({f"module.{k}": v for k, v in official.items()}, model)
    pairs = {"stages.0.patch_embed.conv1.weight": "patch_embed1.proj.0.weight",
             "stages.0.patch_embed.norm1.running_var": "patch_embed1.proj.1.running_var",
             "stages.0.patch_embed.conv2.bias": "patch_embed1.proj.3.bias",
             "stages.0.patch_embed.norm2.weight": "patch_embed1.proj.4.weight",
             "stages.2.patch_embed.conv.weight": "patch_embed3.proj.0.weight",
             "stages.3.patch_embed.norm.num_batches_tracked": "patch_embed4.proj.1.num_batches_tracked",
             "stages.1.blocks.4.attn.weight": "blocks2.4.attn.weight",
             "stages.3.blocks.2.attn.qkv.bias": "blocks4.2.attn.qkv.bias",
             "norm.running_mean": "norm.running_mean", "head.weight": "head.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(mapped[ours], official[theirs]), ours
    # layer scale: gamma_1/2 -> ls1/ls2.scale
    with torch.device("meta"):
        model = formers.create_model("uniformer_base_ls")
    gam = {"blocks3.0.gamma_1": torch.full((320,), 0.5), "blocks4.6.gamma_2": torch.full((512,), 2.0)}
    mapped = checkpoint_filter_fn(gam, model)
    assert set(mapped) == {"stages.2.blocks.0.ls1.scale", "stages.3.blocks.6.ls2.scale"}
    # our own state dict passes through unchanged
    sd = formers.create_model("uniformer_demo").state_dict()
    again = checkpoint_filter_fn(sd, formers.create_model("uniformer_demo"))
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_token_labeling_aux_head_dropped_with_a_warning():
    model = formers.create_model("uniformer_demo")
    sd = {"head.weight": torch.zeros(1000, 128), "aux_head.weight": torch.zeros(1000, 128),
          "aux_head.bias": torch.zeros(1000)}
    with pytest.warns(UserWarning, match="aux_head.weight.*token-labeling|token-labeling.*aux_head"):
        out = checkpoint_filter_fn(sd, model)
    assert set(out) == {"head.weight"}
    # CBlock layer scale of the token-labeling UniFormer-L is stored (1, C, 1, 1): flattened to ours
    m = UniFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=32, layer_scale_init_value=1e-6,
                  layer_scale_conv=True)
    out = checkpoint_filter_fn({"blocks1.0.gamma_1": torch.ones(1, 16, 1, 1)}, m)
    assert out["stages.0.blocks.0.ls1.scale"].shape == m.stages[0].blocks[0].ls1.scale.shape == (16,)


def test_official_release_file_loads(tmp_path):
    """An official-format .pth (wrapped in {'model': ...}) loads through create_model(checkpoint=...)."""
    torch.manual_seed(0)
    src = formers.create_model("uniformer_demo").eval()
    for mod in src.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)

    def official_name(k):
        k = re.sub(r"^stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
        return re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"blocks{int(m[1]) + 1}.", k)

    path = str(tmp_path / "uniformer_demo.pth")
    torch.save({"model": {official_name(k): v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    loaded = formers.create_model("uniformer_demo", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return module


def test_cblock_maths():
    """DPE first (x += dw3x3(x)), then x += conv1x1(dw5x5(conv1x1(BN(x)))), then x += fc2(GELU(fc1(BN(x))))."""
    blk = _randomize(CBlock(8, mlp_ratio=2)).eval()
    x = torch.randn(2, 8, 6, 5)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    x1 = x + F.conv2d(x, blk.pos_embed.weight, blk.pos_embed.bias, padding=1, groups=8)
    a = F.conv2d(bn(x1, blk.norm1), blk.conv1.weight, blk.conv1.bias)
    a = F.conv2d(a, blk.attn.weight, blk.attn.bias, padding=2, groups=8)
    x2 = x1 + F.conv2d(a, blk.conv2.weight, blk.conv2.bias)
    m = F.gelu(F.conv2d(bn(x2, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    ref = x2 + F.conv2d(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)
    assert blk.attn.kernel_size == (5, 5) and blk.attn.groups == 8 and blk.pos_embed.kernel_size == (3, 3)


def test_sablock_maths_and_layer_scale():
    blk = _randomize(SABlock(16, num_heads=4, mlp_ratio=2, layer_scale_init_value=1e-6)).eval()
    x = torch.randn(2, 16, 3, 4)
    x1 = x + F.conv2d(x, blk.pos_embed.weight, blk.pos_embed.bias, padding=1, groups=16)
    t = x1.flatten(2).transpose(1, 2)
    n = F.layer_norm(t, (16,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, k, v = (n @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(2, 12, 3, 4, 4).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-1, -2)) * 4 ** -0.5).softmax(-1) @ v
    o = o.transpose(1, 2).reshape(2, 12, 16) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    t = t + blk.ls1.scale * o
    n = F.layer_norm(t, (16,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    t = t + blk.ls2.scale * (F.gelu(n @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T
                             + blk.mlp.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), t.transpose(1, 2).reshape(2, 16, 3, 4), atol=1e-5, rtol=1e-5)


def test_variant_details():
    """Heads = dim // head_dim; layer scale (1e-6) only in B+LS's attention blocks; LayerNorm eps 1e-6 in
    blocks but 1e-5 in the patch embeddings (an atol-1e-5 logit check would not see that)."""
    with torch.device("meta"):
        small, splus, base_ls = (formers.create_model(n) for n in ("uniformer_small", "uniformer_small_plus",
                                                                    "uniformer_base_ls"))
    assert [small.stages[i].blocks[0].attn.num_heads for i in (2, 3)] == [5, 8]
    assert [splus.stages[i].blocks[0].attn.num_heads for i in (2, 3)] == [10, 16]
    assert all(s.patch_embed.norm.eps == 1e-5 for s in small.stages)
    assert all(b.norm1.eps == b.norm2.eps == 1e-6 for s in small.stages[2:] for b in s.blocks)
    assert not any("ls" in k for k in small.state_dict())
    ls = [k for k in base_ls.state_dict() if ".ls" in k]
    assert len(ls) == 2 * (20 + 7) and all(k.startswith(("stages.2.", "stages.3.")) for k in ls)
    assert isinstance(splus.get_submodule(splus.pretrained_cfg["first_conv"]), torch.nn.Conv2d)
    assert isinstance(small.get_submodule(small.pretrained_cfg["first_conv"]), torch.nn.Conv2d)
    assert small.pretrained_cfg["crop_pct"] == 0.875
    base = formers.create_model("uniformer_small", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "p", 0.0) for s in base.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 18))


def _pruning_reference(blk, x, cls_token, score):
    """Evo-ViT pruning written differently: a boolean mask of the top-k tokens instead of a sort."""
    x = x + blk.pos_embed(x)
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    keep = int(h * w * blk.prune_ratio)
    kept_idx = score.topk(keep, dim=1).indices.sort(dim=1).values
    mask = torch.zeros_like(score, dtype=torch.bool).scatter(1, kept_idx, True)
    wts = torch.where(mask, 0.0, score)
    merged = (wts / wts.sum(1, keepdim=True)).unsqueeze(1) @ t
    kept = t.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, c))
    seq = torch.cat([cls_token, kept, merged], 1)
    y = blk.attn(blk.norm1(seq))
    seq = seq + y
    z = blk.mlp(blk.norm2(seq))
    seq = seq + z
    out = torch.where(mask.unsqueeze(-1), 0.0, t + (y + z)[:, -1:])
    out = out.scatter(1, kept_idx.unsqueeze(-1).expand(-1, -1, c), seq[:, 1:-1])
    return out.transpose(1, 2).reshape(b, c, h, w), seq[:, :1]


@pytest.mark.parametrize("train", [False, True])
def test_token_pruning(train):
    """Half the tokens (highest score) go through attention with cls + a score-weighted merged token; the
    others all get the merged token's update; the same at eval (no dropout/drop path here)."""
    torch.manual_seed(0)
    blk = _randomize(EvoSABlock(16, 4, mlp_ratio=2, prune_ratio=0.5, trade_off=0.5)).train(train)
    x, cls_token, score = torch.randn(2, 16, 4, 5), torch.randn(2, 1, 16), torch.rand(2, 20)
    out, cls_out, new_score = blk(x, cls_token, score)
    ref, ref_cls = _pruning_reference(blk, x, cls_token, score)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_out, ref_cls, atol=1e-5, rtol=1e-5)
    # only the kept tokens' scores move, each to (1 - t) * old + t * (its attention from cls)
    kept = score.topk(10, dim=1).indices
    dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, kept, False)
    torch.testing.assert_close(new_score[dropped], score[dropped], rtol=0, atol=0)
    assert (new_score.gather(1, kept) != score.gather(1, kept)).all()
    # the dropped tokens share one update
    delta = (out - (x + blk.pos_embed(x))).flatten(2).transpose(1, 2)[dropped].reshape(2, 10, 16)
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), atol=1e-6, rtol=0)


def test_single_dropped_token_score_quirk():
    """With 2 tokens (keep 1), the official code (telling cases apart by shape) refreshes the dropped token's
    score too, with the cls attention to the merged token; we do the same (its logits then match)."""
    blk = _randomize(EvoSABlock(16, 4, mlp_ratio=2, prune_ratio=0.5, trade_off=0.5), seed=3).eval()
    x, cls_token, score = torch.randn(1, 16, 1, 2), torch.randn(1, 1, 16), torch.tensor([[0.2, 0.7]])
    with torch.no_grad():
        _, _, new = blk(x, cls_token, score)
        # cls attention over [kept (token 1), merged (token 0 alone)] after the DPE and norm1
        t = (x + blk.pos_embed(x)).flatten(2).transpose(1, 2)
        seq = blk.norm1(torch.cat([cls_token, t[:, 1:], t[:, :1]], 1))
        q, k, _ = (blk.attn.qkv(seq)).reshape(1, 3, 3, 4, 4).permute(2, 0, 3, 1, 4)
        a = ((q[:, :, :1] @ k.transpose(-1, -2)) * 0.5).softmax(-1)[:, :, 0, 1:].mean(1)  # (1, 2)
    torch.testing.assert_close(new, torch.stack([0.5 * 0.2 + 0.5 * a[0, 1], 0.5 * 0.7 + 0.5 * a[0, 0]])[None])


def test_pool_score_keeps_the_sum():
    s = torch.rand(2, 6 * 4)
    p = pool_score(s, (6, 4))
    assert p.shape == (2, 6)
    torch.testing.assert_close(p.sum(1), s.sum(1))
    torch.testing.assert_close(p, F.avg_pool2d(s.reshape(2, 1, 6, 4), 2).flatten(1) * 4)


TINY_LIGHT = dict(depths=(1, 1, 3, 2), embed_dims=(8, 16, 32, 64), head_dim=8, num_classes=5)


def test_light_eval_is_the_pooled_head_and_cls_head_training():
    torch.manual_seed(0)
    model = UniFormerLight(**TINY_LIGHT).eval()
    assert [b.prune_ratio for b in model.stages[2].blocks] == [1, 0.5, 0.5]
    assert [b.prune_ratio for b in model.stages[3].blocks] == [0.5, 0.5]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(logits, model.head(feats.mean((2, 3))))
        # the cls head and its norm play no part at eval; the cls token does (through attention)
        model.head_cls.weight.add_(1.0)
        model.norm_cls.bias.add_(1.0)
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
        model.cls_token.add_(1.0)
        assert not torch.allclose(model(x), logits)
    # training: (head, cls head) logits by default, as the official model; all params trained.
    # set_cls_head_training(False): the head's logits only
    model.train()
    model.set_cls_head_training(False)
    assert model(x).shape == (2, 5)
    model.set_cls_head_training(True)
    out, out_cls = model(x)
    assert out.shape == out_cls.shape == (2, 5)
    (out.logsumexp(-1) + out_cls.logsumexp(-1)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["uniformer_small", "uniformer_small_plus", "uniformer_xxs"])
@pytest.mark.parametrize("size", [(512, 512), (224, 352)])
def test_dense_sizes(name, size):
    with torch.device("meta"):
        model = formers.create_model(name)
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]


def test_light_models_take_small_and_odd_grids():
    """Multiples of 32 only; at 32x32 the last stage has one token (kept: 0, merged: 1)."""
    model = UniFormerLight(**TINY_LIGHT).eval()
    with torch.no_grad():
        for size in [(32, 32), (32, 64), (96, 160)]:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 48, 64))


def test_unsupported_size_error_names_the_model():
    model = formers.create_model("uniformer_demo")
    with pytest.raises(ValueError, match="uniformer_demo.*100x100.*multiple of 32"):
        model(torch.randn(1, 3, 100, 100))


def test_intermediates_norm_and_grad_checkpointing():
    torch.manual_seed(0)
    model = formers.create_model("uniformer_demo", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.norm(feats[-1]))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, final)
    model.train()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "stages.0.blocks.0.pos_embed.weight" not in model.no_weight_decay()  # the DPE conv is decayed
