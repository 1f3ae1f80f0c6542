"""timm's strong augmentation, batched in torch (formers.data.augment, formers.data.randaugment), checked
against timm's own code fed the same random numbers: every RandAugment op within one grey level of
timm's PIL op, RandomResizedCrop and RandomErasing boxes equal, mixup / cutmix images and soft targets
equal; then a training run with all of it on resumes bit for bit."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from formers.cli import main
from train_helpers import resumed_digests
from formers.data.augment import BatchTransform, Mixup, erase_boxes, resized_crop, rrc_boxes
from formers.data.randaugment import INCREASING_OPS, OPS, RandAugment, apply_op

timm_aa = pytest.importorskip("timm.data.auto_augment")
from PIL import Image  # noqa: E402


def _photos():
    import skimage.data
    rgb = [skimage.data.astronaut()[100:164, 150:214], skimage.data.coffee()[50:114, 200:264],
           skimage.data.chelsea()[80:144, 100:164]]
    return rgb + [skimage.data.camera()[200:248, 200:248]]


@pytest.mark.parametrize("name", sorted(set(OPS) | set(INCREASING_OPS)))
def test_every_randaugment_op_equals_timms_within_one_grey_level(name, monkeypatch):
    for arr in _photos():
        rgb = arr.ndim == 3
        fill = (124, 116, 104) if rgb else 120
        x = torch.from_numpy(arr.astype(np.float32))
        x = x.permute(2, 0, 1)[None] if rgb else x[None, None]
        for m in (3.0, 9.0):
            for negate in (False, True):
                monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
                level = timm_aa.LEVEL_TO_ARG[name]
                args = level(m, {}) if level else ()
                want = np.asarray(timm_aa.NAME_TO_OP[name](Image.fromarray(arr), *args, fillcolor=fill,
                                                           resample=Image.BILINEAR)).astype(np.float32)
                got = apply_op(name, x, torch.tensor([m]), torch.tensor([negate]),
                               torch.tensor([float(v) for v in np.atleast_1d(fill)]))[0]
                got = got.permute(1, 2, 0).numpy() if rgb else got[0].numpy()
                assert np.abs(got - want).max() <= 1, (name, m, negate)
                if name in ("Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeAdd"):
                    assert np.array_equal(got, want), (name, m, negate)


def test_randaugment_string_and_draws():
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob, ra.ops) == (9, 0.5, 2, 0.5, INCREASING_OPS)
    assert RandAugment.from_string("rand-m7-n3-p1.0").ops == OPS
    assert RandAugment.from_string("rand-m9-mstd101").magnitude_std == math.inf
    for bad in ("augmix-m5", "rand-x3", "rand-m", "rand-n1.5"):
        with pytest.raises(ValueError, match="--aa"):
            RandAugment.from_string(bad)
    params = ra.draw(4000, torch.Generator().manual_seed(0))
    assert abs(params["ra_applied"].float().mean() - 0.5) < 0.03
    assert abs(params["ra_magnitude"].std() - 0.5) < 0.03 and params["ra_magnitude"].max() <= 10
    counts = torch.bincount(params["ra_op"].flatten(), minlength=15)
    assert counts.min() > 0.8 * counts.float().mean()               # uniform over the 15 ops
    # one op per image, always applied: the batch equals the op applied image by image
    ra1 = RandAugment(magnitude=9, num_layers=1, prob=1.0, increasing=True)
    x = torch.from_numpy(np.stack([a for a in _photos()[:3]])).permute(0, 3, 1, 2).float()
    p = ra1.draw(3, torch.Generator().manual_seed(3))
    out = ra1(x, p)
    for i in range(3):
        name = INCREASING_OPS[int(p["ra_op"][i, 0])]
        assert torch.equal(out[i], apply_op(name, x[i:i + 1], p["ra_magnitude"][i], p["ra_sign"][i], ra1.fill)[0])


class _Feed:
    """Stands in for `random`: uniform / randint / random answered from a list of U(0, 1) values."""

    def __init__(self, values):
        self.values = [float(v) for v in values]

    def next(self):
        return self.values.pop(0)

    def uniform(self, a, b):
        return a + (b - a) * self.next()

    def randint(self, a, b):
        return a + math.floor(self.next() * (b - a + 1))

    def random(self):
        return self.next()


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.95, 1.0)])
def test_random_resized_crop_boxes_equal_timms(scale, monkeypatch):
    from timm.data import transforms as timm_tf
    h, w = 28, 40
    g = torch.Generator().manual_seed(1)
    tf = BatchTransform([0.5], [0.5], 1, rrc=(scale, (3 / 4, 4 / 3)))
    u = tf.draw(200, g)
    top, left, th, tw = rrc_boxes(u, h, w, scale)
    img = Image.new("L", (w, h))
    for b in range(200):
        # timm draws (area, ratio) per try, then the position right after the first try that fits
        k = next((k for k in range(10) if _fits(u, b, k, h, w, scale)), None)
        tries = [v for t in range(10 if k is None else k + 1) for v in (u["rrc_area"][b, t], u["rrc_ratio"][b, t])]
        fake = _Feed(tries + ([] if k is None else [u["rrc_top"][b], u["rrc_left"][b]]))
        monkeypatch.setattr(timm_tf.random, "uniform", fake.uniform)
        monkeypatch.setattr(timm_tf.random, "randint", fake.randint)
        want = timm_tf.RandomResizedCropAndInterpolation.get_params(img, scale, (3 / 4, 4 / 3))
        assert (int(top[b]), int(left[b]), int(th[b]), int(tw[b])) == tuple(want), b
    fallback = (th == 28) & (tw == 37) & (left == 1)          # the centred crop clamped to ratio 4/3
    assert fallback.any() if scale[0] > 0.9 else (th * tw < h * w * 0.5).any()


def _fits(u, b, k, h, w, scale):
    area = (scale[0] + (scale[1] - scale[0]) * float(u["rrc_area"][b, k])) * h * w
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    aspect = math.exp(lo + (hi - lo) * float(u["rrc_ratio"][b, k]))
    return round(math.sqrt(area * aspect)) <= w and round(math.sqrt(area / aspect)) <= h


def test_resized_crop_equals_interpolating_the_cut_box():
    x = torch.rand(6, 3, 20, 24) * 255
    top, left = torch.tensor([0, 3, 5, 0, 7, 2]), torch.tensor([0, 4, 1, 10, 0, 9])
    th, tw = torch.tensor([20, 9, 12, 5, 13, 11]), torch.tensor([24, 11, 7, 14, 17, 15])
    out = resized_crop(x, top, left, th, tw)
    for b in range(6):
        box = x[b:b + 1, :, top[b]:top[b] + th[b], left[b]:left[b] + tw[b]]
        want = F.interpolate(box, size=(20, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-3, rtol=0)


def test_random_erasing_boxes_equal_timms(monkeypatch):
    from timm.data import random_erasing as timm_re
    h, w = 32, 24
    tf = BatchTransform([0.5], [0.5], 1, reprob=1.0)
    u = tf.draw(100, torch.Generator().manual_seed(2))
    top, left, eh, ew, fits = erase_boxes(u, h, w)
    for b in range(100):
        # random.random() <= probability (erase), then (area, aspect) per try and the first fit's position
        k = next((k for k in range(10) if _erase_fits(u, b, k, h, w)), None)
        tries = [v for t in range(10 if k is None else k + 1) for v in (u["erase_area"][b, t], u["erase_aspect"][b, t])]
        fake = _Feed([0.0] + tries + ([] if k is None else [u["erase_top"][b], u["erase_left"][b]]))
        monkeypatch.setattr(timm_re.random, "random", fake.random)
        monkeypatch.setattr(timm_re.random, "uniform", fake.uniform)
        monkeypatch.setattr(timm_re.random, "randint", fake.randint)
        img = torch.zeros(1, h, w)
        monkeypatch.setattr(timm_re, "_get_pixels", lambda *a, **k: torch.ones(a[2]))
        timm_re.RandomErasing(probability=1.0, mode="pixel", device="cpu")._erase(img, 1, h, w, torch.float32)
        mask = torch.zeros(h, w, dtype=torch.bool)
        if fits[b]:
            mask[top[b]:top[b] + eh[b], left[b]:left[b] + ew[b]] = True
        assert torch.equal(img[0].bool(), mask), b
    # and the transform puts N(0, 1) noise exactly there, nothing elsewhere
    x = torch.zeros(4, 1, h, w, dtype=torch.uint8) + 128
    p = tf.draw(4, torch.Generator().manual_seed(5))
    out = tf(x, p)
    top, left, eh, ew, fits = erase_boxes(p, h, w)
    base = (128 / 255 - 0.5) / 0.5
    for b in range(4):
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top[b]:top[b] + eh[b], left[b]:left[b] + ew[b]] = bool(fits[b])
        assert torch.allclose(out[b, 0][~inside], torch.tensor(base), atol=1e-6)
        assert not torch.isclose(out[b, 0][inside], torch.tensor(base), atol=1e-6).any()


def _erase_fits(u, b, k, h, w):
    area = (0.02 + (1 / 3 - 0.02) * float(u["erase_area"][b, k])) * h * w
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    aspect = math.exp(lo + (hi - lo) * float(u["erase_aspect"][b, k]))
    return round(math.sqrt(area / aspect)) < w and round(math.sqrt(area * aspect)) < h


@pytest.mark.parametrize("cut", [False, True])
def test_mixup_and_cutmix_equal_timms(cut, monkeypatch):
    from timm.data import mixup as timm_mix
    x = torch.randn(8, 3, 20, 16)
    y = torch.randint(0, 10, (8,))
    mix = Mixup(mixup=0.8, cutmix=1.0, switch_prob=0.5, num_classes=10)
    for seed in range(20):
        p = mix.draw(8, torch.Generator().manual_seed(seed))
        if bool(p["mix_cut"][0]) == cut:
            break
    lam, cy, cx = float(p["mix_lam"][0]), float(p["mix_cy"][0]), float(p["mix_cx"][0])
    got_x, got_y = mix(x.clone(), y, p)
    rand = iter([0.0, 0.0 if cut else 0.99])                  # mix this batch; cutmix or mixup
    monkeypatch.setattr(timm_mix.np.random, "rand", lambda *a: next(rand))
    monkeypatch.setattr(timm_mix.np.random, "beta", lambda a, b: lam)
    pos = iter([math.floor(cy * 20), math.floor(cx * 16)])
    monkeypatch.setattr(timm_mix.np.random, "randint", lambda lo, hi, size=None: next(pos))
    ref = timm_mix.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=10)
    want_x, want_y = ref(x.clone(), y)
    torch.testing.assert_close(got_x, want_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_y, want_y, atol=1e-6, rtol=0)
    # label smoothing left to the loss equals timm's smoothed mixup target with its soft-target loss
    from timm.loss import SoftTargetCrossEntropy
    logits = torch.randn(8, 10)
    ref_s = timm_mix.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=10)
    rand, pos = iter([0.0, 0.0 if cut else 0.99]), iter([math.floor(cy * 20), math.floor(cx * 16)])
    _, smooth_y = ref_s(x.clone(), y)
    torch.testing.assert_close(F.cross_entropy(logits, got_y, label_smoothing=0.1),
                               SoftTargetCrossEntropy()(logits, smooth_y), atol=1e-6, rtol=0)


def test_mixup_off_for_a_batch_gives_one_hot_targets():
    mix = Mixup(mixup=0.8, prob=0.0, num_classes=5)
    p = mix.draw(4, torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 8, 8)
    out, t = mix(x, torch.tensor([0, 1, 2, 3]), p)
    assert torch.equal(out, x) and torch.equal(t, torch.eye(5)[:4])


ARGS = ["--dataset", "digits", "--limit-train", "512", "--limit-test", "200", "--img-size", "16", "--epochs", "6",
        "--batch-size", "32", "--lr", "5e-3", "--save-every", "40", "--keep", "8", "--no-progress", "--augment", "rrc-flip",
        "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--seed", "3"]


def test_a_strong_recipe_run_learns_and_resumes_bit_exact(tiny, tmp_path):
    full = tmp_path / "full"
    assert main(["train", tiny, *ARGS, "--out", str(full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["best_test_acc"] > 18.0                    # 10 balanced classes: chance is 10%
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "step"]) == 96
    ours, resumed = resumed_digests(full, 40, tmp_path / "part")
    assert resumed == ours


def test_strong_augmentation_errors_are_one_clear_line(tiny, tmp_path, capsys):
    assert main(["train", tiny, "--dataset", "digits", "--aa", "rand-q4", "--out", str(tmp_path / "a")]) == 2
    assert "--aa 'rand-q4': unknown section" in capsys.readouterr().err
    assert main(["train", tiny, "--dataset", "digits", "--scale", "0.5", "0.2", "--out", str(tmp_path / "b")]) == 2
    assert "--scale must be two numbers" in capsys.readouterr().err
    assert main(["train", "segformer_b0", "--dataset", "mosaic", "--mixup", "0.8", "--out", str(tmp_path / "c")]) == 2
    assert "strong augmentation is for classifiers so far" in capsys.readouterr().err
