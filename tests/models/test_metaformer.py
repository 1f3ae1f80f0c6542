"""MetaFormer baselines (models/metaformer.py): official and timm checkpoints, and what is easy to get wrong.

The official key list below is written from the architecture of sail-sg/metaformer's
metaformer_baselines.py (module names and tensor shapes), not from its code.
"""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.metaformer import checkpoint_filter_fn as timm_filter

import formers
from formers.models.metaformer import checkpoint_filter_fn

S = (64, 128, 320, 512)
SMALL = {  # name: depths, dims, token mixer per stage, MLP head
    "identityformer_s12": ((2, 2, 6, 2), S, ("identity",) * 4, False),
    "randformer_s12": ((2, 2, 6, 2), S, ("identity", "identity", "random", "random"), False),
    "poolformerv2_s12": ((2, 2, 6, 2), S, ("pool",) * 4, False),
    "convformer_s18": ((3, 3, 9, 3), S, ("sepconv",) * 4, True),
    "caformer_s18": ((3, 3, 9, 3), S, ("sepconv", "sepconv", "attention", "attention"), True),
}


def official_keys(depths, dims, mixers, mlp_head, num_classes=1000, tokens=(3136, 784, 196, 49)) -> dict:
    """Key -> shape of an official checkpoint. Stem: downsample_layers.0.{conv, post_norm}; the three
    downsamplings: downsample_layers.i.{pre_norm, conv}; blocks: stages.i.j.*; norms have no bias;
    MLP and mixers have no bias; ResScale in stages 3-4; StarReLU holds a scalar scale and bias."""
    keys = {"downsample_layers.0.conv.weight": (dims[0], 3, 7, 7), "downsample_layers.0.conv.bias": (dims[0],),
            "downsample_layers.0.post_norm.weight": (dims[0],)}
    for i in range(1, 4):
        keys[f"downsample_layers.{i}.pre_norm.weight"] = (dims[i - 1],)
        keys[f"downsample_layers.{i}.conv.weight"] = (dims[i], dims[i - 1], 3, 3)
        keys[f"downsample_layers.{i}.conv.bias"] = (dims[i],)
    for i, (depth, d, mixer) in enumerate(zip(depths, dims, mixers)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            keys[p + "norm1.weight"] = keys[p + "norm2.weight"] = (d,)
            if mixer == "random":
                keys[p + "token_mixer.random_matrix"] = (tokens[i], tokens[i])
            elif mixer == "sepconv":
                keys.update({p + "token_mixer.pwconv1.weight": (2 * d, d), p + "token_mixer.act1.scale": (1,),
                             p + "token_mixer.act1.bias": (1,), p + "token_mixer.dwconv.weight": (2 * d, 1, 7, 7),
                             p + "token_mixer.pwconv2.weight": (d, 2 * d)})
            elif mixer == "attention":
                keys.update({p + "token_mixer.qkv.weight": (3 * d, d), p + "token_mixer.proj.weight": (d, d)})
            if i >= 2:
                keys[p + "res_scale1.scale"] = keys[p + "res_scale2.scale"] = (d,)
            keys.update({p + "mlp.fc1.weight": (4 * d, d), p + "mlp.act.scale": (1,), p + "mlp.act.bias": (1,),
                         p + "mlp.fc2.weight": (d, 4 * d)})
    c = dims[-1]
    keys["norm.weight"] = keys["norm.bias"] = (c,)
    if mlp_head:
        keys.update({"head.fc1.weight": (4 * c, c), "head.fc1.bias": (4 * c,), "head.norm.weight": (4 * c,),
                     "head.norm.bias": (4 * c,), "head.fc2.weight": (num_classes, 4 * c),
                     "head.fc2.bias": (num_classes,)})
    else:
        keys.update({"head.weight": (num_classes, c), "head.bias": (num_classes,)})
    return keys


def random_official(keys: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("random_matrix"):
            sd[k] = torch.softmax(torch.randn(shape, generator=g), -1)
        elif len(shape) > 1 or k.endswith("bias"):
            sd[k] = 0.02 * torch.randn(shape, generator=g)
        else:  # norm weights, scales
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.mark.parametrize("name", list(SMALL))
def test_every_official_key_and_shape_is_mapped(name):
    with torch.device("meta"):
        model = formers.create_model(name)
    keys = official_keys(*SMALL[name])
    mapped = checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in keys.items()}, model)
    own = model.state_dict()
    assert len(mapped) == len(keys) and set(mapped) == set(own)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert checkpoint_filter_fn(own, model) is own  # our own format passes unchanged


def _timm_official_head_eps(m):
    # timm's MlpHead LayerNorm uses eps 1e-6; the official code (and ours) uses torch's 1e-5.
    if hasattr(m.head.fc, "norm"):
        m.head.fc.norm.eps = 1e-5
    return m


