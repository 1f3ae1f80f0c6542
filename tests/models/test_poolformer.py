"""PoolFormer v1 (models/poolformer.py): official and timm checkpoints, and what is easy to get wrong.

The official key list below is written from the architecture of sail-sg/poolformer's
models/poolformer.py (module names and tensor shapes), not from its code.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.metaformer import checkpoint_filter_fn as timm_filter

import formers
from formers.models.poolformer import checkpoint_filter_fn

S12 = ((2, 2, 6, 2), (64, 128, 320, 512))


def official_keys(depths, dims, num_classes=1000) -> dict:
    """Key -> shape of an official checkpoint: patch_embed.proj (7x7 stem), then `network`, a flat list
    of stage i at 2i (blocks: GroupNorm norm1/norm2 with bias, 1x1-conv mlp.fc1/fc2 with bias,
    layer_scale_1/2 vectors) and a 3x3 downsampling `proj` conv at 2i+1; then norm and head."""
    keys = {"patch_embed.proj.weight": (dims[0], 3, 7, 7), "patch_embed.proj.bias": (dims[0],)}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"network.{2 * i}.{j}."
            for n in ("norm1", "norm2"):
                keys[p + n + ".weight"] = keys[p + n + ".bias"] = (d,)
            keys.update({p + "mlp.fc1.weight": (4 * d, d, 1, 1), p + "mlp.fc1.bias": (4 * d,),
                         p + "mlp.fc2.weight": (d, 4 * d, 1, 1), p + "mlp.fc2.bias": (d,),
                         p + "layer_scale_1": (d,), p + "layer_scale_2": (d,)})
        if i < len(depths) - 1:
            keys[f"network.{2 * i + 1}.proj.weight"] = (dims[i + 1], d, 3, 3)
            keys[f"network.{2 * i + 1}.proj.bias"] = (dims[i + 1],)
    keys["norm.weight"] = keys["norm.bias"] = (dims[-1],)
    keys.update({"head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return keys


def test_every_official_key_and_shape_is_mapped():
    with torch.device("meta"):
        model = formers.create_model("poolformer_s12")
    keys = official_keys(*S12)
    mapped = checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in keys.items()}, model)
    own = model.state_dict()
    assert len(mapped) == len(keys) and set(mapped) == set(own)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert checkpoint_filter_fn(own, model) is own


def test_timm_weights_give_timm_logits(tmp_path):
    """timm's port averages before its final norm (LayerNorm, eps 1e-6); final_norm='layer' does the same."""
    torch.manual_seed(0)
    ref = timm.create_model("poolformer_s12").eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours = formers.create_model("poolformer_s12", checkpoint=str(tmp_path / "w.pth"), final_norm="layer").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)


def test_official_checkpoint_through_timm_and_ours(tmp_path):
    """Official-format weights, mapped by timm's filter into timm and by ours into ours: the bodies agree,
    and our default head is the official one (GroupNorm(1) over the whole map, eps 1e-5, then average)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: (0.02 * torch.randn(s, generator=g) if len(s) > 1 or k.endswith("bias")
              else 1 + 0.1 * torch.randn(s, generator=g)) for k, s in official_keys(*S12).items()}
    ref = timm.create_model("poolformer_s12").eval()
    ref.load_state_dict(timm_filter(dict(sd), ref))
    torch.save(sd, tmp_path / "official.pth")
    path = str(tmp_path / "official.pth")
    ours = formers.create_model("poolformer_s12", checkpoint=path).eval()
    timm_like = formers.create_model("poolformer_s12", checkpoint=path, final_norm="layer").eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        feats = ref.forward_features(x)
        torch.testing.assert_close(ours.forward_features(x), feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(timm_like(x), ref(x), atol=1e-5, rtol=1e-5)
        official_head = F.linear(F.group_norm(feats, 1, sd["norm.weight"], sd["norm.bias"], 1e-5).mean((2, 3)),
                                 sd["head.weight"], sd["head.bias"])
        torch.testing.assert_close(ours(x), official_head, atol=1e-5, rtol=1e-5)
        assert (ours(x) - ref(x)).abs().max() > 1e-3  # the two heads really differ


def test_pooling_mixer_excludes_padding_and_subtracts_the_input():
    model = formers.create_model("poolformer_s12")
    mixer = model.stages[0].blocks[0].token_mixer
    x = torch.full((1, 4, 5, 6), 3.0)
    torch.testing.assert_close(mixer(x), torch.zeros_like(x))  # borders too: count_include_pad=False
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert mixer(x)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4 - 0)


def test_layer_scale_init_and_norms_follow_the_paper():
    for name, init in [("poolformer_s12", 1e-5), ("poolformer_s24", 1e-5), ("poolformer_s36", 1e-6),
                       ("poolformer_m36", 1e-6), ("poolformer_m48", 1e-6)]:
        with torch.device("meta"):
            model = formers.create_model(name)
        block = model.stages[0].blocks[0]
        assert isinstance(block.norm1, torch.nn.GroupNorm) and block.norm1.num_groups == 1
        assert isinstance(block.mlp.act, torch.nn.GELU)
    model = formers.create_model("poolformer_s36")
    assert torch.all(model.stages[2].blocks[3].layer_scale2.scale == 1e-6)
    s12 = formers.create_model("poolformer_s12")
    assert s12.stages[1].blocks[0].layer_scale1.scale[0].item() == pytest.approx(1e-5)
    assert formers.model_info("poolformer_m36")["pretrained_cfg"]["crop_pct"] == 0.95
    assert formers.model_info("poolformer_s12")["pretrained_cfg"]["crop_pct"] == 0.9


def test_any_input_size_unpooled_head_and_grad_checkpointing():
    torch.manual_seed(0)
    model = formers.create_model("poolformer_s12", num_classes=3).eval()
    x = torch.randn(1, 3, 45, 67)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(11, 17), (6, 9), (3, 5), (2, 3)]
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    model.eval().reset_classifier(0, global_pool="")
    with torch.no_grad():
        assert model(x).shape == (1, 512, 2, 3)
    with pytest.raises(ValueError, match="poolformer_s12"):
        model(torch.randn(1, 3, 64, 2))
