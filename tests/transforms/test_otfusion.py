"""OT fusion: a permuted copy is recovered exactly, identical models fuse to themselves,
alignment never changes model B's function, clear errors, CLI round trip."""
import copy

import pytest
import torch

import formers
from formers.cli import main
from formers.transforms import TransformError, load
from formers.transforms._surgery import all_units, select
from formers.transforms.base import save
from formers.transforms.otfusion import average, fuse, ot_align

torch.set_num_threads(1)

PVT_SMALL = dict(patch_size=2, embed_dims=(16, 24, 32, 48), num_heads=(1, 2, 2, 4), mlp_ratios=(4, 4, 4, 2))
MODELS = {"swin_demo": {}, "pvt_tiny": PVT_SMALL}
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(name, seed=0):
    torch.manual_seed(seed)
    m = formers.create_model(name, num_classes=10, img_size=32, **MODELS.get(name, {})).eval()
    with torch.no_grad():   # trained-like weights: no ties between units (fresh norms are all ones)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def permuted(model, seed=1):
    """The same function with every residual stream, head and FFN neuron shuffled."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for u in all_units(other):
        select(u, torch.randperm(u.size, generator=g))
    return other


def distance(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sum((sa[k].float() - sb[k].float()).pow(2).sum() for k in sa if sa[k].is_floating_point()).sqrt()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("metric", ["weights", "activations"])
def test_fusing_with_a_permuted_copy_gives_the_model_back(name, metric):
    a = build(name)
    b = permuted(a)
    assert distance(a, b) > 1.0                       # the copy really is shuffled
    torch.testing.assert_close(b(X), a(X), atol=1e-5, rtol=0)
    assert (average(a, b)(X) - a(X)).abs().max() > 0.1   # plain averaging breaks the function
    batches = [(torch.randn(8, 3, 32, 32), None)] if metric == "activations" else None
    fused = fuse(a, b, metric=metric, batches=batches)
    torch.testing.assert_close(fused(X), a(X), atol=1e-5, rtol=0)
    assert distance(fused, a) < 1e-4


def test_identical_models_fuse_to_themselves():
    a = build("swin_demo")
    fused = fuse(a, copy.deepcopy(a), alpha=0.3)
    for (k, v), w in zip(fused.state_dict().items(), a.state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("name", list(MODELS))
def test_alignment_keeps_b_and_brings_it_closer(name):
    a, b = build(name, seed=0), build(name, seed=5)
    aligned, perms = ot_align(a, b)
    torch.testing.assert_close(aligned(X), b(X), atol=1e-5, rtol=0)
    assert distance(a, aligned) < distance(a, b)
    assert set(perms) == {u.key for u in all_units(a)}
    assert all(sorted(p.tolist()) == list(range(len(p))) for p in perms.values())
    # alpha = 0 is A, alpha = 1 is (aligned) B
    torch.testing.assert_close(fuse(a, b, alpha=0.0)(X), a(X), atol=1e-6, rtol=0)
    torch.testing.assert_close(fuse(a, b, alpha=1.0)(X), b(X), atol=1e-5, rtol=0)


def test_errors_name_the_models():
    swin = build("swin_demo")
    with pytest.raises(TransformError, match="different architectures"):
        fuse(swin, build("pvt_tiny"))
    wider = formers.create_model("swin_demo", num_classes=10, embed_dim=48)
    with pytest.raises(TransformError, match="widths differ"):
        fuse(swin, wider)
    uni = formers.create_model("uniformer_demo", num_classes=10)
    with pytest.raises(TransformError, match="uniformer_demo"):
        fuse(uni, copy.deepcopy(uni))
    with pytest.raises(TransformError, match="needs batches"):
        fuse(swin, swin, metric="activations")


def test_cli_round_trip(tmp_path):
    a, b = build("swin_demo", seed=0), build("swin_demo", seed=7)
    pa, pb, out = (str(tmp_path / f) for f in ("a.safetensors", "b.safetensors", "fused.safetensors"))
    save(a, pa, metadata={"img_size": 32})
    save(b, pb, metadata={"img_size": 32})
    rc = main(["transform", "otfusion", "--model", "swin_demo", "--checkpoint", pa, "--checkpoint-b", pb,
               "--out", out])
    assert rc == 0
    loaded = load(out).eval()
    torch.testing.assert_close(loaded(X), fuse(a, b)(X), atol=1e-6, rtol=0)
