"""`formers.export` / `formers export`: pt2 and ONNX at dynamic sizes, each export checked against the
eager model, and a wrong export caught instead of written."""
import os

import pytest
import torch
import torch.nn as nn

import formers
from formers.cli import main
from formers.export import ExportMismatch, export_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def poolformer():
    torch.manual_seed(0)
    return formers.create_model("poolformer_s12", num_classes=10, img_size=64).eval()


def test_pt2_with_dynamic_batch_and_size(poolformer, tmp_path):
    path = tmp_path / "pool.pt2"
    res = export_model(poolformer, str(path), format="pt2", img_size=64, dynamic=True)
    assert [c[:3] for c in res["checks"]] == [(2, 64, 64), (3, 64, 64), (3, 65, 65)]
    assert all(c[3] <= 1e-4 for c in res["checks"])
    # the saved program, loaded fresh, runs at a size and batch it was not traced at
    program = torch.export.load(str(path)).module()
    x = torch.randn(5, 3, 72, 80)
    with torch.no_grad():
        torch.testing.assert_close(program(x), poolformer(x), atol=1e-4, rtol=0)
    assert [p for p in os.listdir(tmp_path)] == ["pool.pt2"]         # no partial file left behind


def test_pt2_static_size_still_has_a_dynamic_batch(poolformer, tmp_path):
    res = export_model(poolformer, str(tmp_path / "s.pt2"), img_size=64)
    assert [c[:3] for c in res["checks"]] == [(2, 64, 64), (3, 64, 64)]


def test_onnx_through_the_command_line(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "pool.onnx"
    rc = main(["export", "poolformer_s12", "--format", "onnx", "--dynamic", "--img-size", "64",
               "--num-classes", "10", "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    line = printed.out.strip().splitlines()[-1]
    assert line.startswith(f"poolformer_s12 -> {out} (onnx, batch dynamic, height/width dynamic); verified"), line
    assert "batch 3 65x65" in line
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: torch.randn(4, 3, 96, 96).numpy()})[0]
    assert y.shape == (4, 10)


class TraceTimeOnly(nn.Module):
    """Returns different numbers while being exported than when run: what a Python-level branch
    that tracing specialises looks like from outside."""
    in_chans, img_size = 3, 8

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.proj(x).mean((2, 3))
        if torch.compiler.is_exporting():
            return y + 1.0
        return y


def test_verification_catches_a_wrong_export(tmp_path):
    path = tmp_path / "wrong.pt2"
    with pytest.raises(ExportMismatch, match=r"differs from the model by 1 \(> 0.0001\) at batch 2, 8x8"):
        export_model(TraceTimeOnly(), str(path), format="pt2")
    assert os.listdir(tmp_path) == []                  # nothing written under the asked-for name


def test_a_wrong_export_ends_the_command_in_one_line(tmp_path, capsys, monkeypatch):
    import formers.export as fx
    monkeypatch.setattr(fx, "_load", lambda args: TraceTimeOnly())
    rc = main(["export", "swin_demo", "--out", str(tmp_path / "m.pt2")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("formers export: error: swin_demo: the exported program differs from the model by")
    assert not (tmp_path / "m.pt2").exists()


def test_onnx_without_its_packages_is_one_line(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # import onnxruntime -> ImportError
    rc = main(["export", "swin_demo", "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert "ONNX export needs onnxruntime: pip install onnx onnxscript onnxruntime" in lines[0]


def test_bad_requests(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(TraceTimeOnly(), str(tmp_path / "x"), format="tflite")
    with pytest.raises(ValueError, match="traced batch must be at least 2"):
        export_model(TraceTimeOnly(), str(tmp_path / "x"), batch=1)
    rc = main(["export", "no_such_model_xyz", "--out", str(tmp_path / "m.pt2")])
    assert rc == 2 and "unknown model 'no_such_model_xyz'" in capsys.readouterr().err


def test_a_model_with_size_keyed_caches_exports_and_stays_usable(tmp_path):
    # swin_demo caches its window masks / index tables by size: traced tensors left in that cache once
    # made the eager reference itself symbolic; the references now come first and the trace takes a copy
    model = formers.create_model("swin_demo", img_size=32).eval()
    res = export_model(model, str(tmp_path / "swin.pt2"), img_size=32)
    assert [c[:3] for c in res["checks"]] == [(2, 32, 32), (3, 32, 32)] and all(c[3] <= 1e-4 for c in res["checks"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert type(y) is torch.Tensor and torch.isfinite(y).all()
