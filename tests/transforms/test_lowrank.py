"""Greenformers low-rank factorisation: exact at full rank, energy and budget rank choices, reload, CLI, objective."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import formers
from formers.layers import Linear
from formers.cli import main
from formers.train.objectives import build_objective
from formers.transforms import LowRankLinear, TransformError, load, low_rank
from formers.transforms.base import applied_transforms, save
from formers.transforms.lowrank import singular_values

torch.set_num_threads(1)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def build(name="swin_demo", seed=0, **kw):
    torch.manual_seed(seed)
    return formers.create_model(name, num_classes=10, **kw).eval()


def _x(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_factors_are_the_truncated_svd():
    lin = nn.Linear(12, 8)
    f = LowRankLinear.from_linear(lin, 3)
    u, s, vh = torch.linalg.svd(lin.weight.detach().double())
    best = (u[:, :3] * s[:3]) @ vh[:3]               # Eckart-Young: the best rank-3 approximation
    torch.testing.assert_close(f.weight.double(), best, atol=1e-6, rtol=0)
    # balanced factors: both carry sqrt(S)
    torch.testing.assert_close(f.down.weight.double().norm(dim=1), s[:3].sqrt(), atol=1e-6, rtol=0)
    torch.testing.assert_close(f.up.weight.double().norm(dim=0), s[:3].sqrt(), atol=1e-6, rtol=0)
    assert f.down.bias is None and torch.equal(f.up.bias, lin.bias)


@pytest.mark.parametrize("name", ["swin_demo", "cswin_demo", "crossformer_demo", "rmt_demo"])
def test_full_rank_is_exact(name):
    model = build(name)
    x = _x()
    n_linear = sum(type(m) in (nn.Linear, Linear) for m in model.modules())
    with torch.no_grad():
        ref = model(x)
        out = low_rank(copy.deepcopy(model), rank=10 ** 6, only_if_smaller=False)
        assert sum(isinstance(m, LowRankLinear) for m in out.modules()) == n_linear
        torch.testing.assert_close(out(x), ref, atol=1e-5, rtol=0)


def test_energy_picks_ranks_and_skips_layers_that_would_grow():
    model = build()
    head_s = singular_values(model.head)
    out = low_rank(copy.deepcopy(model), energy=0.6)
    ranks = applied_transforms(out)[-1]["spec"]["ranks"]
    for name, r in ranks.items():
        m = dict(model.named_modules())[name]
        s2 = singular_values(m) ** 2
        kept = s2[:r].sum() / s2.sum()
        assert kept >= 0.6 - 1e-9 and (r == 1 or s2[:r - 1].sum() / s2.sum() < 0.6)   # the fewest that keep 60%
        assert r * (m.in_features + m.out_features) < m.in_features * m.out_features  # only where it saves
    assert n_params(out) < n_params(model)
    # energy 1: full rank everywhere, which saves nothing, so nothing changes
    same = low_rank(copy.deepcopy(model), energy=1.0)
    assert not applied_transforms(same) and n_params(same) == n_params(model)
    assert len(head_s) == 10


@pytest.mark.parametrize("budget", [0.35, 0.6, 0.85, 250_000])
def test_param_budget_is_met_as_closely_as_the_steps_allow(budget):
    model = build()
    total = n_params(model)
    target = int(budget * total) if isinstance(budget, float) else budget
    out = low_rank(copy.deepcopy(model), param_budget=budget)
    got = n_params(out)
    assert got <= target
    # no factorised layer's next rank would still fit
    steps = [m.in_features + m.out_features for m in out.modules() if isinstance(m, LowRankLinear)]
    assert target - got < min(steps)
    # more budget keeps more of the spectra (relative energy summed over the chosen layers, dense = 1)
    tighter = low_rank(copy.deepcopy(model), param_budget=int(target * 0.8))
    assert _kept_energy(model, tighter) < _kept_energy(model, out)


def _kept_energy(model, out):
    ranks = applied_transforms(out)[-1]["spec"]["ranks"]
    total = 0.0
    for name, m in model.named_modules():
        if type(m) in (nn.Linear, Linear):
            s2 = singular_values(m) ** 2
            total += float(s2[:ranks.get(name, len(s2))].sum() / s2.sum())
    return total


def test_flops_fall_with_params():
    model = build()
    out = low_rank(copy.deepcopy(model), param_budget=0.5)
    macs = [formers.count_flops(m, (3, 32, 32)) for m in (model, out)]
    assert macs[1] < 0.85 * macs[0]


def test_include_exclude_and_errors():
    model = build()
    out = low_rank(copy.deepcopy(model), rank=4, include="*.mlp.*", exclude="layers.0.*")
    names = {n for n, m in out.named_modules() if isinstance(m, LowRankLinear)}
    assert names and all(".mlp." in n and not n.startswith("layers.0.") for n in names)
    half = low_rank(copy.deepcopy(model), rank=0.5)      # half of each break-even rank in*out/(in+out)
    fc1 = half.layers[2].blocks[0].mlp.fc1                # 128 -> 512: break-even 102
    assert fc1.rank == 51
    with pytest.raises(TransformError, match="exactly one of"):
        low_rank(copy.deepcopy(model), rank=4, energy=0.9)
    with pytest.raises(TransformError, match="no nn.Linear layer matches"):
        low_rank(copy.deepcopy(model), rank=4, include="nothing*")
    with pytest.raises(TransformError, match="below"):
        low_rank(copy.deepcopy(model), param_budget=1000)
    with torch.device("meta"):
        meta = formers.create_model("swin_demo")
    with pytest.raises(TransformError, match="meta"):
        low_rank(meta, energy=0.9)
    assert isinstance(low_rank(meta, rank=4).layers[0].blocks[0].mlp.fc1, LowRankLinear)   # shapes only: fine


def test_cli_writes_a_file_that_reloads(tmp_path):
    model = build(seed=3)
    ckpt = tmp_path / "plain.safetensors"
    save(model, str(ckpt), metadata={"img_size": 32, "num_classes": 10})
    out = tmp_path / "lr.safetensors"
    rc = main(["transform", "lowrank", "--model", "swin_demo", "--checkpoint", str(ckpt), "--energy", "0.8",
               "--exclude", "head", "--out", str(out)])
    assert rc == 0
    loaded = load(str(out)).eval()
    expect = low_rank(copy.deepcopy(model), energy=0.8, exclude="head")
    assert type(loaded.head) is nn.Linear and n_params(loaded) == n_params(expect) < n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), expect(_x()), atol=0, rtol=0)
    # `formers eval` rebuilds the factorised structure from the file's records before loading the weights
    # (before, it built the plain model and the strict load refused the factor keys)
    rc = main(["eval", "swin_demo", "--checkpoint", str(out), "--dataset", "digits", "--limit-test", "64",
               "--out", str(tmp_path / "eval")])
    assert rc == 0
    result = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert result["n"] == 64 and result["img_size"] == 32 and sum(map(sum, result["confusion"])) == 64


def test_objective_factorises_the_checkpoint(tmp_path):
    model = build(seed=5)
    ckpt = tmp_path / "trained.safetensors"
    save(model, str(ckpt), metadata={"img_size": 32})
    obj = build_objective("lowrank", {"checkpoint": str(ckpt), "param_budget": 0.5})
    fresh = obj.prepare(build(seed=9))
    expect = low_rank(copy.deepcopy(model), param_budget=0.5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_x()), expect(_x()), atol=0, rtol=0)
    loss, logits = obj(fresh.train(), _x(), torch.tensor([1, 2]), 0)
    loss.backward()
    factors = [m for m in fresh.modules() if isinstance(m, LowRankLinear)]
    assert logits.shape == (2, 10) and factors and all(f.down.weight.grad is not None for f in factors)
