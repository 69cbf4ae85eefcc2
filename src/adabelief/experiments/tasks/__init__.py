"""The built-in tasks, by name: ``toy``, ``classify``, ``lm``, ``transformer``, ``gan``."""

from __future__ import annotations

from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.tasks.classify import ClassifyTask
from adabelief.experiments.tasks.gan import GanTask
from adabelief.experiments.tasks.lm import LanguageModelTask
from adabelief.experiments.tasks.toy import ToyTask
from adabelief.experiments.tasks.transformer import TransformerTask

__all__ = ["TASKS", "PlanOptions", "Task", "get_task"]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (ToyTask(), ClassifyTask(), LanguageModelTask(), TransformerTask(), GanTask())
}


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (raises ``KeyError`` with the known names)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
