"""Every command ends a bad request in one line on stderr and a nonzero exit status, before any
work: bad numbers, devices this machine lacks, output paths that cannot be written."""
import os

import pytest
import torch

from formers.cli import main

HAVE_CUDA = torch.cuda.is_available()


@pytest.fixture
def afile(tmp_path):
    """A regular file, to put an --out under."""
    p = tmp_path / "plain.txt"
    p.write_text("not a directory")
    return p


@pytest.fixture
def weights(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"")
    return p


def _one_line(argv, capsys, rc_expected=2):
    try:
        rc = main(argv)
    except SystemExit as e:      # argparse's own errors exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == rc_expected, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# (argv, what the line must say)
BAD_NUMBERS = {
    "train min-lr-ratio negative": (["train", "swin_demo", "--min-lr-ratio", "-0.5"], "--min-lr-ratio"),
    "train min-lr-ratio nan": (["train", "swin_demo", "--min-lr-ratio", "nan"], "finite number"),
    "train min-lr-ratio above 1": (["train", "swin_demo", "--min-lr-ratio", "2"], "[0, 1]"),
    "train lr inf": (["train", "swin_demo", "--lr", "inf"], "finite number"),
    "train lr nan": (["train", "swin_demo", "--lr", "nan"], "--lr"),
    "train weight-decay nan": (["train", "swin_demo", "--weight-decay", "nan"], "finite number"),
    "train weight-decay negative": (["train", "swin_demo", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    "train label-smoothing 1.5": (["train", "swin_demo", "--label-smoothing", "1.5"], "--label-smoothing must be in"),
    "train clip-grad nan": (["train", "swin_demo", "--clip-grad", "nan"], "--clip-grad"),
    "train clip-grad 0": (["train", "swin_demo", "--clip-grad", "0"], "positive number"),
    "train ema-decay 1.5": (["train", "swin_demo", "--ema-decay", "1.5"], "--ema-decay must be in (0, 1)"),
    "train warmup-epochs inf": (["train", "swin_demo", "--warmup-epochs", "inf"], "finite number"),
    "train warmup-epochs negative": (["train", "swin_demo", "--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    "train save-every negative": (["train", "swin_demo", "--save-every", "-1"], "integer >= 0"),
    "lra steps 0": (["lra", "listops", "--steps", "0"], "--steps: expected a positive integer"),
    "lra steps negative": (["lra", "listops", "--steps", "-3"], "--steps: expected a positive integer"),
    "lra scale 0": (["lra", "listops", "--scale", "0"], "--scale: expected a positive number"),
    "lra lengths 0": (["lra", "--speed", "--lengths", "0,1024"], "positive integers"),
    "info img-size negative": (["info", "swin_demo", "--img-size", "-5"], "--img-size: expected a positive integer"),
    "info img-size 0": (["info", "swin_demo", "--img-size", "0"], "--img-size: expected a positive integer"),
    "bench threads 0": (["bench", "swin_demo", "--threads", "0"], "--threads: expected a positive integer"),
    "bench batch 0": (["bench", "swin_demo", "--batch-size", "0"], "--batch-size/-b: expected a positive integer"),
    "bench repeats 0": (["bench", "swin_demo", "--repeats", "0"], "--repeats: expected a positive integer"),
    "bench min-time nan": (["bench", "swin_demo", "--min-time", "nan"], "finite number"),
    "transform threads 0": (["transform", "rmsnorm", "--model", "swin_demo", "--out", "x.safetensors",
                             "--threads", "0"], "--threads: expected a positive integer"),
    "export img-size 0": (["export", "swin_demo", "--img-size", "0"], "--img-size: expected a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_end_in_one_line(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, msg = BAD_NUMBERS[case]
    line = _one_line(argv, capsys)
    assert msg in line, line


def _device_cases(device):
    return {
        "train": ["train", "swin_demo", "--device", device],
        "eval": ["eval", "swin_demo", "--checkpoint", "W", "--device", device],
        "bench": ["bench", "swin_demo", "--device", device],
    }


@pytest.mark.parametrize("command", ["train", "eval", "bench"])
def test_unknown_device_is_one_line_in_every_command(command, capsys, tmp_path, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(weights) if a == "W" else a for a in _device_cases("tpu9")[command]]
    line = _one_line(argv, capsys)
    assert "--device 'tpu9' is not a device torch knows" in line and "cpu" in line, line


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["train", "eval", "bench"])
def test_cuda_without_a_gpu_is_one_line_in_every_command(command, capsys, tmp_path, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(weights) if a == "W" else a for a in _device_cases("cuda")[command]]
    line = _one_line(argv, capsys)
    assert "no CUDA device" in line and "--device cpu" in line, line


def test_out_under_a_regular_file(afile, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    under = str(afile / "run")
    cases = {
        "train": ["train", "swin_demo", "--out", under],
        "eval": ["eval", "swin_demo", "--checkpoint", str(weights), "--out", under],
        "bench": ["bench", "swin_demo", "--out", os.path.join(under, "b.csv")],
        "transform": ["transform", "rmsnorm", "--model", "swin_demo", "--out", os.path.join(under, "t.safetensors")],
        "export": ["export", "swin_demo", "--out", os.path.join(under, "m.pt2")],
        "lra": ["lra", "listops", "--out", under],
    }
    for command, argv in cases.items():
        line = _one_line(argv, capsys)
        assert f"formers {command}: error:" in line and "plain.txt" in line and "not a directory" in line, line
    assert sorted(os.listdir(tmp_path)) == ["plain.txt", "w.safetensors"]     # nothing was made


def test_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(["train", "swin_demo", "--out", ""], capsys)
    assert "--out is empty" in line and "--out ." in line, line
    assert os.listdir(tmp_path) == []          # nothing was written into the current folder


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = _one_line(["train", "swin_demo", "--out", str(ro / "run")], capsys)
        assert "not writable" in line, line
    finally:
        ro.chmod(0o700)


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    line = _one_line(["train", "swin_demo", "--out", str(tmp_path / "fresh"), "--resume"], capsys)
    assert "--resume: no checkpoint in" in line and "drop --resume" in line, line
    assert not (tmp_path / "fresh").exists()


def test_lra_help_lists_the_registered_mechanisms(capsys):
    from formers.attention import list_attentions
    with pytest.raises(SystemExit) as e:
        main(["lra", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    names = list_attentions()
    assert len(names) >= 5
    assert "registered mechanisms (--attention):" in out
    flat = " ".join(out.split())
    for name in names:
        assert name in flat, name


def test_an_unexpected_failure_is_one_line_exit_1(capsys, monkeypatch):
    import formers.cli as cli

    def boom(args):
        raise KeyError("something internal")
    monkeypatch.setattr(cli, "_cmd_list", boom)
    line = _one_line(["list"], capsys, rc_expected=1)
    assert line.startswith("formers list: error: KeyError") and "FORMERS_DEBUG=1" in line, line


def test_every_command_prints_its_help(capsys):
    """`formers CMD --help` formats every option's help (a bare % in one once broke `train --help`)."""
    from formers.cli import build_parser
    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))][0].choices
    assert {"train", "eval", "bench", "lra", "list", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: formers {name}"), (name, out[:80])
