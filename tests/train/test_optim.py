"""Optimizers and schedules (formers.train.optim): LAMB equals timm's, the schedule kinds equal torch's own
schedulers, --lr-mult scales the matching groups, --opt takes timm's names and torch.optim's, and early
stopping and resume work through `formers train`."""
import json

import pytest
import torch
import torch.nn as nn

from formers.cli import main
from train_helpers import resumed_digests
from formers.train.optim import Lamb, WarmupSchedule, build_optimizer, lr_factor_of, optimizer_names


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def _steps(model, opt, n=6):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=g) * 3
        model(x).pow(2).mean().backward()
        opt.step()


def test_lamb_equals_timms():
    from timm.optim import Lamb as TimmLamb
    torch.manual_seed(0)
    a = _Net()
    b = _Net()
    b.load_state_dict(a.state_dict())
    _steps(a, build_optimizer(a, 1e-2, 0.05, "lamb"))
    groups = [{"params": [p for n, p in b.named_parameters() if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for n, p in b.named_parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    _steps(b, TimmLamb(groups, lr=1e-2))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert isinstance(build_optimizer(a, 1e-2, 0.05, "lamb"), Lamb)


def test_opt_names_and_momentum():
    m = _Net()
    sgd = build_optimizer(m, 0.1, 0.0, "sgd", momentum=0.8)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    assert not build_optimizer(m, 0.1, 0.0, "momentum").defaults["nesterov"]
    assert type(build_optimizer(m, 0.1, 0.0, "NAdam")) is torch.optim.NAdam
    assert "lbfgs" not in optimizer_names() and {"adamw", "lamb", "radam"} <= set(optimizer_names())
    with pytest.raises(ValueError, match="unknown --opt 'nope'"):
        build_optimizer(m, 0.1, 0.0, "nope")


def test_lr_mult_scales_the_matching_groups_through_the_schedule():
    m = _Net()
    assert lr_factor_of("encoder.0.weight", {"encoder": 0.1}) == 0.1
    assert lr_factor_of("encoder0.weight", {"encoder": 0.1}) == 1.0            # a prefix of dotted names only
    assert lr_factor_of("head.bias", {"*.bias": 2, "head": 10}) == 2           # the first match wins
    opt = build_optimizer(m, 1e-3, 0.05, "adamw", lr_mult={"encoder": 0.1, "head": 10})
    sched = WarmupSchedule(opt, total_steps=20, warmup_steps=4)
    for _ in range(7):
        sched.step()
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    f = sched.factor(7)
    assert by_name["encoder.0.weight"]["lr"] == pytest.approx(1e-4 * f)
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-2 * f)
    assert by_name["encoder.1.weight"]["weight_decay"] == 0.0 and by_name["head.weight"]["weight_decay"] == 0.05


@pytest.mark.parametrize("kind", ["cosine", "step", "poly"])
def test_schedules_equal_torchs_own(kind):
    """Without warm-up and with min_ratio 0 (eta_min for cosine), each kind equals torch's scheduler."""
    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = WarmupSchedule(ours_opt, total_steps=30, warmup_steps=0, min_ratio=0.02 if kind == "cosine" else 0.0,
                          kind=kind, decay_steps=7, decay_rate=0.5, power=0.9)
    ref = {"cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.01),
           "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
           "poly": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=30, power=0.9)}[kind](ref_opt)
    for _ in range(30):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ours.step()
        ref_opt.step()
        ref.step()


def test_warmup_then_hold_then_decay():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupSchedule(opt, total_steps=40, warmup_steps=4, min_ratio=0.1, kind="cosine", hold_steps=6)
    f = [s.factor(i) for i in range(40)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f[4:10] == [1.0] * 6
    assert f[10] == pytest.approx(1.0) and all(a > b for a, b in zip(f[10:], f[11:])) and f[-1] > 0.1
    assert WarmupSchedule(opt, 40, 4, kind="constant").factor(39) == 1.0
    assert WarmupSchedule(opt, 40, 0, min_ratio=0.2, kind="step", decay_steps=5, decay_rate=0.1).factor(30) == 0.2


ARGS = ["--dataset", "digits", "--limit-train", "256", "--limit-test", "100", "--img-size", "16",
        "--batch-size", "32", "--no-progress", "--seed", "1"]


def test_early_stopping_stops_after_patience_epochs(tiny, tmp_path):
    out = tmp_path / "es"
    # a learning rate too small to change the test accuracy: epoch 1 stays the best
    assert main(["train", tiny, *ARGS, "--epochs", "8", "--lr", "1e-9", "--sched", "constant", "--patience", "2",
                 "--warmup-epochs", "0", "--save-every", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] == 3 and summary["epochs"] == 3 and summary["best_epoch"] == 1
    assert (out / "final.safetensors").exists()


def test_lamb_with_lr_mult_and_step_schedule_resumes_bit_exact(tiny, tmp_path):
    full = tmp_path / "full"
    run = ["train", tiny, *ARGS, "--epochs", "3", "--lr", "5e-3", "--opt", "lamb", "--lr-mult", "head=5",
           "--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5", "--save-every", "5", "--keep", "8"]
    assert main([*run, "--out", str(full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["best_test_acc"] > 20.0
    ours, resumed = resumed_digests(full, 10, tmp_path / "part")
    assert resumed == ours


def test_bad_optimizer_flags_are_one_clear_line(tiny, tmp_path, capsys):
    assert main(["train", tiny, "--dataset", "digits", "--opt", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown --opt 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                        # argparse's own one-line error
        main(["train", tiny, "--dataset", "digits", "--lr-mult", "head", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "expected PATTERN=FACTOR" in capsys.readouterr().err
    assert main(["train", tiny, "--dataset", "digits", "--lr-mult", "nothing=0.1", "--epochs", "1",
                 "--out", str(tmp_path / "c")]) == 2
    assert "no parameter of tiny_trainnet matches" in capsys.readouterr().err
