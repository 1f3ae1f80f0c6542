"""timm's model contract on the smallest paper variant of every family (the rule of
tests/timm_contract/conftest.py): pretrained_cfg, declared input limits, reset_classifier,
global_pool choices, prune_intermediate_layers, meta-device construction, gradients.

Everything that needs no forward values runs on the meta device.
"""
from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
import torch.nn as nn

import formers
from formers.registry import model_entry


@functools.lru_cache(maxsize=1)
def families() -> dict[str, str]:
    """family -> its smallest paper variant: tests/timm_contract/conftest.py's rule (a family is a model
    file and the name's first word), restated here, as importing that conftest would patch timm."""
    best = {}
    for name in formers.list_models(task="classify"):  # the image-backbone contract
        entry = model_entry(name)
        if entry.card.status == "reduced":
            continue
        family = entry.module.rsplit(".", 1)[-1] + ":" + name.split("_")[0]
        with torch.device("meta"):
            n = sum(p.numel() for p in formers.create_model(name).parameters())
        if family not in best or n < best[family][1]:
            best[family] = (name, n)
    return {f: v[0] for f, v in sorted(best.items())}


FAMILIES = sorted(families().values())


def meta(name, **kwargs):
    with torch.device("meta"):
        return formers.create_model(name, **kwargs)


def _input(model, size=None, batch=1, device="meta"):
    cfg = model.pretrained_cfg
    h, w = cfg["input_size"][1:] if size is None else (size, size)
    return torch.randn(batch, cfg["input_size"][0], h, w, device=device)


def _is_map(model, y) -> bool:
    return torch.is_tensor(y) and y.ndim == 4


def _hw(model, y):
    return tuple(y.shape[1:3]) if getattr(model, "output_fmt", "NCHW") == "NHWC" else tuple(y.shape[2:])


# ---------------------------------------------------------------------------------------------
# 1. pretrained_cfg

# every family, plus the variants whose strides or sizes differ from their family's (demos, 384 px)
CFG_MODELS = sorted(set(FAMILIES) | {n for n in formers.list_models(task="classify") if model_entry(n).card.status == "reduced"
                                     or model_entry(n).card.img_size not in (224, 240)})


@pytest.mark.parametrize("name", CFG_MODELS)
def test_cfg_names_real_layers_and_pool_size(name):
    """first_conv and classifier name real layers (tuples where there are several); pool_size is the
    (H, W) of forward_features' map at the default input size; tokens models say output_fmt 'NLC'."""
    model = meta(name).eval()
    cfg = model.pretrained_cfg
    keys = model.state_dict().keys()
    for key in ("first_conv", "classifier"):
        names = cfg[key] if isinstance(cfg[key], (tuple, list)) else (cfg[key],)
        missing = [n for n in names if n + ".weight" not in keys]
        assert not missing, f"{name}: cfg {key} names {missing}, which have no weight"
    y = model.forward_features(_input(model))
    if _is_map(model, y):
        assert _hw(model, y) == tuple(cfg["pool_size"]), f"{name}: pool_size {cfg['pool_size']} != {_hw(model, y)}"
        assert getattr(model, "output_fmt", "NCHW") in ("NCHW", "NHWC")
    elif torch.is_tensor(y) and y.ndim == 3:
        assert model.output_fmt == "NLC", f"{name}: forward_features returns tokens but output_fmt is not 'NLC'"


def _declared_ok(model, s: int) -> bool:
    if model.fixed_input_size is not None:
        return (s, s) == tuple(model.fixed_input_size)
    return s >= model.min_input_size and s % model.input_divisor == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_declared_input_limits_are_the_real_ones(name):
    """Sizes the model declares it takes (input_divisor, min_input_size, fixed_input_size) run; the
    others raise ValueError naming the model; the cfg's min_input_size is one the model takes and is
    the smallest it declares."""
    model = meta(name).eval()
    cfg = model.pretrained_cfg
    div, low = model.input_divisor, model.min_input_size
    sizes = {1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 24, 31, 32, 33, 48, 64, 96, 100, 128,
             low - 1, low, low + 1, div, div + 1, 2 * div, 2 * div - 1, 3 * div}
    if model.fixed_input_size is not None:
        sizes = {model.fixed_input_size[0] + d for d in (-32, -1, 0, 1)}
    for s in sorted(v for v in sizes if 0 < v <= 256):
        x = _input(model, s)
        if _declared_ok(model, s):
            model.forward_features(x)
        else:
            with pytest.raises(ValueError, match=name):
                model.forward_features(x)
    if cfg.get("min_input_size"):
        m = cfg["min_input_size"][1]
        assert _declared_ok(model, m) and not any(_declared_ok(model, s) for s in range(1, m)), \
            f"{name}: cfg min_input_size {cfg['min_input_size']} is not the smallest input the model takes"


