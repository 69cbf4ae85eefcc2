"""PNG figures for the report (matplotlib's Agg canvas; pyplot and its global state are not used).

* learning curves: mean over seeds with a +-1 std band, per optimizer;
* ``trajectories``: the toy task's paths on the function's contour plot (first seed);
* ``points``: the 2-D GAN's samples against the 8 modes (first seed);
* ``images``: generated digits (first seed).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from adabelief.experiments.analysis import REFERENCE, ExperimentResult, OptimizerResult

__all__ = ["optimizer_color", "plot_experiment"]

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


def optimizer_color(name: str) -> str:
    """A fixed colour per optimizer (AdaBelief red)."""
    return _COLORS.get(name, "#17becf")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _label(row: OptimizerResult) -> str:
    factor = row.chosen.lr_factor
    lr = row.chosen.hparams.get("lr")
    return (
        f"{row.optimizer} (lr {lr:g})"
        if factor == 1 or lr is None
        else f"{row.optimizer} (lr {lr:g}, x{factor:.2g})"
    )


def _stack(rows: list[list[float | None]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [np.nan if v is None else v for v in r]
    return out


def _curve_axes(axes: Axes, result: ExperimentResult, curve: str, label: str) -> None:
    for row in result.optimizers:
        runs = [r for r in row.chosen.records.values() if curve in r.get("curves", {})]
        if not runs:
            continue
        values = _stack([r["curves"][curve] for r in runs])
        longest = max(runs, key=lambda r: len(r["curves"].get("x", [])))
        x = np.asarray(longest["curves"]["x"], dtype=np.float64)[: values.shape[1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)[: len(x)]
            std = np.nanstd(values, axis=0)[: len(x)]
        color = optimizer_color(row.optimizer)
        width = 2.2 if row.optimizer == REFERENCE else 1.3
        axes.plot(x, mean, color=color, lw=width, label=_label(row))
        if len(runs) > 1:
            axes.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    axes.set_xlabel(result.experiment.x_label)
    axes.set_ylabel(label)
    if curve in ("train_loss", "val_ppl", "distance", "fid"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            axes.set_yscale("log")
    axes.grid(alpha=0.3)


def plot_curves(result: ExperimentResult, path: Path) -> Path | None:
    """Learning curves of every optimizer (mean +- std over seeds)."""
    curves = result.experiment.curves
    if not curves or not result.optimizers:
        return None
    figure = Figure(figsize=(4.2 * len(curves), 3.4))
    for index, (curve, label) in enumerate(curves):
        _curve_axes(figure.add_subplot(1, len(curves), index + 1), result, curve, label)
    figure.axes[0].legend(fontsize=7)
    figure.suptitle(f"{result.experiment.title} ({result.mode} mode, {len(result.seeds)} seeds)")
    return _save(figure, path)


def _first_record(row: OptimizerResult) -> dict[str, Any] | None:
    return row.chosen.records[min(row.chosen.records)] if row.chosen.records else None


def _with_samples(result: ExperimentResult) -> list[tuple[OptimizerResult, dict[str, Any]]]:
    """Each optimizer's first-seed record that holds generated samples."""
    rows = []
    for row in result.optimizers:
        record = _first_record(row)
        if record is not None and record.get("artifacts", {}).get("samples"):
            rows.append((row, record))
    return rows


def points_start(result: ExperimentResult) -> tuple[float, float]:
    """Start point of the first seed (from the first optimizer with a stored path)."""
    for row in result.optimizers:
        record = _first_record(row)
        if record is not None and record.get("artifacts", {}).get("path"):
            x, y = record["artifacts"]["path"][0]
            return float(x), float(y)
    x, y = result.experiment.settings["start"]
    return float(x), float(y)


