"""DAFormer: the fusion head's exact size, official UDA checkpoint keys, the CPU facts of its training
(dense.md §2: RCS probabilities, the EMA ramp, label downscaling, the one-scalar pseudo weight), the DACS
strong augmentation against kornia (ColorJiggle, Gaussian blur), ClassMix's whole-batch quirk, rare-class
sampling, and DACS training under the trainer: it runs, logs its parts and resumes bit for bit."""
import json
import math

import pytest
import torch
import torch.nn as nn

import formers
from formers.data.strong_aug import (class_mix_masks, color_jiggle, dacs_blur_kernel_size, gaussian_blur,
                                     hsv_to_rgb, rgb_to_hsv)
from formers.models.dense.daformer import (DACS, DAFormerHead, RareClassSampler, downscale_label_ratio, ema_alpha,
                                           mmseg_cross_entropy, rcs_class_probs)


def _count(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- the network

def test_head_and_total_parameters_match_the_paper():
    # dense.md §2 [D]: 3,712,275 head parameters for 19 classes; 85,155,283 (85.2M) with MiT-B5
    assert _count(DAFormerHead((64, 128, 320, 512), 256, 256, 19)) == 3_712_275
    with torch.device("meta"):
        model = formers.create_model("daformer_mitb5")
    assert _count(model) == 85_155_283
    assert _count(model.head) == 3_712_275
    assert formers.model_info("daformer_mitb5")["params_m"] == "85.2"


def test_forward_shapes_and_classifier_reset():
    model = formers.create_model("daformer_mitb0", num_classes=5, img_size=64).eval()
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert out.shape == (2, 5, 16, 12)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7, 16, 12) and model.get_classifier().out_channels == 7
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 64, 64))


def _official_name(ours: str) -> str:
    """Our key -> the official UDA student key, written out by hand from the official module tree
    (mmcv ConvModule = conv + bn, DepthwiseSeparableConvModule = depthwise_conv + pointwise_conv)."""
    parts = ours.split(".")
    if parts[0] == "encoder":
        stage = int(parts[2]) + 1
        if parts[3] == "patch_embed":
            return f"model.backbone.patch_embed{stage}." + ".".join(parts[4:])
        if parts[3] == "norm":
            return f"model.backbone.norm{stage}." + ".".join(parts[4:])
        rest = ".".join(parts[5:]).replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        return f"model.backbone.block{stage}.{parts[4]}.{rest}"
    head = parts[1]
    if head == "embed":
        return f"model.decode_head.embed_layers.{parts[2]}.proj." + ".".join(parts[3:])
    if head == "aspp":
        sub = {"depthwise": "depthwise_conv", "pointwise": "pointwise_conv"}.get(parts[3], parts[3])
        return f"model.decode_head.fuse_layer.aspp_modules.{parts[2]}.{sub}." + ".".join(parts[4:])
    if head == "bottleneck":
        return "model.decode_head.fuse_layer.bottleneck." + ".".join(parts[2:])
    assert head == "classifier", ours
    return "model.decode_head.conv_seg." + ".".join(parts[2:])