# ---------------------------------------------------------------------------------------------
# 2. reset_classifier

@pytest.mark.parametrize("name", FAMILIES)
def test_reset_classifier_keeps_device_dtype_and_frozen(name):
    model = meta(name)
    model.to(dtype=torch.float64).eval()
    for n in (0, 3):
        model.reset_classifier(n)
        heads = model.get_classifier()
        params = [p for h in (heads if isinstance(heads, tuple) else (heads,)) for p in h.parameters()]
        if n:
            assert params and all(p.device.type == "meta" and p.dtype == torch.float64 for p in params), name
            assert all(p.requires_grad for p in params), f"{name}: a new head must be trainable"
        else:
            assert not params, f"{name}: reset_classifier(0) left classifier parameters"
        assert all(not m.training for m in model.modules()), f"{name}: the new head is in train mode"
    model = meta(name).requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(0, None)
    assert not [n for n, p in model.named_parameters() if p.requires_grad], f"{name}: frozen params thawed"
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None


# ---------------------------------------------------------------------------------------------
# 5. global_pool choices

@pytest.mark.parametrize("name", FAMILIES)
def test_global_pool_choices(name):
    """Every declared pool type works at creation and in reset_classifier and pools as it says; any
    other value is refused in one line, at creation and in reset_classifier alike."""
    model = meta(name, num_classes=0).eval()
    x = _input(model)
    feats = model.forward_features(x)
    for pool in model.pool_types:
        for m in (meta(name, num_classes=0, global_pool=pool).eval(), model):
            m.reset_classifier(0, pool)
            assert m.global_pool == pool
            out = m.forward_head(feats)
            if pool == "":
                expect = (feats.shape if torch.is_tensor(feats) else None)
                if expect is not None:
                    assert out.shape == expect, f"{name}: global_pool='' must return the unpooled features"
            else:
                assert out.ndim == 2 and out.shape[1] == m.head_hidden_size, (name, pool, out.shape)
    for bad in ("max" if "max" not in model.pool_types else "token", "catavgmax", "bogus"):
        if bad in model.pool_types:
            continue
        with pytest.raises(ValueError, match=rf"{name}.*{bad}"):
            meta(name, global_pool=bad)
        with pytest.raises(ValueError, match=rf"{name}.*{bad}"):
            model.reset_classifier(0, bad)


def test_map_pools_compute_what_they_name():
    model = formers.create_model("swin_tiny_patch4_window7_224", num_classes=0).eval()
    feats = torch.randn(2, 7, 7, model.num_features)
    for pool, expect in (("avg", feats.mean((1, 2))), ("max", feats.amax((1, 2))),
                         ("avgmax", 0.5 * (feats.mean((1, 2)) + feats.amax((1, 2))))):
        model.reset_classifier(0, pool)
        torch.testing.assert_close(model.forward_head(feats), expect)


def test_tnt_empty_pool_is_unpooled():
    model = meta("tnt_s_patch16_224", num_classes=0, global_pool="")
    y = model(_input(model))
    assert y.ndim == 3  # the tokens
    model.reset_classifier(0, "token")
    assert model(_input(model)).ndim == 2


# ---------------------------------------------------------------------------------------------
# 3. prune_intermediate_layers

@pytest.mark.parametrize("name", FAMILIES)
def test_prune_intermediate_layers(name):
    """Stages/blocks after the last index go; the returned indices tap the same features as the
    unpruned model; with prune_head the classifier has no parameters; every parameter left is used."""
    model = meta(name).eval()
    n = len(model.feature_info)
    x = _input(model)
    fmt = "NLC" if getattr(model, "feature_maps", True) is False else "NCHW"
    full = model.forward_intermediates(x, output_fmt=fmt, intermediates_only=True)
    default = copy.deepcopy(model)
    assert default.prune_intermediate_layers() == [n - 1]  # indices=1: the last one
    for i in sorted({0, n // 2, n - 1}):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i], prune_norm=True)
        assert take == [i]
        heads = pruned.get_classifier()
        assert not [p for h in (heads if isinstance(heads, tuple) else (heads,)) for p in h.parameters()]
        feats = pruned.forward_intermediates(x, indices=take, output_fmt=fmt, intermediates_only=True)
        assert feats[0].shape == full[i].shape, (name, i)
        assert sum(p.numel() for p in pruned.parameters()) <= sum(p.numel() for p in model.parameters())
        out = pruned(x)  # forward still runs on what is left
        assert out is not None


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "convformer_s18", "pvt_tiny", "t2t_vit_7",
                                  "rmt_tiny", "svt_h_s", "uniformer_xxs"])
