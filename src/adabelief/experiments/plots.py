"""PNG figures for the report (matplotlib's Agg canvas; pyplot and its global state are not used).

This module draws what every experiment has:

* learning curves: mean over seeds with a +-1 std band, per optimizer; diverged runs are left
  out (they are counted in the report's tables), and AdaBelief's line is drawn first and
  widest, so that the others stay visible on top of it;
* the performance profile across experiments.

Task-specific figures (trajectories, GAN samples) are drawn by their tasks (``Task.plots``)
with the helpers here: :func:`new_figure`, :func:`save_figure`, :func:`optimizer_color`,
:func:`line_style`, :func:`run_label`, :func:`first_record`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adabelief.experiments.analysis import (
    REFERENCE,
    TAU_MAX,
    ExperimentResult,
    OptimizerResult,
    Profile,
)

__all__ = [
    "first_record",
    "line_style",
    "new_figure",
    "optimizer_color",
    "plot_curves",
    "plot_profile",
    "plot_stem",
    "run_label",
    "save_figure",
    "write_plots",
]

_COLORS = {
    "adabelief": "#d62728",
    "sgd": "#1f77b4",
    "adam": "#2ca02c",
    "adamw": "#9467bd",
    "radam": "#ff7f0e",
    "adabound": "#8c564b",
    "yogi": "#e377c2",
    "adabelief_ref": "#7f7f7f",
}
#: Curves that are not plotted as learning curves (positions and clocks).
_AXES_CURVES = {"x", "step", "time_s"}
#: Curves shown on a log scale when all their values are positive.
_LOG_CURVES = {"train_loss", "val_ppl", "distance", "fid"}


def optimizer_color(name: str) -> str:
    """A fixed colour per optimizer (AdaBelief red)."""
    return _COLORS.get(name, "#17becf")


def line_style(optimizer: str) -> dict[str, Any]:
    """Matplotlib line options: AdaBelief wide and underneath, the others thinner, dashed, on top."""
    if optimizer == REFERENCE:
        return {"color": optimizer_color(optimizer), "lw": 3.0, "ls": "-", "zorder": 2}
    return {"color": optimizer_color(optimizer), "lw": 1.4, "ls": "--", "zorder": 3}


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as PNG (the umask decides the file's permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_stem(result: ExperimentResult) -> str:
    """File-name stem of an experiment's figures: ``task-experiment``, plus the mode and study
    when they are needed to tell figures of the same experiment apart."""
    stem = f"{result.experiment.task}-{result.experiment.name}"
    if result.mode != "paper":
        stem += f"-{result.mode}"
    return f"{stem}-{result.study}" if result.label else stem


def run_label(row: OptimizerResult) -> str:
    """Legend text: optimizer, learning rate and (fair mode) the winning trial."""
    lr = row.chosen.hparams.get("lr")
    text = row.optimizer if not isinstance(lr, int | float) else f"{row.optimizer} (lr {lr:.3g})"
    return text if row.chosen.trial is None else f"{text}, trial {row.chosen.trial}"


def first_record(row: OptimizerResult) -> dict[str, Any] | None:
    """The chosen candidate's record of its first seed that did not diverge (or ``None``)."""
    for seed in sorted(row.chosen.records):
        record = row.chosen.records[seed]
        if not record.get("diverged"):
            return record
    return None


