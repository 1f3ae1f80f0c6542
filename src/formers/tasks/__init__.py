"""One module per task: what differs from image classification (see base.py for the interface).

    from formers.tasks import task_of
    task_of("segformer_b0").name      # "segment"
"""
from __future__ import annotations

import importlib

from .base import Task

__all__ = ["Task", "TASKS", "get_task", "task_of", "run_eval"]

# task name -> (module, class); imported on first use
TASKS = {
    "classify": ("formers.tasks.classify", "ClassifyTask"),
    "segment": ("formers.tasks.segment", "SegmentTask"),
}
_MADE: dict[str, Task] = {}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    if name not in _MADE:
        module, cls = TASKS[name]
        _MADE[name] = getattr(importlib.import_module(module), cls)()
    return _MADE[name]


def task_of(model_name: str) -> Task:
    """The task named on the model's card."""
    from formers.registry import model_entry
    return get_task(model_entry(model_name).card.task)


def run_eval(model_name: str, *args, **kwargs) -> dict:
    """`formers eval`: the model's task evaluates a weights file (see each task's run_eval)."""
    return task_of(model_name).run_eval(model_name, *args, **kwargs)
