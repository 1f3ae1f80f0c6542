import os

import numpy as np
import pytest

from formers.data import FASHION_MNIST_DIR
from formers.data import mosaic as M

HAVE_FASHION = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}")


def _arrays(d):
    return [t.numpy() for t in (d.x_train, d.y_train, d.instance_train, d.x_test, d.y_test, d.instance_test)]


def _instance_classes(sem, inst):
    """Fashion-MNIST class of every kept instance in a split."""
    n = np.broadcast_to(np.arange(len(sem))[:, None, None], sem.shape)
    m = inst > 0
    key = n[m].astype(np.int64) * 64 + inst[m]
    _, first = np.unique(key, return_index=True)
    return sem[m][first].astype(int) - M.NUM_STUFF


@needs_fashion
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = M.load_mosaic((24, 8), seed=3, cache_dir=str(tmp_path / "a"))
    b = M.load_mosaic((24, 8), seed=3, cache_dir=str(tmp_path / "b"))
    c = M.load_mosaic((24, 8), seed=4, cache_dir=str(tmp_path / "a"))
    for u, v, w in zip(_arrays(a), _arrays(b), _arrays(c)):
        assert u.dtype == v.dtype and u.tobytes() == v.tobytes()
        assert u.tobytes() != w.tobytes()
    # image i depends only on (seed, domain, split, i): a smaller split is a prefix
    small = M.load_mosaic((10, 3), seed=3, cache_dir=str(tmp_path / "a"))
    assert np.array_equal(small.x_train.numpy(), a.x_train[:10].numpy())
    assert np.array_equal(small.y_test.numpy(), a.y_test[:3].numpy())


@needs_fashion
def test_fields_and_description(tmp_path):
    d = M.load_mosaic((16, 4), size=48, cache_dir=str(tmp_path))
    assert d.x_train.shape == (16, 3, 48, 48) and d.x_train.dtype.is_floating_point is False
    assert str(d.x_train.dtype) == "torch.uint8" and str(d.y_train.dtype) == "torch.uint8"
    assert str(d.instance_train.dtype) == "torch.int16" and d.y_test.shape == (4, 48, 48)
    assert d.num_classes == 13 and d.channels == 3 and d.ignore_index == 255
    assert d.classes[:3] == ["stripes", "checker", "noise"] and d.classes[3] == "T-shirt/top"
    assert d.thing_ids == list(range(3, 13)) and d.stuff_ids == [0, 1, 2]
    ids = set(np.unique(d.y_train.numpy()).tolist())
    assert ids <= set(range(13)) | {255}
    assert d.substitute and "generated substitute" in d.describe()
    assert d.describe().endswith("16 train / 4 test, 48px, 13 classes"), d.describe()
    t = M.load_mosaic((4, 2), domain="target", cache_dir=str(tmp_path))
    assert t.name == "mosaic-target" and "target domain" in t.describe()
    with pytest.raises(ValueError, match="domain"):
        M.load_mosaic((4, 2), domain="dusk", cache_dir=str(tmp_path))


@needs_fashion
def test_cache_is_used_and_damage_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("FORMERS_CACHE", str(tmp_path))
    first = M.load_mosaic((12, 4), seed=5)
    file = M.cache_path(12, 4, seed=5)
    assert file.startswith(str(tmp_path / "mosaic")) and os.path.isfile(file)
    assert not [f for f in os.listdir(os.path.dirname(file)) if ".tmp" in f]
    real = M._generate_split

    def boom(*a, **k):
        raise AssertionError("generator called despite the cache")
    monkeypatch.setattr(M, "_generate_split", boom)
    again = M.load_mosaic((12, 4), seed=5)
    for u, v in zip(_arrays(first), _arrays(again)):
        assert np.array_equal(u, v)
    assert M.cache_path(12, 4, seed=5) != M.cache_path(12, 4, seed=5, domain="target")
    assert M.cache_path(12, 4, seed=5) != M.cache_path(12, 4, seed=5, size=96)
    # a damaged file is rebuilt
    with open(file, "wb") as f:
        f.write(b"not a zip file")
    calls = []
    monkeypatch.setattr(M, "_generate_split", lambda *a, **k: calls.append(a) or real(*a, **k))
    rebuilt = M.load_mosaic((12, 4), seed=5)
    assert len(calls) == 2 and np.array_equal(rebuilt.y_train.numpy(), first.y_train.numpy())
    assert M._read_cache(file, M._key(12, 4, 64, "source", 5, os.path.abspath(FASHION_MNIST_DIR))) is not None


