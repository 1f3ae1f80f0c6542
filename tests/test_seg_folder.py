import os

import numpy as np
import pytest

from formers.data.segdata import SegData, load_seg_folder

Image = pytest.importorskip("PIL.Image")


def _save_img(path, h, w, seed, ext=".png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path if path.endswith(ext) else path + ext)
    return a


def _save_label(path, lab, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(lab.astype(np.uint8))
    if mode == "P":                      # an L image given a palette becomes P with the same indices
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    im.save(path)


def _label(h, w, seed, k=4):
    lab = np.random.default_rng(100 + seed).integers(0, k, (h, w))
    lab[0, 0] = 255
    return lab


def _ade(root, n_train=3, n_val=2, tr="training", va="validation", ext=".jpg", k=4, h=12, w=10):
    labels = {}
    for split, n in ((tr, n_train), (va, n_val)):
        for i in range(n):
            _save_img(str(root / "images" / split / f"img{i}"), h, w, i, ext)
            lab = _label(h, w, i + (0 if split == tr else 50), k)
            _save_label(str(root / "annotations" / split / f"img{i}.png"), lab)
            labels[(split, i)] = lab
    return labels


def test_ade_layout(tmp_path):
    labels = _ade(tmp_path)
    d = load_seg_folder(str(tmp_path))
    assert isinstance(d, SegData) and not d.held_out
    assert d.x_train.shape == (3, 3, 12, 10) and d.x_test.shape == (2, 3, 12, 10)
    assert str(d.y_train.dtype) == "torch.uint8" and d.y_train.shape == (3, 12, 10)
    assert np.array_equal(d.y_train[1].numpy(), labels[("training", 1)])
    assert np.array_equal(d.y_test[0].numpy(), labels[("validation", 0)])
    assert d.num_classes == 4 and d.classes == ["0", "1", "2", "3"] and d.ignore_index == 255
    assert "3 train / 2 test, 12x10px, 4 classes" in d.describe()


def test_train_val_names_png_images_and_palette_labels(tmp_path):
    _ade(tmp_path, tr="train", va="val", ext=".png")
    lab = _label(12, 10, 7, k=3)
    _save_label(str(tmp_path / "annotations" / "val" / "img1.png"), lab, mode="P")
    d = load_seg_folder(str(tmp_path), num_classes=6)
    assert d.num_classes == 6 and len(d.x_train) == 3
    assert np.array_equal(d.y_test[1].numpy(), lab)         # palette indices, not colours
    pixels = np.asarray(Image.open(tmp_path / "images" / "train" / "img2.png"))
    assert np.array_equal(d.x_train[2].numpy().transpose(1, 2, 0), pixels)


def test_flat_layout_holds_out_a_fixed_split(tmp_path):
    for i in range(10):
        _save_img(str(tmp_path / "images" / f"a{i}"), 8, 8, i)
        _save_label(str(tmp_path / "annotations" / f"a{i}.png"), np.full((8, 8), i % 3))
    d = load_seg_folder(str(tmp_path))
    e = load_seg_folder(str(tmp_path))
    assert d.held_out and len(d.x_train) == 8 and len(d.x_test) == 2
    assert np.array_equal(d.y_test.numpy(), e.y_test.numpy())
    assert np.array_equal(d.x_train.numpy(), e.x_train.numpy())


def test_reduce_zero_label(tmp_path):
    _ade(tmp_path, n_train=1, n_val=1)
    lab = np.array([[0, 1, 2, 3, 255]] * 2)
    lab = np.pad(lab, ((0, 10), (0, 5)), constant_values=1)
    _save_label(str(tmp_path / "annotations" / "training" / "img0.png"), lab)
    d = load_seg_folder(str(tmp_path), reduce_zero_label=True)
    assert d.y_train[0, 0, :5].tolist() == [255, 0, 1, 2, 255]
    assert d.num_classes == 3                                   # ids 1..3 became 0..2


def test_img_size_resizes_images_bilinear_labels_nearest(tmp_path):
    labels = _ade(tmp_path, n_train=2, n_val=1, h=12, w=12)
    d = load_seg_folder(str(tmp_path), img_size=6)
    assert d.x_train.shape == (2, 3, 6, 6) and d.y_train.shape == (2, 6, 6)
    # nearest: pixel centres of the 6x6 grid sit on rows/cols 1, 3, 5, ... of the 12x12 label
    assert np.array_equal(d.y_train[0].numpy(), labels[("training", 0)][1::2, 1::2])
    # images of different sizes are fine once they are all resized
    _save_img(str(tmp_path / "images" / "training" / "img1"), 20, 16, 9, ".jpg")
    _save_label(str(tmp_path / "annotations" / "training" / "img1.png"), _label(20, 16, 3))
    assert load_seg_folder(str(tmp_path), img_size=(8, 6)).x_train.shape == (2, 3, 8, 6)
    with pytest.raises(ValueError, match="img1.jpg.*img_size"):
        load_seg_folder(str(tmp_path))


def test_cityscapes_suffixes_and_city_subfolders(tmp_path):
    for split in ("train", "val"):
        for city in ("aachen", "bonn"):
            _save_img(str(tmp_path / "images" / split / city / f"{city}_0_leftImg8bit.png"), 6, 8, 1)
            _save_label(str(tmp_path / "annotations" / split / city / f"{city}_0_gtFine_labelTrainIds.png"),
                        _label(6, 8, 2, k=19))
            _save_label(str(tmp_path / "annotations" / split / city / f"{city}_0_gtFine_color.png"),
                        np.zeros((6, 8)))
    d = load_seg_folder(str(tmp_path), img_suffix="_leftImg8bit.png", seg_map_suffix="_gtFine_labelTrainIds.png",
                        num_classes=19)
    assert len(d.x_train) == 2 and len(d.x_test) == 2 and d.num_classes == 19
    assert d.y_train.max() == 255 and int(d.y_train[d.y_train != 255].max()) > 0


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_seg_folder(str(tmp_path / "nope"))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="annotations/"):
        load_seg_folder(str(tmp_path))
    (tmp_path / "annotations").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_seg_folder(str(tmp_path))

    root = tmp_path / "ade"
    _ade(root)
    os.remove(root / "annotations" / "validation" / "img1.png")
    with pytest.raises(ValueError, match=r"img1\.jpg' has no label"):
        load_seg_folder(str(root))
    _save_label(str(root / "annotations" / "validation" / "img1.png"), _label(11, 10, 1))
    with pytest.raises(ValueError, match=r"validation/img1\.png' is 10x11 but its image"):
        load_seg_folder(str(root))
    _save_label(str(root / "annotations" / "validation" / "img1.png"), np.full((12, 10), 9))
    with pytest.raises(ValueError, match=r"validation/img1\.png' holds class id\(s\) \[9\] >= num_classes=4"):
        load_seg_folder(str(root), num_classes=4)
    assert load_seg_folder(str(root)).num_classes == 10          # inferred from the ids found
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "annotations" / "validation" / "img1.png")
    with pytest.raises(ValueError, match=r"img1\.png' is a RGB image"):
        load_seg_folder(str(root))
    os.rename(root / "images" / "validation", root / "images" / "other")
    with pytest.raises(ValueError, match="no validation/"):
        load_seg_folder(str(root))
