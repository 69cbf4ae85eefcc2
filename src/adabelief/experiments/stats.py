"""Summary statistics and paired comparisons over seeds.

A paired comparison of optimizer A against B uses the seeds both ran (same data, same seed):
the mean difference of the metric, its standard error, a two-sided paired t-test (Student t
distribution from scipy when available) and an exact two-sided sign test.  Differences are
oriented so that a positive ``advantage`` always means A did better.

The t statistic ``mean(d) / (std(d) / sqrt(n))`` is undefined when every paired difference is
the same (``std(d) = 0``, e.g. a one-image test set): then only the sign test is used, which
needs 6 seeds or more to reach p < 0.05.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ALPHA",
    "PairedComparison",
    "Summary",
    "paired_comparison",
    "sign_test_p",
    "student_t_p",
    "summarize",
]

#: Significance level used for the words "better" / "worse" in the report.
ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    """Count, mean, sample standard deviation, minimum and maximum of the finite values."""

    n: int
    mean: float
    std: float
    min: float
    max: float


def summarize(values: Sequence[float | None]) -> Summary:
    """Summary of the finite values (NaN fields when there are none; std NaN for one value)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return Summary(len(finite), statistics.fmean(finite), std, min(finite), max(finite))


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def student_t_p(t: float, dof: int) -> float | None:
    """Two-sided p-value of Student's t with ``dof`` degrees of freedom.

    ``None`` without scipy, or when ``t`` is not finite (the test is then undefined).
    """
    if not math.isfinite(t):
        return None
    try:
        from scipy import stats as scipy_stats
    except ImportError:
        return None
    return float(2 * scipy_stats.t.sf(abs(t), dof))


@dataclass(frozen=True)
class PairedComparison:
    """A against B over paired seeds; ``advantage`` > 0 means A is better.

    ``mean_difference`` is mean(A - B) in the metric's units; ``advantage`` is the same number
    with its sign flipped for lower-is-better metrics.  ``p_value`` is the paired t-test when it
    can be computed (scipy installed, differences not all identical), else the sign test.
    """

    n: int
    mean_difference: float
    standard_error: float
    advantage: float
    t_p_value: float | None
    wins: int
    losses: int
    ties: int
    sign_p_value: float

    @property
    def p_value(self) -> float:
        """Paired t-test p-value, or the sign test's when the t-test is unavailable."""
        return self.t_p_value if self.t_p_value is not None else self.sign_p_value

    @property
    def verdict(self) -> str:
        """``"better"``, ``"worse"``, ``"no significant difference"`` or ``"too few seeds"``."""
        if self.n < 2:
            return "too few seeds"
        if self.p_value < ALPHA and self.advantage > 0:
            return "better"
        if self.p_value < ALPHA and self.advantage < 0:
            return "worse"
        return "no significant difference"


def paired_comparison(
    a: Sequence[float | None], b: Sequence[float | None], higher_is_better: bool
) -> PairedComparison:
    """Compare paired samples ``a[i]`` and ``b[i]``; pairs with a missing value are dropped."""
    pairs = [
        (float(x), float(y))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    diffs = [x - y for x, y in pairs]
    sign = 1.0 if higher_is_better else -1.0
    n = len(diffs)
    wins = sum(1 for d in diffs if sign * d > 0)
    losses = sum(1 for d in diffs if sign * d < 0)
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, None, 0, 0, 0, 1.0)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    # Identical differences (se == 0) leave t undefined: the sign test alone decides then.
    t_p = student_t_p(mean / se, n - 1) if n > 1 and se > 0 else None
    return PairedComparison(
        n=n,
        mean_difference=mean,
        standard_error=se,
        advantage=sign * mean,
        t_p_value=t_p,
        wins=wins,
        losses=losses,
        ties=n - wins - losses,
        sign_p_value=sign_test_p(wins, losses),
    )
