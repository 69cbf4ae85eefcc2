"""Summary statistics and paired comparisons over seeds.

A paired comparison of optimizer A against B uses the seeds both ran (same data, same seed):
the mean difference of the metric, its standard error, a two-sided paired t-test (Student t
distribution from scipy when available) and an exact two-sided sign test.  Differences are
oriented so that a positive ``advantage`` always means A did better.

The t statistic ``mean(d) / (std(d) / sqrt(n))`` is undefined when every paired difference is
the same, and meaningless when they differ only by floating-point rounding (one more test image
right on every seed, accuracy ``100 * correct / n``): differences whose spread is within
:data:`CONSTANT_TOLERANCE` of the values' magnitude count as constant, and only the sign test is
used then.  The exact two-sided sign test cannot go below ``2 / 2**n``: it needs
:func:`sign_test_seeds_needed` (6) seeds or more to reach p < 0.05.

A *divergence* is a loss: a seed where A diverged and B did not is a pair B wins (and the
reverse); a seed where both diverged is a tie.  Such pairs have no numeric difference, so when
any pair is decided by a divergence the sign test over every pair decides the p-value, and the
mean difference, its interval and the t-test cover the finite pairs only.

The effect size is the mean paired difference in the metric's units with its 95% confidence
interval (Student t over the finite pairs); it has no interval with fewer than two pairs or
constant differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "CONSTANT_TOLERANCE",
    "CONVERGENCE_TOLERANCE",
    "CONVERGENCE_Z",
    "LATE_FROM",
    "NOISE_FROM",
    "PairedComparison",
    "Summary",
    "convergence_metrics",
    "is_still_improving",
    "late_improvement",
    "late_noise",
    "paired_comparison",
    "sign_test_p",
    "sign_test_seeds_needed",
    "student_t_p",
    "summarize",
]

#: Significance level used for the words "better" / "worse" in the report.
ALPHA = 0.05
#: Paired differences whose spread is within this fraction of the values' magnitude are equal.
CONSTANT_TOLERANCE = 1e-9
#: Coverage of the effect size's confidence interval.
CONFIDENCE = 0.95


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


def sign_test_seeds_needed(alpha: float = ALPHA) -> int:
    """The fewest pairs with which the exact two-sided sign test can reach ``p < alpha``."""
    n = 1
    while 2.0 / 2**n >= alpha:
        n += 1
    return n


def _t_quantile(probability: float, dof: int) -> float | None:
    try:
        from scipy import stats as scipy_stats
    except ImportError:
        return None
    return float(scipy_stats.t.ppf(probability, dof))


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
    can be computed (scipy installed, finite differences that vary, no pair decided by a
    divergence), else the sign test.  ``n`` counts every pair (divergences included);
    ``a_diverged`` / ``b_diverged`` count the seeds where one side diverged and the other did
    not, ``both_diverged`` those where both did.  ``interval`` is the 95% confidence interval of
    ``advantage`` (``None`` when it cannot be computed).
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
    a_diverged: int = 0
    b_diverged: int = 0
    both_diverged: int = 0
    interval: tuple[float, float] | None = None
    constant: bool = False

    @property
    def p_value(self) -> float:
        """Paired t-test p-value, or the sign test's when the t-test is unavailable."""
        return self.t_p_value if self.t_p_value is not None else self.sign_p_value

    @property
    def sign_test_only(self) -> bool:
        """Whether the sign test alone gave the p-value."""
        return self.t_p_value is None

    @property
    def sign_test_floor(self) -> float:
        """The smallest p-value the sign test can give with these pairs (``2 / 2**n``)."""
        decided = self.wins + self.losses
        return min(1.0, 2.0 / 2**decided) if decided else 1.0

    @property
    def verdict(self) -> str:
        """``"better"``, ``"worse"``, ``"worse (diverged)"``, ``"no significant difference"``
        or ``"too few seeds"``.

        ``"worse (diverged)"``: A diverged on more seeds than B and the test did not already
        call it worse; a divergence is never a draw.
        """
        if self.a_diverged > self.b_diverged and not (
            self.n >= 2 and self.p_value < ALPHA and self.losses > self.wins
        ):
            return "worse (diverged)"
        if self.n < 2:
            return "too few seeds"
        direction = float(self.wins - self.losses) if self.sign_test_only else self.advantage
        if self.p_value < ALPHA and direction > 0:
            return "better"
        if self.p_value < ALPHA and direction < 0:
            return "worse"
        return "no significant difference"


def _is_constant(diffs: list[float], pairs: list[tuple[float, float]]) -> bool:
    """Whether the differences are equal up to rounding (relative to the values' size)."""
    scale = max([1.0, *(abs(v) for pair in pairs for v in pair)])
    return max(diffs) - min(diffs) <= CONSTANT_TOLERANCE * scale


