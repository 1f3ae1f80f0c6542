"""The segmentation task (formers.tasks.segment) under the one trainer: joint augmentation keeps images and
labels aligned, sliding-window and flip inference equal whole-image inference where they must, evaluation
is dataset-level, `formers train` learns the mosaic far above the majority-class baseline and resumes bit
for bit, `formers eval` writes the table, JSON and overlays, and bad input is one clear error."""
import json

import pytest
import torch
import torch.nn as nn

import formers
from formers.cli import main
from formers.tasks import get_task, task_of
from formers.tasks.segment import SegTransform, evaluate, predict
from formers.tasks.segment_metrics import SegMetrics


def test_cards_name_their_task():
    assert task_of("segformer_b0").name == "segment"
    assert task_of("swin_tiny_patch4_window7_224").name == "classify"
    assert "segformer_b0" in formers.list_models(task="segment")
    assert "segformer_b0" not in formers.list_models(task="classify")


def test_crop_and_flip_move_image_and_labels_together():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 20, (6, 16, 16), generator=g).to(torch.uint8)
    x = (y * 10).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()     # the image spells out its labels
    tf = SegTransform([0.0] * 3, [1 / 255] * 3, 3, crop_pad=4, hflip=True)   # normalising is the identity
    params = tf.draw(6, g)
    assert params["shift"].ne(4).any() and params["flip"].any()        # real crops and flips were drawn
    xf, yf = tf(x, y, params)
    labelled = yf != 255
    assert labelled.float().mean() < 1                                 # some border came from the padding
    torch.testing.assert_close(xf[:, 0][labelled], (yf[labelled] * 10).float())
    assert (xf[:, 0][~labelled] == 0).all()                            # padded image, ignored label


class _PixelModel(nn.Module):
    """A 1x1 convolution: its scores at a pixel depend on that pixel only (equivariant to crops and flips)."""

    def __init__(self, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_and_flip_equal_whole_image_for_a_pixelwise_model():
    model = _PixelModel().eval()
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        whole = predict(model, x, 5)
        slide = predict(model, x, 5, mode="slide", crop=16, stride=11)   # overlapping, last window flush
        tta = predict(model, x, 5, flip=True)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(tta, whole.log_softmax(1), atol=1e-5, rtol=1e-5)


def test_sliding_window_averages_overlaps():
    """A model that answers each window with its own constant: the overlap of two windows gets their mean."""
    class WindowId(nn.Module):
        def forward(self, x):
            return x[:, :1, :1, :1].expand(-1, 1, x.shape[2], x.shape[3]).clone()
    x = torch.zeros(1, 3, 8, 12)
    x[..., 0, 0], x[..., 0, 4] = 2.0, 6.0        # the top-left pixel of the windows at columns 0 and 4
    out = predict(WindowId(), x, 1, mode="slide", crop=8, stride=4)   # windows at columns 0 and 4
    assert out[0, 0, 0, 0] == 2.0 and out[0, 0, 0, 10] == 6.0
    assert out[0, 0, 0, 5] == 4.0                                       # the overlap: (2 + 6) / 2


def test_evaluation_is_dataset_level_and_exact_for_a_perfect_model():
    y = torch.randint(0, 4, (5, 12, 12))
    y[0, :3] = 255
    x = torch.nn.functional.one_hot(y.clamp(max=3), 4).permute(0, 3, 1, 2).to(torch.uint8) * 255

    class Oracle(nn.Module):
        def forward(self, x):
            return x[:, :4]
    tf = SegTransform([0.0] * 4, [1.0] * 4, 4)
    res = evaluate(Oracle(), x, y, tf, 4, batch_size=2)
    assert res["mIoU"] == 100.0 and res["aAcc"] == 100.0
    assert res["pixels"] == int((y != 255).sum())
    noisy = x.clone()
    noisy[1] = noisy[1].roll(1, dims=0)         # image 1 predicted as the next class everywhere
    res = evaluate(Oracle(), noisy, y, tf, 4, batch_size=2)
    m = SegMetrics(4)
    m.update(noisy[:, :4].float().argmax(1), y)
    assert res["mIoU"] == pytest.approx(m.compute()["mIoU"])


def test_labels_outside_the_classes_are_one_clear_error():
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"label ids \[7\] are outside the model's 5 classes"):
        evaluate(_PixelModel(), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), y, SegTransform([0.0] * 3, [1.0] * 3, 3), 5)


