"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm: same outputs where the streams allow it, a clear error where not."""
import copy

import pytest
import torch
import torch.nn as nn

import formers
from formers.cli import main
from formers.layers import CRMSNorm, LayerNormNoBias, PatchEmbed, RMSNorm, TransformerBlock
from formers.models.base import Backbone
from formers.models.metaformer import MetaFormer
from formers.transforms import TransformError, load, to_crmsnorm, to_rmsnorm
from formers.transforms.base import save
from formers.transforms.rmsnorm import describe_streams

torch.set_num_threads(1)


class ToyViT(Backbone):
    """The paper's setting: patch embedding + position table + class token, Pre-LN blocks, final LN."""

    def __init__(self, dim=24, depth=3, num_classes=5, img_size=16):
        super().__init__()
        self.num_classes, self.num_features, self.img_size = num_classes, dim, img_size
        self.patch_embed = PatchEmbed(4, 3, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // 4) ** 2, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, 3) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_head(self, x, pre_logits=False):
        return x[:, 0] if pre_logits else self.head(x[:, 0])


def _metaformer(mixers, res_scale=(False,) * 4):
    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), mixers=mixers, norm="layer", mlp_head=True,
                      res_scale=res_scale, img_size=64, num_classes=5)


def _randomise_norms(model):
    """Non-trivial gamma/beta, so a lost mean or a wrong affine shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, LayerNormNoBias)):
            if m.weight is not None:
                m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype)
            if getattr(m, "bias", None) is not None:
                m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype)
    return model


# model builder, whether every stream converts (else only with partial=True), whether CRMSNorm applies fully
EXACT = {
    "toy_vit": (lambda: ToyViT(), True, True),
    "t2t_vit_demo": (lambda: formers.create_model("t2t_vit_demo", num_classes=5), True, True),
    "crossformer_v1_demo": (lambda: formers.create_model("crossformer_demo", num_classes=5, use_acl=False), True, True),
    "convformer_small": (lambda: _metaformer(("sepconv",) * 4), True, True),
    "caformer_small": (lambda: _metaformer(("sepconv", "sepconv", "attention", "attention")), True, False),
    "swin_demo": (lambda: formers.create_model("swin_demo", num_classes=5), False, False),
    "cswin_demo": (lambda: formers.create_model("cswin_demo", num_classes=5), False, False),
    "crossformer_demo": (lambda: formers.create_model("crossformer_demo", num_classes=5), False, False),
    "pvt_small_kwargs": (lambda: formers.create_model("pvt_tiny", num_classes=5, img_size=64,
                                                       embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2)),
                         False, False),
    "caformer_res_scale": (lambda: _metaformer(("sepconv", "sepconv", "attention", "attention"),
                                               (False, False, True, True)), False, False),
}


def _input(model, dtype):
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("key", sorted(EXACT))
def test_equivalence_fp64_fp32(key):
    build, whole, whole_c = EXACT[key]
    torch.manual_seed(0)
    base = _randomise_norms(build()).eval()
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = copy.deepcopy(base).to(dtype)
        x = _input(model, dtype)
        with torch.no_grad():
            ref = model(x)
            for fn, full in ((to_rmsnorm, whole), (to_crmsnorm, whole_c)):
                if not full:
                    with pytest.raises(TransformError, match="cannot"):
                        fn(copy.deepcopy(model))
                out = fn(copy.deepcopy(model), partial=not full)
                torch.testing.assert_close(out(x), ref, atol=tol, rtol=0)
    # something was converted, and the final norm when the last stream converts
    norms = [m for m in out.modules() if isinstance(m, (RMSNorm, CRMSNorm))]
    assert norms and (isinstance(out.norm, CRMSNorm) or not whole_c)


def test_what_changes():
    """RMSNorm: every LayerNorm of a fully convertible model is gone but the embedding's (wrapped, its output
    recentred); the writers' rows are zero-mean. CRMSNorm: the stream is one channel narrower."""
    model = ToyViT()
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    rms = to_rmsnorm(copy.deepcopy(model))
    assert sum(isinstance(m, RMSNorm) for m in rms.modules()) == n_ln
    assert not any(isinstance(m, nn.LayerNorm) for m in rms.modules())
    for blk in rms.blocks:
        assert blk.attn.proj.weight.mean(0).abs().max() < 1e-7 and blk.mlp.fc2.bias.mean().abs() < 1e-7
    assert rms.pos_embed.mean(-1).abs().max() < 1e-6
    crms = to_crmsnorm(copy.deepcopy(model))
    assert crms.blocks[0].mlp.fc2.out_features == 23 and crms.pos_embed.shape[-1] == 23
    assert crms.blocks[0].norm1.weight.shape == (24,)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # one output row less per writer: 3 x (attn.proj 24+1, fc2 96+1), patch conv 3*4*4+1, class token, table
    assert params(model) - params(crms) == 3 * (25 + 97) + 49 + 1 + 17
    # the compressed stream's last entry is minus the sum of the others, as the paper writes it
    x = _input(model, torch.float32)
    with torch.no_grad():
        full = rms.blocks(torch.cat([rms.cls_token.expand(2, -1, -1),
                                     rms.patch_embed(x).flatten(2).transpose(1, 2)], 1) + rms.pos_embed)
        comp = crms.blocks(torch.cat([crms.cls_token.expand(2, -1, -1),
                                      crms.patch_embed(x).flatten(2).transpose(1, 2)], 1) + crms.pos_embed)
    torch.testing.assert_close(comp, full[..., :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(-comp.sum(-1), full[..., -1], atol=1e-5, rtol=0)


def test_streams_and_reasons():
    swin = describe_streams(formers.create_model("swin_demo"))
    assert [s.where for s in swin] == ["patch_embed", "layers.1", "layers.2"]
    assert "2x2 tokens" in swin[0].blockers[0] and not swin[-1].blockers
    assert len(swin[-1].adders) == 2 * 2 and len(swin[-1].norms) == 2 * 2 + 1   # 2 blocks + final norm
    with pytest.raises(TransformError, match="patch conv.*reads the stream itself"):
        to_rmsnorm(formers.create_model("pvt_tiny", img_size=64, embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2)))
    with pytest.raises(TransformError, match="activation cooling"):
        to_rmsnorm(formers.create_model("crossformer_demo"))
    with pytest.raises(TransformError, match="res_scale1 scales the stream per channel"):
        to_rmsnorm(_metaformer(("sepconv",) * 4, (False, False, True, True)))
    with pytest.raises(TransformError, match="MapAttention"):
        to_crmsnorm(_metaformer(("sepconv", "sepconv", "attention", "attention")))


@pytest.mark.parametrize("name,why", [
    ("biformer_demo", "BatchNorm.*conv positional encoding"),
    ("uniformer_demo", "BatchNorm"),
    ("rmt_demo", "BatchNorm"),
    ("poolformer_s12", "GroupNorm"),
])
def test_not_pre_ln(name, why):
    with torch.device("meta"):
        model = formers.create_model(name)
    with pytest.raises(TransformError, match=f"^{name}: .*{why}"):
        to_rmsnorm(model, partial=True)


def test_identityformer_has_no_channel_layernorm():
    with torch.device("meta"):
        model = formers.create_model("identityformer_s12")
    with pytest.raises(TransformError, match="ChannelLayerNorm, not a LayerNorm over the channel axis"):
        to_crmsnorm(model, partial=True)


def test_train_mode_and_backward():
    """The converted model trains: gradients reach the compressed writers and the norms."""
    model = to_crmsnorm(formers.create_model("crossformer_demo", num_classes=5, use_acl=False))
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum()
    loss.backward()
    assert model.norm.weight.grad is not None and model.stages[0].blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("compressed", [False, True])
def test_cli_writes_a_loadable_file(tmp_path, compressed):
    kwargs = {"use_acl": False}
    model = formers.create_model("crossformer_demo", num_classes=5, **kwargs)
    ckpt = tmp_path / "plain.safetensors"
    save(model, str(ckpt), metadata={"img_size": 32, "model_kwargs": kwargs, "num_classes": 5})
    out = tmp_path / "rms.safetensors"
    rc = main(["transform", "rmsnorm", "--model", "crossformer_demo", "--checkpoint", str(ckpt),
               "--model-kwargs", '{"use_acl": false}', "--out", str(out)] + (["--compressed"] if compressed else []))
    assert rc == 0
    loaded = load(str(out)).eval()
    assert isinstance(loaded.norm, CRMSNorm if compressed else RMSNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-5, rtol=0)
