"""Data sets, batched augmentation and the resumable sampler."""
import os

import numpy as np
import pytest
import torch

from formers.data import (FASHION_MNIST_DIR, BatchTransform, EpochSampler, channel_stats, load_dataset,
                          shard_slice, step_generator)

HAVE_FASHION = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


def test_digits_fixed_stratified_split():
    d = load_dataset("digits")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 350 <= len(d.y_test) <= 370
    assert torch.bincount(d.y_test, minlength=10).min() >= 34      # every class held out
    assert d.x_train.max() == 255 and not d.hflip                   # 0..16 scaled; flips change digits
    # the same split every time, and no image in both splits
    again = load_dataset("digits")
    assert torch.equal(d.y_test, again.y_test) and torch.equal(d.x_test, again.x_test)
    train = {bytes(x.numpy()) for x in d.x_train}
    assert sum(bytes(x.numpy()) in train for x in d.x_test) < 10   # (a few digits are exact duplicates)


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist is not installed "
                                             "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_full_and_resized():
    d = load_dataset("fashion-mnist", img_size=32, limit_test=1000)
    assert d.x_train.shape == (60000, 1, 32, 32) and len(d.y_test) == 1000
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert d.classes[9] == "Ankle boot" and d.hflip


def test_fashion_mnist_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_fashion_mnist_truncated_file_is_clear(tmp_path):
    import gzip
    import struct
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 10, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist", str(tmp_path))


def _write_pngs(root, classes, n, size, mode="L"):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_folder_held_out_split_and_sizes(tmp_path):
    _write_pngs(tmp_path, ["cat", "dog", "eel"], 10, (20, 24))
    d = load_dataset("folder", str(tmp_path), img_size=16)
    assert d.classes == ["cat", "dog", "eel"]
    assert d.x_train.shape == (24, 1, 16, 16) and len(d.y_test) == 6
    assert torch.bincount(d.y_test).tolist() == [2, 2, 2]


def test_folder_train_test_layout_rgb(tmp_path):
    _write_pngs(tmp_path / "train", ["a", "b"], 4, (12, 12), "RGB")
    _write_pngs(tmp_path / "val", ["a", "b"], 2, (12, 12), "RGB")
    d = load_dataset("folder", str(tmp_path))
    assert d.x_train.shape == (8, 3, 12, 12) and d.x_test.shape == (4, 3, 12, 12)
    assert d.y_test.tolist() == [0, 0, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", str(tmp_path / "missing"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="cannot read image"):
        load_dataset("folder", str(tmp_path))


def test_npz_float_nhw_and_explicit_test(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((30, 10, 10)).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=x[:6], y_test=y[:6])
    d = load_dataset("npz", str(tmp_path / "a.npz"))
    assert d.x_train.shape == (30, 1, 10, 10) and d.x_train.dtype == torch.uint8
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(np.rint(x * 255).astype(np.uint8)))
    assert len(d.y_test) == 6 and d.num_classes == 3


def test_npz_uint8_nhwc_held_out(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", x=x, y=np.arange(40) % 4)
    d = load_dataset("npz", str(tmp_path / "b.npz"))
    assert d.channels == 3 and len(d.y_test) == 8
    assert torch.equal(d.x_train[0], torch.from_numpy(x[d_index(d, x)]).permute(2, 0, 1))


def d_index(d, x):
    first = d.x_train[0].permute(1, 2, 0).numpy()
    return next(i for i in range(len(x)) if np.array_equal(x[i], first))


def test_npz_errors(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset("npz", str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nox.npz", images=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="no array 'x'"):
        load_dataset("npz", str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "bady.npz", x=np.zeros((4, 4, 4)), y=np.zeros(3))
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        load_dataset("npz", str(tmp_path / "bady.npz"))
    with pytest.raises(FileNotFoundError):
        load_dataset("npz", str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar")


def test_channel_stats_match_numpy():
    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean((0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(std, ref.std((0, 2, 3)), atol=1e-6)


def test_batch_transform_shift_flip_normalise_expand():
    x = torch.randint(0, 256, (3, 1, 6, 6), dtype=torch.uint8)
    tf = BatchTransform([0.5], [0.25], out_chans=3, crop_pad=2, hflip=True)
    plain = BatchTransform([0.5], [0.25], out_chans=3)(x)
    assert plain.shape == (3, 3, 6, 6) and torch.equal(plain[:, 0], plain[:, 2])
    np.testing.assert_allclose(plain[0, 0].numpy(), (x[0, 0].numpy() / 255 - 0.5) / 0.25, atol=1e-6)
    params = {"shift": torch.tensor([[2, 2], [0, 4], [4, 0]]), "flip": torch.tensor([False, False, True])}
    out = tf(x, params)
    assert torch.equal(out[0], plain[0])                                 # shift (pad, pad) = identity
    assert torch.equal(out[1, :, 2:, :4], plain[1, :, :4, 2:])           # moved down 2 and left 2
    zero = (0 - 0.5) / 0.25
    assert torch.all(out[1, :, :2] == zero) and torch.all(out[1, :, :, 4:] == zero)
    assert torch.equal(out[2, :, :4, :].flip(-1)[..., 2:], plain[2, :, 2:, :4])  # up 2, right 2, then flipped


def test_augment_draws_are_a_function_of_seed_epoch_step():
    tf = BatchTransform([0.5], [0.5], 1, crop_pad=3, hflip=True)
    a = tf.draw(64, step_generator(5, 2, 7))
    b = tf.draw(64, step_generator(5, 2, 7))
    c = tf.draw(64, step_generator(5, 2, 8))
    assert torch.equal(a["shift"], b["shift"]) and torch.equal(a["flip"], b["flip"])
    assert not torch.equal(a["shift"], c["shift"])
    assert a["shift"].min() == 0 and a["shift"].max() == 6


def test_sampler_resumes_and_shards():
    s = EpochSampler(1000, 64, seed=3)
    assert len(s) == 15
    full = list(s.batches(4))
    resumed = list(s.batches(4, start=9))
    assert [k for k, _ in resumed] == list(range(9, 15))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full[9:], resumed))
    assert torch.cat([b for _, b in full]).unique().numel() == 960        # no repeats within an epoch
    assert not torch.equal(s.order(4), s.order(5))
    assert torch.equal(s.order(4), EpochSampler(1000, 64, seed=3).order(4))
    parts = [full[0][1][shard_slice(64, r, 4)] for r in range(4)]
    assert torch.equal(torch.cat(parts), full[0][1])
    with pytest.raises(ValueError, match="larger than"):
        EpochSampler(10, 64)
