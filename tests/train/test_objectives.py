"""The objective hook: a registered objective decides the loss and may change the model first."""
import json

import torch
import torch.nn.functional as F

from formers.cli import main
from formers.train.objectives import _OBJECTIVES, Objective, build_objective, list_objectives, register_objective


def test_default_objective_is_label_smoothed_cross_entropy():
    obj = build_objective("ce", {}, label_smoothing=0.1)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, logits = obj(model, x, y, step=0)
    assert torch.allclose(loss, F.cross_entropy(model(x), y, label_smoothing=0.1))
    assert {"ce", "multires", "matformer", "sparse"} <= set(list_objectives())


def test_a_registered_objective_drives_training(tiny, tmp_path, capsys):
    calls = {"prepare": 0, "steps": []}

    @register_objective
    class Counting(Objective):
        """Zero loss for the head's bias only: proves prepare ran and the loss came from here."""
        name = "counting_test"

        def __init__(self, label_smoothing=0.0, scale=1.0):
            super().__init__(label_smoothing)
            self.scale = scale

        def prepare(self, model):
            calls["prepare"] += 1
            model.marked = True
            return model

        def __call__(self, model, x, y, step):
            assert getattr(model, "marked", False)
            calls["steps"].append(step)
            loss, logits = super().__call__(model, x, y, step)
            return loss * self.scale, logits

    try:
        rc = main(["train", tiny, "--epochs", "1", "--batch-size", "64", "--limit-train", "256",
                   "--limit-test", "64", "--objective", "counting_test", "--objective-kwargs", '{"scale": 0.5}',
                   "--out", str(tmp_path), "--no-progress"])
    finally:
        _OBJECTIVES.pop("counting_test")
    assert rc == 0, capsys.readouterr().err
    assert calls["prepare"] == 1 and calls["steps"] == [0, 1, 2, 3]
    cfg = json.loads((tmp_path / "summary.json").read_text())
    assert cfg["config"]["objective"] == "counting_test" and cfg["config"]["objective_kwargs"] == {"scale": 0.5}