@pytest.mark.parametrize("name", ["poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_timm_weights_give_timm_logits(name, tmp_path):
    torch.manual_seed(0)
    ref = _timm_official_head_eps(timm.create_model(name).eval())
    path = str(tmp_path / ("w.safetensors" if name == "caformer_s18" else "w.pth"))
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    else:
        torch.save(ref.state_dict(), path)
    ours = formers.create_model(name, checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_official_checkpoint_through_timm_and_ours(name, tmp_path):
    """The same official-format weights, mapped by timm's filter into timm and by ours into ours."""
    sd = random_official(official_keys(*SMALL[name]))
    ref = _timm_official_head_eps(timm.create_model(name).eval())
    ref.load_state_dict(timm_filter(dict(sd), ref))
    torch.save(sd, tmp_path / "official.pth")
    ours = formers.create_model(name, checkpoint=str(tmp_path / "official.pth")).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_timm_checkpoint_with_another_class_count_keeps_the_mlp_head_body(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("convformer_s18").eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="classifier"):
        ours = formers.create_model("convformer_s18", num_classes=10, checkpoint=str(tmp_path / "w.pth"))
    assert torch.equal(ours.head.fc1.weight, ref.head.fc.fc1.weight)
    assert torch.equal(ours.norm.weight, ref.head.norm.weight) and ours.head.fc2.out_features == 10


def test_randformer_matrices_are_frozen_fixed_size_and_the_cards_plus_part():
    model = formers.create_model("randformer_s12")
    frozen = [b for n, b in model.named_buffers() if n.endswith("random_matrix")]
    assert [tuple(p.shape) for p in frozen] == [(196, 196)] * 6 + [(49, 49)] * 2
    assert not any(n.endswith("random_matrix") for n, _ in model.named_parameters())  # buffers, in the state dict
    mixers = [n for n, m in model.named_modules() if hasattr(m, "random_matrix")]
    assert mixers and all(n + ".random_matrix" in model.state_dict() for n in mixers)
    torch.testing.assert_close(frozen[0].sum(-1), torch.ones(196))  # softmax rows
    # the paper prints "11.9 + 0.2M": trained parameters plus the frozen matrices
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert round(trained, 1) == 11.9 and round(sum(p.numel() for p in frozen) / 1e6, 1) == 0.2
    assert model.pretrained_cfg["fixed_input_size"] is True and model.fixed_input_size == (224, 224)
    with pytest.raises(ValueError, match="randformer_s12.*224x224"):
        model(torch.randn(1, 3, 192, 192))
    # built for another size, the matrices follow it: 7x7 at stage 3 for 112 input
    small = formers.create_model("randformer_s12", img_size=112)
    assert small.stages[2].blocks[0].token_mixer.random_matrix.shape == (49, 49)
    assert small(torch.randn(1, 3, 112, 112)).shape == (1, 1000)


def test_block_structure_follows_the_paper():
    ca = formers.create_model("caformer_s18")
    attn = ca.stages[2].blocks[0].token_mixer
    assert attn.num_heads == 10 and attn.head_dim == 32 and attn.qkv.bias is None and attn.proj.bias is None
    assert ca.stages[3].blocks[0].token_mixer.num_heads == 16
    # ResScale only in stages 3-4; no bias anywhere in the blocks' norms, MLPs and mixers
    assert [hasattr(s.blocks[0].res_scale1, "scale") for s in ca.stages] == [False, False, True, True]
    assert not any(n.endswith("bias") and ".blocks." in n and "act" not in n for n, _ in ca.named_parameters())
    assert ca.head.norm.eps == 1e-5 and ca.norm.eps == 1e-6 and ca.norm.bias is not None
    # IdentityFormer's norm spans (H, W, C): a per-sample shift of one channel changes every output
    pf = formers.create_model("identityformer_s12").eval()
    norm = pf.stages[0].blocks[0].norm1
    x = torch.randn(2, 5, 6, 64)
    y = norm(x)
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    assert not torch.allclose(y.mean(-1), torch.zeros(2, 5, 6), atol=1e-3)


def test_any_input_size_and_grad_checkpointing():
    torch.manual_seed(0)
    model = formers.create_model("caformer_s18", num_classes=3).eval()
    x = torch.randn(1, 3, 50, 70)
    feats = model.forward_intermediates(x, intermediates_only=True)
    # the stem floors: (50 - 3) // 4 + 1 = 12, then each stride-2 conv rounds up
    assert [tuple(f.shape[2:]) for f in feats] == [(12, 17), (6, 9), (3, 5), (2, 3)]
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="caformer_s18"):
        model(torch.randn(1, 3, 2, 64))
