"""MatFormer: nested FFNs, Mix'n'Match extraction, the joint objective, the CLI round trip."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import formers
from formers.cli import main
from formers.transforms import TransformError, applied_transforms, load
from formers.transforms.base import save
from formers.transforms.matformer import (DEFAULT_GRANULARITIES, MatFormerObjective, NestedConv2d, NestedLinear,
                                          extract_submodel, granularity_widths, set_granularity, to_matformer)
from formers.train.objectives import build_objective

torch.set_num_threads(1)

PVT_SMALL = dict(patch_size=2, embed_dims=(16, 24, 32, 48), num_heads=(1, 1, 2, 2), mlp_ratios=(4, 4, 4, 4))
# Mlp (GELU); ViT-style PVT; ConvMlp + Mlp; RMT's ConvFFN with a depthwise conv in the hidden layer; cswin
MODELS = {"swin_demo": {}, "pvt_tiny": PVT_SMALL, "uniformer_demo": {}, "rmt_demo": {}, "cswin_demo": {}}


def build(name, seed=0):
    torch.manual_seed(seed)
    return formers.create_model(name, num_classes=10, img_size=32, **MODELS.get(name, {})).eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def mixed(n):
    """A Mix'n'Match choice over n FFNs: small early, large late (the paper's best-behaved pattern)."""
    return [DEFAULT_GRANULARITIES[min(3, 4 * i // n)] for i in range(n)]


def zero_tail_oracle(model, fractions):
    """The definition of a granularity, built independently of the nesting code: the plain model
    with every hidden unit past m_i disconnected (its fc2 column zeroed)."""
    o = copy.deepcopy(model)
    ffns = [m for m in o.modules() if isinstance(getattr(m, "fc1", None), (nn.Linear, nn.Conv2d))
            and m is not getattr(o, "head", None) and not hasattr(m, "norm")]
    assert len(ffns) == len(fractions)
    with torch.no_grad():
        for m, f in zip(ffns, fractions):
            h = m.fc2.weight.shape[1]
            m.fc2.weight[:, max(1, int(f * h + 0.5)):] = 0
    return o


@pytest.mark.parametrize("name", list(MODELS))
def test_nested_granularity_and_extracted_submodel_match(name):
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    plain_sd = {k: v for k, v in model.state_dict().items()}
    to_matformer(model)
    # no copy, same keys: the nested model's state dict is the plain one, tensor for tensor
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == {k: v.data_ptr() for k, v in plain_sd.items()}
    n = len(granularity_widths(model))
    choice = mixed(n)
    with torch.no_grad():
        assert torch.equal(model(x), ref)                     # full width by default
        full = extract_submodel(model, 1.0)
        assert type(full) is type(model) and torch.equal(full(x), ref)
        set_granularity(model, choice)
        nested = model(x)
        oracle = zero_tail_oracle(build(name), choice)(x)
        sub = extract_submodel(model, choice)
        out = sub(x)
    torch.testing.assert_close(nested, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, nested, atol=1e-6, rtol=0)
    assert not (nested - ref).abs().max() < 1e-4              # the granularity really changed the function
    assert type(sub) is type(model)
    assert not any(isinstance(m, (NestedLinear, NestedConv2d)) for m in sub.modules())   # a plain model
    assert applied_transforms(sub)[-1] == {"name": "matformer", "spec": {"hidden": granularity_widths(model, choice)}}


def test_param_and_flop_reduction_is_exactly_the_dropped_units():
    model = build("swin_demo")
    to_matformer(model)
    choice = mixed(len(granularity_widths(model)))
    sub = extract_submodel(model, choice)
    # expected savings from the FFN shapes: each dropped unit had an fc1 row + bias and an fc2 column
    tokens, saved_p, saved_macs = [], 0, 0
    hooks = [m.fc1.register_forward_hook(lambda mod, i, o: tokens.append(i[0].numel() // i[0].shape[-1]))
             for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")]
    with torch.no_grad():
        set_granularity(model, None)
        model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    ffns = [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")]
    for m, w, t in zip(ffns, granularity_widths(model, choice), tokens):
        drop = m.fc1.out_features - w
        saved_p += drop * (m.fc1.in_features + 1 + m.fc2.out_features)
        saved_macs += t * drop * (m.fc1.in_features + m.fc2.out_features)
    assert n_params(model) - n_params(sub) == saved_p
    macs_full = formers.count_flops(model, (3, 32, 32))
    macs_sub = formers.count_flops(sub, (3, 32, 32))
    assert macs_full - macs_sub == saved_macs


def test_starrelu_ffn_convformer():
    """ConvFormer's Mlp has StarReLU (scalar scale and bias: act(0) != 0) and no biases."""
    torch.manual_seed(0)
    model = formers.create_model("convformer_s18", num_classes=10, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    to_matformer(model)
    assert len(granularity_widths(model)) == 18          # the MlpHead classifier is not an FFN
    set_granularity(model, 0.25)
    with torch.no_grad():
        nested = model(x)
        set_granularity(model, None)
        oracle = zero_tail_oracle(model, [0.25] * 18)(x)
    torch.testing.assert_close(nested, oracle, atol=1e-5, rtol=1e-4)


def test_errors_name_the_model_and_reason():
    model = build("swin_demo")
    with pytest.raises(TransformError, match="swin_demo.*to_matformer"):
        set_granularity(model, 0.5)
    to_matformer(model)
    with pytest.raises(TransformError, match=r"swin_demo: 3 granularities given, the model has 6 FFNs"):
        set_granularity(model, [0.5, 1, 1])
    with pytest.raises(TransformError, match=r"\(0, 1\]"):
        extract_submodel(model, 1.5)
    with pytest.raises(TransformError, match="Sequential.*no FFN"):
        to_matformer(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 1)))


def test_objective_sums_the_granularity_losses_and_leaves_full_width():
    obj = build_objective("matformer", {"granularities": [0.25, 1.0]})
    assert isinstance(obj, MatFormerObjective)
    model = obj.prepare(build("pvt_tiny").train())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, logits = obj(model, x, y, step=0)
    loss.backward()
    with torch.no_grad():
        model.eval()
        expect = 0
        for g in (0.25, 1.0):
            set_granularity(model, g)
            expect = expect + F.cross_entropy(model(x), y)
        set_granularity(model, None)
        full = model(x)
    torch.testing.assert_close(loss.detach(), expect)       # pvt_tiny has no dropout at defaults
    torch.testing.assert_close(logits.detach(), full)
    # the units beyond h/4 get gradient only from the full granularity; all get some
    fc1 = model.stages[0].blocks[0].mlp.fc1
    assert fc1.nest_out is None and fc1.weight.grad.abs().sum(1).min() > 0
    sample = build_objective("matformer", {"reduce": "sample", "granularities": [0.125, 0.5]})
    assert sample(obj.prepare(build("pvt_tiny")), x, y, 3)[0].ndim == 0
    with pytest.raises(ValueError, match="reduce"):
        build_objective("matformer", {"reduce": "max"})


def test_train_flag_sets_the_objective():
    from formers.cli import build_parser
    args = build_parser().parse_args(["train", "swin_demo", "--matformer"])
    assert args.objective == "matformer"


def test_cli_round_trip(tmp_path):
    model = build("swin_demo", seed=3)
    ckpt = tmp_path / "plain.safetensors"
    save(model, str(ckpt), metadata={"img_size": 32})
    choice = mixed(6)
    out = tmp_path / "sub.safetensors"
    rc = main(["transform", "matformer", "--model", "swin_demo", "--checkpoint", str(ckpt),
               "--granularity", ",".join(str(g) for g in choice), "--out", str(out)])
    assert rc == 0
    loaded = load(str(out))
    expect = extract_submodel(model, choice)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expect(x), atol=0, rtol=0)
    assert n_params(loaded) == n_params(expect) < n_params(model)
