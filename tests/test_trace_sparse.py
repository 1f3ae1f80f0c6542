"""Whole-model transforms on the RMT, BiFormer, FaViT and SparseFormer families (project issue 13, items
5, 6, 12, 19): a plain torch.fx symbolic trace equals the model (forward and backward), TorchScript compiles
the model (or it says why not), torch.export with a dynamic height and width equals eager at a second size,
ONNX graphs are right at two sizes (slow-marked: `make test-export`), and a batch of zero images gives
empty outputs.

Each family's smallest paper variant, at small inputs; the export and ONNX tests build it with one block
per stage (unit, for SparseFormer), which runs every code path of the full model in a fraction of the time.
"""
import functools
import warnings

import pytest
import torch
import torch.fx

import formers

# (model, input size, a second size of the same rule)
MODELS = [
    ("rmt_tiny", 64, 96),
    ("biformer_tiny", 64, 96),
    ("favit_b0", 64, 96),
    ("sparseformer_tiny", 64, 96),
]
IDS = [m[0] for m in MODELS]
NOT_SCRIPTABLE = {"rmt_tiny", "sparseformer_tiny"}
SHALLOW = {
    "rmt_tiny": dict(depths=(1, 1, 1, 1)),
    "biformer_tiny": dict(depths=(1, 1, 1, 1)),
    "favit_b0": dict(depths=(1, 1, 1, 1)),
    "sparseformer_tiny": dict(widths=(256, 512, 512), repeats=(2, 1, 1)),  # both kinds of unit and a transition
}
# (traced size, smallest dynamic size). torch.export specialises a size wherever a map derived from it is one
# pixel (or region) wide, so the smallest size keeps every such map at two or more: RMT's stride-32 map;
# BiFormer's stride-16 regions (n_win=7), hence its larger traced size; FaViT's reduced maps (stage 1: stride
# 4, then the sr=8 conv); SparseFormer's stride-4 feature map.
EXPORT = {"rmt_tiny": (64, 33), "biformer_tiny": (128, 113), "favit_b0": (64, 61), "sparseformer_tiny": (64, 5)}


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


@functools.lru_cache(maxsize=None)
def _exported(name):
    """The shallow model and its torch.export program with a dynamic batch, height and width (from the
    family's smallest dynamic size up), traced at batch 2; one trace shared by the export and ONNX tests."""
    model = _model(name, **SHALLOW[name])
    traced, low = EXPORT[name]
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    dims.update({axis: torch.export.Dim(n, min=low, max=1024) for axis, n in ((2, "h"), (3, "w"))})
    return model, torch.export.export(model, (torch.randn(2, 3, traced, traced),), dynamic_shapes={"x": dims})


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_fx_trace_equals_eager(name, size, size2):
    """A plain tracer (no leaf modules, no autowrap lists) gives a GraphModule equal to the model, at the
    traced size and at another one, that still refuses what the model refuses, and that trains."""
    model = _model(name)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _close(gm(x), model(x))
        x2 = torch.randn(2, 3, size2, size2 + 8)
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
    assert not model.script_unsupported
    scripted = torch.jit.script(model)
    for s in (size, size2):
        x = torch.randn(2, 3, s, s + 8)
        with torch.no_grad():
            _close(scripted(x), model(x))


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_export_dynamic_height_width(name, size, size2):
    """One exported program for every size from the family's smallest dynamic size up; afterwards the eager
    model (whose caches the export must not fill) still equals a fresh one."""
    model, ep = _exported(name)
    traced, low = EXPORT[name]
    for shape in ((2, traced + 24, traced + 8), (1, low, traced + 32)):
        x = torch.randn(shape[0], 3, *shape[1:])
        with torch.no_grad():
            _close(ep.module()(x), model(x), tol=1e-4)
            _close(model(x), _model(name, **SHALLOW[name])(x))


@pytest.mark.parametrize("name,size,size2", MODELS, ids=IDS)
def test_zero_batch(name, size, size2):
    """A batch of 0 images gives empty outputs of the shapes a batch of 1 has, as torch layers do."""
    model = _model(name)
    fmt = getattr(model, "output_fmt", "NCHW")  # SparseFormer's intermediates are token sets (NLC)
    x0, x1 = torch.randn(0, 3, size, size), torch.randn(1, 3, size, size)
    with torch.no_grad():
        for fn in (model, model.forward_features,
                   lambda x: model.forward_intermediates(x, intermediates_only=True, output_fmt=fmt)):
            empty, one = fn(x0), fn(x1)
            pairs = zip(empty, one) if isinstance(one, (list, tuple)) else [(empty, one)]
            for e, o in pairs:
                assert e.shape == (0, *o.shape[1:])


@pytest.mark.slow  # 7-27 s a family: make test-export
@pytest.mark.parametrize("name", IDS)
def test_onnx_right_at_two_sizes(name):
    """The dynamo exporter's graph of the exported program (dynamic batch, height and width), run by
    onnxruntime, equals the model at the traced size and at a second one."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, ep = _exported(name)
    traced = EXPORT[name][0]
    prog = torch.onnx.export(ep, dynamo=True, optimize=False, verbose=False)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    for shape in ((2, traced, traced), (1, traced + 32, traced + 8)):
        x = torch.randn(shape[0], 3, *shape[1:])
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {inp: x.numpy()})[0]), ref,
                                   rtol=1e-4, atol=1e-4)
