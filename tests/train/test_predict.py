"""`formers predict`: top-k agrees with `formers eval`, timm's eval transform for foreign weights,
segmentation masks at each image's size, and the errors (one line, exit 2)."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import formers
from formers.cli import main
from formers.predict import pretrained_cfg_transform

Image = pytest.importorskip("PIL.Image")

PER_CLASS = 4          # test images per digit written to the folder


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Weights of one epoch of `formers train` on digits at 16 px (metadata: mean, std, img_size, classes)."""
    out = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["train", tiny, "--dataset", "digits", "--img-size", "16", "--epochs", "1", "--batch-size", "32",
                   "--lr", "5e-3", "--model-kwargs", '{"drop_rate": 0.0, "drop_path_rate": 0.0}',
                   "--save-every", "0", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return str(out / "final.safetensors")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """ROOT/train/<digit>/ (one image each) and ROOT/test/<digit>/ (PER_CLASS each): digits images as grey
    PNGs of 20 or 24 px, the layout `formers eval --dataset folder` reads."""
    from formers.data import load_dataset
    root = tmp_path_factory.mktemp("digits")
    d = load_dataset("digits")
    for split, x, y, n in (("train", d.x_train, d.y_train, 1), ("test", d.x_test, d.y_test, PER_CLASS)):
        for c in range(10):
            os.makedirs(root / split / str(c))
            for i in (y == c).nonzero().flatten()[:n].tolist():
                side = 24 if i % 2 else 20          # larger than 16 px, so eval and predict both shrink them
                Image.fromarray(x[i, 0].numpy()).resize((side, side), Image.NEAREST).save(
                    root / split / str(c) / f"{i:04d}.png")
    return root


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["predict", *map(str, argv), "--threads", "1"])
    return rc, out.getvalue(), err.getvalue()


def _rgb(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


# ---------------------------------------------------------------- weights from formers train

def test_top1_equals_eval_on_the_same_folder(tiny, trained, digit_folder, tmp_path):
    rc, out, err = _run(tiny, digit_folder / "test", "--checkpoint", trained, "--out", tmp_path / "p",
                        "--format", "json", "--topk", "3")
    assert rc == 0, err
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(rows) == 10 * PER_CLASS and [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert f"{10 * PER_CLASS} image(s) predicted" in out

    # `formers eval` on the same images: its confusion matrix is predict's top-1 against the folder names
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", tiny, "--checkpoint", trained, "--dataset", "folder", "--data", str(digit_folder),
                     "--out", str(tmp_path / "e"), "--threads", "1"]) == 0
    ev = json.loads((tmp_path / "e" / "eval_final_folder_test.json").read_text())
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for r in rows:
        confusion[int(os.path.basename(os.path.dirname(r["path"]))), r["topk"][0]["index"]] += 1
    assert ev["n"] == len(rows) and confusion.tolist() == ev["confusion"]
    assert abs(100.0 * float(confusion.trace()) / len(rows) - ev["top1"]) < 1e-9

    # image by image: the model on the batch run_eval builds (load_dataset + BatchTransform of the metadata)
    from formers.data import BatchTransform, load_dataset
    from formers.train import read_weights_metadata
    meta = read_weights_metadata(trained)
    data = load_dataset("folder", str(digit_folder), img_size=meta["img_size"])
    model = formers.create_model(tiny, num_classes=10, in_chans=meta["in_chans"], img_size=meta["img_size"],
                                 checkpoint=trained, **meta["model_kwargs"]).eval()
    with torch.no_grad():
        probs = model(BatchTransform(meta["mean"], meta["std"], meta["in_chans"])(data.x_test)).softmax(1)
    top = probs.topk(3, dim=1)
    assert [[t["index"] for t in r["topk"]] for r in rows] == top.indices.tolist()
    assert torch.allclose(torch.tensor([[t["prob"] for t in r["topk"]] for r in rows]), top.values, atol=1e-6)
    assert len(set(top.indices[:, 0].tolist())) > 1          # not a constant answer
    for r in rows:
        p = [t["prob"] for t in r["topk"]]
        assert p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-6
        assert [t["class"] for t in r["topk"]] == [meta["classes"][t["index"]] for t in r["topk"]]


def test_csv_beside_the_checkpoint_and_table(tiny, trained, digit_folder):
    one = digit_folder / "test" / "3"
    rc, out, err = _run(tiny, one, sorted(one.iterdir())[0], "--checkpoint", trained)
    assert rc == 0, err
    path = os.path.join(os.path.dirname(trained), "predict", "predictions.csv")
    lines = open(path).read().splitlines()
    assert lines[0] == "path," + ",".join(f"class_{i},prob_{i}" for i in range(1, 6))
    assert len(lines) == 1 + PER_CLASS                     # the file named again is taken once
    assert "top-5 (class probability)" in out and path in out


# ---------------------------------------------------------------- a checkpoint without metadata

