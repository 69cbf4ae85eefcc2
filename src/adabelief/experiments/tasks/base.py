"""The interface every task implements (the built-in ones and a user's own)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adabelief.experiments.spec import Experiment, RunContext, RunOutput, RunSpec

if TYPE_CHECKING:
    from adabelief.experiments.analysis import ExperimentResult
    from adabelief.experiments.data import DataCheck

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
    """A family of experiments (``toy``, ``classify``, ``lm``, ``transformer``, ``gan``, or a
    user's function).

    Besides training (:meth:`run`), a task owns what is specific to it in the report: extra
    figures (:meth:`plots`, e.g. the toy trajectories) and extra lines in its experiments'
    sections (:meth:`report_lines`).
    """

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

    def model_dtype_refusal(self, experiment: Experiment) -> str:
        """Why ``experiment`` cannot train its model in an optimizer's ``model_dtype`` (the
        bfloat16 variants), or ``""`` when it can: its :meth:`run` passes the model through
        :func:`~adabelief.experiments.training.model_for_optimizer` before building the
        optimizer.  The runner refuses such a variant for a task that gives a reason."""
        return ""

    def check_data(self, data_dir: Path) -> DataCheck:
        """Find and validate this task's files in ``data_dir`` before anything trains.

        Returns what was found with its fingerprint, or raises
        :class:`~adabelief.experiments.data.DataNotFoundError` naming the missing or bad file.
        """
        raise NotImplementedError(f"task {self.name!r} does not read --data")

    def preset_hparams(self, experiment: Experiment, optimizer: str) -> dict[str, Any]:
        """``optimizer``'s hyperparameters in ``experiment``'s preset (paper mode as is, fair
        mode's search spaces are centred on them)."""
        from adabelief.experiments.presets import get_preset

        return get_preset(experiment.preset).hparams(optimizer)

    def payload(self) -> dict[str, Any]:
        """What a worker process needs to find this task again (plain JSON-able data)."""
        return {"builtin": self.name}

    def plots(self, result: ExperimentResult, directory: Path) -> list[Path]:
        """Task-specific figures of one experiment (beyond the learning curves)."""
        return []

    def report_lines(self, result: ExperimentResult) -> list[str]:
        """Task-specific Markdown lines for one experiment's section of the report."""
        return []
