"""`formers train --log tensorboard,csv`: the loggers get exactly the rows of metrics.jsonl, a resumed
run rewrites them to match its truncated metrics.jsonl, and a bad --log is one line before any work."""
import csv
import json
import shutil

import pytest

from formers.cli import main
from formers.train import loggers

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 640 / 64 = 10 steps per epoch, 20 in all; a checkpoint every 3 steps, all of them kept
ARGS = ["--dataset", "digits", "--img-size", "16", "--epochs", "2", "--batch-size", "64", "--limit-train", "640",
        "--limit-test", "200", "--save-every", "3", "--keep", "20", "--no-progress"]


def _train(tiny, out, *extra, rc_expected=0):
    rc = main(["train", tiny, *ARGS, "--out", str(out), *extra])
    assert rc == rc_expected
    return rc


def _jsonl(out, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _csv(out, kind):
    with open(out / f"metrics_{kind}s.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_csv_matches(out):
    for kind in ("step", "epoch"):
        want, got = _jsonl(out, kind), _csv(out, kind)
        assert len(got) == len(want) > 0
        for w, g in zip(want, got):
            assert {k for k, v in g.items() if v != ""} == set(w) - {"kind"}
            for k in g:
                if k in w:
                    assert float(g[k]) == w[k], (kind, w["step"], k)      # repr: exact, not rounded


def _scalars(out):
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def logged_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("logged")
    _train(tiny, out, "--log", "tensorboard,csv")
    return out


def test_tensorboard_holds_every_row(logged_run):
    acc = _scalars(logged_run)
    steps = _jsonl(logged_run, "step")
    assert len(steps) == 20
    for key in ("loss", "acc", "lr"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in steps]
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6)
    epochs = _jsonl(logged_run, "epoch")
    tags = set(acc.Tags()["scalars"])
    assert {f"epoch/{k}" for k, v in epochs[0].items() if k not in ("kind", "step")} <= tags
    for key in ("train_loss", "test_acc", "test_loss"):
        events = acc.Scalars(f"epoch/{key}")
        assert [(e.step, e.value) for e in events] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in epochs]


def test_csv_equals_metrics_jsonl(logged_run):
    _assert_csv_matches(logged_run)


def test_resume_rewrites_the_csv_and_purges_tensorboard(logged_run, tiny, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(logged_run, out)
    # from step 6 of 20: the copied CSVs and event files already hold steps 7..20 once
    _train(tiny, out, "--resume", str(out / "checkpoints" / "step-00000006.json"))   # --log from the checkpoint
    steps = [int(r["step"]) for r in _csv(out, "step")]
    assert steps == list(range(1, 21))
    _assert_csv_matches(out)
    events = _scalars(out).Scalars("train/loss")
    assert [e.step for e in events] == steps
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in _jsonl(out, "step")], rel=1e-6)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2


class _Collect:
    """A registered logger: keeps the rows it gets; raises KeyboardInterrupt at `stop_at` if set."""
    rows, closed, stop_at = [], 0, None

    def __init__(self, out, history, resumed_step):
        assert history == [] and resumed_step is None

    def log(self, row):
        _Collect.rows.append(row)
        if row["step"] == _Collect.stop_at:
            raise KeyboardInterrupt

    def close(self):
        _Collect.closed += 1


@pytest.fixture
def collect():
    _Collect.rows, _Collect.closed, _Collect.stop_at = [], 0, None
    loggers.register_logger("collect", _Collect)
    yield _Collect
    loggers.LOGGERS.pop("collect")


def test_registered_logger_gets_every_row_and_is_closed(tiny, tmp_path, collect):
    _train(tiny, tmp_path, "--epochs", "1", "--log", "collect")
    assert collect.rows == _jsonl(tmp_path, "step") + _jsonl(tmp_path, "epoch")
    assert collect.closed == 1


def test_interrupted_run_has_flushed_what_it_logged(tiny, tmp_path, collect):
    collect.stop_at = 5
    _train(tiny, tmp_path, "--log", "tensorboard,collect", rc_expected=130)
    assert collect.closed == 1
    assert [e.step for e in _scalars(tmp_path).Scalars("train/loss")] == [1, 2, 3, 4, 5]


def _one_line(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_logger_is_one_line(tiny, tmp_path, capsys):
    line = _one_line(["train", tiny, *ARGS, "--out", str(tmp_path), "--log", "csv,wandb"], capsys)
    assert "unknown --log 'wandb'" in line and "tensorboard" in line and "csv" in line
    assert not (tmp_path / "metrics.jsonl").exists()                  # refused before any training
    line = _one_line(["train", tiny, *ARGS, "--out", str(tmp_path), "--log", ","], capsys)
    assert "--log" in line


def test_missing_tensorboard_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    line = _one_line(["train", tiny, *ARGS, "--out", str(tmp_path), "--log", "tensorboard"], capsys)
    assert "--log tensorboard" in line and "pip install tensorboard" in line
    assert not (tmp_path / "metrics.jsonl").exists()

