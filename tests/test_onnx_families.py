"""ONNX for every family (project issue 13, items 6 and 19): each family's smallest paper variant goes
through `formers.export.export_model(format="onnx", dynamic=True)`: the dynamo exporter, then
onnxruntime against the eager model at the traced size, at another batch and, wherever the model takes
more than one size, at a second height and width. A difference above 1e-4 is an `ExportMismatch`.

About 10-40 s a family on one core (the exporter's cost, not ours), so these run outside the default
suite: `make test-export` (or `pytest -m slow tests/test_onnx_families.py`). The default suite keeps
the cheap ONNX checks (tests/test_export.py, tests/test_trace_tokens.py).
"""
import pytest
import torch

import formers
from formers.export import export_model

from test_contract import FAMILIES  # each family's smallest paper variant

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.slow


# Sizes where a family's graph keeps its structure at the second size too: at 64 px CSWin's third-stage map
# (4x4) is narrower than its stripe (7), which changes the graph, and the export is specialised to it.
_TRACED = {"cswin_64_12211_tiny_224": 128}


def _traced_size(name, model) -> int:
    """A small size the model takes: 64 px rounded up to its divisor and minimum."""
    div, low = model.input_divisor, model.min_input_size
    size = max(_TRACED.get(name, 64), low)
    return -(-size // div) * div


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_equals_eager_at_two_sizes(name, tmp_path):
    torch.manual_seed(0)
    model = formers.create_model(name).eval()
    if name.startswith("uniformer"):  # a zero cls_token at init: its pruning sort would see every token tie,
        torch.nn.init.normal_(model.cls_token)  # and the order among ties is each runtime's own choice
    fixed = model.fixed_input_size
    size = None if fixed else _traced_size(name, model)
    report = export_model(model, str(tmp_path / f"{name}.onnx"), format="onnx", img_size=size,
                          dynamic=fixed is None, name=name, atol=1e-4)
    checks = report["checks"]
    assert len(checks) == (2 if fixed else 3)
    assert len({(h, w) for _, h, w, _ in checks}) == (1 if fixed else 2)   # a second size really ran
    assert all(diff <= 1e-4 for *_, diff in checks), checks
