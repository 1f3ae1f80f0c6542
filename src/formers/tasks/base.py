"""What a task is: the part of training and evaluation that differs between kinds of model.

The trainer (`formers.train`), `formers eval` and the checkpoints are one piece of code for every
task. A model's card names its task (`ModelCard.task`); the trainer asks that task for:

- its data sets (`datasets`, `default_dataset`, `load_data`): objects with `x_train`, `y_train`,
  `x_test`, `y_test` tensors, `num_classes`, `channels`, `classes`, `source`, `describe()`;
- its batch transforms (`transforms`): `draw(n, generator)` the random parameters of a global batch,
  `slice_params`, and `make_batch(data, split, idx, params)` -> the model's input and target;
- its objective (`build_objective`): a `formers.train.objectives.Objective` returning (loss, logits);
- its step statistics (`step_stats`): (correct, counted) of one micro-batch, for the progress bar;
- its evaluation (`evaluate`): streamed over the split, reduced across DDP ranks, a dict with
  "loss" and the headline metric (`headline`, higher is better), which picks the best weights;
- the fields of an epoch row (`epoch_fields`) and `run_eval`, the `formers eval` command.
"""
from __future__ import annotations

__all__ = ["Task"]


class Task:
    name = ""
    headline = ""            # the key of evaluate()'s result that "best" and the summary report
    headline_label = ""      # how a line prints it ("acc", "mIoU")
    headline_field = ""      # its key in a metrics.jsonl epoch row: f"test_{headline_field}" ("acc", "miou")
    default_dataset = ""
    datasets: tuple = ()

    def check_dataset(self, name: str, model: str):
        if name not in self.datasets:
            raise ValueError(f"unknown dataset {name!r} for {model} (a {self.name} model); choose one of "
                             f"{', '.join(self.datasets)}")

    def output_problem(self, out, num_classes: int) -> str | None:
        """What is wrong with the model's output for one image (None: nothing), in words that follow
        "MODEL returned"."""
        raise NotImplementedError

    def epoch_fields(self, res: dict, prefix: str) -> dict:
        """The metrics of an evaluation, as the keys of a metrics.jsonl epoch row (prefix "test" or "ema_test")."""
        raise NotImplementedError
