"""The same command under torchrun: two gloo processes end with identical weights, rank 0 writes."""
import json
import subprocess

import torch
from safetensors.torch import load_file

from train_helpers import NAME, script_cmd, subprocess_env, torchrun_cmd

ARGS = ["train", NAME, "--dataset", "digits", "--limit-test", "200", "--img-size", "16",
        "--epochs", "3", "--batch-size", "32", "--lr", "5e-3", "--warmup-epochs", "0.5", "--seed", "3",
        "--save-every", "0",
        "--model-kwargs", '{"drop_rate": 0.0, "drop_path_rate": 0.0}']


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run(torchrun_cmd(2, *ARGS, "--out", out), capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]           # every rank holds the same weights
    assert r.stdout.count("done: best test accuracy") == 1           # only rank 0 prints and writes
    assert "Traceback" not in r.stderr and "Grad strides" not in r.stderr
    assert summary["best_test_acc"] > 70.0, summary["best_test_acc"]

    # one process on the same global batches: the same data, so nearly the same weights
    # (float sums of two half-batch gradients are ordered differently, so not bit-equal)
    single = tmp_path / "single"
    r1 = subprocess.run(script_cmd(*ARGS, "--out", single), capture_output=True, text=True,
                        env=subprocess_env(), timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = load_file(out / "final.safetensors"), load_file(single / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-3, msg=k)


def test_two_process_dacs_segmentation_keeps_ranks_identical(tmp_path):
    """A BatchNorm segmentation model under DAFormer's self-training: the ranks' running statistics are
    averaged at each epoch's end (timm's --dist-bn reduce), so both evaluate and end with one model."""
    import sys
    out = tmp_path / "dacs"
    args = ["train", "daformer_mitb0", "--dataset", "mosaic-uda-night", "--objective", "dacs", "--limit-train", "48",
            "--limit-test", "16", "--epochs", "2", "--batch-size", "8", "--save-every", "0", "--no-progress",
            "--model-kwargs", '{"decoder_dim": 32}', "--out", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "formers.cli"]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "different weights" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["task"] == "segment"
    assert len(summary["param_digests"]) == 2 and summary["param_digests"][0] == summary["param_digests"][1]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "step"]
    assert len(steps) == 12 and all({"src_loss", "mix_loss", "pseudo_weight"} <= set(s) for s in steps)
