"""The scikit-image horse composites (formers.data.horse): each image is the real silhouette exactly where
its label says, on unseen photographs in the test split, and `formers train --dataset horse` learns it
above the all-background baseline."""
import json

import numpy as np
import pytest
import torch

from formers.cli import main
from formers.data import load_horse
from formers.data.horse import TEST_PHOTOS, TRAIN_PHOTOS, horse_sample
from formers.tasks.segment_metrics import SegMetrics


def test_the_label_is_the_pasted_silhouette_exactly():
    import skimage.data
    horse = ~skimage.data.horse()
    r, c = np.nonzero(horse)
    box_h, box_w = np.ptp(r) + 1, np.ptp(c) + 1              # the silhouette's tight box
    fraction = horse.sum() / (box_h * box_w)                # and its share of that box
    for i in range(6):
        s = horse_sample(i, "train", size=96)
        want = torch.where(s["mask"], s["fill"], s["background"]).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(s["image"], want)
        assert torch.equal(s["label"].bool(), s["mask"])
        rows, cols = np.nonzero(s["mask"].numpy())
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 0.45 * 96 * box_w / horse.shape[1] - 2 <= w <= 0.9 * 96 + 1
        assert abs(h / w - box_h / box_w) < 0.08, (h, w)
        assert abs(s["mask"].sum().item() / (h * w) - fraction) < 0.04
        assert s["photos"][0] != s["photos"][1]


def test_splits_are_prefixes_draw_disjoint_photographs_and_repeat():
    data = load_horse((5, 3), size=32)
    assert data.num_classes == 2 and data.thing_ids == [1] and data.substitute
    assert data.x_train.shape == (5, 3, 32, 32) and data.y_test.shape == (3, 32, 32)
    for i in range(3):
        s = horse_sample(i, "test", size=32)
        assert torch.equal(data.x_test[i], s["image"]) and torch.equal(data.y_test[i], s["label"])
        assert set(s["photos"]) <= set(TEST_PHOTOS)
    assert set(horse_sample(0, "train", size=32)["photos"]) <= set(TRAIN_PHOTOS)
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    assert torch.equal(load_horse((5, 3), size=32).x_train, data.x_train)
    assert not torch.equal(load_horse((5, 3), size=32, seed=1).x_train, data.x_train)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        horse_sample(0, "val")
    with pytest.raises(ValueError, match="at least 16 px"):
        horse_sample(0, size=8)
    with pytest.raises(ValueError, match="split_sizes must be positive"):
        load_horse((0, 4))


def test_train_segments_the_horse_above_the_all_background_baseline(tmp_path):
    out = tmp_path / "horse"
    rc = main(["train", "segformer_b0", "--dataset", "horse", "--limit-train", "320", "--limit-test", "64",
               "--epochs", "3", "--batch-size", "16", "--threads", "1", "--no-progress", "--save-every", "0",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    y = load_horse((320, 64)).y_test
    m = SegMetrics(2)
    m.update(torch.zeros_like(y), y)
    baseline = m.compute()["mIoU"]                          # every pixel "background": ~44 (percent)
    assert summary["best_test_miou"] > baseline + 8, (summary["best_test_miou"], baseline)
