"""CrossFormer / CrossFormer++: official checkpoints map completely; the grouping, position bias,
padding masks and cooling layers do what the official code does. (timm has no CrossFormer.)"""
import math

import pytest
import torch

import formers
from formers.models.crossformer import (ActivationCooling, CrossFormer, CrossFormerBlock, GroupAttention,
                                        checkpoint_filter_fn, group_tokens, ungroup_tokens)

TINY = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
PP_SMALL = dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), group_size=(4, 4, 14, 7), use_acl=True)


def official_crossformer_keys(embed_dim, depths, num_heads, group_size=(7, 7, 7, 7), use_acl=False, v1_buffers=False,
                              img=224, patch_kernels=(4, 8, 16, 32), merge_kernels=(2, 4), mlp_ratio=4,
                              num_classes=1000):
    """Key names and shapes of a cheerss/CrossFormer `CrossFormer` state dict, as its model definition
    lays them out: CEL convs `patch_embed.projs.i` with C/2, C/4, ..., the last two equal; DPB width
    dim // 16 (`DynamicPosBias(dim // 4)` quarters it again); merging (LN, then `reductions`) at the end
    of stages 0..n-2; ACL `ex_conv`/`ex_ln` on blocks j with (j+1) % 3 == 0 and j < depth-1. The v1
    code (commit f20000d) also saved `attn.biases` and `attn.relative_position_index` for a group of
    min(G, map side)."""
    def split(c, n):
        return [c // 2 ** (i + 1) if i < n - 1 else c // 2 ** i for i in range(n)]

    keys = {}
    for i, (k, c) in enumerate(zip(patch_kernels, split(embed_dim, len(patch_kernels)))):
        keys[f"patch_embed.projs.{i}.weight"] = (c, 3, k, k)
        keys[f"patch_embed.projs.{i}.bias"] = (c,)
    keys.update({"patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)})
    res = img // patch_kernels[0]
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim, pos = embed_dim * 2 ** s, embed_dim * 2 ** s // 16
        g = min(group_size[s], res)
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            keys.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                         p + "attn.pos.pos_proj.weight": (pos, 2), p + "attn.pos.pos_proj.bias": (pos,)})
            for m, out in (("pos1", pos), ("pos2", pos), ("pos3", heads)):
                keys.update({p + f"attn.pos.{m}.0.weight": (pos,), p + f"attn.pos.{m}.0.bias": (pos,),
                             p + f"attn.pos.{m}.2.weight": (out, pos), p + f"attn.pos.{m}.2.bias": (out,)})
            keys.update({p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                         p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                         p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                         p + "mlp.fc1.weight": (mlp_ratio * dim, dim), p + "mlp.fc1.bias": (mlp_ratio * dim,),
                         p + "mlp.fc2.weight": (dim, mlp_ratio * dim), p + "mlp.fc2.bias": (dim,)})
            if v1_buffers:
                keys[p + "attn.biases"] = ((2 * g - 1) ** 2, 2)
                keys[p + "attn.relative_position_index"] = (g * g, g * g)
            if use_acl and (j + 1) % 3 == 0 and j < depth - 1:
                keys.update({p + "ex_conv.weight": (dim, 1, 3, 3), p + "ex_conv.bias": (dim,),
                             p + "ex_ln.weight": (dim,), p + "ex_ln.bias": (dim,)})
        if s < len(depths) - 1:
            p = f"layers.{s}.downsample."
            keys.update({p + "norm.weight": (dim,), p + "norm.bias": (dim,)})
            for i, (k, c) in enumerate(zip(merge_kernels, split(2 * dim, len(merge_kernels)))):
                keys[p + f"reductions.{i}.weight"] = (c, dim, k, k)
                keys[p + f"reductions.{i}.bias"] = (c,)
            res //= 2
    dim = embed_dim * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim),
                 "head.bias": (num_classes,)})
    return keys


def _random_state_dict(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.zeros(s, dtype=torch.long) if k.endswith("relative_position_index")
                else 0.02 * torch.randn(s, generator=g)) for k, s in keys.items()}


