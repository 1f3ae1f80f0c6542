import math

import pytest
import torch

from formers.tasks.segment_metrics import SegMetrics

I = 255  # ignore


def _hand_example():
    t1 = torch.tensor([[0, 0, 1], [1, 2, I]])
    p1 = torch.tensor([[0, 1, 1], [1, 2, 0]])
    t2 = torch.tensor([[2, 2, 2], [0, 1, I]])
    p2 = torch.tensor([[2, 0, 2], [0, 1, 1]])
    return (p1[None], t1[None]), (p2[None], t2[None])


def test_hand_computed_two_images():
    # labelled (target, pred) pairs: image 1: (0,0) (0,1) (1,1) (1,1) (2,2); image 2: (2,2) (2,0) (2,2) (0,0) (1,1)
    # class 0: tp 2, 3 target px, 3 predicted px -> IoU 2/4, Acc 2/3
    # class 1: tp 3, 3 target px, 4 predicted px -> IoU 3/4, Acc 3/3
    # class 2: tp 3, 4 target px, 3 predicted px -> IoU 3/4, Acc 3/4
    # class 3: never seen -> NaN, left out of the means;  aAcc = 8 / 10
    m = SegMetrics(4)
    for p, t in _hand_example():
        m.update(p, t)
    r = m.compute()
    assert r["IoU"][:3] == pytest.approx([50.0, 75.0, 75.0])
    assert r["Acc"][:3] == pytest.approx([200 / 3, 100.0, 75.0])
    assert math.isnan(r["IoU"][3]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == pytest.approx(200 / 3)
    assert r["mAcc"] == pytest.approx((200 / 3 + 100 + 75) / 3)
    assert r["aAcc"] == pytest.approx(80.0)
    assert r["pixels"] == 10
    assert m.matrix().tolist() == [[2, 1, 0, 0], [0, 3, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    # the same from logits
    m2 = SegMetrics(4)
    for p, t in _hand_example():
        m2.update(torch.nn.functional.one_hot(p, 4).permute(0, 3, 1, 2).float(), t)
    assert torch.equal(m2.state(), m.state())


def test_predicted_only_class_has_iou_zero_and_no_acc():
    m = SegMetrics(3)
    m.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    r = m.compute()
    assert r["IoU"][0] == pytest.approx(50.0) and r["IoU"][2] == 0.0 and math.isnan(r["IoU"][1])
    assert math.isnan(r["Acc"][2]) and r["Acc"][0] == pytest.approx(50.0)
    assert r["mIoU"] == pytest.approx(25.0) and r["mAcc"] == pytest.approx(50.0)


def test_dataset_level_not_mean_of_images():
    # image 1: all class 0, predicted right; image 2: one class-0 pixel predicted as 1, three class-1 right
    imgs = [(torch.tensor([[[0, 0], [0, 0]]]), torch.tensor([[[0, 0], [0, 0]]])),
            (torch.tensor([[[1, 1], [1, 1]]]), torch.tensor([[[0, 1], [1, 1]]]))]
    per_image = []
    m = SegMetrics(2)
    for p, t in imgs:
        one = SegMetrics(2)
        one.update(p, t)
        per_image.append(one.compute()["mIoU"])
        m.update(p, t)
    assert per_image == pytest.approx([100.0, 37.5])                  # (0 + 75) / 2 on image 2
    # over the split: class 0 tp 4 of union 5, class 1 tp 3 of union 4
    assert m.compute()["mIoU"] == pytest.approx((80.0 + 75.0) / 2)
    assert m.compute()["mIoU"] != pytest.approx(sum(per_image) / 2)   # 77.5 vs 68.75


def test_bad_ids_raise():
    m = SegMetrics(3)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [7, I]]]))
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(torch.zeros(1, 1, 1, dtype=torch.long), torch.tensor([[[-1]]]))
    with pytest.raises(ValueError, match="predicted"):
        m.update(torch.tensor([[[5]]]), torch.tensor([[[0]]]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert m.state().sum() == 0          # nothing counted by a refused update


def _random_batches(k, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, k - 1, (3, 17, 19), generator=g)           # class k-1 never a target
        p = torch.where(torch.rand(t.shape, generator=g) < 0.6, t, torch.randint(0, k - 1, t.shape, generator=g))
        t[torch.rand(t.shape, generator=g) < 0.1] = I
        out.append((p, t))
    return out


def test_equals_torchmetrics_jaccard_per_class():
    tm = pytest.importorskip("torchmetrics")
    k = 6
    ours = SegMetrics(k)
    ref = tm.classification.MulticlassJaccardIndex(num_classes=k, average="none", ignore_index=I)
    for p, t in _random_batches(k):
        ours.update(p, t)
        ref.update(p, t)
    got = torch.tensor(ours.compute()["IoU"], dtype=torch.float64)
    want = ref.compute().double() * 100
    defined = ~torch.isnan(got)
    assert defined[:k - 1].all() and not defined[k - 1]
    torch.testing.assert_close(got[defined], want[defined], rtol=1e-5, atol=1e-4)   # theirs is float32
    assert ours.compute()["mIoU"] == pytest.approx(float(want[:k - 1].mean()), rel=1e-5)


def test_merge_and_reduce_equal_one_pass():
    k = 5
    batches = _random_batches(k, n=6, seed=1)
    whole, a, b = SegMetrics(k), SegMetrics(k), SegMetrics(k)
    for i, (p, t) in enumerate(batches):
        whole.update(p, t)
        (a if i % 2 else b).update(p, t)
    merged = SegMetrics(k).merge_(a.state()).merge_(b)
    assert torch.equal(merged.state(), whole.state())
    # an all-reduce that works in float64 (as a trainer's packed sum) comes back as exact counts
    a.reduce_(lambda s: s.double() + b.state().double())
    assert torch.equal(a.state(), whole.state()) and a.state().dtype == torch.int64

    def inplace(s):                      # torch.distributed.all_reduce's style: in place, returns None
        s += b.state()
    c = SegMetrics(k)
    c.merge_(whole.state() - b.state())
    c.reduce_(inplace)
    assert torch.equal(c.state(), whole.state())
    with pytest.raises(ValueError, match="cannot merge"):
        SegMetrics(3).merge_(whole.state())


def test_table_lists_classes():
    m = SegMetrics(4)
    for p, t in _hand_example():
        m.update(p, t)
    text = m.table(["road", "car", "sky", "bus"])
    assert "| Class |" in text and "road" in text and "50.00" in text and "75.00" in text
    assert "nan" in text.splitlines()[7]       # bus: absent from both
    assert "80.00" in text and "66.67" in text   # aAcc, mIoU
    with pytest.raises(ValueError):
        m.table(["a"])