def paired_comparison(
    a: Sequence[float | None],
    b: Sequence[float | None],
    higher_is_better: bool,
    a_diverged: Sequence[bool] | None = None,
    b_diverged: Sequence[bool] | None = None,
) -> PairedComparison:
    """Compare paired samples ``a[i]`` and ``b[i]`` (see the module notes).

    ``a_diverged[i]`` / ``b_diverged[i]`` mark seeds where that side diverged (its value is then
    ignored); a pair with a missing value on a side that did not diverge is dropped.
    """
    a_div = list(a_diverged) if a_diverged is not None else [False] * len(a)
    b_div = list(b_diverged) if b_diverged is not None else [False] * len(b)
    pairs: list[tuple[float, float]] = []
    only_a = only_b = both = 0
    for x, y, x_div, y_div in zip(a, b, a_div, b_div, strict=True):
        x_ok = x is not None and math.isfinite(x)
        y_ok = y is not None and math.isfinite(y)
        if x_div and y_div:
            both += 1
        elif x_div and (y_ok or y_div):
            only_a += 1
        elif y_div and x_ok:
            only_b += 1
        elif x_ok and y_ok:
            pairs.append((float(x), float(y)))  # type: ignore[arg-type]
    diffs = [x - y for x, y in pairs]
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1 for d in diffs if sign * d > 0) + only_b
    losses = sum(1 for d in diffs if sign * d < 0) + only_a
    n = len(diffs) + only_a + only_b + both
    if n == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, None, 0, 0, 0, 1.0)
    mean = statistics.fmean(diffs) if diffs else math.nan
    constant = len(diffs) > 1 and _is_constant(diffs, pairs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    if constant:
        se = 0.0
    # Constant differences leave t undefined, and a pair decided by a divergence has no
    # difference to average: the sign test over every pair decides then.
    t_usable = len(diffs) > 1 and se > 0 and only_a == only_b == 0
    t_p = student_t_p(mean / se, len(diffs) - 1) if t_usable else None
    interval = None
    if len(diffs) > 1 and se > 0:
        quantile = _t_quantile(0.5 + CONFIDENCE / 2, len(diffs) - 1)
        if quantile is not None:
            low, high = sign * mean - quantile * se, sign * mean + quantile * se
            interval = (low, high)
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
        a_diverged=only_a,
        b_diverged=only_b,
        both_diverged=both,
        interval=interval,
        constant=constant,
    )


#: A run whose smoothed validation curve improved by more than this fraction over the last
#: eighth of its budget, and by more than :data:`CONVERGENCE_Z` times its noise, was still
#: improving (its comparisons are budget-limited).
CONVERGENCE_TOLERANCE = 0.01
#: How many standard errors of the curve's own noise a late improvement must exceed to count.
CONVERGENCE_Z = 2.0
#: Where the convergence rule's window starts, as a fraction of the run's steps: after the last
#: learning-rate drop of the step schedules (at 72-75% of the budget).
LATE_FROM = 7 / 8
#: Where the window that measures the curve's noise starts, as a fraction of the run's steps.
NOISE_FROM = 3 / 4


@dataclass(frozen=True)
class _LateWindow:
    """A curve's finite evaluations, oriented so that higher is better, and its late window."""

    values: list[float]
    steps: list[float]
    width: int  # the trailing mean's width
    start: int  # index of the last evaluation at or before LATE_FROM of the final step

    def smoothed(self, index: int) -> float:
        low = max(0, index - self.width + 1)
        return statistics.fmean(self.values[low : index + 1])

    def weights(self) -> list[float]:
        """Coefficients of ``smoothed(end) - smoothed(start)`` on each evaluation."""
        weights = [0.0] * len(self.values)
        for index, sign in ((len(self.values) - 1, 1.0), (self.start, -1.0)):
            low = max(0, index - self.width + 1)
            for i in range(low, index + 1):
                weights[i] += sign / (index + 1 - low)
        return weights