@pytest.mark.parametrize("name, arch, v1_buffers, count", [
    ("crossformer_tiny", dict(TINY), True, 480),     # a v1 release file: 448 tensors + 32 DPB buffers
    ("crossformer_pp_small", dict(PP_SMALL), False, 676),
])
def test_official_keys_all_mapped(tmp_path, name, arch, v1_buffers, count):
    keys = official_crossformer_keys(**arch, v1_buffers=v1_buffers)
    assert len(keys) == count  # what the official definitions save (checked against them)
    sd = _random_state_dict(keys)
    path = str(tmp_path / "official.pth")
    torch.save({"model": sd}, path)
    # strict: every model tensor is filled from the file and every file tensor is used or a known buffer
    model = formers.create_model(name, checkpoint=path)
    own = model.state_dict()
    used = [k for k in sd if not k.endswith(("attn.biases", "attn.relative_position_index"))]
    assert len(used) == len(own)
    torch.testing.assert_close(own["stages.1.downsample.projs.1.weight"], sd["layers.0.downsample.reductions.1.weight"])
    torch.testing.assert_close(own["stages.3.downsample.norm.bias"], sd["layers.2.downsample.norm.bias"])
    if arch.get("use_acl"):
        torch.testing.assert_close(own["stages.2.blocks.14.cooling.conv.weight"],
                                   sd["layers.2.blocks.14.ex_conv.weight"])
    # our own state dict passes unchanged
    assert checkpoint_filter_fn(own, model).keys() == own.keys()


def test_detection_backbone_checkpoint_and_other_channel_count():
    arch = dict(embed_dim=32, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7), use_acl=True)
    keys = official_crossformer_keys(**arch)
    sd = {"backbone." + k: v for k, v in _random_state_dict(keys).items() if not k.startswith(("norm.", "head."))}
    model = CrossFormer(**arch, interval=(4, 2, 1, 1), lda_regions=True, in_chans=1)
    out = checkpoint_filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and not unexpected
    # every CEL stem conv (not only the first) is converted to one channel: summed over RGB
    w = sd["backbone.patch_embed.projs.3.weight"]
    torch.testing.assert_close(model.patch_embed.projs[3].weight, w.sum(1, keepdim=True))


def test_cross_scale_embedding_layers():
    model = CrossFormer(**TINY, num_classes=0)
    stem = [(p.out_channels, p.kernel_size[0], p.stride[0], p.padding[0]) for p in model.patch_embed.projs]
    assert stem == [(32, 4, 4, 0), (16, 8, 4, 2), (8, 16, 4, 6), (8, 32, 4, 14)]  # C/2, C/4, C/8, C/8
    merge = [(p.in_channels, p.out_channels, p.kernel_size[0], p.stride[0], p.padding[0])
             for p in model.stages[1].downsample.projs]
    assert merge == [(64, 64, 2, 2, 0), (64, 64, 4, 2, 1)]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert model.patch_embed(x).shape == (1, 16, 24, 64)  # every kernel lands on the same 16 x 24 grid


def test_cooling_layers_every_third_block_but_the_last():
    model = CrossFormer(embed_dim=32, depths=(2, 6, 18, 2), num_heads=(1, 2, 4, 8), use_acl=True)
    where = [[j for j, b in enumerate(s.blocks) if isinstance(b.cooling, ActivationCooling)] for s in model.stages]
    assert where == [[], [2], [2, 5, 8, 11, 14], []]
    # ACL replaces the residual stream: a block's output is LN(DWConv(x)), zero mean per token
    block = model.stages[1].blocks[2].eval()
    with torch.no_grad():
        y = block(torch.randn(1, 8, 8, 64) * 50)
    torch.testing.assert_close(y.mean(-1), torch.zeros(1, 8, 8), atol=1e-5, rtol=0)


