"""fp16 with a gradient scaler (its state checkpointed, so resume stays bit-exact), channels-last batches
and torch.compile: each trains the same model as the plain fp32 run does."""
import json

import pytest
import torch
from safetensors.torch import load_file

from formers.cli import main
from train_helpers import resumed_digests

ARGS = ["--dataset", "digits", "--limit-train", "512", "--limit-test", "200", "--img-size", "16", "--epochs", "3",
        "--batch-size", "32", "--lr", "5e-3", "--no-progress", "--seed", "2",
        "--model-kwargs", '{"drop_rate": 0.0, "drop_path_rate": 0.0}']


def _run(tiny, out, *extra):
    assert main(["train", tiny, *ARGS, "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_fp16_learns_checkpoints_its_scaler_and_resumes_bit_exact(tiny, tmp_path):
    full = tmp_path / "full"
    summary = _run(tiny, full, "--precision", "fp16", "--limit-train", "256", "--epochs", "2", "--save-every", "5",
                   "--keep", "8")
    assert summary["best_test_acc"] > 25.0, summary["best_test_acc"]      # 10 classes: chance is 10%
    meta = json.loads((full / "checkpoints" / "step-00000010.json").read_text())
    scaler = meta["grad_scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    ours, resumed = resumed_digests(full, 10, tmp_path / "part")
    assert resumed == ours


def test_channels_last_trains_the_same_weights(tiny, tmp_path):
    _run(tiny, tmp_path / "plain", "--save-every", "0")
    _run(tiny, tmp_path / "cl", "--save-every", "0", "--channels-last")
    a = load_file(tmp_path / "plain" / "final.safetensors")
    b = load_file(tmp_path / "cl" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k].contiguous(), atol=2e-4, rtol=0, msg=k)


def test_fp16_with_dacs_is_refused(tmp_path, capsys):
    assert main(["train", "daformer_mitb0", "--dataset", "mosaic-uda", "--objective", "dacs", "--precision", "fp16",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--precision fp16 needs the gradient scaler" in capsys.readouterr().err


@pytest.mark.slow  # compiling takes a minute on a CPU: make test-export
def test_compile_trains_the_same_weights(tiny, tmp_path):
    _run(tiny, tmp_path / "eager", "--save-every", "0", "--epochs", "1")
    _run(tiny, tmp_path / "compiled", "--save-every", "0", "--epochs", "1", "--compile")
    a = load_file(tmp_path / "eager" / "final.safetensors")
    b = load_file(tmp_path / "compiled" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)