def _late_window(
    values: Iterable[float | None], steps: Iterable[float | None], higher_is_better: bool
) -> _LateWindow | None:
    points = [
        (float(s), float(v))
        for s, v in zip(steps, values, strict=False)
        if s is not None and v is not None and math.isfinite(v) and math.isfinite(s)
    ]
    if len(points) < 2:
        return None
    sign = 1.0 if higher_is_better else -1.0
    before = [i for i, (s, _) in enumerate(points) if s <= LATE_FROM * points[-1][0]]
    return _LateWindow(
        values=[sign * v for _, v in points],
        steps=[s for s, _ in points],
        width=max(1, len(points) // 8),
        start=before[-1] if before else 0,
    )


def late_improvement(
    values: Iterable[float | None], steps: Iterable[float | None], higher_is_better: bool
) -> float | None:
    """Relative improvement of the smoothed curve over the last eighth of the budget.

    The curve (one value per evaluation, at optimizer step ``steps[i]``) is smoothed by a
    trailing mean over ``w = max(1, K // 8)`` evaluations, ``K`` the number of evaluations.  The
    result is ``(end - q) / |q|`` for a higher-is-better curve (``(q - end) / |q|`` otherwise),
    ``end`` the smoothed value at the last evaluation and ``q`` the smoothed value at the last
    evaluation at or before :data:`LATE_FROM` (7/8) of the final step: positive means still
    improving.  The window is the last eighth rather than the last quarter so that the jump of
    a step schedule's last decay (at 75% in the paper's CIFAR schedule) is not read as progress.
    ``None`` with fewer than two finite evaluations, or when ``q`` is 0.

    **The convergence rule** (:func:`is_still_improving`): an optimizer was still improving at
    the end of its budget when the median over its ``n`` seeds of the late improvement exceeds
    both :data:`CONVERGENCE_TOLERANCE` (1%) and :data:`CONVERGENCE_Z` (2) standard errors,
    ``2 * median(late noise) / sqrt(n)``; the *late noise* (:func:`late_noise`) is the standard
    error that the curve's own evaluation-to-evaluation noise gives one run's late
    improvement.  Each comparison that optimizer enters is then *budget-limited*.  A smooth
    curve (classification accuracy, an LSTM's held-out perplexity) has almost no noise, so the
    rule is the 1% tolerance, as it was before the noise term; a noisy one (a GAN's sample
    quality or Frechet distance, which swing by up to tens of percent between evaluations, so
    that the tolerance alone flags flat curves) counts only when its late trend stands out of
    that noise: a flat-but-noisy curve is not flagged, a rising one is.  With the noise known,
    2 standard errors make a false alarm on a flat curve with Gaussian noise 2.5% likely; the
    noise is itself estimated from a few evaluations (and ``noise / sqrt(n)`` treats the median
    as a mean), so expect somewhat more (1 of the tests' 20 synthetic flat curves is flagged).
    """
    window = _late_window(values, steps, higher_is_better)
    if window is None:
        return None
    start = window.smoothed(window.start)
    if start == 0:
        return None
    return (window.smoothed(len(window.values) - 1) - start) / abs(start)


def late_noise(
    values: Iterable[float | None], steps: Iterable[float | None], higher_is_better: bool
) -> float | None:
    """Standard error of :func:`late_improvement` from the curve's own noise.

    The noise is measured on the evaluations from the last one at or before :data:`NOISE_FROM`
    (3/4) of the final step to the end: around a trend that is straight over three
    evaluations, the second difference ``e_i = y[i+1] - 2 y[i] + y[i-1]`` of independent noise
    of standard deviation ``s`` has variance ``6 s^2``, so ``s = median(|e_i|) / (0.6745 *
    sqrt(6))`` (the median, so that one jump - a step schedule's decay at 75% - does not count
    as noise).  The late improvement is the difference of two trailing means with weights
    ``c_i`` on the evaluations, divided by ``|q|``; its standard error is
    ``s * sqrt(sum c_i^2) / |q|``.  ``None`` when :func:`late_improvement` is, or with fewer
    than three evaluations in the noise window (the rule then uses the tolerance alone).
    """
    window = _late_window(values, steps, higher_is_better)
    if window is None:
        return None
    start = window.smoothed(window.start)
    first = [i for i, s in enumerate(window.steps) if s <= NOISE_FROM * window.steps[-1]]
    tail = window.values[first[-1] if first else 0 :]
    if start == 0 or len(tail) < 3:
        return None
    second = [abs(tail[i + 1] - 2 * tail[i] + tail[i - 1]) for i in range(1, len(tail) - 1)]
    noise = statistics.median(second) / (_MAD_TO_STD * math.sqrt(6))
    return noise * math.sqrt(sum(c * c for c in window.weights())) / abs(start)


#: The median absolute deviation of a standard normal variable.
_MAD_TO_STD = 0.6745


def is_still_improving(improvement: float | None, noise: float | None, runs: int = 1) -> bool:
    """The convergence rule (see :func:`late_improvement`): the late improvement exceeds both
    :data:`CONVERGENCE_TOLERANCE` and :data:`CONVERGENCE_Z` standard errors.  For ``runs``
    seeds, ``improvement`` and ``noise`` are the medians over the seeds, and the standard error
    is ``noise / sqrt(runs)`` (the seeds are independent repetitions).  Without a noise figure
    the tolerance alone decides."""
    if improvement is None:
        return False
    error = (noise or 0.0) / math.sqrt(max(1, runs))
    return improvement > max(CONVERGENCE_TOLERANCE, CONVERGENCE_Z * error)


def convergence_metrics(
    values: Iterable[float | None], steps: Iterable[float | None], higher_is_better: bool
) -> dict[str, float | None]:
    """The convergence figures every run stores: ``late_improvement`` and ``late_noise``."""
    values, steps = list(values), list(steps)
    return {
        "late_improvement": late_improvement(values, steps, higher_is_better),
        "late_noise": late_noise(values, steps, higher_is_better),
    }
