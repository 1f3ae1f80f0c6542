"""A run killed with SIGKILL resumes to the very weights of an uninterrupted run; damaged
checkpoints are refused with a clear message."""
import json
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from formers.cli import main
from train_helpers import NAME, script_cmd, subprocess_env

# 640 / 32 = 20 steps per epoch, 60 in all; accumulation, EMA, dropout and drop-path all on,
# so the optimizer state, the EMA and the RNG states must all come back exactly
ARGS = ["train", NAME, "--dataset", "digits", "--limit-train", "640", "--limit-test", "200", "--img-size", "16",
        "--epochs", "3", "--batch-size", "32", "--accum", "2", "--lr", "3e-3", "--ema", "--save-every", "4",
        "--seed", "7", "--model-kwargs", '{"drop_rate": 0.2, "drop_path_rate": 0.2}']
TIMING = {"img_per_s", "epoch_time"}


def _run(*extra, timeout=300):
    r = subprocess.run(script_cmd(*ARGS, *extra), capture_output=True, text=True, env=subprocess_env(),
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _kill_after_checkpoint(out, newer_than=0):
    """Start the run, SIGKILL it as soon as a checkpoint newer than `newer_than` is committed."""
    p = subprocess.Popen(script_cmd(*ARGS, "--out", out, *(["--resume"] if newer_than else [])),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env())
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and p.poll() is None:
        found = sorted((out / "checkpoints").glob("step-*.json")) if (out / "checkpoints").is_dir() else []
        if found and int(found[-1].stem[5:]) > newer_than:
            step = int(found[-1].stem[5:])
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()
    assert step, "no checkpoint appeared"
    assert not (out / "final.safetensors").exists(), "the run finished before it was killed"
    return step


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _run("--out", out)
    return out


def test_sigkill_twice_then_resume_gives_identical_weights(reference, tmp_path):
    out = tmp_path / "killed"
    first = _kill_after_checkpoint(out)
    second = _kill_after_checkpoint(out, newer_than=first)      # killed again, while resumed
    assert second > first
    stdout = _run("--out", out, "--resume")
    assert "resumed from step" in stdout
    assert not list(out.rglob("*.tmp*"))                        # the killed runs' temp files are gone
    for name in ("final.safetensors", "final_ema.safetensors", "best.safetensors"):
        a, b = load_file(reference / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    assert _metrics(out) == _metrics(reference)                 # the same losses, step by step
    ref_sum = json.loads((reference / "summary.json").read_text())
    got_sum = json.loads((out / "summary.json").read_text())
    assert got_sum["param_digests"] == ref_sum["param_digests"]
    assert got_sum["best_test_acc"] == ref_sum["best_test_acc"] and got_sum["steps"] == 60


def _damaged_copy(reference, tmp_path, damage):
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    latest = sorted((out / "checkpoints").glob("step-*.safetensors"))[-1]
    blob = bytearray(latest.read_bytes())
    latest.write_bytes(bytes(damage(blob)))
    return out


def _flip(blob):
    blob[len(blob) - 100] ^= 0xFF
    return blob


@pytest.mark.parametrize("damage,message", [(lambda b: b[: len(b) // 2], "truncated or corrupt"),
                                            (_flip, "sha256")], ids=["truncated", "flipped-byte"])
def test_damaged_checkpoint_is_refused_with_one_line(reference, tmp_path, tiny, capsys, damage, message):
    out = _damaged_copy(reference, tmp_path, damage)
    rc = main([*ARGS[:2], "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "step-00000060" in err, err


def test_truncated_weights_file_is_refused_by_eval(reference, tmp_path, tiny, capsys):
    bad = tmp_path / "best.safetensors"
    bad.write_bytes((reference / "best.safetensors").read_bytes()[:1000])
    rc = main(["eval", NAME, "--checkpoint", str(bad), "--dataset", "digits"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "safetensors" in err, err


def test_resume_with_changed_settings_is_refused(reference, tmp_path, tiny, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    rc = main([*ARGS[:2], "--out", str(out), "--resume", "--lr", "1e-2"])
    err = capsys.readouterr().err
    assert rc == 2 and "lr: checkpoint 0.003, now 0.01" in err, err


def test_resume_of_a_finished_run_takes_its_settings_from_the_checkpoint(reference, tmp_path, tiny, capsys):
    out = tmp_path / "finished"
    shutil.copytree(reference, out)
    rc = main([*ARGS[:2], "--out", str(out), "--resume"])     # no other settings: all from the checkpoint
    assert rc == 0, capsys.readouterr().err
    a, b = load_file(reference / "final.safetensors"), load_file(out / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
