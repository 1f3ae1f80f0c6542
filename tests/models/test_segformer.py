"""SegFormer (MiT encoder + All-MLP head): exact parameter counts, shapes and sizes, equality with HF
transformers' SegformerForSemanticSegmentation on the same weights, coverage of the official checkpoint
keys, clear errors, and a training sanity check."""
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import formers
from formers.checkpoint import CheckpointError, load_checkpoint
from formers.models.dense.segformer import checkpoint_filter_fn
from formers.registry import model_entry

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "segformer_b0_official_keys.json")

# dense.md §1: the encoders without the ImageNet classifier (matches the official mit_b* built locally for B0)
ENCODER_PARAMS = {"segformer_b0": 3_319_392, "segformer_b1": 13_151_424, "segformer_b2": 24_196_288,
                  "segformer_b3": 44_072_128, "segformer_b4": 60_842_688, "segformer_b5": 81_443_008}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_as_segmentation_models():
    assert formers.list_models("segformer_b*") == sorted(ENCODER_PARAMS)
    for name in ENCODER_PARAMS:
        card = model_entry(name).card
        assert card.task == "segment" and card.paper == 2 and card.arxiv == "2105.15203"


@pytest.mark.parametrize("name", sorted(ENCODER_PARAMS))
def test_param_counts(name):
    with torch.device("meta"):
        model = formers.create_model(name)
    assert _count(model.encoder) == ENCODER_PARAMS[name]
    value, tol = model_entry(name).card.reported_params()
    total = _count(model) / 1e6
    assert abs(total - value) <= tol, f"{name}: {total:.3f}M params, the paper prints {value}M"
    assert model.num_classes == 150 and model.output_stride == 4


def test_shapes_sizes_and_reset_classifier():
    model = formers.create_model("segformer_b0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        odd = model(torch.randn(1, 3, 70, 90))      # not a multiple of 32: the convs pad, sizes round up
        smallest = model(torch.randn(1, 3, model.min_input_size, model.min_input_size))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4), (2, 256, 2, 2)]
    assert tuple(logits.shape) == (2, 150, 16, 16)
    assert tuple(odd.shape) == (1, 150, 18, 23)
    assert model.min_input_size == 29 and tuple(smallest.shape) == (1, 150, 8, 8)
    with pytest.raises(ValueError, match=r"segformer_b0.*28x28.*at least 29"):
        model(torch.randn(1, 3, 28, 28))   # stage 1 would be 7x7, under its 8x8 reduction conv

    model = model.to(torch.float64)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.classifier.weight.dtype == torch.float64
    with torch.no_grad():
        assert tuple(model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape) == (1, 7, 8, 8)


def _hf_b0(num_labels: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=num_labels, hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2],
                                          num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
                                          mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256)
    hf = transformers.SegformerForSemanticSegmentation(config)
    with torch.no_grad():   # move every norm and BN statistic away from its init, so each one is tested
        for name, t in hf.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return hf.eval()


@pytest.mark.parametrize("norm_eps, atol", [(1e-5, 5e-5), (1e-6, 1e-4)])
def test_equals_hf_transformers(tmp_path, norm_eps, atol):
    """HF uses torch's LayerNorm eps 1e-5 everywhere; the official blocks and stage norms use 1e-6.
    With norm_eps=1e-5 ours is HF's function; with the official 1e-6 the two stay within 1e-4."""
    from safetensors.torch import save_file
    hf = _hf_b0(19)
    path = str(tmp_path / "hf_b0.safetensors")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
    ours = formers.create_model("segformer_b0", num_classes=19, checkpoint=path, norm_eps=norm_eps).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        feats = ours.forward_features(x)
        logits = ours(x)
    assert len(ref.hidden_states) == 4
    for mine, theirs in zip(feats, ref.hidden_states):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=0)
    assert logits.shape == ref.logits.shape == (2, 19, 16, 24)
    torch.testing.assert_close(logits, ref.logits, atol=atol, rtol=0)


