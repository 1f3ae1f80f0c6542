"""`formers lra` end to end on tiny settings; bad input exits 2 with one line."""
import csv
import json
import os
import pytest

from formers.cli import main


def test_listops_cell_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    rc = main(["lra", "listops", "--attention", "softmax", "--steps", "30", "--seq-len", "64", "--scale", "0.0625",
               "--depth", "2", "--batch-size", "16", "--train-size", "120", "--val-size", "10", "--test-size", "40",
               "--out", str(out), "--threads", "1", "--no-progress"])
    assert rc == 0
    s = json.loads((out / "lra-listops-softmax.json").read_text())
    assert s["task"] == "listops" and s["attention"] == "softmax" and s["substitute"] is False
    assert s["steps"] == 30 and s["seq_len"] == 64 and s["params"] > 1000 and s["test_examples"] == 40
    assert 0 <= s["test_acc"] <= 100 and 0 <= s["train_acc"] <= 100 and s["seconds"] > 0
    assert "listops / softmax" in capsys.readouterr().out


def test_substitute_is_labelled(tmp_path, cache, capsys):
    rc = main(["lra", "pathfinder32", "--attention", "linear", "--steps", "2", "--scale", "0.5", "--batch-size", "4",
               "--train-size", "4", "--val-size", "2", "--test-size", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    s = json.loads((tmp_path / "lra-pathfinder32-linear.json").read_text())
    assert s["substitute"] is True and "substitute" in s["data"]
    assert "SUBSTITUTE" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["lra", "cifar", "--attention", "softmax"], "unknown LRA task"),
    (["lra", "listops", "--attention", "nope"], "unknown attention"),
    (["lra", "--speed", "--attention", "nope"], "unknown attention"),
    (["lra"], "give a task"),
    (["lra", "image", "--seq-len", "2048"], "fixed length"),
])
def test_bad_input_exits_2_with_one_line(argv, msg, capsys):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], lines

def test_speed_table(tmp_path):
    from formers.lra.speed import run_speed
    run_speed(["softmax"], [64], str(tmp_path), batch_size=1, scale=0.125, time_cap=0.2, cell_timeout=90)
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert [(r["attention"], r["status"]) for r in rows] == [("softmax", "ok")]
    assert all(float(r["steps_per_s"]) > 0 and r["peak_mb"] != "" for r in rows)
    md = (tmp_path / "speed.md").read_text()
    assert "| softmax | " in md and "(1.00x)" in md
    assert os.path.getsize(tmp_path / "speed.png") > 1000
    # a cell past its time limit is reported, not raised
    run_speed(["softmax"], [64], str(tmp_path / "t"), time_cap=0.1, cell_timeout=0.05)
    assert list(csv.DictReader(open(tmp_path / "t" / "speed.csv")))[0]["status"] == "timeout"
