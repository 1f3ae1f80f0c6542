"""NViT pruning: exact no-op, removal == masking (heads, neurons), the saliency's closed form,
channel surgery complete (permutation invariance), MAC target reached, reload and CLI round trip."""
import copy

import pytest
import torch

import formers
from formers.cli import main
from formers.transforms import TransformError, applied_transforms, load
from formers.transforms._surgery import all_units, check_permutation_invariance, head_units, neuron_units
from formers.transforms.base import save
from formers.transforms.prune import _removal_order, calibration_batches, prune_units, unit_costs, unit_saliency

torch.set_num_threads(1)

PVT_SMALL = dict(patch_size=2, embed_dims=(16, 24, 32, 48), num_heads=(1, 2, 2, 4), mlp_ratios=(4, 4, 4, 2))
MODELS = {"swin_demo": {}, "pvt_tiny": PVT_SMALL, "uniformer_demo": {}}
WITH_CHANNELS = ("swin_demo", "pvt_tiny")


def build(name, seed=0):
    torch.manual_seed(seed)
    m = formers.create_model(name, num_classes=10, img_size=32, **MODELS[name]).eval()
    with torch.no_grad():   # break the ties of a fresh init (unit norms, zero biases)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batches(n=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def macs(m):
    return formers.count_flops(m, (3, 32, 32))


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_removal_is_exact(name):
    m = build(name)
    ref = m(X).detach()
    before = n_params(m)
    formers.transforms.prune(m, batches(1), target_flops=1.0, channels=name in WITH_CHANNELS)
    assert n_params(m) == before
    assert torch.equal(m(X), ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_a_head_equals_masking_it(name):
    m = build(name)
    u = next(u for u in head_units(m) if u.size >= 2)
    h, d = 1, u.owner.head_dim
    masked = copy.deepcopy(m)
    proj = dict(masked.named_modules())[u.name].proj
    with torch.no_grad():
        proj.weight[:, h * d:(h + 1) * d] = 0    # the head's output never reaches the block
    before = n_params(m)
    prune_units(m, {u.key: [h]})
    torch.testing.assert_close(m(X), masked(X), atol=1e-5, rtol=0)
    dim = u.owner.proj.out_features
    extra = sum(p.shape[0] for n, p in u.owner.named_parameters(recurse=False) if "bias_table" in n)
    qkv_bias = 3 * d if getattr(u.owner, "qkv", None) is not None and u.owner.qkv.bias is not None else 0
    if getattr(u.owner, "q", None) is not None:
        qkv_bias = 3 * d if u.owner.q.bias is not None else 0
    assert before - n_params(m) == 4 * d * dim + qkv_bias + extra
    assert u.owner.num_heads == u.size - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_neurons_equals_masking_them(name):
    m = build(name)
    u = neuron_units(m)[-1]
    drop = [0, 3, 5]
    masked = copy.deepcopy(m)
    fc2 = dict(masked.named_modules())[u.name].fc2
    with torch.no_grad():
        fc2.weight[:, drop] = 0
    prune_units(m, {u.key: drop})
    torch.testing.assert_close(m(X), masked(X), atol=1e-5, rtol=0)
    assert dict(m.named_modules())[u.name].fc1.out_features == u.size - 3
    assert applied_transforms(m)[-1]["spec"]["sizes"][u.key] == u.size - 3


@pytest.mark.parametrize("name", WITH_CHANNELS)
def test_channel_description_is_complete(name):
    """Permuting every stream, head and neuron at random leaves the function unchanged: no tensor
    that reads or writes a unit is missing from its description."""
    assert check_permutation_invariance(build(name), X, channels=True) < 1e-5


def test_saliency_closed_form():
    """(sum of grad * weight over a unit's parameters)^2, summed over batches, by hand."""
    m = build("swin_demo")
    units = all_units(m)
    data = batches(2)
    s = unit_saliency(m, data, units)
    key = "layers.1.blocks.0.mlp:neurons"
    mlp = m.layers[1].blocks[0].mlp
    heads_key = "layers.2.blocks.1.attn:heads"
    attn = m.layers[2].blocks[1].attn
    want, want_h = torch.zeros(mlp.fc1.out_features, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for x, y in data:
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        gw = lambda p: (p.grad * p).double()   # noqa: E731
        t = gw(mlp.fc1.weight).sum(1) + gw(mlp.fc1.bias) + gw(mlp.fc2.weight).sum(0)
        want += t ** 2
        d = attn.head_dim
        q = gw(attn.qkv.weight).view(3, 4, d, -1).sum((0, 2, 3)) + gw(attn.qkv.bias).view(3, 4, d).sum((0, 2))
        q += gw(attn.proj.weight).view(-1, 4, d).sum((0, 2)) + gw(attn.relative_position_bias_table).sum(0)
        want_h += q ** 2
    torch.testing.assert_close(s[key], want)
    torch.testing.assert_close(s[heads_key], want_h)


@pytest.mark.parametrize("name,target,latency_aware", [("swin_demo", 0.5, True), ("pvt_tiny", 0.5, False),
                                                        ("uniformer_demo", 0.7, True)])
def test_flops_reach_target(name, target, latency_aware):
    m = build(name)
    full, p0 = macs(m), n_params(m)
    formers.transforms.prune(m, batches(2), target_flops=target, latency_aware=latency_aware,
                             channels=name in WITH_CHANNELS)
    ratio = macs(m) / full
    assert target - 0.03 <= ratio <= target
    assert n_params(m) < p0
    assert m(X).shape == (3, 10)
    assert type(m) is type(build(name))
    if name in WITH_CHANNELS:
        assert m.num_features == m.head.in_features == m.feature_info[-1]["num_chs"] < p0


def test_latency_awareness_reorders_by_cost():
    """Saliency per MAC: among units of equal saliency the costlier goes first; the order changes."""
    m = build("swin_demo")
    units = all_units(m)
    scores = unit_saliency(m, batches(1), units)
    costs = unit_costs(m, units)
    plain = _removal_order(scores, costs, units, latency_aware=False, min_keep=0.05)
    aware = _removal_order(scores, costs, units, latency_aware=True, min_keep=0.05)
    assert plain != aware and sorted(plain) == sorted(aware)
    flat = {k: torch.ones_like(v) for k, v in scores.items()}
    first = _removal_order(flat, costs, units, latency_aware=True, min_keep=0.05)[0][0]
    assert costs[first] == max(costs[u.key] for u in units if u.size > 1)
    # the MACs of one head / neuron, counted, against the closed form for swin_demo's last stage
    attn, n = m.layers[2].blocks[0].attn, 4 * 4     # 4x4 tokens at 32 px, one 4x4 window
    d, c = attn.head_dim, 128
    assert costs["layers.2.blocks.0.attn:heads"] == n * (3 * c * d + d * c) + 2 * n * n * d
    assert costs["layers.2.blocks.0.mlp:neurons"] == n * 2 * c


def test_save_load_round_trip(tmp_path):
    m = build("pvt_tiny")
    formers.transforms.prune(m, batches(2), target_flops=0.6)
    path = str(tmp_path / "p.safetensors")
    save(m, path, metadata={"img_size": 32, "model_kwargs": PVT_SMALL})
    back = load(path).eval()
    assert torch.equal(back(X), m(X))
    assert n_params(back) == n_params(m)


def test_errors_name_the_model():
    with pytest.raises(TransformError, match="uniformer_demo"):   # channels of an undescribed family
        formers.transforms.prune(build("uniformer_demo"), batches(1), target_flops=0.5)
    with pytest.raises(TransformError, match="biformer_demo"):    # an attention we do not cut
        formers.transforms.prune(formers.create_model("biformer_demo", num_classes=10), batches(1), channels=False)
    with pytest.raises(TransformError, match="target_flops"):
        formers.transforms.prune(build("swin_demo"), batches(1), target_flops=1.5)


def test_cli_round_trip(tmp_path):
    m = build("swin_demo", seed=3)
    ckpt = str(tmp_path / "plain.safetensors")
    save(m, ckpt, metadata={"img_size": 32})
    out = str(tmp_path / "pruned.safetensors")
    rc = main(["transform", "prune", "--model", "swin_demo", "--checkpoint", ckpt, "--dataset", "digits",
               "--calib-batches", "2", "--batch-size", "16", "--target-flops", "0.6", "--out", out])
    assert rc == 0
    loaded = load(out).eval()
    expect = copy.deepcopy(m)
    formers.transforms.prune(expect, calibration_batches(expect, "digits", batch_size=16, n_batches=2),
                             target_flops=0.6)
    assert torch.equal(loaded(X), expect(X))
    assert 0.57 <= macs(loaded) / macs(m) <= 0.6
