"""2-D test functions: optimizer trajectories and steps needed to reach the optimum.

The paper illustrates AdaBelief on |x|+|y|, |x+y|+|x-y|/10 and (x+y)^2+(x-y)^2/10; Beale,
Rosenbrock and McCormick are the usual harder 2-D benchmarks.  Each seed starts from the preset's
start point shifted by a seed-dependent offset in [-0.1, 0.1]^2, so seeds differ a little.

A run *diverges* when its point becomes non-finite or moves farther from the optimum than
:data:`DIVERGENCE_FACTOR` times the diagonal of the function's plotting window; it stops there,
and its metrics are undefined (a diverged run never enters a mean with a censored step count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adabelief.experiments.presets import presets_for_task
from adabelief.experiments.registry import create_optimizer
from adabelief.experiments.spec import Experiment, Metric, RunContext, RunOutput, RunSpec
from adabelief.experiments.tasks.base import PlanOptions, Task
from adabelief.experiments.training import optimizer_step, seed_everything

if TYPE_CHECKING:
    from adabelief.experiments.analysis import ExperimentResult

__all__ = ["DIVERGENCE_FACTOR", "FUNCTIONS", "TestFunction", "ToyTask"]

#: A run that gets farther from the optimum than this many window diagonals has diverged.
DIVERGENCE_FACTOR = 100.0

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

    @property
    def divergence_distance(self) -> float:
        """Distance from the optimum beyond which a run counts as diverged."""
        x0, x1, y0, y1 = self.window
        return DIVERGENCE_FACTOR * math.hypot(x1 - x0, y1 - y0)


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
                    target=Metric("distance", "distance to the optimum", False),
                )
            )
        return result

    def model_dtype_refusal(self, experiment: Experiment) -> str:
        """The toy functions optimise one float64 point, not a model: no model dtype applies."""
        return "it optimises a float64 2-D point, not a model that could be put in another dtype"

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
            if not math.isfinite(distance) or distance > function.divergence_distance:
                diverged = True
                break
            path.append(current.tolist())
            distances.append(distance)
            if reached_at is None and distance <= tolerance:
                reached_at = step
        keep = _subsample(len(path), _MAX_STORED_POINTS)
        metrics: dict[str, float | None] = {
            "steps": float(reached_at if reached_at is not None else steps),
            "reached": 1.0 if reached_at is not None else 0.0,
            "final_distance": distances[-1],
        }
        x: list[float | None] = [float(i) for i in keep]
        return RunOutput(
            metrics=dict.fromkeys(metrics) if diverged else metrics,
            curves={"x": x, "step": list(x), "distance": [distances[i] for i in keep]},
            artifacts={"path": [[round(v, 5) for v in path[i]] for i in keep]},
            diverged=diverged,
        )

    def plots(self, result: ExperimentResult, directory: Path) -> list[Path]:
        """The first seed's trajectories on the function's contour plot."""
        from adabelief.experiments.plots import plot_stem

        path = plot_trajectories(result, directory / f"{plot_stem(result)}-trajectories.png")
        return [path] if path is not None else []


def _start_point(result: ExperimentResult) -> tuple[float, float]:
    """Start point of the first seed (from the first optimizer with a stored path)."""
    for row in result.optimizers:
        for seed in sorted(row.chosen.records):
            path = row.chosen.records[seed].get("artifacts", {}).get("path")
            if path:
                return float(path[0][0]), float(path[0][1])
    x, y = result.experiment.settings["start"]
    return float(x), float(y)


def plot_trajectories(result: ExperimentResult, path: Path) -> Path | None:
    """Paths of the first seed of every optimizer on a contour plot of the toy function.

    AdaBelief's path is wide and underneath, the others dashed on top; a diverged run's path is
    not drawn (its first seed diverged: the legend says so).
    """
    import numpy as np

    from adabelief.experiments.plots import line_style, new_figure, run_label, save_figure

    function = FUNCTIONS[result.experiment.settings["function"]]
    x0, x1, y0, y1 = function.window
    xs, ys = np.linspace(x0, x1, 200), np.linspace(y0, y1, 200)
    gx, gy = np.meshgrid(xs, ys)
    with torch.no_grad():
        z = function.function(torch.from_numpy(gx), torch.from_numpy(gy)).numpy()
    figure = new_figure(6, 5)
    axes = figure.add_subplot(1, 1, 1)
    shifted = z - z.min() + 1e-3
    levels = np.geomspace(shifted.min(), shifted.max(), 30)
    axes.contour(gx, gy, shifted, levels=levels, cmap="Greys", linewidths=0.6)
    rows = sorted(result.optimizers, key=lambda r: r.optimizer != "adabelief")
    for row in rows:
        if not row.chosen.records:
            continue
        record = row.chosen.records[min(row.chosen.records)]
        style = line_style(row.optimizer)
        if record.get("diverged") or not record.get("artifacts", {}).get("path"):
            axes.plot([], [], label=f"{run_label(row)}: diverged", **style)
            continue
        points = np.asarray(record["artifacts"]["path"], dtype=np.float64)
        axes.plot(points[:, 0], points[:, 1], label=run_label(row), **style)
        axes.plot(
            points[-1, 0], points[-1, 1], "o", color=style["color"], ms=4, zorder=style["zorder"]
        )
    axes.plot(*_start_point(result), "s", color="black", ms=5, label="start (first seed)")
    axes.plot(*function.optimum, "*", color="gold", ms=14, mec="black", label="optimum")
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.legend(fontsize=7, loc="best")
    axes.set_title(f"{function.title}: trajectories of the first seed", fontsize=9)
    return save_figure(figure, path)
