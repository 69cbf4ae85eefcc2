"""Number and cell formatting shared by the report's outputs (Markdown and CSV)."""

from __future__ import annotations

import math
from typing import Any

from adabelief.experiments.analysis import ExperimentResult

__all__ = ["HPARAM_NAMES", "fmt", "fmt_p", "hparams_text", "mean_std"]

HPARAM_NAMES = ("lr", "eps", "weight_decay", "betas", "momentum")


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def mean_std(result: ExperimentResult, optimizer: str, metric: str) -> str:
    summary = result.summary(optimizer, metric)
    if summary.n == 0:
        return "-"
    if summary.n == 1 or not math.isfinite(summary.std):
        return fmt(summary.mean)
    return f"{fmt(summary.mean)} ± {fmt(summary.std, 2)}"


def hparams_text(hparams: dict[str, Any]) -> str:
    parts = []
    for name in HPARAM_NAMES:
        value = hparams.get(name)
        if isinstance(value, list | tuple):
            parts.append(f"{name} ({', '.join(fmt(float(v)) for v in value)})")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name} {fmt(float(value))}")
    return ", ".join(parts) or "-"