def _members(h, w, g, interval, kind):
    """Group id and in-group (row, col) of every token, derived from the definitions (not the code):
    SDA: adjacent G x G; LDA++: G x G tokens `interval` apart inside G*I regions; LDA v1: tokens
    `interval` apart over the whole map."""
    out = {}
    for y in range(h):
        for x in range(w):
            if kind == "sda":
                out[y, x] = ((y // g, x // g), (y % g, x % g))
            elif kind == "lda_pp":
                span = g * interval
                out[y, x] = ((y // span, x // span, y % interval, x % interval),
                             ((y % span) // interval, (x % span) // interval))
            else:
                out[y, x] = ((y % interval, x % interval), (y // interval, x // interval))
    return out


@pytest.mark.parametrize("kind, long_distance, lda_regions, interval", [
    ("sda", False, False, 1), ("lda_pp", True, True, 2), ("lda_v1", True, False, 3)])
def test_group_attention_matches_a_per_group_reference(kind, long_distance, lda_regions, interval):
    """A 9 x 11 map (padded in every mode) against explicit per-group attention over real tokens only,
    with the DPB evaluated at (row_i - row_j, col_i - col_j) of the in-group positions."""
    torch.manual_seed(0)
    h, w, g, dim, heads = 9, 11, 3, 32, 2
    block = CrossFormerBlock(dim, heads, group_size=g, interval=interval, long_distance=long_distance,
                             lda_regions=lda_regions).eval()
    attn: GroupAttention = block.attn
    x = torch.randn(1, h, w, dim)
    with torch.no_grad():
        got = attn(x, *block.groups(h, w))[0]
        members = _members(h, w, g, interval, kind)
        qkv = attn.qkv(x[0])
        ref = torch.zeros(h, w, dim)
        for gid in {m[0] for m in members.values()}:
            toks = [t for t, m in members.items() if m[0] == gid]
            pos = torch.tensor([members[t][1] for t in toks], dtype=torch.float32)
            q, k, v = torch.stack([qkv[t] for t in toks]).view(len(toks), 3, heads, -1).permute(1, 2, 0, 3)
            offsets = (pos[:, None] - pos[None, :]).reshape(-1, 2)
            p = attn.pos
            bias = p.pos3(p.pos2(p.pos1(p.pos_proj(offsets)))).view(len(toks), len(toks), heads).permute(2, 0, 1)
            a = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + bias).softmax(-1)
            out = attn.proj((a @ v).transpose(0, 1).reshape(len(toks), dim))
            for t, o in zip(toks, out):
                ref[t] = o
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_group_layout_and_its_inverse():
    coords = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1)[None]
    groups = group_tokens(coords, 2, 2, 4, 4)  # ++ LDA: G=2, I=4, regions of 8 x 8
    assert groups.shape == (1, 64, 4, 2)  # 2 x 2 regions, 4 x 4 phases each
    assert groups[0, 0].tolist() == [[0, 0], [0, 4], [4, 0], [4, 4]]  # every 4th token of region (0, 0)
    assert groups[0, 1].tolist() == [[0, 1], [0, 5], [4, 1], [4, 5]]  # phase (0, 1) of that region
    assert groups[0, 16].tolist() == [[0, 8], [0, 12], [4, 8], [4, 12]]  # region (0, 1), phase (0, 0)
    torch.testing.assert_close(ungroup_tokens(groups, 2, 2, 4, 4, 16, 16), coords)


def test_grouping_rules_at_224_and_small_maps():
    v1 = CrossFormerBlock(64, 2, group_size=7, interval=8, long_distance=True, lda_regions=False)
    pp = CrossFormerBlock(64, 2, group_size=4, interval=4, long_distance=True, lda_regions=True)
    assert v1.groups(56, 56) == (7, 7, 8, 8)       # v1 LDA at 224: 7 x 7 groups, every 8th token
    assert v1.groups(64, 88) == (8, 11, 8, 8)      # v1 keeps I, the group grows with the map
    assert pp.groups(56, 56) == (4, 4, 4, 4)       # ++ keeps G and I: 56 is padded to 64
    assert pp.groups(4, 9) == (4, 9, 1, 1)         # a side <= G: one global group, no padding


def test_dense_sizes_and_clear_errors():
    with torch.device("meta"):
        model = formers.create_model("crossformer_pp_small")
    for h, w in [(512, 512), (320, 448), (800, 1216), (225, 250)]:
        feats = model.forward_intermediates(torch.randn(1, 3, h, w, device="meta"), intermediates_only=True)
        assert [f.shape[-2:] for f in feats] == [(h // r, w // r) for r in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.randn(1, 3, 31, 64, device="meta"))
    demo = formers.create_model("crossformer_demo").eval()
    with torch.no_grad():
        for h, w in [(32, 32), (40, 56), (33, 47), (8, 8)]:
            out = demo(torch.randn(1, 3, h, w))
            assert out.shape == (1, 1000) and torch.isfinite(out).all()
