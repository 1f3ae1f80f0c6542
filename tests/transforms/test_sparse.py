"""Sparse then Prune: the attention penalty (explicit maps behind SDPA), the L1 / group penalties,
global magnitude pruning, physical FFN-unit removal, the CLI round trip."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import formers
from formers.cli import main
from formers.layers import Attention
from formers.transforms import TransformError, applied_transforms, load
from formers.transforms.base import save
from formers.transforms.sparse import (SparseObjective, attention_penalty, ffn_unit_norms, prunable_weights,
                                       prune_sparse, sparsity)
from formers.train.objectives import build_objective

torch.set_num_threads(1)

PVT_SMALL = dict(patch_size=2, embed_dims=(16, 24, 32, 48), num_heads=(1, 1, 2, 2), mlp_ratios=(4, 4, 4, 4))
MODELS = {"swin_demo": {}, "pvt_tiny": PVT_SMALL, "rmt_demo": {}, "cswin_demo": {}, "biformer_demo": {}}


def build(name, seed=0):
    torch.manual_seed(seed)
    return formers.create_model(name, num_classes=10, img_size=32, **MODELS.get(name, {})).eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_explicit_attention_keeps_the_outputs_and_collects_every_call(name):
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with attention_penalty() as terms:
            out = model(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert len(terms) >= 3 and all(0 < float(t) <= math.log(2) + 1e-6 for t in terms)   # A in [0, 1]


def test_penalty_value_on_one_attention_layer_and_masks():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2)
    x = torch.randn(3, 7, 16)
    with attention_penalty() as terms:
        attn(x)
    q, k, _ = attn.qkv(x).reshape(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    torch.testing.assert_close(terms[0], torch.log(1 + a ** 2).mean())
    # boolean, additive and causal masks give SDPA's own outputs
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    bool_mask = torch.rand(5, 5) > 0.3
    bool_mask[:, 0] = True
    for kw in ({"attn_mask": bool_mask}, {"attn_mask": torch.randn(2, 5, 5)}, {"is_causal": True}, {"scale": 0.3}):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        with attention_penalty() as terms:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        assert len(terms) == 1


def test_objectives_add_their_penalty():
    model = build("pvt_tiny").train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    ce = F.cross_entropy(model(x), y)
    att = build_objective("sparse", {"strength": 0.5})          # the paper's penalty by default
    loss, _ = att(model, x, y, 0)
    with attention_penalty() as terms:
        model(x)
    torch.testing.assert_close(loss, ce + 0.5 * torch.stack(terms).mean())
    l1 = SparseObjective(strength=1e-3, penalty="l1")
    torch.testing.assert_close(l1(model, x, y, 0)[0], ce + 1e-3 * sum(w.abs().sum() for _, w in prunable_weights(model)))
    group = SparseObjective(strength=1e-2, penalty="group")
    loss, _ = group(model, x, y, 0)
    mlp = model.stages[0].blocks[0].mlp
    by_hand = (mlp.fc1.weight.square().sum(1) + mlp.fc1.bias.square() + mlp.fc2.weight.square().sum(0)).sqrt()
    torch.testing.assert_close(ffn_unit_norms(model)[0], by_hand)
    torch.testing.assert_close(loss, ce + 1e-2 * sum(n.sum() for n in ffn_unit_norms(model)))
    loss.backward()
    assert mlp.fc1.weight.grad is not None
    pool = formers.create_model("poolformer_s12", num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="poolformer_s12 runs no attention"):
        att(pool, x, y, 0)
    with pytest.raises(ValueError, match="penalty"):
        build_objective("sparse", {"penalty": "l0"})


def test_paper_prune_zeroes_exactly_the_smallest_tenth():
    model = build("swin_demo")
    weights = prunable_weights(model)
    names = [n for n, _ in weights]
    assert "patch_embed.proj.weight" in names[0] and "head.weight" in names and \
        any(n.endswith("norm1.weight") for n in names) and any(n.endswith("mlp.fc2.weight") for n in names)
    assert not any("bias" in n or "relative_position" in n for n in names)
    before = torch.cat([w.detach().abs().flatten() for _, w in weights])
    prune_sparse(model, amount=0.1)
    after = torch.cat([w.detach().flatten() for _, w in prunable_weights(model)])
    total = after.numel()
    zeros = after == 0
    assert int(zeros.sum()) == round(0.1 * total)
    assert before[zeros].max() <= before[~zeros].min()
    assert sparsity(model)["zero_fraction"] == pytest.approx(round(0.1 * total) / total)
    assert applied_transforms(model) == []                     # the architecture is unchanged
    prune_sparse(model, threshold=float(before.median()))
    assert sparsity(model)["zero_fraction"] >= 0.5


@pytest.mark.parametrize("name", ["swin_demo", "rmt_demo", "uniformer_demo"])
def test_removing_zeroed_ffn_units_keeps_the_outputs(name, tmp_path):
    model = build(name)
    torch.manual_seed(1)
    removed = 0
    with torch.no_grad():   # what a strong group penalty produces: whole units at zero
        for norms, m in zip(ffn_unit_norms(model), [m for m in model.modules() if hasattr(m, "fc1")]):
            dead = torch.rand(norms.numel()) < 0.4
            removed += int(dead.sum())
            m.fc1.weight[dead] = 0
            if m.fc1.bias is not None:
                m.fc1.bias[dead] = 0
            m.fc2.weight[:, dead] = 0
            if hasattr(m, "dwconv"):
                m.dwconv.weight[dead] = 0
                m.dwconv.bias[dead] = 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    units, params = sparsity(model)["ffn_units"], n_params(model)
    prune_sparse(model, threshold=0.0, structure="neurons")
    assert sparsity(model)["ffn_units"] == units - removed
    assert n_params(model) < params
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    assert applied_transforms(model)[-1]["name"] == "sparse-prune"
    save(model, str(tmp_path / "p.safetensors"), metadata={"img_size": 32, "model_kwargs": MODELS.get(name, {})})
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "p.safetensors")).eval()(x), model(x))


def test_errors():
    model = build("swin_demo")
    with pytest.raises(TransformError, match="swin_demo: give exactly one"):
        prune_sparse(model)
    with pytest.raises(TransformError, match="swin_demo: give exactly one"):
        prune_sparse(model, threshold=0.1, amount=0.1)
    with pytest.raises(TransformError, match="structure"):
        prune_sparse(model, amount=0.1, structure="heads")
    with pytest.raises(TransformError, match=r"\[0, 1\)"):
        prune_sparse(model, amount=1.5)
    with pytest.raises(TransformError, match="Sequential: no FFN"):
        prune_sparse(nn.Sequential(nn.Linear(4, 4)), amount=0.5, structure="neurons")


def test_cli_round_trip(tmp_path):
    model = build("swin_demo", seed=2)
    ckpt = tmp_path / "plain.safetensors"
    save(model, str(ckpt), metadata={"img_size": 32})
    x = torch.randn(2, 3, 32, 32)
    for args in (["--amount", "0.2", "--structure", "neurons"], ["--amount", "0.1"]):
        out = tmp_path / "pruned.safetensors"
        rc = main(["transform", "sparse-prune", "--model", "swin_demo", "--checkpoint", str(ckpt),
                   "--out", str(out)] + args)
        assert rc == 0
        expect = prune_sparse(build("swin_demo", seed=2), amount=float(args[1]),
                              structure=args[3] if len(args) > 2 else "weights")
        loaded = load(str(out)).eval()
        assert n_params(loaded) == n_params(expect)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expect(x), atol=0, rtol=0)