def test_official_uda_checkpoint_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    src = formers.create_model("daformer_mitb0", num_classes=19, img_size=64).eval()
    for m in src.modules():     # non-trivial BatchNorm statistics, so a wrong mapping shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    sd = {_official_name(k): v for k, v in src.state_dict().items()}
    assert any(".aspp_modules.1.depthwise_conv.bn.running_var" in k for k in sd)
    # the UDA file also holds the teacher and the frozen ImageNet model: both must be ignored
    sd.update({k.replace("model.", "ema_model.", 1): torch.zeros_like(v) for k, v in list(sd.items())})
    sd.update({k.replace("ema_model.", "imnet_model.", 1): v for k, v in list(sd.items()) if k.startswith("ema_")})
    path = tmp_path / "daformer_uda.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": sd}, path)
    dst = formers.create_model("daformer_mitb0", num_classes=19, img_size=64, checkpoint=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


# ---------------------------------------------------------------- dense.md §2 CPU checks

def test_rare_class_probabilities():
    p = rcs_class_probs(torch.tensor([0.5, 0.3, 0.2]), 0.01)
    torch.testing.assert_close(p, torch.tensor([9.36e-14, 4.54e-5, 0.99995], dtype=torch.float64), rtol=2e-3, atol=0)


def test_teacher_momentum_ramp():
    assert ema_alpha(1) == 0.5
    assert ema_alpha(998) == pytest.approx(1 - 1 / 999) and ema_alpha(998) < 0.999
    assert ema_alpha(999) == 0.999 and ema_alpha(30000) == 0.999
    assert ema_alpha(9, alpha=0.99) == pytest.approx(0.9) and ema_alpha(500, alpha=0.99) == 0.99


def test_downscale_label_ratio():
    y = torch.full((1, 32, 64), 255, dtype=torch.long)
    flat = torch.tensor([3] * 819 + [5] * 205)          # 80% / 20% of a 32x32 block
    y[0, :, :32] = flat[torch.randperm(1024)].view(32, 32)
    flat = torch.tensor([3] * 614 + [5] * 410)          # 60% / 40%
    y[0, :, 32:] = flat[torch.randperm(1024)].view(32, 32)
    out = downscale_label_ratio(y, 32, 0.75, 19)
    assert out.tolist() == [[[3, 255]]]
    all_ignore = torch.full((1, 32, 32), 255)
    assert downscale_label_ratio(all_ignore, 32, 0.75, 19).item() == 255


def test_pseudo_weight_is_the_confident_share_and_crop_rows_are_zero():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits
    logits = torch.randn(2, 4, 16, 16) * 4
    dacs = DACS(ignore_top=2, ignore_bottom=3)
    dacs.teacher = Fixed(logits)
    label, weight = dacs._pseudo_labels(torch.zeros(2, 3, 16, 16))
    prob = logits.softmax(1).max(1).values
    q = float((prob >= 0.968).float().mean())
    assert 0 < q < 1
    assert torch.equal(label, logits.argmax(1))
    torch.testing.assert_close(weight[:, 2:-3], torch.full((2, 11, 16), q))
    assert (weight[:, :2] == 0).all() and (weight[:, -3:] == 0).all()


def test_mmseg_loss_averages_over_all_pixels():
    logits = torch.randn(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 4, 4))
    y[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, y, reduction="none", ignore_index=255)
    assert mmseg_cross_entropy(logits, y).item() == pytest.approx(float(per_pixel.sum() / 16))
    w = torch.rand(1, 4, 4)
    assert mmseg_cross_entropy(logits, y, w).item() == pytest.approx(float((per_pixel * w).sum() / 16), rel=1e-6)


# ---------------------------------------------------------------- strong augmentation

def test_color_jiggle_equals_kornia():
    kornia = pytest.importorskip("kornia")
    torch.manual_seed(0)
    x = torch.rand(6, 3, 17, 23)
    aug = kornia.augmentation.ColorJiggle(0.2, 0.2, 0.2, 0.2, p=1.0)
    for _ in range(4):
        ref = aug(x)
        p = aug._params
        ours = color_jiggle(x, p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"],
                            p["order"])
        torch.testing.assert_close(ours, ref, atol=5e-6, rtol=0)
    # and it is not today's torchvision-style ColorJitter (the reason to reproduce the old one)
    jit = kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.2, p=1.0)
    ref = jit(x)
    p = jit._params
    ours = color_jiggle(x, p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"],
                        p["order"])
    assert (ours - ref).abs().max() > 1e-2


def test_hsv_round_trip_and_kornia_hsv():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(2, 3, 9, 9)
    x[0, :, 0, 0] = 0.5          # grey: zero saturation
    x[0, :, 0, 1] = 0.0          # black
    hsv = rgb_to_hsv(x)
    torch.testing.assert_close(hsv, kornia.color.rgb_to_hsv(x), atol=2e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=2e-6, rtol=0)


def test_gaussian_blur_equals_kornia_and_dacs_kernel_size():
    kornia = pytest.importorskip("kornia")
    assert [dacs_blur_kernel_size(n) for n in (512, 1024, 64, 32)] == [51, 103, 7, 3]
    x = torch.rand(2, 3, 40, 52)
    for k, sigma in ((7, 0.15), (7, 1.15), (5, 0.6)):
        ref = kornia.filters.GaussianBlur2d((k, k), (sigma, sigma))(x)
        torch.testing.assert_close(gaussian_blur(x, (k, k), sigma), ref, atol=1e-6, rtol=0)


