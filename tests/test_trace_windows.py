"""Whole-model transforms on the window families, Swin, CSWin, CrossFormer (v1 and ++) and UniFormer
(light and plain) (project issue 13, items 5, 6, 12, 19): a plain torch.fx symbolic trace equals the model
(forward and backward), TorchScript compiles the model (or it says why not), torch.export with a dynamic
batch, height and width equals eager at other sizes, the ONNX graph of that program is right at two sizes,
and a batch of zero images gives empty outputs. The ONNX check is slow-marked (`make test-export`).

fx, TorchScript and the zero batch run each family's smallest paper variant. torch.export and ONNX run it
with fewer blocks per stage (every kind of block kept: shifted windows, SDA/LDA and ACL, pruning EvoSA
blocks): tracing cost grows with the blocks, the code paths do not.
"""
import contextlib
import functools
import io
import warnings

import pytest
import torch
import torch.fx

import formers

# (model, input size, a second size of the same rule)
MODELS = [
    ("swin_tiny_patch4_window7_224", 64, 96),
    ("cswin_64_12211_tiny_224", 64, 96),
    ("crossformer_pp_small", 64, 96),
    ("crossformer_tiny", 64, 96),
    ("uniformer_xxs", 64, 96),
    ("uniformer_small", 64, 96),
]
IDS = [m[0] for m in MODELS]
NOT_SCRIPTABLE = {"uniformer_xxs", "uniformer_small"}

# (model, fewer blocks, traced size, other sizes, height/width range). The range is one where the graph keeps
# its structure: a stage map stays above (or within) one window / group (Swin shifts only maps larger than
# the window; CrossFormer attends globally in a map that fits a group) and no window or region count is 1 at
# the traced size (torch.export specialises sizes of 1). The other sizes pad differently from the traced one.
# The blocks kept: Swin's shifted and plain windows, CSWin's two stripe branches and its global stage,
# CrossFormer's SDA, LDA (++ regions, v1 map-wide) and an activation-cooling layer, UniFormer-XXS's full and
# pruning EvoSA blocks in both attention stages.
EXPORTS = [
    ("swin_tiny_patch4_window7_224", dict(depths=(2, 2, 1, 1)), 96, (72, 100), (57, 112)),
    ("cswin_64_12211_tiny_224", dict(depths=(1, 1, 1, 1)), 128, (131, 160), (115, 1024)),
    ("crossformer_pp_small", dict(depths=(4, 2, 1, 1)), 96, (100, 128), (68, 239)),
    ("crossformer_tiny", dict(depths=(2, 2, 1, 1)), 96, (72, 100), (64, 127)),
    ("uniformer_xxs", dict(depths=(1, 1, 2, 1)), 64, (96, 160), (64, 1024)),
]
ONNX = ["swin_tiny_patch4_window7_224", "cswin_64_12211_tiny_224", "crossformer_pp_small", "uniformer_xxs"]
EXPORT_IDS = [m[0] for m in EXPORTS]


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
    x2 = torch.randn(2, 3, size2, size2 + model.input_divisor)
    with torch.no_grad():
        _close(gm(x), model(x))
        _close(gm(x2), model(x2))
    assert any(n.target.__name__ == "image_checks" for n in gm.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="input channels"):
        gm(torch.randn(1, 4, size, size))
    train = torch.fx.symbolic_trace(_model(name, num_classes=7).train())
    out = train(torch.randn(2, 3, size, size))
    outs = out if isinstance(out, tuple) else (out,)  # the light UniFormers train two heads
    assert all(o.shape == (2, 7) for o in outs)
    sum(o.mean() for o in outs).backward()
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
    x = torch.randn(2, 3, size2, size2 + 1)  # padded windows / groups
    with torch.no_grad():
        _close(scripted(x), model(x))


@functools.lru_cache(maxsize=None)
def _exported(name):
    """The reduced model, its torch.export program (dynamic batch, height and width) and the traced input.

    The window families reshape maps padded to whole windows; torch's shape solver cannot prove that such a
    padded size divides into its windows (true for every size), so those checks become runtime assertions
    of the program (`prefer_deferred_runtime_asserts_over_guards`) instead of export errors."""
    _, kwargs, size, _, (low, high) = next(e for e in EXPORTS if e[0] == name)
    model = _model(name, **kwargs)
    if hasattr(model, "cls_token"):  # zeros at init: every token would tie in the light models' pruning sort,
        torch.nn.init.normal_(model.cls_token)  # whose order among ties is the runtime's own choice
    div = model.input_divisor
    h = torch.export.Dim("h", min=low // div, max=high // div)
    w = torch.export.Dim("w", min=low // div, max=high // div)
    dims = {"x": {0: torch.export.Dim("b", min=1, max=64), 2: div * h if div > 1 else h,
                  3: div * w if div > 1 else w}}
    x = torch.randn(2, 3, size, size)   # batch 2: a batch of 1 is specialised
    program = torch.export.export(model, (x,), dynamic_shapes=dims,
                                  prefer_deferred_runtime_asserts_over_guards=not name.startswith("uniformer"))
    return model, program, x


@pytest.mark.parametrize("name", EXPORT_IDS)
def test_export_dynamic_height_width(name):
    model, program, _ = _exported(name)
    sizes = next(e for e in EXPORTS if e[0] == name)[3]
    runner = program.module()
    with torch.no_grad():
        for i, size in enumerate(sizes):
            x = torch.randn(2 + i, 3, size, size + model.input_divisor)
            _close(runner(x), model(x), tol=1e-4)
        # the eager model's size-keyed caches hold no traced values: it still runs at a new size
        x = torch.randn(1, 3, 2 * sizes[0], sizes[0])
        assert model(x).shape == (1, 1000)


@pytest.mark.slow  # 10-25 s a family: make test-export
@pytest.mark.parametrize("name", ONNX)
def test_onnx_right_at_two_sizes(name):
    """The dynamo exporter's graph of the same program, in onnxruntime, at the traced size and another."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, program, x = _exported(name)
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    sess = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    size2 = next(e for e in EXPORTS if e[0] == name)[3][0]
    for xi in (x, torch.randn(3, 3, size2, size2 + model.input_divisor)):
        with torch.no_grad():
            ref = model(xi)
        got = torch.from_numpy(sess.run(None, {input_name: xi.numpy()})[0])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


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