@needs_fashion
@pytest.mark.parametrize("domain", ["source", "target", "night"])
def test_semantic_labels_are_exact(tmp_path, domain):
    from formers.data.datasets import load_fashion_mnist
    fm = load_fashion_mnist()
    data = M.load_mosaic((15, 6), domain=domain, seed=2, cache_dir=str(tmp_path))
    dropped = 0
    for split, raw, other in (("train", fm.x_train, fm.x_test), ("test", fm.x_test, fm.x_train)):
        for i in (0, 1, 2, 3, 4, 5, 14) if split == "train" else range(6):
            info = M.mosaic_image(i, split=split, domain=domain, seed=2)
            x, y, inst = (data.x_train, data.y_train, data.instance_train) if split == "train" else \
                (data.x_test, data.y_test, data.instance_test)
            assert np.array_equal(info["image"], x[i].numpy())
            assert np.array_equal(info["semantic"], y[i].numpy())
            assert np.array_equal(info["instance"], inst[i].numpy())
            sem, ins, items = info["semantic"], info["instance"], info["items"]
            assert 1 <= len(items) <= 6
            top = np.zeros(sem.shape, int)            # index + 1 of the item on top of each pixel
            for j, it in enumerate(items):
                # the mask, recomputed from the item's own Fashion-MNIST image (of this split's pool)
                s = it["size"]
                assert 21 <= s <= 42
                r = ((2 * np.arange(s) + 1) * 28) // (2 * s)
                big = raw[it["pool_index"], 0].numpy()[r[:, None], r[None, :]] > 0.2 * 255
                want = np.zeros((64 + 2 * 42, 64 + 2 * 42), bool)
                want[42 + it["y0"]:42 + it["y0"] + s, 42 + it["x0"]:42 + it["x0"] + s] = big
                assert np.array_equal(it["mask"], want[42:42 + 64, 42:42 + 64])
                if it["kept"]:
                    from_other = other[it["pool_index"] % len(other), 0].numpy()[r[:, None], r[None, :]] > 51
                    assert not np.array_equal(big, from_other)
                top[it["mask"]] = j + 1
            k = 0
            for j, it in enumerate(items):
                vis = top == j + 1
                assert vis.sum() == it["visible"]
                if it["kept"]:                        # every visible pixel carries the item's class
                    k += 1
                    assert it["visible"] >= 16 and it["instance"] == k
                    assert (sem[vis] == it["cls"] + 3).all() and (ins[vis] == k).all()
                else:                                 # a dropped item's pixels are ignore
                    dropped += 1
                    assert it["visible"] < 16 and (sem[vis] == 255).all() and (ins[vis] == 0).all()
            assert ins.max() == k
            bg = top == 0                             # no item: the region's stuff id
            assert np.array_equal(sem[bg], info["stuff"][bg]) and (sem[bg] < 3).all() and (ins[bg] == 0).all()
            assert (((sem >= 3) & (sem != 255)) == (ins > 0)).all()
            for c in np.unique(info["cells"]):        # one stuff class per Voronoi cell
                assert len(np.unique(info["stuff"][info["cells"] == c])) == 1
    assert dropped > 0                                # (seed 2 has some in these images)


