"""Swin: official and timm checkpoints load and give the peers' logits; padding is masked."""
import pytest
import torch

import formers
from formers.models.swin import SwinBlock

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window=7, img=224)


def official_swin_keys(embed_dim, depths, num_heads, window, img, num_classes=1000, patch=4, mlp_ratio=4):
    """Key names and shapes of a microsoft/Swin-Transformer `SwinTransformer` state dict,
    as its model definition lays them out (patch merging at the end of stages 0..n-2, the
    persistent `relative_position_index` and, in shifted blocks, `attn_mask` buffers)."""
    keys = {"patch_embed.proj.weight": (embed_dim, 3, patch, patch), "patch_embed.proj.bias": (embed_dim,),
            "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)}
    res = img // patch
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        win = min(window, res)
        shifted = res > window
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                         p + "attn.relative_position_bias_table": ((2 * win - 1) ** 2, heads),
                         p + "attn.relative_position_index": (win * win, win * win),
                         p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                         p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                         p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                         p + "mlp.fc1.weight": (mlp_ratio * dim, dim), p + "mlp.fc1.bias": (mlp_ratio * dim,),
                         p + "mlp.fc2.weight": (dim, mlp_ratio * dim), p + "mlp.fc2.bias": (dim,)})
            if j % 2 == 1 and shifted:
                keys[p + "attn_mask"] = ((res // win) ** 2, win * win, win * win)
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            keys.update({p + "reduction.weight": (2 * dim, 4 * dim), p + "norm.weight": (4 * dim,),
                         p + "norm.bias": (4 * dim,)})
            res //= 2
    dim = embed_dim * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (num_classes, dim),
                 "head.bias": (num_classes,)})
    return keys


def _official_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_swin_keys(**TINY).items():
        if k.endswith("relative_position_index"):
            sd[k] = torch.zeros(shape, dtype=torch.long)  # rebuilt by the model, value irrelevant here
        elif k.endswith("attn_mask"):
            sd[k] = torch.zeros(shape)
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.02 * torch.randn(shape, generator=g)
    return sd


def test_official_keys_all_mapped(tmp_path):
    sd = _official_state_dict()
    assert len(sd) == 190  # what the official definition saves for Swin-T (checked against it)
    path = str(tmp_path / "swin_tiny_patch4_window7_224.pth")
    torch.save({"model": sd}, path)
    # strict load: every model tensor is filled and every official tensor is used or a known buffer
    model = formers.create_model("swin_tiny_patch4_window7_224", checkpoint=path)
    own = model.state_dict()
    used = {k for k in sd if not k.endswith(("relative_position_index", "attn_mask"))}
    assert len(used) == len(own)
    torch.testing.assert_close(own["layers.1.downsample.reduction.weight"], sd["layers.0.downsample.reduction.weight"])


def test_official_checkpoint_gives_timm_logits(tmp_path):
    """The same official-format file through timm's own converter and through ours: same logits."""
    sd = _official_state_dict()
    path = str(tmp_path / "official.pth")
    torch.save({"model": sd}, path)
    ours = formers.create_model("swin_tiny_patch4_window7_224", checkpoint=path).eval()
    peer = timm.create_model("swin_tiny_patch4_window7_224").eval()
    from timm.models.swin_transformer import checkpoint_filter_fn as timm_filter
    peer.load_state_dict(timm_filter(dict(sd), peer))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-5)


def test_timm_checkpoint_gives_timm_logits(tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model("swin_tiny_patch4_window7_224").eval()
    path = str(tmp_path / "timm.pth")
    torch.save(peer.state_dict(), path)
    ours = formers.create_model("swin_tiny_patch4_window7_224", checkpoint=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-5)
        # features too: timm's stage outputs are NHWC, ours NCHW
        theirs = peer.forward_intermediates(x, intermediates_only=True)
        mine = ours.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_window_bias_table_resized_for_a_larger_window(tmp_path):
    src = formers.create_model("swin_tiny_patch4_window7_224")
    path = str(tmp_path / "w.safetensors")
    formers.save_checkpoint(src, path)
    dst = formers.create_model("swin_tiny_patch4_window7_224", window_size=12, checkpoint=path)
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 3)


def test_padded_tokens_are_masked_out_of_attention():
    """A 5x5 map in a 7x7 window: each real token attends to the 25 real tokens only, with the
    bias the 7x7 table gives their offsets."""
    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=7).eval()
    x = torch.randn(1, 5, 5, 16)
    with torch.no_grad():
        got = block._attention(x)
        attn = block.attn
        q, k, v = attn.qkv(x.reshape(25, 16)).view(25, 3, 2, 8).permute(1, 2, 0, 3)
        pos = torch.tensor([r * 7 + c for r in range(5) for c in range(5)])
        idx = attn.relative_position_index[pos][:, pos]
        bias = attn.relative_position_bias_table[idx].permute(2, 0, 1)
        w = (q @ k.transpose(-1, -2) * 8 ** -0.5 + bias).softmax(-1)
        ref = attn.proj((w @ v).transpose(0, 1).reshape(25, 16)).view(1, 5, 5, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_any_input_size():
    model = formers.create_model("swin_demo").eval()
    with torch.no_grad():
        for h, w in [(32, 32), (30, 45), (17, 64), (8, 8)]:
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
            assert feats[0].shape[-2:] == (-(-h // 2), -(-w // 2))
