"""create_model with timm's keywords, and the input checks every backbone shares."""
import pytest
import torch

import formers
from formers.features import FeatureGetterNet

SMALL = "swin_demo"


def test_pretrained_false_and_timm_switches_are_accepted():
    m = formers.create_model(SMALL, pretrained=False, scriptable=True, exportable=True, no_jit=True)
    assert m.model_name == SMALL


def test_pretrained_true_without_a_file_says_how_to_pass_one():
    with pytest.raises(ValueError, match=r"swin_demo: pretrained=True needs a local weights file.*checkpoint="):
        formers.create_model(SMALL, pretrained=True)


def test_pretrained_cfg_overlay_file_is_loaded_with_pretrained(tmp_path):
    src = formers.create_model(SMALL, num_classes=7)
    path = tmp_path / "w.safetensors"
    formers.checkpoint.save_checkpoint(src, str(path))
    m = formers.create_model(SMALL, num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert m.pretrained_cfg["file"] == str(path)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    # without pretrained=True the overlay only describes the weights (timm's meaning)
    fresh = formers.create_model(SMALL, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    assert not torch.equal(fresh.head.weight, src.head.weight)


def test_device_and_dtype_place_every_tensor():
    m = formers.create_model(SMALL, device="meta", dtype=torch.float64)
    tensors = list(m.parameters()) + list(m.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


def test_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="unknown keyword 'not_a_model_arg'"):
        formers.create_model(SMALL, not_a_model_arg=1)


def test_type_error_inside_a_constructor_names_the_keyword_at_fault():
    # depths=3 is a bad type (the builder iterates it); num_classes=5 is fine and must not be blamed
    with pytest.raises(TypeError) as err:
        formers.create_model(SMALL, num_classes=5, depths=3)
    assert "depths=3" in str(err.value) and "num_classes" not in str(err.value)


def test_features_only_returns_the_requested_maps():
    m = formers.create_model(SMALL, features_only=True, out_indices=(1, 2))
    assert isinstance(m, FeatureGetterNet)
    assert m.feature_info.channels() == [m.model.feature_info[i]["num_chs"] for i in (1, 2)]
    x = torch.randn(2, 3, 32, 32)
    feats = m(x)
    assert len(feats) == 2
    assert [f.shape[1] for f in feats] == m.feature_info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in feats] == m.feature_info.reduction()


def test_features_only_refuses_unknown_feature_cls_and_stray_out_indices():
    with pytest.raises(ValueError, match="feature_cls='hook'"):
        formers.create_model(SMALL, features_only=True, feature_cls="hook")
    with pytest.raises(TypeError, match="out_indices"):
        formers.create_model(SMALL, out_indices=(0,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_of_another_dtype_is_a_clear_error(dtype):
    m = formers.create_model(SMALL).eval()
    with pytest.raises(ValueError, match=rf"swin_demo: the input is {dtype} but the model's weights are torch.float32"):
        m(torch.randn(1, 3, 32, 32, dtype=dtype))


def test_autocast_input_of_another_dtype_runs():
    m = formers.create_model(SMALL).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.shape == (1, m.num_classes)


def test_input_on_another_device_is_a_clear_error():
    m = formers.create_model(SMALL).eval()
    with pytest.raises(ValueError, match="swin_demo: the input is on meta but the model's weights are on cpu"):
        m(torch.randn(1, 3, 32, 32, device="meta"))


def test_fx_trace_keeps_the_input_checks():
    m = formers.create_model("poolformer_s12").eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(ValueError, match="poolformer_s12: expected 3 input channels, got 4"):
        gm(torch.randn(1, 4, 32, 32))