def test_pretrained_cfg_transform_by_hand(tiny, tmp_path):
    cfg = formers.create_model(tiny, img_size=16).pretrained_cfg
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["input_size"]) == ("bicubic", 0.9, (3, 16, 16))
    path = _rgb(tmp_path / "a.png", 37, 50, 0)
    got = pretrained_cfg_transform(cfg, 16)(path)
    # shorter side 37 -> floor(16 / 0.9) = 17, the longer 50 -> int(17 * 50 / 37) = 22; centre crop 16 x 16
    im = Image.open(path).convert("RGB").resize((22, 17), Image.BICUBIC).crop((3, 0, 19, 16))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    want = (x - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    assert got.shape == (3, 16, 16) and torch.allclose(got, want, atol=1e-6)


def test_pretrained_cfg_transform_is_timms(tiny, tmp_path):
    timm_data = pytest.importorskip("timm.data")
    model = formers.create_model(tiny, img_size=24)
    tf = timm_data.create_transform(**timm_data.resolve_data_config({}, model=model), is_training=False)
    for i, (h, w) in enumerate(((37, 50), (61, 29), (26, 26))):
        path = _rgb(tmp_path / f"{i}.png", h, w, i)
        want = tf(Image.open(path).convert("RGB"))
        assert torch.allclose(pretrained_cfg_transform(model.pretrained_cfg, 24)(path), want, atol=1e-6)


def test_plain_state_dict_classifier(tiny, tmp_path):
    torch.manual_seed(0)
    model = formers.create_model(tiny, num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    files = [_rgb(tmp_path / f"{i}.png", h, w, i) for i, (h, w) in enumerate(((20, 30), (40, 18), (16, 16)))]
    rc, _, err = _run(tiny, *files, "--checkpoint", tmp_path / "w.pth", "--topk", "7", "--format", "json",
                      "--out", tmp_path / "p")
    assert rc == 0, err
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    tf = pretrained_cfg_transform(model.pretrained_cfg, 16)
    with torch.no_grad():
        probs = model(torch.stack([tf(f) for f in files])).softmax(1)
    assert [[t["index"] for t in r["topk"]] for r in rows] == probs.topk(7).indices.tolist()
    assert [t["class"] for t in rows[0]["topk"]] == [str(t["index"]) for t in rows[0]["topk"]]
    rc, _, err = _run(tiny, *files, "--checkpoint", tmp_path / "w.pth", "--topk", "8", "--out", tmp_path / "p")
    assert rc == 2 and "--topk 8 is more than the 7 classes" in err     # the head size read from the file


# ---------------------------------------------------------------- segmentation

def test_segmentation_masks_at_each_image_size(tmp_path):
    torch.manual_seed(0)
    model = formers.create_model("segformer_b0", num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    files = [_rgb(tmp_path / "wide.png", 20, 28, 1), _rgb(tmp_path / "tall.png", 37, 23, 2)]
    rc, out, err = _run("segformer_b0", *files, "--checkpoint", tmp_path / "seg.pth", "--img-size", "32",
                        "--out", tmp_path / "p")
    assert rc == 0, err
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    classes = set()
    for f, r in zip(files, rows):
        im = Image.open(f)
        w, h = im.size
        x = torch.from_numpy(np.asarray(im.resize((32, 32), Image.BILINEAR)).copy()).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            scores = model(((x - mean) / std)[None])
        want = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        mask = Image.open(r["mask"])
        assert r["mask"] == str(tmp_path / "p" / "masks" / os.path.basename(f))
        assert mask.mode == "P" and mask.size == (w, h) and r["size"] == [w, h]
        got = torch.from_numpy(np.asarray(mask).astype(np.int64))
        assert torch.equal(got, want)
        counts = torch.bincount(want.flatten(), minlength=3)
        assert r["pixels"] == {str(c): int(n) for c, n in enumerate(counts) if n}
        assert Image.open(r["overlay"]).size == (w, h)
        classes |= set(want.unique().tolist())
    assert len(classes) > 1                                  # the masks are not one class everywhere
    rc, _, err = _run("segformer_b0", *files, "--checkpoint", tmp_path / "seg.pth", "--format", "csv")
    assert rc == 2 and len(err.splitlines()) == 1


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("case", ["missing input", "empty folder", "no readable image", "topk", "checkpoint"])
def test_errors_are_one_line(tiny, trained, digit_folder, tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    argv, expect = {
        "missing input": ([tmp_path / "nope"], "input"),
        "empty folder": ([tmp_path / "empty"], "holds no images"),
        "no readable image": ([tmp_path / "bad.png"], "none of the 1 input file(s) is a readable image"),
        "topk": ([digit_folder / "test", "--topk", "11"], "--topk 11 is more than the 10 classes"),
        "checkpoint": ([digit_folder / "test", "--checkpoint", tmp_path / "no.safetensors"], "does not exist"),
    }[case]
    argv = argv if "--checkpoint" in argv else [*argv, "--checkpoint", trained]
    rc, _, err = _run(tiny, *argv, "--out", tmp_path / "p")
    assert rc == 2
    assert err.splitlines()[-1].startswith("formers predict: error: ") and expect in err.splitlines()[-1]
    assert len(err.splitlines()) == (2 if case == "no readable image" else 1)   # + the skipped line


def test_unreadable_files_are_skipped_and_counted(tiny, trained, digit_folder, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((digit_folder / "test" / "7").iterdir())[:2]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:60])
    rc, out, err = _run(tiny, folder, "--checkpoint", trained, "--out", tmp_path / "p", "--format", "json")
    assert rc == 0, err
    assert [line.split(":")[1] for line in err.splitlines()] == [" skipped"] * 2 and "corrupt.png" in err
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert [os.path.basename(r["path"]) for r in rows] == [p.name for p in good]
    assert "2 image(s) predicted, 2 unreadable file(s) skipped" in out
