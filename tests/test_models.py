"""The generic suite: every registered model is held to the same contract by registering it.

Cheap checks (params, FLOPs, feature shapes, input errors) run on the `meta` device for every
variant; numerical ones (forward/backward, classifier reset, safetensors round trip) run on the
smallest variant of each model file.
"""
import math
import os

import pytest
import torch

import formers
from formers.registry import model_entry

ALL = formers.list_models(task="classify")  # the image-backbone suite; other tasks test their own contract


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return formers.create_model(name, **kwargs)


def _params_m(model):
    # RandFormer's frozen mixing matrices are persistent buffers; its paper counts them ("11.9+0.2")
    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith("random_matrix"))
    return (sum(p.numel() for p in model.parameters()) + frozen) / 1e6


def _smallest_per_module():
    best = {}
    for name in ALL:
        module = model_entry(name).module
        n = _params_m(_meta_model(name))
        if module not in best or n < best[module][1]:
            best[module] = (name, n)
    return sorted(name for name, _ in best.values())


SMALLEST = _smallest_per_module()


def _input_size(model, name):
    card = model_entry(name).card
    fixed = getattr(model, "fixed_input_size", None)
    return tuple(fixed) if fixed is not None else (card.img_size, card.img_size)


def _token_set(model):
    """Models whose features are a set of tokens, not a map (SparseFormer's latent tokens), set
    feature_maps = False: forward_intermediates gives (B, N, C) with output_fmt='NLC' and refuses
    'NCHW' with a ValueError naming the model."""
    return getattr(model, "feature_maps", True) is False