def test_hf_hub_names_and_encoder_only_files():
    hf = _hf_b0(19)
    sd5 = hf.state_dict()
    model = formers.create_model("segformer_b0", num_classes=19)
    # the 4.x names the hub files carry map to the same tensors as the 5.x names
    renames = [("stages.0.patch_embeddings.", "encoder.patch_embeddings.0."), ("stages.0.blocks.", "encoder.block.0."),
               ("stages.0.layer_norm.", "encoder.layer_norm.0."), ("layernorm_before", "layer_norm_1"),
               ("layernorm_after", "layer_norm_2"), ("attention.q_proj", "attention.self.query"),
               ("attention.k_proj", "attention.self.key"), ("attention.v_proj", "attention.self.value"),
               ("attention.sequence_reduction.sequence_reduction", "attention.self.sr"),
               ("attention.sequence_reduction.layer_norm", "attention.self.layer_norm"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "mlp.dense1"), ("mlp.fc2", "mlp.dense2"),
               ("decode_head.linear_projections", "decode_head.linear_c")]
    sd4 = {}
    for k, v in sd5.items():
        for i in range(1, 4):
            k = k.replace(f"stages.{i}.patch_embeddings.", f"encoder.patch_embeddings.{i}.").replace(
                f"stages.{i}.blocks.", f"encoder.block.{i}.").replace(f"stages.{i}.layer_norm.", f"encoder.layer_norm.{i}.")
        for new, old in renames:
            k = k.replace(new, old)
        sd4[k] = v
    assert any(".attention.self.query." in k for k in sd4) and not any("stages." in k for k in sd4)
    a, b = checkpoint_filter_fn(sd5, model), checkpoint_filter_fn(sd4, model)
    assert set(a) == set(b) == set(model.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an encoder alone (HF SegformerModel's keys) fills the encoder; the head stays at init, with a warning
    encoder_only = {k[len("segformer."):]: v for k, v in sd5.items() if k.startswith("segformer.")}
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    with pytest.warns(UserWarning, match="encoder only"):
        load_checkpoint(model, encoder_only)
    assert torch.equal(model.encoder.stages[3].norm.weight, sd5["segformer.stages.3.layer_norm.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in head_before.items())


def _random_official(shapes: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g) + 0.5)
            for k, s in shapes.items()}


def test_official_keys_fill_every_tensor(tmp_path):
    shapes = json.load(open(FIXTURE))
    assert "decode_head.conv_seg.weight" in shapes and "backbone.block1.0.attn.kv.weight" in shapes
    official = _random_official(shapes)
    path = str(tmp_path / "segformer_b0_official.pth")
    torch.save({"meta": {"CLASSES": ["c"] * 19}, "state_dict": official}, path)   # an mmcv checkpoint's layout
    model = formers.create_model("segformer_b0", num_classes=19, checkpoint=path)  # strict
    mapped = checkpoint_filter_fn(official, model)
    own = model.state_dict()
    assert set(mapped) == set(own)
    assert len(mapped) == len(shapes) - 2          # everything but conv_seg's weight and bias
    for k, v in own.items():
        assert torch.equal(v, mapped[k]), f"{k} was not filled from the official checkpoint"
    assert torch.equal(own["encoder.stages.0.blocks.1.mlp.dwconv.weight"], official["backbone.block1.1.mlp.dwconv.dwconv.weight"])
    assert torch.equal(own["head.fuse.weight"], official["decode_head.linear_fuse.conv.weight"])

    # the ImageNet mit_b0.pth layout: no prefix, a classifier `head.*` that is dropped
    imagenet = {k[len("backbone."):]: v for k, v in official.items() if k.startswith("backbone.")}
    imagenet.update({"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})
    fresh = formers.create_model("segformer_b0", num_classes=19)
    with pytest.warns(UserWarning, match="encoder only"):
        load_checkpoint(fresh, imagenet)
    assert torch.equal(fresh.encoder.stages[2].blocks[0].attn.kv.weight, official["backbone.block3.0.attn.kv.weight"])


def test_bad_inputs_and_foreign_checkpoints():
    model = formers.create_model("segformer_b0").eval()
    with pytest.raises(ValueError, match=r"segformer_b0.*3 input channels, got 4"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="segformer_b0"):
        model(torch.randn(3, 64, 64))
    swin = formers.create_model("swin_demo").state_dict()
    with pytest.raises(CheckpointError, match="segformer_b0: the checkpoint does not fit"):
        load_checkpoint(model, swin)
    b1 = formers.create_model("segformer_b1").state_dict()   # a SegFormer of another width
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(model, b1)


def test_equals_segmentation_models_pytorch_mit_encoder():
    """smp's `mit_b0` encoder keeps the official NVlabs key names: its state dict loads through our filter
    (an encoder-only file: the head stays at its init, with a warning) and the four maps agree."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    enc = smp.encoders.get_encoder("mit_b0", weights=None).eval()
    with torch.no_grad():
        for t in enc.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    ours = formers.create_model("segformer_b0", num_classes=19).eval()
    with pytest.warns(UserWarning, match="encoder only"):
        sd = checkpoint_filter_fn(enc.state_dict(), ours)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        theirs = enc(x)[2:]          # smp adds the input and an empty stride-2 map in front
        mine = ours.forward_features(x)
    assert [tuple(t.shape) for t in mine] == [tuple(t.shape) for t in theirs]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