SHORT = ["--dataset", "mosaic", "--limit-train", "192", "--limit-test", "64", "--batch-size", "16", "--lr", "2e-3",
         "--threads", "1", "--no-progress", "--save-every", "0", "--keep", "4", "--augment", "crop-flip"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    rc = main(["train", "segformer_b0", *SHORT, "--epochs", "4", "--out", str(out / "full")])
    assert rc == 0
    return out


def _majority_miou(y, k):
    m = SegMetrics(k)
    counts = torch.bincount(y[y != 255].long(), minlength=k)
    m.update(torch.full_like(y, int(counts.argmax())), y)
    return m.compute()["mIoU"]


def test_train_learns_the_mosaic_far_above_the_majority_class(run):
    summary = json.loads((run / "full" / "summary.json").read_text())
    assert summary["task"] == "segment" and summary["headline"] == "test_miou"
    rows = [json.loads(line) for line in (run / "full" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 4 and {"test_miou", "test_macc", "test_aacc", "test_loss"} <= set(epochs[0])
    from formers.data import load_mosaic
    baseline = _majority_miou(load_mosaic((192, 64)).y_test, 13)
    assert summary["best_test_miou"] > 3 * baseline, (summary["best_test_miou"], baseline)
    assert epochs[-1]["test_loss"] < epochs[0]["test_loss"]
    assert (run / "full" / "curves.png").stat().st_size > 0


def test_a_resumed_segmentation_run_ends_bit_exact(run):
    """Continued from the full run's epoch-2 checkpoint (into another folder), the run ends with its weights."""
    part = run / "part"
    ckpt = run / "full" / "checkpoints" / "step-00000024.json"
    assert main(["train", "segformer_b0", "--out", str(part), "--resume", str(ckpt), "--threads", "1",
                 "--no-progress"]) == 0
    full = json.loads((run / "full" / "summary.json").read_text())
    resumed = json.loads((part / "summary.json").read_text())
    assert resumed["param_digests"] == full["param_digests"]


def test_eval_writes_the_table_json_and_overlays(run, capsys):
    ckpt = run / "full" / "best.safetensors"
    rc = main(["eval", "segformer_b0", "--checkpoint", str(ckpt), "--limit-test", "16", "--mode", "slide",
               "--crop", "48", "--overlays", "4", "--out", str(run / "ev")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Ankle boot |" in printed.replace("  ", " ") or "Ankle boot" in printed
    summary = json.loads((run / "ev" / "eval_best_mosaic_test.json").read_text())
    assert summary["n"] == 16 and summary["inference"].startswith("slide 48")
    assert 0 < summary["mIoU"] <= 100 and f"mIoU {summary['mIoU']:.2f}%" in printed
    assert (run / "ev" / "overlay_best_mosaic_test.png").stat().st_size > 10_000


def test_segmentation_options_on_a_classifier_are_refused(tmp_path, capsys):
    rc = main(["eval", "swin_demo", "--checkpoint", str(tmp_path / "x.safetensors"), "--mode", "slide"])
    assert rc == 2
    assert "--mode is for segmentation models; swin_demo is a classify model" in capsys.readouterr().err


def test_a_classification_dataset_for_a_segmentation_model_is_refused(tmp_path, capsys):
    rc = main(["train", "segformer_b0", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "unknown dataset 'digits' for segformer_b0 (a segment model); choose one of mosaic" in capsys.readouterr().err


def test_the_classification_task_is_unchanged_by_default():
    assert get_task("classify").default_dataset == "digits"