@needs_fashion
def test_pools_are_fashion_mnist_train_and_test():
    from formers.data.datasets import load_fashion_mnist
    fm = load_fashion_mnist()
    pools = M._pools(os.path.abspath(FASHION_MNIST_DIR))
    assert np.array_equal(pools["train"][0], fm.x_train[:, 0].numpy())
    assert np.array_equal(pools["test"][0], fm.x_test[:, 0].numpy())
    for split, y in (("train", fm.y_train.numpy()), ("test", fm.y_test.numpy())):
        for c, idx in enumerate(pools[split][1]):
            assert (y[idx] == c).all()


@needs_fashion
def test_class_frequencies_per_domain(tmp_path):
    src = M.load_mosaic((300, 10), domain="source", cache_dir=str(tmp_path))
    tgt = M.load_mosaic((300, 10), domain="target", cache_dir=str(tmp_path))
    cs = np.bincount(_instance_classes(src.y_train.numpy(), src.instance_train.numpy()), minlength=10)
    ct = np.bincount(_instance_classes(tgt.y_train.numpy(), tgt.instance_train.numpy()), minlength=10)
    assert cs.min() >= 0.6 * cs.mean() and cs.max() <= 1.4 * cs.mean(), cs      # roughly balanced
    assert ct.min() <= ct.max() / 4, ct                                          # long-tailed
    assert ct.argmax() == M.TARGET_CLASS_ORDER[0] and ct[M.TARGET_CLASS_ORDER[-1]] <= ct.max() / 8
    # stuff classes are there in both, in about equal shares
    for d in (src, tgt):
        px = d.class_pixel_counts().numpy()
        assert (px[:3] > 0.2 * px[:3].sum()).all() and (px[3:] > 0).all()


@needs_fashion
def test_domains_differ_in_colour_and_sharpness(tmp_path):
    src = M.load_mosaic((60, 4), domain="source", cache_dir=str(tmp_path)).x_train.numpy().astype(np.float64)
    tgt = M.load_mosaic((60, 4), domain="target", cache_dir=str(tmp_path)).x_train.numpy().astype(np.float64)
    ms, mt = src.mean(axis=(0, 2, 3)), tgt.mean(axis=(0, 2, 3))
    assert (mt < ms - 20).all() and mt[2] > mt[0] + 10        # darker and blue-shifted
    hf = lambda x: np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()
    assert hf(tgt) < 0.5 * hf(src)                           # blurred


@needs_fashion
def test_night_domain_is_the_source_textures_under_the_target_palette_and_blur(tmp_path):
    """"night" shares the source's texture patterns (so its images are the source's but darker, blue-shifted
    and blurred), and the target's long tail of items; its draws are its own."""
    src = M.load_mosaic((60, 4), domain="source", cache_dir=str(tmp_path)).x_train.numpy().astype(np.float64)
    night = M.load_mosaic((300, 4), domain="night", cache_dir=str(tmp_path))
    x = night.x_train.numpy()[:60].astype(np.float64)
    ms, mn = src.mean(axis=(0, 2, 3)), x.mean(axis=(0, 2, 3))
    assert (mn < ms - 20).all() and mn[2] > mn[0] + 10
    hf = lambda v: np.abs(np.diff(v, axis=-1)).mean() + np.abs(np.diff(v, axis=-2)).mean()
    assert hf(x) < 0.5 * hf(src)
    assert M._DOMAINS["night"]["stripe_dirs"] == M._DOMAINS["source"]["stripe_dirs"]
    assert M._DOMAINS["night"]["checker"] == "square" and M._DOMAINS["night"]["noise_cell"] == 1
    counts = np.bincount(_instance_classes(night.y_train.numpy(), night.instance_train.numpy()), minlength=10)
    assert counts.argmax() == M.TARGET_CLASS_ORDER[0] and counts.min() <= counts.max() / 4
    assert night.name == "mosaic-night"
    with pytest.raises(ValueError, match="source, target, night"):
        M.load_mosaic((1, 1), domain="dusk", cache_dir=str(tmp_path))


def test_missing_fashion_mnist_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        M.load_mosaic((4, 2), path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path))