def plot_trajectories(result: ExperimentResult, path: Path) -> Path | None:
    """Paths of the first seed on a contour plot of the toy function."""
    import torch

    from adabelief.experiments.tasks.toy import FUNCTIONS

    function = FUNCTIONS[result.experiment.settings["function"]]
    x0, x1, y0, y1 = function.window
    xs, ys = np.linspace(x0, x1, 200), np.linspace(y0, y1, 200)
    gx, gy = np.meshgrid(xs, ys)
    with torch.no_grad():
        z = function.function(torch.from_numpy(gx), torch.from_numpy(gy)).numpy()
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot(1, 1, 1)
    shifted = z - z.min() + 1e-3
    levels = np.geomspace(shifted.min(), shifted.max(), 30)
    axes.contour(gx, gy, shifted, levels=levels, cmap="Greys", linewidths=0.6)
    for row in result.optimizers:
        record = _first_record(row)
        if record is None or not record.get("artifacts", {}).get("path"):
            continue
        points = np.asarray(record["artifacts"]["path"], dtype=np.float64)
        mine = row.optimizer == REFERENCE
        axes.plot(
            points[:, 0],
            points[:, 1],
            color=optimizer_color(row.optimizer),
            lw=2.2 if mine else 1.3,
            ls="-" if mine else "--",
            zorder=3 if mine else 2,
            label=_label(row),
        )
        axes.plot(points[-1, 0], points[-1, 1], "o", color=optimizer_color(row.optimizer), ms=4)
    axes.plot(*points_start(result), "s", color="black", ms=5, label="start (first seed)")
    axes.plot(*function.optimum, "*", color="gold", ms=14, mec="black", label="optimum")
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.legend(fontsize=7, loc="best")
    axes.set_title(f"{function.title}: first seed's trajectories")
    return _save(figure, path)


def plot_points(result: ExperimentResult, path: Path) -> Path | None:
    """Generated 2-D samples (first seed) of each optimizer against the 8 modes."""
    from adabelief.experiments.tasks.gan import MOG_CENTERS

    rows = _with_samples(result)
    if not rows:
        return None
    figure = Figure(figsize=(2.6 * len(rows), 2.8))
    centers = MOG_CENTERS.numpy()
    for index, (row, record) in enumerate(rows):
        axes = figure.add_subplot(1, len(rows), index + 1)
        samples = np.asarray(record["artifacts"]["samples"], dtype=np.float64)
        axes.scatter(
            samples[:, 0], samples[:, 1], s=2, color=optimizer_color(row.optimizer), alpha=0.5
        )
        axes.scatter(centers[:, 0], centers[:, 1], s=25, marker="x", color="black")
        hq = record["metrics"].get("hq_fraction")
        axes.set_title(
            f"{row.optimizer}\nhq {hq:.2f}" if hq is not None else row.optimizer, fontsize=8
        )
        axes.set_xlim(-3, 3)
        axes.set_ylim(-3, 3)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_aspect("equal")
    figure.suptitle(result.experiment.title, fontsize=9)
    return _save(figure, path)


def plot_images(result: ExperimentResult, path: Path) -> Path | None:
    """Generated digits (first seed, 4x4 grid) of each optimizer."""
    rows = _with_samples(result)
    if not rows:
        return None
    figure = Figure(figsize=(2.4 * len(rows), 2.7))
    for index, (row, record) in enumerate(rows):
        images = np.asarray(record["artifacts"]["samples"], dtype=np.float64)[:16]
        side = math.ceil(math.sqrt(len(images)))
        grid = np.zeros((side * 9 - 1, side * 9 - 1))  # white separators
        for k, image in enumerate(images):
            r, c = divmod(k, side)
            grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = image
        axes = figure.add_subplot(1, len(rows), index + 1)
        axes.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
        fid = record["metrics"].get("fid")
        axes.set_title(
            f"{row.optimizer}\nFD {fid:.1f}" if fid is not None else row.optimizer, fontsize=8
        )
        axes.axis("off")
    figure.suptitle(result.experiment.title, fontsize=9)
    return _save(figure, path)


def plot_experiment(result: ExperimentResult, directory: Path) -> list[Path]:
    """All figures of one experiment; returns the files written."""
    stem = f"{result.experiment.task}-{result.experiment.name}"
    written = [plot_curves(result, directory / f"{stem}-curves.png")]
    special = {
        "trajectories": plot_trajectories,
        "points": plot_points,
        "images": plot_images,
    }.get(result.experiment.plot)
    if special is not None:
        written.append(special(result, directory / f"{stem}-{result.experiment.plot}.png"))
    return [p for p in written if p is not None]
