"""Statistics used by the report: summaries, sign test, paired comparisons."""

from __future__ import annotations

import math

import pytest

from adabelief.experiments.stats import (
    paired_comparison,
    sign_test_p,
    student_t_p,
    summarize,
)


def test_summarize_ignores_missing_values() -> None:
    s = summarize([1.0, None, 3.0, math.nan])
    assert s.n == 2
    assert s.mean == pytest.approx(2.0)
    assert s.std == pytest.approx(math.sqrt(2.0))
    assert (s.min, s.max) == (1.0, 3.0)
    assert summarize([]).n == 0
    assert math.isnan(summarize([5.0]).std)


def test_sign_test_exact_values() -> None:
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 0) == pytest.approx(0.25)
    assert sign_test_p(2, 2) == pytest.approx(1.0)
    assert sign_test_p(0, 0) == 1.0


def test_paired_t_test_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    a = [0.91, 0.93, 0.92, 0.95, 0.90]
    b = [0.89, 0.92, 0.88, 0.93, 0.90]
    c = paired_comparison(a, b, higher_is_better=True)
    expected = scipy_stats.ttest_rel(a, b)
    assert c.t_p_value == pytest.approx(expected.pvalue)
    assert c.mean_difference == pytest.approx(sum(a) / 5 - sum(b) / 5)
    assert (c.wins, c.losses, c.ties) == (4, 0, 1)
    assert c.advantage > 0


def test_direction_for_lower_is_better_metrics() -> None:
    # A has lower perplexity on every seed: it is better, and by a clear margin.
    a = [80.0, 81.0, 79.5, 80.2]
    b = [90.0, 92.0, 91.0, 90.5]
    c = paired_comparison(a, b, higher_is_better=False)
    assert c.mean_difference < 0
    assert c.advantage > 0
    assert c.verdict == "better"
    reverse = paired_comparison(b, a, higher_is_better=False)
    assert reverse.verdict == "worse"


def test_pairs_with_missing_values_are_dropped_and_small_n_is_flagged() -> None:
    c = paired_comparison([1.0, None, 3.0], [0.5, 2.0, None], higher_is_better=True)
    assert c.n == 1
    assert c.verdict == "too few seeds"
    empty = paired_comparison([None], [1.0], higher_is_better=True)
    assert empty.n == 0


def test_constant_differences_fall_back_to_the_sign_test() -> None:
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], higher_is_better=True)
    assert same.t_p_value is None and same.p_value == 1.0
    assert same.verdict == "no significant difference"
    # One test image on every seed: identical differences. t = inf would call this p = 0; the
    # sign test (3 wins of 3, p = 0.25) cannot call it significant.
    shifted = paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], higher_is_better=True)
    assert shifted.t_p_value is None
    assert shifted.p_value == pytest.approx(0.25)
    assert shifted.verdict == "no significant difference"
    # With six seeds the sign test alone reaches p < 0.05 (2 / 64).
    six = paired_comparison([1.0] * 6, [0.0] * 6, higher_is_better=True)
    assert six.p_value == pytest.approx(2 / 64) and six.verdict == "better"


def test_student_t_p_limits() -> None:
    pytest.importorskip("scipy")
    assert student_t_p(0.0, 4) == pytest.approx(1.0)
    assert student_t_p(math.inf, 4) is None
    assert student_t_p(2.776, 4) == pytest.approx(0.05, abs=1e-3)
