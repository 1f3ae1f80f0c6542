"""UperNet and the All-MLP head on any registered backbone (formers.models.dense.upernet): the heads equal
HF transformers' UperNetHead / UperNetFCNHead on the same weights, the Swin + UperNet cards carry the
parameter counts mmseg reports (auxiliary head included), pyramid and columnar backbones give stride-4
scores and train, an mmseg-layout state dict loads, and bad backbones are one clear error each."""
import json

import pytest
import torch
import torch.nn as nn

import formers
from formers.checkpoint import load_checkpoint
from formers.models.dense.upernet import FCNAuxHead, SegFormerHeadModel, UperNet, UperNetHead, checkpoint_filter_fn
from formers.registry import model_entry

SMALL = dict(channels=32, aux_channels=16)   # narrow heads keep the CPU tests fast


def _randomise(*modules):
    """Weights and BatchNorm statistics away from their init, so a wrong mapping or a skipped layer shows."""
    g = torch.Generator().manual_seed(1)
    for m in modules:
        for p in m.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for n, b in m.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif n.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def test_heads_equal_hf_transformers_upernet():
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead as HFUperNetHead
    in_channels = [8, 16, 24, 32]
    ours = UperNetHead(in_channels, channels=16, num_classes=5).eval()
    aux = FCNAuxHead(24, channels=12, num_classes=5, num_convs=1).eval()
    _randomise(ours, aux)
    config = UperNetConfig(hidden_size=16, num_labels=5, pool_scales=[1, 2, 3, 6], auxiliary_channels=12,
                           auxiliary_num_convs=1, auxiliary_concat_input=False)
    theirs, theirs_aux = HFUperNetHead(config, in_channels).eval(), UperNetFCNHead(config, in_channels).eval()

    def to_hf(sd):  # the only renaming: mmcv's ConvModule `bn` is HF's `batch_norm`
        return {k.replace(".bn.", ".batch_norm."): v for k, v in sd.items()}
    assert theirs.load_state_dict(to_hf(ours.state_dict())) is not None       # strict: every key mapped
    theirs_aux.load_state_dict(to_hf(aux.state_dict()))
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s + 3, generator=g) for c, s in zip(in_channels, (33, 17, 9, 5))]  # odd sizes
    with torch.no_grad():
        out, ref = ours(feats), theirs(feats)
        out_aux, ref_aux = aux(feats[2]), theirs_aux(feats)
    assert out.shape == (2, 5, 33, 36) and out_aux.shape == (2, 5, 9, 12)
    assert ref.abs().max() > 0.1     # not a degenerate comparison
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_aux, ref_aux, atol=1e-5, rtol=1e-5)


# mmseg's totals (backbone + UPerHead + FCN auxiliary head, 150 classes), Swin-Transformer-Semantic-Segmentation README
SWIN_PARAMS = {"upernet_swin_tiny": (59_941_862, 60), "upernet_swin_small": (81_259_766, 81),
               "upernet_swin_base": (121_279_716, 121)}


@pytest.mark.parametrize("name", sorted(SWIN_PARAMS))
def test_swin_upernet_params_match_the_published_totals(name):
    exact, published = SWIN_PARAMS[name]
    with torch.device("meta"):
        model = formers.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == exact
    assert abs(n / 1e6 - published) < 0.5
    card = model_entry(name).card
    value, tol = card.reported_params()
    assert abs(n / 1e6 - value) <= tol and f"{exact:,}" in card.notes
    assert card.task == "segment" and model.loss_weights == (1.0, 0.4) and model.output_stride == 4
    assert model.in_channels == ((96, 192, 384, 768) if "base" not in name else (128, 256, 512, 1024))


def test_segment_models_are_listed_under_their_task():
    names = {"upernet", "segformer_head", "upernet_swin_tiny", "upernet_swin_small", "upernet_swin_base"}
    assert names <= set(formers.list_models(task="segment"))
    assert not names & set(formers.list_models(task="classify"))


@pytest.mark.parametrize("backbone,kind", [("convformer_s18", "pyramid"), ("t2t_vit_7", "columnar"),
                                           ("swin_tiny_patch4_window7_224", "pyramid")])
def test_upernet_gives_stride_4_scores_and_trains(backbone, kind):
    torch.manual_seed(0)
    model = formers.create_model("upernet", backbone=backbone, num_classes=5, img_size=64)
    assert model.kind == kind and model.output_stride == 4
    assert [d["reduction"] for d in model.feature_info] == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    main, aux = model.train()(x)
    assert main.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)
    (main.square().mean() + 0.4 * aux.square().mean()).backward()
    assert model.backbone.feature_info and all(
        p.grad is not None for n, p in model.named_parameters() if n.startswith(("backbone.", "head.conv")))
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 5, 16, 16)


def test_columnar_backbones_take_four_evenly_spaced_blocks_through_the_beit_neck():
    model = formers.create_model("upernet", backbone="t2t_vit_7", num_classes=5, img_size=64, **SMALL)
    assert model.take == [0, 2, 4, 6]            # 7 blocks: (k + 1) * 7 // 4 - 1
    assert [d["module"] for d in model.feature_info] == ["neck.fpn1", "neck.fpn2", "neck.fpn3", "neck.fpn4"]
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    crossvit = formers.create_model("upernet", backbone="crossvit_tiny_240", num_classes=5, img_size=96, **SMALL)
    assert crossvit.kind == "columnar" and crossvit.take == [0, 1, 2]   # the finer branch's 3 blocks
    assert crossvit.output_stride == 3
    with torch.no_grad():
        assert crossvit.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 5, 32, 32)


