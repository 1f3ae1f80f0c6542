"""ViT-CoMer + UperNet: exact parameter counts against the paper, shapes in eval and training mode,
coverage of the official checkpoint keys (built from the official backbone's state dict), gradients
through the deformable attention, and clear errors."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.checkpoint import CheckpointError
from formers.models.dense.vit_comer import ViTCoMer, checkpoint_filter_fn
from formers.registry import model_entry

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vit_comer_tiny_official_keys.json")

# (whole segmentor, backbone): the official backbone built locally has 10,619,360 / 31,280,480 /
# 110,603,648 parameters; with mmseg's UPerHead (512 ch) and FCNHead (256 ch) for 150 classes the totals
# are the README / paper's 38.7M / 61.4M / 144.7M
PARAMS = {"vit_comer_tiny_upernet": (38_715_148, 10_619_360),
          "vit_comer_small_upernet": (61_391_500, 31_280_480),
          "vit_comer_base_upernet": (144_745_132, 110_603_648)}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_as_segmentation_models():
    assert formers.list_models("vit_comer*") == sorted(PARAMS)
    for name in PARAMS:
        card = model_entry(name).card
        assert card.task == "segment" and card.paper == 30 and card.arxiv == "2403.07392"
        assert card.img_size == 512 and "ADE20K val mIoU" in card.notes


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts(name):
    with torch.device("meta"):
        model = formers.create_model(name)
    total, backbone = PARAMS[name]
    assert _count(model.backbone) == backbone
    assert _count(model) == total
    value, tol = model_entry(name).card.reported_params()
    assert abs(total / 1e6 - value) <= 0.05, f"{name}: {total / 1e6:.3f}M, the paper prints {value}M"
    assert model.num_classes == 150 and model.loss_weights == (1.0, 0.4)
    assert model.output_stride == 4 and model.input_divisor == 32


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return formers.create_model("vit_comer_tiny_upernet")


def test_shapes_eval_and_training(tiny):
    model = tiny.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    assert [tuple(f.shape) for f in feats] == [(1, 192, 16, 24), (1, 192, 8, 12), (1, 192, 4, 6), (1, 192, 2, 3)]
    assert [d["reduction"] for d in model.feature_info] == [4, 8, 16, 32]
    assert [d["module"] for d in model.feature_info] == [f"backbone.norm{i}" for i in range(1, 5)]
    assert tuple(logits.shape) == (1, 150, 16, 24)
    model.train()
    with torch.no_grad():
        main, aux = model.forward_head([torch.cat([f, f]) for f in feats])   # training BatchNorm needs 2 samples
    model.eval()
    assert tuple(main.shape) == (2, 150, 16, 24) and tuple(aux.shape) == (2, 150, 4, 6)


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"vit_comer_tiny_upernet.*multiple"):
        tiny(torch.randn(1, 3, 64, 80))     # 80 is not a multiple of 32
    with pytest.raises(ValueError, match=r"vit_comer_tiny_upernet.*channel"):
        tiny(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="patch_size must be 16"):
        ViTCoMer(embed_dim=64, num_heads=2, patch_size=8)


def _official_state_dict(seed=0):
    with open(FIXTURE) as f:
        shapes = json.load(f)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        else:
            sd[k] = torch.randn(shape, generator=g) if shape else torch.randn((), generator=g)
    return sd


def test_official_keys_cover_the_model(tiny):
    sd = _official_state_dict()
    assert sum(t.numel() for k, t in sd.items() if not k.endswith(("running_mean", "running_var",
               "num_batches_tracked"))) == PARAMS["vit_comer_tiny_upernet"][0]
    mapped = checkpoint_filter_fn(sd, tiny)
    ours = tiny.state_dict()
    assert sorted(mapped) == sorted(ours), (sorted(set(ours) - set(mapped))[:5], sorted(set(mapped) - set(ours))[:5])
    for k, v in mapped.items():
        assert v.shape == ours[k].shape, k
    model = formers.create_model("vit_comer_tiny_upernet")
    model.load_state_dict(mapped, strict=True)
    torch.testing.assert_close(model.backbone.interactions[3].extra_CTIs[2].cfinter.attn.sampling_offsets.weight,
                               sd["backbone.interactions.3.extra_CTIs.2.cfinter.attn.sampling_offsets.weight"])
    torch.testing.assert_close(model.get_classifier().weight, sd["decode_head.conv_seg.weight"])
    # our own state dict passes unchanged; a file of another model is refused
    assert checkpoint_filter_fn(ours, tiny).keys() == ours.keys()
    with pytest.raises(CheckpointError, match="not those of an official ViT-CoMer"):
        checkpoint_filter_fn({"blocks.0.norm1.weight": torch.ones(3)}, tiny)


def test_backward_through_the_deformable_attention():
    torch.manual_seed(0)
    model = formers.create_model("vit_comer_tiny_upernet", num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)      # two samples: training BatchNorm needs more than one value per channel
    y = torch.randint(0, 5, (2, 64, 64))
    main, aux = model(x)
    loss = sum(w * F.cross_entropy(F.interpolate(s, size=(64, 64), mode="bilinear"), y)
               for w, s in zip(model.loss_weights, (main, aux)))
    loss.backward()
    stage = model.backbone.interactions[1]
    last = model.backbone.interactions[3]
    for name, p in [("cti_toc.cfinter.attn.sampling_offsets", stage.cti_toc.cfinter.attn.sampling_offsets.weight),
                    ("cti_toc.cfinter.attn.value_proj", stage.cti_toc.cfinter.attn.value_proj.weight),
                    ("extra_CTIs.3.cfinter.attn.sampling_offsets",
                     last.extra_CTIs[3].cfinter.attn.sampling_offsets.weight),
                    ("cti_tov.gamma", stage.cti_tov.gamma),
                    ("cti_toc.cfinter.attn.attention_weights", stage.cti_toc.cfinter.attn.attention_weights.weight),
                    ("mrfp.dwconv.dwconv2", stage.mrfp.dwconv.dwconv2.weight),
                    ("spm.stem.0", model.backbone.spm.stem[0].weight),
                    ("level_embed", model.backbone.level_embed),
                    ("blocks.0.attn.qkv", model.backbone.blocks[0].attn.qkv.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # gamma starts at 0 (init_values): CTI-toV's own attention gets no gradient until gamma moves
    assert not stage.cti_tov.gamma.any() and not stage.cti_tov.attn.value_proj.weight.grad.any()


def test_grad_checkpointing_is_exact_and_reset_classifier():
    torch.manual_seed(0)
    # a reduced config (4 blocks, one per stage) without dropout or drop path, so both passes are deterministic
    # (and narrower: embed_dim 96, head channels 64 / 32), on a 32x32 input
    model = formers.create_model("vit_comer_tiny_upernet", num_classes=3, depth=4, embed_dim=96, head_channels=64,
                                 aux_channels=32, drop_path_rate=0.0, head_dropout=0.0,
                                 interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], init_values=0.5).eval()
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(plain) > 0.9 * len(list(model.parameters()))
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():       # train mode for checkpointing, with BatchNorm on its running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    model(x)[0].sum().backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], msg=n)
    model.eval()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.classifier.out_channels == 7
    assert model.aux_head.classifier.out_channels == 7
    with torch.no_grad():
        assert tuple(model(x).shape) == (1, 7, 8, 8)
    assert "backbone.level_embed" not in model.no_weight_decay() and "backbone.norm1.weight" in model.no_weight_decay()
