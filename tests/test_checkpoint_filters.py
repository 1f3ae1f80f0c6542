"""Every model file's checkpoint_filter_fn, given weights it cannot map (another family's state dict,
a tensor of the wrong shape), fails as a CheckpointError saying the checkpoint does not fit, never
as an exception from deep inside (KeyError, IndexError, int() of a key part, interpolate)."""
import sys
import warnings

import pytest
import torch

import formers
from formers.checkpoint import CheckpointError, load_checkpoint

# The smallest variant of each model file (demo configs where the file has one).
FAMILIES = {
    "biformer": "biformer_demo", "crossformer": "crossformer_demo", "crossvit": "crossvit_demo",
    "cswin": "cswin_demo", "favit": "favit_demo", "metaformer": "poolformerv2_s12",
    "poolformer": "poolformer_s12", "pvt": "pvt_tiny", "resformer": "resformer_demo", "rmt": "rmt_demo",
    "sparseformer": "sparseformer_demo", "sret": "sret_demo", "svt": "svt_demo", "swin": "swin_demo",
    "t2t_vit": "t2t_vit_demo", "tnt": "tnt_demo", "uniformer": "uniformer_demo",
}


@pytest.fixture(scope="module")
def built():
    with torch.device("meta"):
        return {fam: formers.create_model(name) for fam, name in FAMILIES.items()}


def test_every_model_file_is_covered():
    files = {formers.registry.model_entry(n).module.rsplit(".", 1)[1] for n in formers.list_models(task="classify")}
    assert files <= set(FAMILIES), sorted(files - set(FAMILIES))


def _filter(model):
    return sys.modules[type(model).__module__].checkpoint_filter_fn


@pytest.mark.parametrize("target", sorted(FAMILIES))
def test_another_familys_weights_do_not_fit(built, target):
    model = built[target]
    for source in sorted(FAMILIES):
        if source == target:
            continue
        sd = built[source].state_dict()
        try:
            _filter(model)(dict(sd), model)       # mapping alone: a dict back, or a CheckpointError
        except CheckpointError as e:
            assert "does not fit" in str(e), (source, str(e))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(model, sd)
        assert FAMILIES[target] in str(info.value), (source, str(info.value))


def _wrong(t, kind):
    """A scalar (a 2-vector where the model's tensor is a scalar) or a 1-D tensor of another length."""
    if kind == "scalar":
        return torch.zeros(() if t.dim() else (2,), device="meta")
    return torch.zeros(t.numel() + 1, device="meta")


@pytest.mark.parametrize("kind", ["scalar", "1d"])
@pytest.mark.parametrize("target", sorted(FAMILIES))
def test_a_tensor_of_the_wrong_shape_does_not_fit(built, target, kind):
    """Each key in turn (the size-dependent tables among them) replaced by a scalar or a 1-D tensor."""
    model = built[target]
    own = model.state_dict()
    special = [k for k in own if any(s in k for s in ("pos", "table", "complex_weight", "ls", "gamma", "token"))]
    keys = special + [k for k in own if k not in special][:: max(1, len(own) // 25)]
    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = tuple(c + "." for c in ((classifier,) if isinstance(classifier, str) else classifier)) + ("aux_head.",)
    for key in keys:
        if kind == "1d" and own[key].dim() == 1 and key.startswith(heads):
            continue    # a classifier of another size: dropped with a warning, as it should be
        sd = dict(own)
        sd[key] = _wrong(own[key], kind)
        try:
            _filter(model)(dict(sd), model)
        except CheckpointError as e:
            assert "does not fit" in str(e), (key, str(e))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError, match=FAMILIES[target]):
                load_checkpoint(model, sd)


@pytest.mark.parametrize("source,target", [("swin", "rmt"), ("cswin", "rmt"), ("resformer", "rmt"),
                                           ("t2t_vit", "sret"), ("tnt", "sret"), ("sret", "t2t_vit"),
                                           ("favit", "svt"), ("rmt", "svt")])
def test_filters_that_crashed_say_the_file_does_not_fit(built, source, target):
    model = built[target]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _filter(model)(dict(built[source].state_dict()), model)


@pytest.mark.parametrize("target,key,shape", [
    ("pvt", "stages.0.pos_embed", ()), ("sret", "pos_embed", (5,)), ("crossvit", "pos_embed.0", ()),
    ("swin", "layers.0.blocks.0.attn.relative_position_bias_table", (5,)), ("t2t_vit", "pos_embed", (3,)),
    ("tnt", "pos_embed", ()), ("svt", "stages.0.blocks.0.attn.complex_weight_ll", (4,)),
])
def test_shape_checks_name_the_key(built, target, key, shape):
    model = built[target]
    sd = dict(model.state_dict())
    sd[key] = torch.zeros(shape, device="meta")
    with pytest.raises(CheckpointError, match="does not fit this model") as info:
        _filter(model)(sd, model)
    assert key in str(info.value)


def test_timm_poolformer_v1_weights_warn_once_about_final_norm(tmp_path):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("poolformer_s12", pretrained=False)
    path = tmp_path / "timm_poolformer_s12.pth"
    torch.save(ref.state_dict(), path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        formers.create_model("poolformer_s12", checkpoint=path)
    said = [str(w.message) for w in seen if "final_norm" in str(w.message)]
    assert len(said) == 1 and 'final_norm="layer"' in said[0] and "timm" in said[0], said
    assert "\n" not in said[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        formers.create_model("poolformer_s12", checkpoint=path, final_norm="layer")
    assert not [w for w in seen if "final_norm" in str(w.message)]


@pytest.mark.parametrize("target,sd", [
    ("crossformer", {"layers.weight": torch.zeros(2)}),
    ("cswin", {"stage1_conv_embed.0.weight": torch.zeros(2), "stage1_conv_embed.7.weight": torch.zeros(2)}),
    ("cswin", {"stage1_conv_embed.0.weight": torch.zeros(2), "stageX.0.qkv.weight": torch.zeros(2)}),
    ("rmt", {"layers.weight": torch.zeros(2)}),
    ("rmt", {"layers.0.blocks.0.gamma_1": torch.zeros(())}),
], ids=["crossformer-layers", "cswin-stem-index", "cswin-stage-number", "rmt-layers", "rmt-scalar-gamma"])
def test_malformed_official_keys_do_not_fit(built, target, sd):
    model = built[target]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _filter(model)(dict(sd), model)