@pytest.mark.parametrize("backbone", ["pvt_tiny", "tnt_demo"])
def test_segformer_head_on_any_backbone(backbone):
    model = formers.create_model("segformer_head", backbone=backbone, num_classes=5, img_size=64, decoder_dim=32)
    assert isinstance(model, SegFormerHeadModel)
    size = -(-64 // model.input_divisor) * model.input_divisor
    out = model.train()(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, size // model.output_stride, size // model.output_stride)
    out.mean().backward()
    model.reset_classifier(3)
    assert model.get_classifier().out_channels == 3 and model.num_classes == 3


def test_eval_returns_the_main_map_and_reset_classifier_covers_both_heads():
    model = formers.create_model("upernet", backbone="uniformer_demo", num_classes=5, img_size=64, **SMALL)
    model.reset_classifier(7)
    assert model.head.classifier.out_channels == 7 and model.aux_head.classifier.out_channels == 7
    main, aux = model.train()(torch.randn(2, 3, 64, 64))
    assert main.shape[1] == aux.shape[1] == 7
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 16, 16)
    no_aux = formers.create_model("upernet", backbone="uniformer_demo", num_classes=5, img_size=64, aux_head=False,
                                  **SMALL)
    assert isinstance(no_aux.train()(torch.randn(2, 3, 64, 64)), torch.Tensor)
    assert not hasattr(no_aux, "loss_weights")
    decay_free = model.no_weight_decay()
    assert "head.bottleneck.bn.weight" in decay_free and "head.bottleneck.conv.weight" not in decay_free


def _mmseg_layout(model: UperNet) -> dict:
    """Our weights under mmseg's names: Swin's official backbone layout (patch merging at the end of stages
    0-2, output norms `norm0..`), `decode_head.*` and `auxiliary_head.*` with `conv_seg`."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            rest = k[len("backbone."):]
            if rest.startswith("layers.") and ".downsample." in rest:
                i = int(rest.split(".")[1])
                rest = rest.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.", 1)
            k = "backbone." + rest
        elif k.startswith("out_norms."):
            k = "backbone.norm" + k[len("out_norms."):]
        elif k.startswith("neck."):
            k = "backbone." + k[len("neck."):]
        else:
            k = k.replace("head.classifier.", "head.conv_seg.")
            k = "decode_head." + k[len("head."):] if k.startswith("head.") else "auxiliary_head." + k[len("aux_head."):]
        sd[k] = v.clone()
    return sd


@pytest.mark.parametrize("backbone,out_norm", [("swin_demo", True), ("t2t_vit_demo", False)])
def test_an_mmseg_upernet_state_dict_loads(backbone, out_norm):
    torch.manual_seed(0)
    source = UperNet(backbone, num_classes=5, img_size=64, out_norm=out_norm, **SMALL)
    _randomise(source)
    sd = _mmseg_layout(source)
    assert "decode_head.psp_modules.0.1.conv.weight" in sd and "auxiliary_head.convs.0.conv.weight" in sd
    assert "decode_head.conv_seg.weight" in sd and "decode_head.fpn_bottleneck.bn.running_var" in sd
    if backbone == "swin_demo":
        assert "backbone.layers.0.downsample.reduction.weight" in sd and "backbone.norm0.weight" in sd
    else:
        assert "backbone.fpn1.0.weight" in sd
    target = UperNet(backbone, num_classes=5, img_size=64, out_norm=out_norm, **SMALL)
    load_checkpoint(target, sd)                  # strict: every key of ours filled, none left over
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, msg=k)
    without_aux = {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}
    aux_before = target.aux_head.classifier.weight.clone()
    assert set(checkpoint_filter_fn(without_aux, target)) == set(target.state_dict())
    assert torch.equal(target.aux_head.classifier.weight, aux_before)


def test_an_unrelated_state_dict_is_refused():
    model = UperNet("swin_demo", num_classes=5, img_size=64, **SMALL)
    with pytest.raises(ValueError, match="neither an mmseg segmentor"):
        checkpoint_filter_fn({"conv1.weight": torch.zeros(1)}, model)


def test_bad_backbones_are_clear_errors():
    with pytest.raises(TypeError, match=r"needs a backbone: pass backbone=.*convformer_s18"):
        formers.create_model("upernet", num_classes=5)
    with pytest.raises(TypeError, match="needs a backbone"):
        formers.create_model("segformer_head", num_classes=5)
    with pytest.raises(ValueError, match=r"unknown backbone 'convformer_s99'.*pass backbone="):
        formers.create_model("upernet", backbone="convformer_s99", num_classes=5)
    with pytest.raises(ValueError, match="sparseformer_demo: this backbone has no spatial feature maps"):
        formers.create_model("upernet", backbone="sparseformer_demo", num_classes=5, img_size=32)
    with pytest.raises(ValueError, match="Conv2d: a segmentation head needs forward_intermediates"):
        UperNet(nn.Conv2d(3, 8, 3), num_classes=5)


def test_formers_train_lowers_the_loss_on_the_mosaic(tmp_path):
    from formers.train import TrainConfig, train
    out = tmp_path / "run"
    cfg = TrainConfig("upernet", dataset="mosaic", epochs=4, batch_size=16, lr=5e-3, limit_train=48, limit_test=16,
                      model_kwargs=dict(backbone="uniformer_demo", **SMALL), out=str(out), save_every=0,
                      progress=False, augment="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # one thread: seconds, not a minute, on a shared machine
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary["task"] == "segment"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    losses = [r["train_loss"] for r in epochs]        # main + 0.4 auxiliary cross-entropy
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
