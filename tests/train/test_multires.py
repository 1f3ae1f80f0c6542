"""ResFormer's multi-resolution objective: the loss it returns is the hand-computed CE + scale-consistency
sum, the teacher chain and stop-gradient are the official ones, and `--multi-res` trains a ResFormer."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.cli import main
from formers.train.objectives import build_objective


@pytest.fixture(scope="module")
def demo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = formers.create_model("resformer_demo", num_classes=4, drop_rate=0.0)
    with torch.no_grad():   # the local PE starts at zero; make it count
        for blk in model.blocks:
            blk.attn.local_pe.weight.normal_(0, 0.2)
    yield model.train()
    torch.set_num_threads(threads)


def _by_hand(model, x, y, sizes, alpha, smoothing=0.0):
    """CE at each size plus alpha * smooth-L1(cls feature, LayerNorm(next larger size's cls feature)),
    averaged over sizes; the cls feature is the final-norm cls token (the classifier's input)."""
    terms, teacher = [], None
    for s in sorted(sizes, reverse=True):
        xs = x if s == x.shape[-1] else F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                                      antialias=s < x.shape[-1])
        feats = model.forward_features(xs)[:, 0]
        logits = model.head(feats)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if teacher is not None:
            white = F.layer_norm(teacher, (feats.shape[-1],), eps=1e-6)
            loss = loss + alpha * F.smooth_l1_loss(feats, white)
        teacher = feats.detach()
        terms.append(loss)
    return sum(terms) / len(terms)


def test_loss_equals_hand_computed_ce_plus_consistency(demo):
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    obj = build_objective("multires", {"sizes": [16, 32, 24], "alpha": 0.7}, label_smoothing=0.1)
    assert obj.sizes == [32, 24, 16]
    loss, logits = obj(demo, x, y, step=0)
    expected = _by_hand(demo, x, y, [16, 24, 32], 0.7, smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, demo(x))          # the largest size's logits come back
    # the consistency term is really there (and not tiny): without it the loss differs
    plain = build_objective("multires", {"sizes": [16, 24, 32], "distill": "none"}, label_smoothing=0.1)(demo, x, y, 0)[0]
    assert (loss - plain).abs() > 1e-3


def test_teacher_is_detached_and_chained(demo):
    """Gradients of the consistency term reach the student's size only: with CE switched off (alpha large,
    one label per class irrelevant), the teacher's forward gets no gradient from the distance term."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    obj = build_objective("multires", {"sizes": [32, 16]})
    feats = {}
    for s in (32, 16):
        f = demo.forward_features(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                                antialias=s < 32))[:, 0]
        feats[s] = f
    teacher = feats[32].detach()
    d = obj._forward(demo, F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))[1]
    torch.testing.assert_close(d, feats[16])
    from formers.train.multires import consistency_loss
    loss = consistency_loss(feats[16], teacher)
    grads = torch.autograd.grad(loss, [feats[32], feats[16]], allow_unused=True)
    assert grads[0] is None and grads[1] is not None and grads[1].abs().sum() > 0
    # 'largest' keeps the largest size as every size's teacher; 'previous' chains 32 -> 24 -> 16
    y = torch.tensor([1, 2])
    chain = build_objective("multires", {"sizes": [32, 24, 16]})(demo, x, y, 0)[0]
    star = build_objective("multires", {"sizes": [32, 24, 16], "teacher": "largest"})(demo, x, y, 0)[0]
    assert not torch.allclose(chain, star)


def test_bad_kwargs_are_clear():
    for kwargs in ({}, {"sizes": 32}, {"sizes": [32, -1]}, {"sizes": [32], "distill": "kl"},
                   {"sizes": [32], "target": "gap"}):
        with pytest.raises(ValueError, match="multires"):
            build_objective("multires", kwargs)


def test_multi_res_flag_trains_resformer_demo(tmp_path, capsys):
    """`--multi-res` is `--objective multires` with those sizes; a few steps at 8 and 16 px run and are recorded
    (the Fashion-MNIST run that goes above chance is in the report: it takes minutes)."""
    torch.set_num_threads(1)
    rc = main(["train", "resformer_demo", "--dataset", "digits", "--img-size", "16", "--multi-res", "8,16",
               "--epochs", "1", "--batch-size", "32", "--limit-train", "128", "--limit-test", "64",
               "--out", str(tmp_path), "--no-progress", "--seed", "0"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["objective"] == "multires"
    assert summary["config"]["objective_kwargs"] == {"sizes": [8, 16]}
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r.get("kind") == "step"]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)


def test_multi_res_flag_refuses_another_objective(tmp_path, capsys):
    rc = main(["train", "resformer_demo", "--multi-res", "16,32", "--objective", "ce", "--out", str(tmp_path)])
    assert rc == 2 and "--multi-res" in capsys.readouterr().err