def _stack(rows: list[list[float | None]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [np.nan if v is None else v for v in r]
    return out


def _finished_runs(row: OptimizerResult, curve: str) -> list[dict[str, Any]]:
    return [
        r
        for r in row.chosen.records.values()
        if not r.get("diverged") and any(v is not None for v in r.get("curves", {}).get(curve, []))
    ]


def _curve_axes(axes: Axes, result: ExperimentResult, curve: str, label: str) -> bool:
    drawn: list[np.ndarray] = []
    rows = sorted(result.optimizers, key=lambda r: r.optimizer != REFERENCE)
    for row in rows:
        runs = _finished_runs(row, curve)
        if not runs:
            continue
        values = _stack([r["curves"][curve] for r in runs])
        longest = max(runs, key=lambda r: len(r["curves"].get("x", [])))
        positions = longest["curves"].get("x") or list(range(1, values.shape[1] + 1))
        x = np.asarray([np.nan if v is None else v for v in positions], dtype=np.float64)
        x = x[: values.shape[1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)[: len(x)]
            std = np.nanstd(values, axis=0)[: len(x)]
        style = line_style(row.optimizer)
        axes.plot(x, mean, label=run_label(row), **style)
        if len(runs) > 1:
            axes.fill_between(
                x, mean - std, mean + std, color=style["color"], alpha=0.12, lw=0, zorder=1
            )
        drawn.append(mean[np.isfinite(mean)])
    axes.set_xlabel(result.experiment.x_label)
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    finite = np.concatenate(drawn) if drawn else np.array([])
    if finite.size == 0:
        axes.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.transAxes)
        return False
    if curve in _LOG_CURVES and finite.min() > 0:
        axes.set_yscale("log")
    return True


def _curves_of(result: ExperimentResult) -> list[tuple[str, str]]:
    """The experiment's declared curves, or every curve its runs have (user tasks)."""
    if result.experiment.curves:
        return list(result.experiment.curves)
    names: dict[str, None] = {}
    for row in result.optimizers:
        for record in row.chosen.records.values():
            for name in record.get("curves", {}):
                if name not in _AXES_CURVES:
                    names[name] = None
    return [(name, name) for name in sorted(names)]


def plot_curves(result: ExperimentResult, path: Path) -> Path | None:
    """Learning curves of every optimizer (mean +- std over the seeds that did not diverge)."""
    curves = _curves_of(result)
    if not curves or not result.optimizers:
        return None
    figure = new_figure(4.2 * len(curves), 3.4)
    any_drawn = False
    for index, (curve, label) in enumerate(curves):
        axes = figure.add_subplot(1, len(curves), index + 1)
        any_drawn |= _curve_axes(axes, result, curve, label)
    # Room between the panels for each one's y-label, and one legend below them all (inside
    # the first panel it ran into the second panel's label).
    figure.subplots_adjust(wspace=0.32)
    if any_drawn:
        handles, labels = figure.axes[0].get_legend_handles_labels()
        figure.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(labels), 5),
            fontsize=7,
            frameon=False,
        )
    figure.suptitle(
        f"{result.experiment.title} ({result.mode} mode, {len(result.seeds)} seeds; "
        "mean ± std, diverged runs left out)",
        fontsize=9,
    )
    return save_figure(figure, path)


def plot_profile(profile: Profile, path: Path) -> Path | None:
    """Performance profiles ``rho(tau)`` of every optimizer for one mode."""
    if not profile.ratios:
        return None
    figure = new_figure(5.5, 3.8)
    axes = figure.add_subplot(1, 1, 1)
    taus = np.linspace(1.0, TAU_MAX, 301)
    names = sorted(profile.ratios, key=lambda name: name != REFERENCE)
    for name in names:
        rho = [profile.rho(name, tau) for tau in taus]
        axes.step(
            taus,
            rho,
            where="post",
            label=f"{name} (area {profile.area(name):.2f})",
            **line_style(name),
        )
    axes.set_xlim(1.0, TAU_MAX)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("tau: steps to target / fastest optimizer's steps")
    axes.set_ylabel("fraction of experiments within tau")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title(
        f"Performance profile, {profile.mode} mode ({len(profile.experiments)} experiments)",
        fontsize=9,
    )
    return save_figure(figure, path)


def write_plots(
    results: list[ExperimentResult], profiles: list[Profile], root: Path
) -> tuple[dict[int, list[Path]], dict[str, Path]]:
    """Draw every figure of the report under ``root/plots``.

    Returns the figures of each experiment (by its index in ``results``: learning curves plus
    its task's own figures) and the performance-profile figure of each mode.
    """
    from adabelief.experiments.tasks import TASKS

    directory = root / "plots"
    plots: dict[int, list[Path]] = {}
    for index, result in enumerate(results):
        written = [plot_curves(result, directory / f"{plot_stem(result)}-curves.png")]
        task = TASKS.get(result.experiment.task)
        extra = task.plots(result, directory) if task is not None else []
        plots[index] = [p for p in (*written, *extra) if p is not None]
    profile_plots: dict[str, Path] = {}
    for profile in profiles:
        path = plot_profile(profile, directory / f"profile-{profile.mode}.png")
        if path is not None:
            profile_plots[profile.mode] = path
    return plots, profile_plots