def test_prune_leaves_no_unused_parameters(name):
    torch.manual_seed(0)
    model = formers.create_model(name).train()
    x = torch.randn(2, 3, 64, 64)
    n = len(model.feature_info)
    for indices, prune_norm in (([0], False), ([n - 1], False), (list(range(n)), True)):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        feats = pruned.forward_intermediates(x, indices=take, norm=not prune_norm, intermediates_only=True)
        sum(f.sum() for f in feats).backward()
        unused = [k for k, p in pruned.named_parameters() if p.grad is None]
        assert not unused, f"{name} pruned to {indices}: unused {unused[:5]}"


def test_prune_to_the_last_index_keeps_the_output():
    model = formers.create_model("swin_tiny_patch4_window7_224", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([len(model.feature_info) - 1], prune_head=False)
        torch.testing.assert_close(pruned(x), expected, rtol=0, atol=0)
        pruned.prune_intermediate_layers([1], prune_norm=True)
        torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2),
                                   model.forward_intermediates(x, indices=[1], intermediates_only=True)[0])


# ---------------------------------------------------------------------------------------------
# 4. meta-device construction

@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "svt_h_s"])
def test_meta_build_then_init_non_persistent_buffers_matches_a_real_model(name):
    torch.manual_seed(0)
    real = formers.create_model(name, img_size=64).eval()
    model = meta(name, img_size=64).to_empty(device="cpu").eval()
    for _, buf in model.named_buffers():
        buf.fill_(7)  # what uninitialised memory may hold: an in-range garbage index
    model.init_non_persistent_buffers()
    model.load_state_dict(real.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), real(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_has_init_non_persistent_buffers(name):
    model = meta(name)
    model.init_non_persistent_buffers()  # meta: recomputes on meta without error
    assert model.pretrained_cfg is not None


# ---------------------------------------------------------------------------------------------
# 6. gradients

@pytest.mark.parametrize("name", ["randformer_s12", "uniformer_xxs"])
def test_every_parameter_gets_a_gradient(name):
    model = formers.create_model(name, num_classes=5).train()
    size = model.pretrained_cfg["input_size"][1] if model.fixed_input_size is not None else 64
    out = model(torch.randn(2, 3, size, size))
    out = torch.cat(out) if isinstance(out, tuple) else out
    out.mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


# ---------------------------------------------------------------------------------------------
# 7. UniFormer-L

def test_uniformer_large_is_registered_with_the_papers_params():
    info = formers.model_info("uniformer_large_ls")
    assert "token-labeling training only" in info["notes"]
    value, tol = model_entry("uniformer_large_ls").card.reported_params()
    n = sum(p.numel() for p in meta("uniformer_large_ls").parameters()) / 1e6
    assert abs(n - value) <= tol


def test_generic_prune_needs_indexed_feature_modules():
    class Odd(formers.models.base.Backbone):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()
            self.feature_info = [dict(num_chs=1, reduction=1, module="a"), dict(num_chs=1, reduction=1, module="b")]
    with pytest.raises(NotImplementedError, match="Odd"):
        Odd().prune_intermediate_layers([0])


def test_checkpoint_loading_reads_tuple_classifier_names(tmp_path):
    """CrossViT's cfg names its two heads (head.0, head.1): a checkpoint with another class count loads
    with both heads left at init (and one warning), the body loaded."""
    torch.manual_seed(0)
    src = formers.create_model("crossvit_demo", num_classes=4)
    path = tmp_path / "w.safetensors"
    formers.save_checkpoint(src, path)
    with pytest.warns(UserWarning, match="classifier"):
        model = formers.create_model("crossvit_demo", num_classes=3, checkpoint=str(path))
    assert model.head[0].out_features == model.head[1].out_features == 3
    assert torch.equal(model.patch_embed[1].proj.weight, src.patch_embed[1].proj.weight)