def test_class_mix_draws_half_of_the_whole_batchs_classes():
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[0, :4], y[0, 4:] = 1, 2
    y[1, :2], y[1, 2:4], y[1, 4:] = 3, 255, 4        # batch classes {1, 2, 3, 4, 255}: ceil(5/2) = 3 pasted
    g = torch.Generator().manual_seed(0)
    seen_partial = False
    for _ in range(30):
        masks = class_mix_masks(y, g)
        for i in range(2):
            pasted = set(torch.unique(y[i][masks[i]]).tolist())
            kept = set(torch.unique(y[i][~masks[i]]).tolist())
            assert not pasted & kept                        # whole classes, never part of one
            assert len(pasted) <= 3
            seen_partial |= len(pasted) < 3                 # drew classes that image does not hold
    assert seen_partial


def test_rare_class_sampler():
    # class 2 covers few pixels: RCS should pick its images far more often than uniform sampling would
    y = torch.zeros(40, 10, 10, dtype=torch.long)
    y[:, :, 5:] = 1
    y[:4, :4, :4] = 2                                  # 16 pixels of class 2 in images 0..3
    sampler = RareClassSampler(y, 3, batch_size=8, seed=1, temperature=0.5, min_pixels=10)
    assert len(sampler) == 5
    batches = [idx for _, idx in sampler.batches(0)]
    again = [idx for _, idx in sampler.batches(0, start=2)]
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], again))      # resumable
    picks = torch.cat([idx for e in range(20) for _, idx in sampler.batches(e)])
    share = float((picks < 4).float().mean())
    expected = float(sampler.probs[2]) + float(sampler.probs[0] + sampler.probs[1]) * 4 / 40
    assert share == pytest.approx(expected, abs=0.05) and share > 0.3    # uniform would give 0.1
    with pytest.raises(ValueError, match="rcs_min_pixels"):
        RareClassSampler(y, 3, batch_size=8, min_pixels=20)


# ---------------------------------------------------------------- DACS under the trainer

_SMALL = dict(model="daformer_mitb0", dataset="mosaic-uda", objective="dacs", batch_size=4, lr=1e-3, img_size=32,
              limit_train=16, limit_test=8, model_kwargs={"decoder_dim": 32, "depths": [1, 1, 1, 1]},
              progress=False, seed=3)


def test_dacs_needs_target_images():
    from formers.train import TrainConfig, train
    with pytest.raises(ValueError, match="mosaic-uda"):
        train(TrainConfig(**{**_SMALL, "dataset": "mosaic"}, epochs=1, out="/tmp/formers-dacs-refused"))


def test_dacs_trains_logs_its_parts_and_resumes_bit_for_bit(tmp_path):
    from formers.train import TrainConfig, train
    kw = dict(_SMALL, objective_kwargs={"fd_level": -2, "rcs_min_pixels": 4})
    full = train(TrainConfig(**kw, epochs=2, out=str(tmp_path / "full")))
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 8
    for key in ("src_loss", "mix_loss", "fd_loss", "pseudo_weight", "fd_pixels"):
        assert all(key in r and math.isfinite(r[key]) for r in steps)
    assert any(r["fd_pixels"] > 0 for r in steps)                       # the feature distance did act
    assert full["dataset"] == "mosaic-uda" and full["test_images"] == 8
    # continued from the full run's epoch-1 checkpoint (teacher weights and all) in another folder
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000004.json"
    resumed = train(TrainConfig(**kw, epochs=2, out=str(tmp_path / "part")), resume=str(ckpt), explicit={"out"})
    assert resumed["steps"] == 8
    assert resumed["param_digests"] == full["param_digests"]


def test_uda_data_sets_pair_source_training_with_the_targets_test_split():
    import types

    from formers.data import load_mosaic
    from formers.tasks import get_task
    task = get_task("segment")
    for name, domain in (("mosaic-uda", "target"), ("mosaic-uda-night", "night")):
        cfg = types.SimpleNamespace(dataset=name, data=None, img_size=32, limit_train=6, limit_test=3)
        data = task.load_data(cfg)
        src = load_mosaic((6, 3), size=32)
        tgt = load_mosaic((6, 3), size=32, domain=domain)
        assert data.name == name and "6 unlabelled target" in data.describe()
        assert torch.equal(data.x_train, src.x_train) and torch.equal(data.y_train, src.y_train)
        assert torch.equal(data.x_target, tgt.x_train) and torch.equal(data.x_test, tgt.x_test)
        assert torch.equal(data.y_test, tgt.y_test)
        small = data.limited(train=4).resized(16)
        assert small.x_target.shape == (4, 3, 16, 16) and small.y_target.shape == (4, 16, 16)
