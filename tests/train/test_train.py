"""End-to-end training and evaluation through the command line, and its errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import formers
from formers.cli import main
from formers.data import FASHION_MNIST_DIR
from train_helpers import subprocess_env

HAVE_FASHION = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
DIGITS = ["--dataset", "digits", "--img-size", "16", "--batch-size", "32", "--lr", "5e-3",
          "--model-kwargs", '{"drop_rate": 0.0, "drop_path_rate": 0.0}', "--save-every", "0"]


@pytest.fixture(scope="module")
def digits_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", tiny, *DIGITS, "--epochs", "8", "--ema", "--out", str(out)])
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_digits_training_beats_90_percent(digits_run):
    rc, out, stdout, stderr = digits_run
    assert rc == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_test_acc"] > 90.0
    assert summary["final_test_acc"] > 90.0
    assert summary["epochs"] == 8 and summary["steps"] == 8 * (1438 // 32)
    assert summary["train_img_per_s"] > 0 and summary["wall_time_s"] > 0
    # progress printed per epoch, and where the results are; no progress bar without a terminal
    assert stdout.count("epoch ") >= 8 and str(out / "curves.png") in stdout and "best.safetensors" in stdout
    assert "\r" not in stderr


def test_outputs_metrics_and_curves(digits_run):
    _, out, _, _ = digits_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(steps) == 8 * 44 and [r["step"] for r in steps] == list(range(1, 8 * 44 + 1))
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all("ema_test_acc" in r for r in epochs)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("best.safetensors", "final.safetensors", "final_ema.safetensors"):
        assert (out / name).is_file(), name


def test_weights_load_with_create_model_and_eval_agrees(digits_run, tiny, capsys):
    _, out, _, _ = digits_run
    summary = json.loads((out / "summary.json").read_text())
    from formers.train import load_trained, read_weights_metadata
    meta = read_weights_metadata(str(out / "final.safetensors"))
    assert meta["img_size"] == 16 and meta["in_chans"] == 1 and meta["num_classes"] == 10
    model = formers.create_model(tiny, num_classes=10, in_chans=1, img_size=16,
                                 checkpoint=str(out / "final.safetensors"))
    again = load_trained(str(out / "final.safetensors"))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    rc = main(["eval", tiny, "--checkpoint", str(out / "final.safetensors"), "--dataset", "digits"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"top-1 {summary['final_test_acc']:.2f}%" in printed
    result = json.loads((out / "eval_final_digits_test.json").read_text())
    assert result["n"] == summary["test_images"] and np.array(result["confusion"]).sum() == result["n"]
    assert abs(result["top1"] - summary["final_test_acc"]) < 1e-9
    assert os.path.isfile(result["confusion_png"])


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed "
                                             "(apt-get install dataset-fashion-mnist); CI installs it")
def test_fashion_mnist_subset_learns_in_bf16(tiny, tmp_path, capsys):
    rc = main(["train", tiny, "--dataset", "fashion-mnist", "--limit-train", "4000", "--limit-test", "1000",
               "--epochs", "2", "--batch-size", "64", "--lr", "4e-3", "--precision", "bf16",
               "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["img_size"] == 28 and summary["train_images"] == 4000       # 28 is a multiple of 4
    assert summary["best_test_acc"] > 55.0                                      # chance is 10%


def _bad_npz(tmp_path):
    p = tmp_path / "broken.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    return str(p)


BAD = {
    "unknown model": lambda t, tiny: ["train", "no_such_model_xyz"],
    "unknown dataset": lambda t, tiny: ["train", tiny, "--dataset", "cifar10"],
    "missing folder": lambda t, tiny: ["train", tiny, "--dataset", "folder", "--data", str(t / "absent")],
    "folder without path": lambda t, tiny: ["train", tiny, "--dataset", "folder"],
    "missing fashion dir": lambda t, tiny: ["train", tiny, "--dataset", "fashion-mnist", "--data-dir", str(t / "x")],
    "unreadable npz": lambda t, tiny: ["train", tiny, "--dataset", "npz", "--data", _bad_npz(t)],
    "img size not a multiple": lambda t, tiny: ["train", tiny, "--img-size", "18"],
    "bad json kwargs": lambda t, tiny: ["train", tiny, "--model-kwargs", "{depths"],
    "unknown model kwarg": lambda t, tiny: ["train", tiny, "--model-kwargs", '{"depthz": 3}'],
    "reserved model kwarg": lambda t, tiny: ["train", tiny, "--model-kwargs", '{"num_classes": 3}'],
    "batch vs accum": lambda t, tiny: ["train", tiny, "--batch-size", "30", "--accum", "4", "--out", str(t / "o")],
    "batch larger than data": lambda t, tiny: ["train", tiny, "--batch-size", "4096", "--out", str(t / "o")],
    "negative lr": lambda t, tiny: ["train", tiny, "--lr", "-1"],
    "epochs not a number": lambda t, tiny: ["train", tiny, "--epochs", "ten"],
    "unknown objective": lambda t, tiny: ["train", tiny, "--objective", "no_such_objective"],
    "bad objective kwargs": lambda t, tiny: ["train", tiny, "--objective-kwargs", '{"nope": 1}'],
    "eval missing checkpoint": lambda t, tiny: ["eval", tiny, "--checkpoint", str(t / "none.safetensors")],
    "eval garbage checkpoint": lambda t, tiny: ["eval", tiny, "--checkpoint", _bad_npz(t)],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_exit_2_with_one_line(case, tiny, tmp_path, capsys):
    try:
        rc = main(BAD[case](tmp_path, tiny))
    except SystemExit as e:      # argparse's own errors exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0]


def test_bad_argument_exit_code_from_a_real_process():
    r = subprocess.run([sys.executable, "-m", "formers.cli", "train", "no_such_model_xyz"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown model 'no_such_model_xyz'" in r.stderr


def test_import_formers_does_not_pull_the_train_extras():
    # torch itself may import tqdm (torch.hub does when it is installed): count only what formers adds
    code = ("import sys, torch; before = set(sys.modules); "
            "import formers, formers.train, formers.data, formers.train.cli; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "bad = [m for m in ('matplotlib', 'tqdm', 'sklearn', 'PIL') if m in new]; "
            "sys.exit(f'imported at import time: {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_npz_rgb_with_flips_trains_and_evaluates(tiny, tmp_path, capsys):
    # class k: the k-th channel is the bright one, with noise; flips and shifts keep the class.
    # 12 px data, trained at 16 px: the default size is at least the model's own (16 for this model)
    rng = np.random.default_rng(0)
    y = np.arange(600) % 3
    x = rng.integers(0, 120, (600, 12, 12, 3)).astype(np.uint8)
    x[np.arange(600), :, :, y] += 120
    np.savez(tmp_path / "rgb.npz", x=x, y=y)
    out = tmp_path / "run"
    rc = main(["train", tiny, "--dataset", "npz", "--data", str(tmp_path / "rgb.npz"), "--epochs", "2",
               "--batch-size", "40", "--lr", "5e-3", "--augment", "crop-flip", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["in_chans"] == 3 and summary["img_size"] == 16 and summary["test_images"] == 120
    assert summary["best_test_acc"] > 80.0
    rc = main(["eval", tiny, "--checkpoint", str(out / "best.safetensors"), "--dataset", "npz",
               "--data", str(tmp_path / "rgb.npz"), "--split", "test", "--out", str(tmp_path / "ev")])
    printed = capsys.readouterr().out
    assert rc == 0 and f"top-1 {summary['best_test_acc']:.2f}%" in printed
    assert "the test split (120 of 600 images of rgb.npz)" in printed
    # a file without a test split of its own: by default every image in it is evaluated
    rc = main(["eval", tiny, "--checkpoint", str(out / "best.safetensors"), "--dataset", "npz",
               "--data", str(tmp_path / "rgb.npz"), "--out", str(tmp_path / "ev")])
    printed = capsys.readouterr().out
    assert rc == 0 and "on all 600 images of rgb.npz" in printed, printed
    assert json.loads((tmp_path / "ev" / "eval_best_npz_all.json").read_text())["n"] == 600


def test_grayscale_into_a_three_channel_model(tiny, tmp_path, capsys):
    out = tmp_path / "rgbmodel"
    rc = main(["train", tiny, *DIGITS, "--epochs", "1", "--limit-train", "320", "--limit-test", "100",
               "--in-chans", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    model = formers.create_model(tiny, num_classes=10, in_chans=3, img_size=16,
                                 checkpoint=str(out / "final.safetensors"))
    assert model.stem[0].weight.shape[1] == 3
    rc = main(["eval", tiny, "--checkpoint", str(out / "final.safetensors"), "--dataset", "digits",
               "--limit-test", "100"])
    assert rc == 0