def _small_size(model):
    """A small input the model takes: its fixed size, or 64 rounded up to its divisor."""
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None:
        return tuple(fixed)
    d = model.input_divisor
    s = max(d, -(-64 // d) * d)
    return (s, s)


def test_registry_has_the_foundation_families():
    for pattern, count in [("swin_*", 6), ("pvt_*", 4), ("poolformer_*", 5), ("poolformerv2_*", 5),
                           ("identityformer_*", 5), ("randformer_*", 5), ("convformer_*", 8), ("caformer_*", 8)]:
        assert len([n for n in formers.list_models(pattern) if model_entry(n).card.status != "reduced"]) == count, pattern


@pytest.mark.parametrize("name", ALL)
def test_params_match_paper(name):
    card = model_entry(name).card
    model = _meta_model(name)
    measured = _params_m(model)
    reported = card.reported_params()
    if card.status == "reduced":
        assert reported is None, f"{name}: a reduced config carries no paper number"
        return
    assert reported is not None, f"{name}: a paper variant needs the paper's param count on its card"
    value, tol = reported
    assert abs(measured - value) <= tol, f"{name}: {measured:.2f}M params, paper {card.params_m}M (tol {tol:.2f})"


@pytest.mark.parametrize("name", [n for n in ALL if model_entry(n).card.macs_g])
def test_flops_match_paper(name):
    card = model_entry(name).card
    model = _meta_model(name)
    h, w = _input_size(model, name)
    macs = formers.count_flops(model, (model.in_chans, h, w)) / 1e9
    assert abs(macs - card.macs_g) <= 0.05 * card.macs_g, f"{name}: {macs:.2f} GMACs, paper {card.macs_g}"


@pytest.mark.parametrize("name", ALL)
def test_contract_shapes(name):
    model = _meta_model(name, num_classes=7)
    for attr in ("num_classes", "num_features", "in_chans", "feature_info", "pretrained_cfg"):
        assert hasattr(model, attr), f"{name} lacks {attr}"
    h, w = _input_size(model, name)
    x = torch.randn(2, model.in_chans, h, w, device="meta")
    out = model(x)
    if isinstance(out, tuple):  # a training forward with an auxiliary head (UniFormer-light): logits first
        out = out[0]
    assert out.shape == (2, 7)
    fmt = "NLC" if _token_set(model) else "NCHW"
    if fmt == "NLC":
        with pytest.raises(ValueError, match=name):
            model.forward_intermediates(x)
    feats = model.forward_intermediates(x, output_fmt=fmt, intermediates_only=True)
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        r = info["reduction"]
        if fmt == "NLC":
            assert f.dim() == 3 and f.shape[0] == 2 and f.shape[2] == info["num_chs"], (name, info, f.shape)
            continue
        assert f.shape[:2] == (2, info["num_chs"]), (name, info)
        # each stage's map is the input divided by its reduction (rounded either way by padding or flooring)
        assert f.shape[2] in (h // r, math.ceil(h / r)) and f.shape[3] in (w // r, math.ceil(w / r)), (name, f.shape, r)
    last2 = model.forward_intermediates(x, indices=[-1, -2], output_fmt=fmt, intermediates_only=True)
    assert [t.shape for t in last2] == [feats[-2].shape, feats[-1].shape]  # in stage order, as timm
    final, _ = model.forward_intermediates(x, output_fmt=fmt)
    features = model.forward_features(x)
    if isinstance(features, (list, tuple)):  # one tensor per branch (CrossViT), as timm
        assert [t.shape for t in final] == [t.shape for t in features]
    else:
        assert final.shape == features.shape
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "first_conv", "classifier", "interpolation"):
        assert key in cfg, f"{name}: pretrained_cfg lacks {key}"
    def names(v):  # timm's cfg names one layer or a tuple of them
        return v if isinstance(v, (tuple, list)) else (v,)
    for conv in names(cfg["first_conv"]):
        assert conv + ".weight" in model.state_dict(), f"{name}: first_conv {conv} is not a module"
    for head in names(cfg["classifier"]):
        assert any(k.startswith(head + ".") for k in model.state_dict()), f"{name}: no classifier {head}"


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_clear_errors(name):
    model = _meta_model(name)
    h, w = _input_size(model, name)
    c = model.in_chans
    bad = {
        "channels": torch.randn(1, c + 1, h, w, device="meta"),
        "rank": torch.randn(c, h, w, device="meta"),
        "dtype": torch.zeros(1, c, h, w, dtype=torch.long, device="meta"),
    }
    for what, x in bad.items():
        with pytest.raises(ValueError, match=name):
            model(x)
    if getattr(model, "fixed_input_size", None) is not None:
        with pytest.raises(ValueError, match=name):
            model(torch.randn(1, c, h + 32, w, device="meta"))
    elif model.input_divisor > 1:
        with pytest.raises(ValueError, match=name):
            model(torch.randn(1, c, h + 1, w, device="meta"))


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = formers.create_model(name, num_classes=5)
    h, w = _small_size(model)
    x = torch.randn(2, model.in_chans, h, w)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters that get no gradient: {no_grad[:5]}"
    assert trained


@pytest.mark.parametrize("name", SMALLEST)
def test_classifier_reset_and_pooled_features(name):
    model = formers.create_model(name).eval()
    h, w = _small_size(model)
    x = torch.randn(1, model.in_chans, h, w)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
    assert model.get_classifier() is not None
    assert isinstance(model.no_weight_decay(), set)


@pytest.mark.parametrize("name", SMALLEST)
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = formers.create_model(name, num_classes=4).eval()
    path = os.path.join(tmp_path, "w.safetensors")
    formers.save_checkpoint(model, path)
    torch.manual_seed(1)
    again = formers.create_model(name, num_classes=4, checkpoint=path).eval()
    h, w = _small_size(model)
    x = torch.randn(2, model.in_chans, h, w)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SMALLEST)
def test_intermediates_agree_with_forward_features(name):
    model = formers.create_model(name).eval()
    h, w = _small_size(model)
    x = torch.randn(1, model.in_chans, h, w)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, output_fmt="NLC" if _token_set(model) else "NCHW")
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(feats) == len(model.feature_info)
