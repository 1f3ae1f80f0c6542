"""Whole-model transforms on the PoolFormer, MetaFormer, PVT, CrossViT, TNT, T2T-ViT, SReT, SVT and
ResFormer families (project issue 13, items 5, 6, 12, 15, 19): a plain torch.fx symbolic trace equals
the model (forward and backward), TorchScript compiles the model (or it says why not), torch.export
with a dynamic height and width equals eager at a second size, ONNX graphs are right at two sizes,
a batch of zero images gives empty outputs, and SVT runs in half precision.

Each family's smallest paper variant, at small inputs (timm's harness runs the same at its sizes).
"""
import warnings

import pytest
import torch
import torch.fx

import formers

# (model, input size, a second size of the same rule, or None where the model takes one size only)
MODELS = [
    ("poolformer_s12", 64, 96),
    ("identityformer_s12", 64, 96),
    ("randformer_s12", 224, None),   # its frozen token-mixing matrices fix the number of tokens: 224 only
    ("poolformerv2_s12", 64, 96),
    ("convformer_s18", 64, 96),
    ("caformer_s18", 64, 96),
    ("pvt_tiny", 64, 96),
    ("crossvit_tiny_240", 96, 144),
    ("tnt_s_patch16_224", 64, 96),
    ("t2t_vit_7", 64, 96),
    ("sret_tiny", 64, 96),
    ("svt_h_s", 64, 96),
    ("resformer_tiny_patch16", 64, 96),
]
IDS = [m[0] for m in MODELS]
NOT_SCRIPTABLE = {"sret_tiny"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit / torch.onnx deprecation notices
        yield


def _model(name, **kwargs):
    torch.manual_seed(0)
    return formers.create_model(name, **kwargs).eval()


def _close(a, b, tol=1e-5):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_fx_trace_equals_eager(name, size, size2):
    """A plain tracer (no leaf modules, no autowrap lists) gives a GraphModule equal to the model, at the
    traced size and at another one, that still refuses what the model refuses, and that trains."""
    model = _model(name)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _close(gm(x), model(x))
        if size2:
            x2 = torch.randn(2, 3, size2, size2 + model.input_divisor)
            _close(gm(x2), model(x2))
    assert any(n.target.__name__ == "image_checks" for n in gm.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="input channels"):
        gm(torch.randn(1, 4, size, size))
    train = torch.fx.symbolic_trace(_model(name, num_classes=7).train())
    out = train(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in train.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_torchscript(name, size, size2):
    model = _model(name)
    if name in NOT_SCRIPTABLE:
        assert model.script_unsupported
        with pytest.raises(RuntimeError, match="TorchScript is not supported"):
            torch.jit.script(model)
        return
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _close(scripted(x), model(x))


@pytest.mark.parametrize("name,size,size2", [m for m in MODELS if m[2]], ids=[m[0] for m in MODELS if m[2]])
def test_export_dynamic_height_width(name, size, size2):
    model = _model(name)
    div = model.input_divisor
    # from the sample size up (the 3x3 pools of the smallest maps add guards below about 35 px)
    h = torch.export.Dim("h", min=size // div, max=1024 // div)
    w = torch.export.Dim("w", min=size // div, max=1024 // div)
    dims = {"x": {2: div * h, 3: div * w}} if div > 1 else {"x": {2: h, 3: w}}
    ep = torch.export.export(model, (torch.randn(1, 3, size, size),), dynamic_shapes=dims)
    x2 = torch.randn(1, 3, size2, size2 + div)
    with torch.no_grad():
        _close(ep.module()(x2), model(x2), tol=1e-4)


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_zero_batch(name, size, size2):
    """A batch of 0 images gives empty outputs of the shapes a batch of 1 has, as torch layers do."""
    model = _model(name)
    x0, x1 = torch.randn(0, 3, size, size), torch.randn(1, 3, size, size)
    with torch.no_grad():
        for fn in (model, model.forward_features, lambda x: model.forward_intermediates(x, intermediates_only=True)):
            empty, one = fn(x0), fn(x1)
            pairs = zip(empty, one) if isinstance(one, (list, tuple)) else [(empty, one)]
            for e, o in pairs:
                assert e.shape == (0, *o.shape[1:])


def test_attention_onnx_permutations_non_negative():
    """The legacy exporter writes layers.Attention's head split with non-negative Transpose perms, which
    onnxruntime loads, and the graph is right at a second token count."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    from formers.layers import Attention
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    buf = io.BytesIO()
    torch.onnx.export(attn, (torch.randn(2, 10, 32),), buf, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 1: "n"}}, opset_version=17)
    graph = onnx.load_from_string(buf.getvalue()).graph
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert perms and all(min(p) >= 0 for p in perms), perms
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for n in (10, 17):
        x = torch.randn(3, n, 32)
        with torch.no_grad():
            ref = attn(x).numpy()
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), torch.from_numpy(ref),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about 30 s: make test-export
def test_crossvit_onnx_right_at_two_sizes_or_refused():
    """The TorchScript-based exporter would bake the large-patch branch's resize in: it is refused. The
    dynamo exporter carries it as a formula of the input size: right at a second size."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import io
    model = _model("crossvit_tiny_240")
    x = torch.randn(1, 3, 96, 96)
    with pytest.raises(RuntimeError, match="dynamo=True"):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {2: "h", 3: "w"}})
    h, w = torch.export.Dim("h", min=4, max=85), torch.export.Dim("w", min=4, max=85)
    prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes={"x": {2: 12 * h, 3: 12 * w}}, verbose=False)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for size in ((96, 96), (144, 180)):   # 180 px: the large-patch branch's size is a rounded fraction
        xi = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = model(xi)
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {name: xi.numpy()})[0]), ref,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_svt_half_precision(dtype):
    """SVT's spectral mixer computes the DTCWT in float32 and gives the model's dtype back."""
    model = _model("svt_h_s")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.to(dtype)
        out = model(x.to(dtype))
        feats = model.forward_intermediates(x.to(dtype), intermediates_only=True)
    assert out.dtype == dtype and all(f.dtype == dtype for f in feats)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_fast_paths_step_aside_under_tracing():
    """Under torch.fx the oneDNN Linear route, the fused StarReLU Function and the in-place residual are
    plain ops (a Proxy has no device or size to test); eager keeps them."""
    from formers.layers import Linear, Scale, StarReLU, add_residual
    from formers.layers.linear import _onednn_ok

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.scale = Linear(8, 8), StarReLU(), Scale(8, 0.5)

        def forward(self, x):
            return add_residual(x, self.act(self.fc(x)), self.scale)

    net = Net().eval()
    gm = torch.fx.symbolic_trace(net)
    targets = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes}
    assert "conv2d" not in targets and "apply" not in targets
    x = torch.randn(2, 300, 8)
    assert _onednn_ok(x, net.fc.weight)  # eager still takes oneDNN's route for this size
    with torch.no_grad():
        _close(gm(x), net(x))
