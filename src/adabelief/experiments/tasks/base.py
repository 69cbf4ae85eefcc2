"""The interface every task implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from adabelief.experiments.spec import Experiment, RunContext, RunOutput, RunSpec

__all__ = ["PlanOptions", "Task"]


@dataclass(frozen=True)
class PlanOptions:
    """What decides a task's experiments: scale, data and mode.

    ``tiny`` shrinks everything to test size (hidden ``--tiny`` flag); ``data_dir`` is the
    folder with real data for this task, or ``None`` for the bundled data.
    """

    quick: bool = True
    mode: str = "paper"
    data_dir: Path | None = None
    tiny: bool = False


class Task(ABC):
    """A family of experiments (``toy``, ``classify``, ``lm``, ``gan``)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: Whether ``--data`` can point this task at a real dataset.
    uses_data: ClassVar[bool] = False
    #: What the task looks for in ``--data`` (shown in help and errors).
    data_help: ClassVar[str] = ""

    @abstractmethod
    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """The experiments to run for these options."""

    @abstractmethod
    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Train once and measure (must be deterministic given ``spec``)."""

    def check_data(self, data_dir: Path) -> str:
        """Validate ``data_dir`` for this task; return a description or raise
        :class:`~adabelief.experiments.data.DataNotFoundError`."""
        raise NotImplementedError(f"task {self.name!r} does not read --data")
