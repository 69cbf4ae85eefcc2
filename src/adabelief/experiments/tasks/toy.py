"""2-D test functions: optimizer trajectories and steps needed to reach the optimum.

The paper illustrates AdaBelief on |x|+|y|, |x+y|+|x-y|/10 and (x+y)^2+(x-y)^2/10; Beale,
Rosenbrock and McCormick are the usual harder 2-D benchmarks.  Each seed starts from the preset's
start point shifted by a seed-dependent offset in [-0.1, 0.1]^2, so seeds differ a little.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adabelief.experiments.presets import presets_for_task
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import optimizer_step, seed_everything

__all__ = ["FUNCTIONS", "TestFunction", "ToyTask"]

Function2D = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TestFunction:
    """A 2-D function, its minimiser, its minimum and a plotting window."""

    title: str
    function: Function2D
    optimum: tuple[float, float]
    window: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max

    @property
    def minimum(self) -> float:
        """Function value at the optimum."""
        x, y = (torch.tensor(v, dtype=torch.float64) for v in self.optimum)
        return float(self.function(x, y))


FUNCTIONS: dict[str, TestFunction] = {
    "abs": TestFunction(
        "|x| + |y|", lambda x, y: x.abs() + y.abs(), (0.0, 0.0), (-2.5, 2.5, -2.5, 2.5)
    ),
    "abs-rotated": TestFunction(
        "|x + y| + |x - y| / 10",
        lambda x, y: (x + y).abs() + (x - y).abs() / 10,
        (0.0, 0.0),
        (-2.5, 2.5, -2.5, 2.5),
    ),
    "quadratic": TestFunction(
        "(x + y)^2 + (x - y)^2 / 10",
        lambda x, y: (x + y) ** 2 + (x - y) ** 2 / 10,
        (0.0, 0.0),
        (-2.5, 2.5, -2.5, 2.5),
    ),
    "beale": TestFunction(
        "Beale",
        lambda x, y: (
            (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2
        ),
        (3.0, 0.5),
        (-0.5, 4.0, -1.0, 2.5),
    ),
    "rosenbrock": TestFunction(
        "Rosenbrock",
        lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
        (1.0, 1.0),
        (-2.0, 2.0, -1.0, 3.0),
    ),
    "mccormick": TestFunction(
        "McCormick",
        lambda x, y: torch.sin(x + y) + (x - y) ** 2 - 1.5 * x + 2.5 * y + 1,
        (-0.54719755, -1.54719755),
        (-1.5, 4.0, -3.0, 4.0),
    ),
}

_MAX_STORED_POINTS = 300
_TINY = {"steps": 40}


def _subsample(n: int, keep: int) -> list[int]:
    """Up to ``keep`` indices spread evenly over ``range(n)``, always including the ends."""
    if n <= keep:
        return list(range(n))
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


class ToyTask(Task):
    """Trajectories on 2-D functions (claim 1: fast convergence)."""

    name = "toy"
    summary = "2-D test functions: trajectories and steps to reach the optimum"

    def experiments(self, options: PlanOptions) -> list[Experiment]:
        """One experiment per function."""
        steps = Metric("steps", "steps to reach the optimum (censored at the budget)", False)
        result = []
        for preset in presets_for_task(self.name):
            settings = preset.settings_for(options.quick)
            if options.tiny:
                settings.update(_TINY)
            function = FUNCTIONS[settings["function"]]
            result.append(
                Experiment(
                    task=self.name,
                    name=settings["function"],
                    title=f"2-D function {function.title}",
                    preset=preset.name,
                    settings=settings,
                    score=steps,
                    selection=steps,
                    speed=steps,
                    extra=(
                        Metric("reached", "reached the optimum (1/0)", True),
                        Metric("final_distance", "final distance to the optimum", False),
                    ),
                    claims=("convergence",),
                    curves=(("distance", "distance to the optimum"),),
                    plot="trajectories",
                    x_label="step",
                )
            )
        return result

    def run(self, spec: RunSpec, context: RunContext) -> RunOutput:
        """Optimise the function from the (seed-shifted) start point."""
        settings = spec.settings
        function = FUNCTIONS[settings["function"]]
        generator = seed_everything(spec.seed)
        offset = (torch.rand(2, generator=generator, dtype=torch.float64) - 0.5) * 0.2
        start = torch.tensor(settings["start"], dtype=torch.float64) + offset
        point = torch.nn.Parameter(start.clone())
        optimizer = create_optimizer(spec.optimizer, [point], **spec.hparams)
        optimum = torch.tensor(function.optimum, dtype=torch.float64)
        steps, tolerance = int(settings["steps"]), float(settings["tolerance"])
        path = [start.tolist()]
        distances = [float((start - optimum).norm())]
        reached_at: int | None = None
        diverged = False
        for step in range(1, steps + 1):
            loss = function.function(point[0], point[1])
            optimizer_step(optimizer, loss)
            current = point.detach()
            distance = float((current - optimum).norm())
            if not math.isfinite(distance):
                diverged = True
                break
            path.append(current.tolist())
            distances.append(distance)
            if reached_at is None and distance <= tolerance:
                reached_at = step
        keep = _subsample(len(path), _MAX_STORED_POINTS)
        return RunOutput(
            metrics={
                "steps": float(reached_at if reached_at is not None else steps),
                "reached": 1.0 if reached_at is not None else 0.0,
                "final_distance": None if diverged else distances[-1],
            },
            curves={"x": [float(i) for i in keep], "distance": [distances[i] for i in keep]},
            artifacts={"path": [[round(v, 5) for v in path[i]] for i in keep]},
            diverged=diverged,
        )
